"""POST /v1/images/edits end to end: a tiny random Qwen-Image-Edit-2509 served over HTTP on 127.0.0.1, called
with the official `openai` client, each edit equal to the pipeline's own run.

The tiny edit pipeline's processor cannot be saved to a folder without torchvision (which the tests do not
install), so the application serves the pipeline object in this process, on a real uvicorn server and socket.
"""

from __future__ import annotations

import dataclasses
import io
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = "make the fox blue"


@pytest.fixture(scope="module")
def edit_pipe(tmp_path_factory):
    from teacache_models.zoo import load_zoo_entry
    from tests.test_pipeline_fixtures import save_qwen_image
    from tests.test_pipeline_qwen_edit import pipelines

    _, pipe = pipelines(save_qwen_image(tmp_path_factory.mktemp("qwen")), "QwenImageEditPlusPipeline")
    pipe.zoo_entry = load_zoo_entry("qwen-image-edit-2509")
    with pytest.warns(UserWarning, match="using those of qwen-image"):  # a borrowed fit, announced
        pipe.zoo_entry.install_teacache_fits(pipe.teacache_models())
    return pipe


@pytest.fixture(scope="module")
def edit_server(edit_pipe):
    """The edit model on uvicorn in a thread; yields its base URL."""
    import uvicorn

    from teacache_models.server import Served, create_app

    served = Served(name="qwen-image-edit-2509", pipe=edit_pipe, entry=edit_pipe.zoo_entry, default_teacache=None)
    app = create_app(served, max_queue=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(height: int, width: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str) -> np.ndarray:
    import base64

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_the_openai_client_edits_two_images_as_the_pipeline_does(edit_server, edit_pipe):
    openai = pytest.importorskip("openai")
    from PIL import Image

    from teacache_models import TeaCacheParams

    client = openai.OpenAI(base_url=f"{edit_server}/v1", api_key="unused", max_retries=0)
    inputs = [png_bytes(40, 56, 0), png_bytes(30, 90, 1)]
    response = client.images.edit(
        model="qwen-image-edit-2509",
        image=[("a.png", inputs[0], "image/png"), ("b.png", inputs[1], "image/png")],
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 3, "teacache": {"teacache_thresh": 10.0}},
    )
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in inputs]
    height, width = edit_pipe.output_size(images)  # no size asked: the last input's aspect ratio, as the CLI
    # The cache the server ran (the request's threshold on the entry's fit), as its response reports it.
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in response.model_extra["teacache"].items()}
    assert settings["teacache_thresh"] == 10.0
    params = edit_pipe.default_sampling_params("off", num_inference_steps=3, seed=3, height=height, width=width)
    params = dataclasses.replace(params, teacache_params=TeaCacheParams(**settings))
    expected = edit_pipe(PROMPT, params, image=images)
    served = decoded(response.data[0].b64_json)
    assert served.shape == (height, width, 3)
    np.testing.assert_array_equal(served, expected.to_uint8()[0].numpy())  # run alone: bit for bit
    assert response.data[0].model_extra["teacache"] == expected.teacache_stats.as_dict()
    skipped = expected.teacache_stats.positive.skipped_steps
    assert skipped, "the threshold skips the middle step: the comparison covers a cached step"


def test_bad_edit_requests_are_clear_errors(edit_server):
    from tests.utils import load_script

    tool = load_script("load_test_server")

    def form(*parts: tuple[str, str, bytes | str]) -> bytes:
        body = b""
        for name, filename, value in parts:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            data = value if isinstance(value, bytes) else value.encode()
            body += f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
        return body + b"--b--\r\n"

    def send(*parts):
        raw = form(("prompt", "", PROMPT), *parts)
        return tool.request(
            edit_server, "POST", "/v1/images/edits", raw=raw, content_type="multipart/form-data; boundary=b"
        )

    cases = [
        ((), "image is required: 1 to 3 image file parts"),
        ([("image[]", f"{i}.png", png_bytes(8, 8, i)) for i in range(4)], "takes 1 to 3 input images, got 4"),
        ((("image", "x.png", b"not a picture"),), "image is not an image"),
        ((("image", "x.png", png_bytes(8, 8, 0)), ("size", "", "15x16")), "width must be a multiple of 8"),
        ((("image", "x.png", png_bytes(1, 200, 0)),), "image[0] of 200 x 1 pixels is too narrow"),
    ]
    for parts, words in cases:
        reply = send(*parts)
        assert reply.status == 400, reply.body
        error = reply.json()["error"]
        assert error["param"] in ("image", "size") and words in error["message"], error
        assert "Traceback" not in reply.body.decode()
