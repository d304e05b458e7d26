"""The HTTP server against real server processes on 127.0.0.1 with the shipped demo model.

Each server is `scripts/serve.py` in its own process on a free port; clients are the official `openai`
client and plain HTTP. Outputs are compared with the CLI's and the pipeline's for the same settings.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import io
import json
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.utils import REPO, load_script

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

PROMPT = "a handwritten digit 3"


@pytest.fixture(scope="module")
def tool():
    return load_script("load_test_server")


@pytest.fixture(scope="module")
def server(tool, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    # oneDNN named, not chosen by --linear-kernel auto's timing, which a busy machine can tip either way: the
    # outputs are compared with runs in other processes.
    args = ["--model", "flux-digits", "--threads", "1", "--linear-kernel", "onednn"]
    with tool.ServerProcess(args, log=log) as process:
        yield process


def png_pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def assert_clean_error(reply, status: int, param: str | None = None, words: tuple[str, ...] = ()) -> dict:
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in reply.body.decode() and 'File "' not in reply.body.decode()
    if param is not None:
        assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error
    return error


# ---- images -----------------------------------------------------------------------------------------


def test_openai_client_images_equal_the_cli(server, tmp_path):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    response = client.images.generate(
        model="flux-digits",
        prompt=PROMPT,
        n=2,
        size="16x16",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 8, "teacache": "fast"},
    )
    served = [png_pixels(image.b64_json) for image in response.data]

    cli = load_script("generate")
    output = tmp_path / "cli.png"
    args = ["--model", "flux-digits", "--prompt", PROMPT, "--num-images", "2", "--seed", "7", "--steps", "8"]
    args += ["--teacache", "fast", "--threads", "1", "--linear-kernel", "onednn"]
    assert cli.main([*args, "--no-progress", "--output", str(output)]) == 0
    from PIL import Image

    for index, pixels in enumerate(served):
        expected = np.asarray(Image.open(tmp_path / f"cli-{index}.png").convert("RGB"))
        assert pixels.shape == (16, 16, 3)
        np.testing.assert_array_equal(pixels, expected)
    sidecar = json.loads((tmp_path / "cli.json").read_text())
    extra = response.model_extra
    assert extra["seed"] == 7
    assert response.data[0].model_extra["teacache"] == sidecar["teacache_stats"]
    skipped = sidecar["teacache_stats"]["branches"]["positive"]["skipped_steps"]
    assert skipped, "the fast preset skips steps at 8 steps: the comparison covers cached steps"
    assert set(extra["timings"]) >= {"queue_wait", "text_encoding", "denoising", "decoding", "total"}


def test_concurrent_requests_keep_their_own_cache(server, tool):
    """Requests with different caches in flight together, batched step by step, each get what they would get
    alone: the same TeaCache decisions, the same pixels (float32 rounding may move one level of 255)."""
    from teacache_models.pipelines import load_pipeline

    pipe = load_pipeline("flux-digits")
    pipe.set_linear_kernel("onednn")  # the server's --linear-kernel auto on a float32 CPU
    settings = [("off", 1), ("slow", 2), ("fast", 3), ({"teacache_thresh": 0.9, "max_consecutive_skips": 4}, 4)]
    replies = {}

    def send(index: int, teacache, seed: int) -> None:
        body = {"prompt": PROMPT, "seed": seed, "num_inference_steps": 10, "teacache": teacache, "size": "16x16"}
        replies[index] = tool.request(server.url, "POST", "/v1/images/generations", body)

    threads = [threading.Thread(target=send, args=(i, t, s)) for i, (t, s) in enumerate(settings * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (teacache, seed) in enumerate(settings * 2):
        reply = replies[index]
        assert reply.status == 200, reply.body
        if isinstance(teacache, dict):
            params = pipe.default_sampling_params("slow", seed=seed, num_inference_steps=10)
            import dataclasses

            params = dataclasses.replace(
                params, teacache_params=dataclasses.replace(params.teacache_params, **teacache)
            )
        else:
            params = pipe.default_sampling_params(teacache, seed=seed, num_inference_steps=10)
        expected = pipe([PROMPT], params)
        served = png_pixels(reply.json()["data"][0]["b64_json"]).astype(int)
        assert np.abs(served - expected.to_uint8()[0].numpy()).max() <= 1
        assert_same_record(reply.json()["data"][0]["teacache"], expected.teacache_stats.as_dict())
    off = replies[0].json()["data"][0]["teacache"]["branches"]
    assert off["positive"]["skipped_steps"] == [] and len(off["positive"]["computed_steps"]) == 10
    # They ran together: some steps carried several requests.
    steps = tool.metric(server.url, "teacache_batch_size_count")
    assert steps > 0 and tool.metric(server.url, "teacache_batch_size_sum") > steps


BAD_REQUESTS = [
    # (body or raw bytes, status, param, words in the message)
    (b"{not json", 400, None, ("not valid JSON",)),
    (b"", 400, None, ("empty",)),
    ({"prompt": PROMPT, "colour": "red"}, 422, "colour", ("unknown field 'colour'",)),
    ({"prompt": PROMPT, "n": "2"}, 422, "n", ("valid integer",)),
    ({"prompt": PROMPT, "n": 11}, 422, "n", ("less than or equal to 10",)),
    ({"prompt": PROMPT, "num_inference_steps": 0}, 422, "num_inference_steps", ("greater than or equal to 1",)),
    ({"prompt": PROMPT, "num_inference_steps": 5000}, 422, "num_inference_steps", ("less than or equal to 1000",)),
    ({"n": 1}, 422, "prompt", ("prompt is required",)),
    ({"prompt": ""}, 422, "prompt", ("at least 1 character",)),
    ({"prompt": PROMPT, "size": "15x16"}, 400, "size", ("multiple of 2",)),
    ({"prompt": PROMPT, "size": "big"}, 400, "size", ("WIDTHxHEIGHT",)),
    ({"prompt": PROMPT, "size": "99999x16"}, 400, "size", ("at most",)),
    ({"prompt": PROMPT, "seed": -1}, 422, "seed", ("greater than or equal to 0",)),
    ({"prompt": PROMPT, "guidance_scale": 0.5}, 400, None, ("guidance_scale must be >= 1",)),
    ({"prompt": PROMPT, "model": "dall-e-3"}, 400, "model", ("'dall-e-3' is not served", "flux-digits")),
    (
        {"prompt": PROMPT, "teacache": "turbo"},
        400,
        "teacache",
        ("'turbo'", "['fast', 'forecast', 'forecast-cadence', 'slow']"),
    ),
    ({"prompt": PROMPT, "teacache": {"thresh": 1}}, 400, "teacache", ("unknown fields ['thresh']", "teacache_thresh")),
    ({"prompt": PROMPT, "teacache": {"residual_order": 2}}, 400, "teacache", ("residual_order must be one of",)),
    ({"prompt": PROMPT, "teacache": 3}, 400, "teacache", ("'off', a preset name",)),
    ({"prompt": PROMPT, "response_format": "url"}, 400, "response_format", ("'url' is not supported", "b64_json")),
    ({"prompt": PROMPT, "guidance_scale": 1, "negative_prompt": "x"}, 400, "negative_prompt", ("no effect",)),
    ({"prompt": "   "}, 400, "prompt", ("prompt must not be blank for flux-digits",)),
    (
        {"prompt": PROMPT, "true_cfg_scale": 2.0},
        400,
        "true_cfg_scale",
        ("true_cfg_scale has no effect on flux-digits",),
    ),
    ({"prompt": PROMPT, "teacache": {"indicator": "x"}}, 400, "teacache", ("indicator 'x' is not offered by Flux",)),
    ({"prompt": PROMPT, "size": "8192x8192"}, 400, "size", ("latent tokens per sample; at most 1,048,576",)),
    (
        {"prompt": PROMPT, "guidance_scale": 1e300, "num_inference_steps": 2, "teacache": "off"},
        400,
        None,
        ("non-finite latents", "lower the guidance scale"),
    ),
    ([1, 2], 422, None, ()),
]


@pytest.mark.parametrize("body, status, param, words", BAD_REQUESTS)
def test_bad_input_is_a_clear_error(server, tool, body, status, param, words):
    raw = body if isinstance(body, bytes) else None
    reply = tool.request(server.url, "POST", "/v1/images/generations", None if raw is not None else body, raw=raw)
    assert_clean_error(reply, status, param, words)


def test_endpoints_that_do_not_fit_the_model_refuse(server, tool):
    reply = tool.request(
        server.url,
        "POST",
        "/v1/images/edits",
        raw=b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
        content_type="multipart/form-data; boundary=b",
    )
    assert_clean_error(reply, 400, "image", ("text-to-image", "/v1/images/generations"))
    reply = tool.request(server.url, "POST", "/v1/videos", {"prompt": PROMPT})
    assert_clean_error(reply, 400, "model", ("makes images", "/v1/images/generations"))
    assert_clean_error(tool.request(server.url, "GET", "/v1/nothing"), 404, None, ("no route",))
    assert_clean_error(tool.request(server.url, "GET", "/v1/videos/abc"), 404, "video_id", ("no video job",))


def test_models_health_and_metrics(server, tool):
    models = tool.request(server.url, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["flux-digits"]
    assert models["data"][0]["teacache_presets"] == ["fast", "forecast", "forecast-cadence", "slow"]
    from teacache_models.zoo import load_zoo_entry

    entry = load_zoo_entry("flux-digits")
    default = entry.presets[entry.default_preset].params
    assert models["data"][0]["default_teacache"]["teacache_thresh"] == default.teacache_thresh
    health = tool.request(server.url, "GET", "/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    body = {"prompt": PROMPT, "seed": 1, "num_inference_steps": 6, "teacache": "fast"}
    before = {
        o: tool.metric(server.url, "teacache_steps_total", branch="positive", outcome=o)
        for o in ("computed", "skipped")
    }
    answer = tool.request(server.url, "POST", "/v1/images/generations", body).json()
    branch = answer["data"][0]["teacache"]["branches"]["positive"]
    assert tool.metric(server.url, "teacache_steps_total", branch="positive", outcome="computed") == before[
        "computed"
    ] + len(branch["computed_steps"])
    assert tool.metric(server.url, "teacache_steps_total", branch="positive", outcome="skipped") == before[
        "skipped"
    ] + len(branch["skipped_steps"])
    text = tool.request(server.url, "GET", "/metrics").body.decode()
    assert 'teacache_http_requests_total{method="POST",route="/v1/images/generations",status="200"}' in text
    assert (
        'teacache_http_request_duration_seconds_bucket{le="0.5",method="POST",route="/v1/images/generations"}' in text
    )
    assert "teacache_queue_depth 0.0" in text


# ---- back-pressure, timeouts, disconnects -----------------------------------------------------------

# About 20 s on one core, so always stopped early; the cache is off, since at 1000 steps TeaCache would skip
# nearly every step and finish in about a second.
LONG = {"prompt": PROMPT, "num_inference_steps": 1000, "seed": 0, "teacache": "off"}


@pytest.fixture(scope="module")
def small_server(tool, tmp_path_factory):
    log = tmp_path_factory.mktemp("small") / "server.log"
    args = ["--model", "flux-digits", "--threads", "1", "--max-queue", "2", "--request-timeout", "3"]
    with tool.ServerProcess([*args, "--max-batch", "2"], log=log) as process:
        yield process


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def idle(tool, url: str) -> bool:
    health = tool.request(url, "GET", "/health").json()
    return health["queue_depth"] == 0 and health["running"] is None


def test_full_queue_answers_429_and_timeouts_free_their_slots(small_server, tool):
    url = small_server.url
    replies = []

    def send(body):
        replies.append(tool.request(url, "POST", "/v1/images/generations", body))

    threads = [threading.Thread(target=send, args=(dict(LONG, seed=i),)) for i in range(4)]
    for thread in threads[:2]:
        thread.start()
    wait_until(lambda: tool.request(url, "GET", "/health").json()["running_jobs"] == 2)  # --max-batch 2
    for thread in threads[2:]:
        thread.start()
    wait_until(lambda: tool.request(url, "GET", "/health").json()["queue_depth"] == 2)
    full = tool.request(url, "POST", "/v1/images/generations", {"prompt": PROMPT, "num_inference_steps": 1})
    assert_clean_error(full, 429, None, ("queue is full",))
    assert int(full.headers["retry-after"]) >= 1 and float(full.headers["retry-after-ms"]) > 0
    for thread in threads:
        thread.join(30)
    # The two running ones stopped at their deadline; the two waiting ones expired in the queue.
    for reply in replies:
        assert_clean_error(reply, 504, None, ("--request-timeout",))
    assert idle(tool, url)
    ok = tool.request(url, "POST", "/v1/images/generations", {"prompt": PROMPT, "num_inference_steps": 2})
    assert ok.status == 200
    assert tool.metric(url, "teacache_jobs_total", kind="image", status="failed") == 4


def send_and_disconnect(tool, server, body: dict) -> None:
    """Send an image request and close the connection once its job runs."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        wait_until(lambda: tool.request(server.url, "GET", "/health").json()["running"] is not None)


def test_a_client_that_disconnects_stops_its_work(small_server, tool):
    url = small_server.url
    cancelled = tool.metric(url, "teacache_jobs_total", kind="image", status="cancelled")
    send_and_disconnect(tool, small_server, dict(LONG, seed=5))
    started = time.monotonic()
    wait_until(lambda: idle(tool, url), timeout=2.5)  # well before its 3 s deadline
    assert time.monotonic() - started < 2.5
    assert tool.metric(url, "teacache_jobs_total", kind="image", status="cancelled") == cancelled + 1


# ---- the load test ----------------------------------------------------------------------------------


def test_bounded_load(tool, tmp_path):
    """300 requests at concurrency 16 against batches of 4 and a queue of 8: all answered with the right image,
    none lost."""
    pytest.importorskip("psutil")
    args = ["--model", "flux-digits", "--threads", "1", "--max-queue", "8", "--max-batch", "4"]
    with tool.ServerProcess(args, log=tmp_path / "server.log") as process:

        def body(index: int) -> dict:
            return tool.image_body(index, steps=1, seeds=10)

        check = tool.reference_check(process.url, body, 10)
        report = tool.run_load(process.url, 300, 16, body, check, process.rss_bytes, time_limit_s=120)
        assert tool.metric(process.url, "teacache_jobs_total", kind="image", status="completed") == 310
    figures = report.figures()
    assert report.errors == [] and figures["answered_200"] == 300 and len(report.latencies_s) == 300
    assert 0 < figures["max_queue_depth_seen"] <= 8
    assert report.retried_429 > 0, "16 clients against 4 running and 8 waiting must meet back-pressure"
    # Memory flat: after the first tenth of the requests the server grows by less than 20 MB.
    assert figures["rss_mb"]["end"] - figures["rss_mb"]["after_first_tenth"] < 20, figures["rss_mb"]


# ---- shutdown ----------------------------------------------------------------------------------------


def test_sigterm_finishes_the_running_requests_cancels_the_queue_and_exits_0(tool, tmp_path):
    args = ["--model", "flux-digits", "--threads", "1", "--shutdown-grace", "20", "--max-batch", "2"]
    process = tool.ServerProcess(args, log=tmp_path / "server.log")
    url = process.url
    replies = {}

    def send(name, steps):
        body = {"prompt": PROMPT, "num_inference_steps": steps, "seed": 0}
        try:
            replies[name] = tool.request(url, "POST", "/v1/images/generations", body)
        except OSError as error:
            replies[name] = error

    running = [threading.Thread(target=send, args=(name, 60)) for name in ("first", "second")]
    for thread in running:
        thread.start()
    wait_until(lambda: tool.request(url, "GET", "/health").json()["running_jobs"] == 2)
    queued = threading.Thread(target=send, args=("queued", 5))
    queued.start()
    wait_until(lambda: tool.request(url, "GET", "/health").json()["queue_depth"] == 1)
    process.terminate()
    assert process.process.wait(30) == 0
    for thread in [*running, queued]:
        thread.join()
    for name in ("first", "second"):  # the batch finished within the grace period
        assert replies[name].status == 200 and replies[name].json()["data"][0]["b64_json"]
    assert_clean_error(replies["queued"], 503, None, ("shutdown",))


def test_sigterm_stops_a_job_past_the_grace_period(tool, tmp_path):
    args = ["--model", "flux-digits", "--threads", "1", "--shutdown-grace", "1"]
    process = tool.ServerProcess(args, log=tmp_path / "server.log")
    url = process.url
    thread = threading.Thread(target=lambda: _ignore_errors(tool, url, LONG))
    thread.start()
    wait_until(lambda: tool.request(url, "GET", "/health").json()["running"] is not None)
    started = time.monotonic()
    process.terminate()
    assert process.process.wait(30) == 0
    assert time.monotonic() - started < 10  # the 1000-step job (about 20 s) was stopped
    thread.join()
    log = (tmp_path / "server.log").read_text()
    assert "stopped at step" in log and "the server is shutting down" in log


def assert_same_record(actual, expected, where: str = "teacache") -> None:
    """Equal nested records, floats to float32 rounding."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-5), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key, value in expected.items():
            assert_same_record(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert isinstance(actual, list | tuple) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_record(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


def _ignore_errors(tool, url, body):
    with contextlib.suppress(OSError):  # the server may close the connection while it stops the job
        tool.request(url, "POST", "/v1/images/generations", body)


# ---- packaging ---------------------------------------------------------------------------------------


def test_console_script_and_extra_are_declared():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = config["options.entry_points"]["console_scripts"]
    assert "teacache-serve = teacache_models.serve:main" in scripts
    from teacache_models.serve import main

    assert callable(main)
    server_extra = config["options.extras_require"]["server"].split()
    test_extra = config["options.extras_require"]["test"].split()
    for requirement in server_extra:
        assert requirement in test_extra


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-queue", "0"], "--max-queue must be at least 1"),
        (["--request-timeout", "-1"], "--request-timeout must be a finite number of seconds >= 0"),
        (["--port", "70000"], "--port must be in [1, 65535]"),
        (["--host", ""], "--host is empty: give an address such as 127.0.0.1"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an address this machine"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--teacache", "turbo"], "flux-digits offers 'off' or ['fast', 'forecast', 'forecast-cadence', 'slow']"),
        (["--cfg-parallel"], "launch with torchrun --nproc-per-node 2 scripts/serve.py"),
    ],
)
def test_bad_server_flags_are_one_line_errors(flags, message, capsys):
    from teacache_models.server.main import main

    assert main(["--model", "flux-digits", *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_the_command_without_the_server_extra_is_one_line(missing):
    import subprocess

    # A module set to None in sys.modules cannot be imported: the command runs as on a core-only install.
    code = f"import sys; sys.modules[{missing!r}] = None; from teacache_models.serve import main; sys.exit(main([]))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines() == [
        f"teacache-serve: the server needs the 'server' extra ({missing} is missing): "
        "pip install 'teacache_models[server]'"
    ]


def test_a_port_in_use_is_refused_before_the_model_loads(monkeypatch, capsys):
    from teacache_models.server import main as server_main

    loaded = []
    monkeypatch.setattr(server_main, "load_configured_pipeline", lambda *args: loaded.append(args))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert server_main.main(["--model", "flux-digits", "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in error and "Traceback" not in error
    assert loaded == []


def test_the_listening_socket_is_bound_as_uvicorn_binds_it():
    from teacache_models.server.main import _listen

    # A name resolves to its IPv4 address, as uvicorn's own binding does (clients of localhost reach 127.0.0.1).
    for host, family, address in (
        ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
        ("localhost", socket.AF_INET, "127.0.0.1"),
    ):
        with _listen(host, 0) as listener:
            assert listener.family == family and listener.getsockname()[0] == address


def test_the_core_package_does_not_import_the_server():
    import subprocess

    code = (
        "import sys, teacache_models, teacache_models.pipelines, teacache_models.cli; print('fastapi' in sys.modules)"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert output.stdout.strip() == "False"


# ---- videos: jobs on a tiny random-weight Wan text-to-video folder ------------------------------------

WAN_CONFIG = REPO / "configs" / "wan2.1-t2v-1.3b.yaml"
VIDEO = {"prompt": "a red fox", "size": "48x32", "num_frames": 5, "num_inference_steps": 3, "seed": 1}


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("ftfy")
    from tests.test_pipeline_fixtures import save_wan

    return save_wan(tmp_path_factory.mktemp("wan-t2v"), "t2v")


@pytest.fixture(scope="module")
def video_server(tool, wan_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-server")
    args = ["--model", str(wan_folder), "--config", str(WAN_CONFIG), "--threads", "1", "--linear-kernel", "onednn"]
    args += ["--output-dir", str(folder)]
    with tool.ServerProcess(args, log=folder.parent / "video-server.log") as process:
        process.output_dir = folder
        yield process


def wait_for_status(tool, url: str, video_id: str, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    found = {}

    def reached() -> bool:
        found.update(tool.request(url, "GET", f"/v1/videos/{video_id}").json())
        return found["status"] in statuses

    wait_until(reached, timeout)
    return found


def test_video_job_end_to_end_with_the_openai_client(video_server, tool, wan_folder, tmp_path):
    openai = pytest.importorskip("openai")
    imageio = pytest.importorskip("imageio.v2")
    client = openai.OpenAI(base_url=f"{video_server.url}/v1", api_key="unused", max_retries=0)
    extra = {key: VIDEO[key] for key in ("num_frames", "num_inference_steps", "seed")}
    extra["teacache"] = {"teacache_thresh": 1e6, "coefficients": [1.0, 0.0]}
    job = client.videos.create(prompt=VIDEO["prompt"], size=VIDEO["size"], extra_body=extra)
    assert job.status in ("queued", "in_progress", "completed")
    done = wait_for_status(tool, video_server.url, job.id, ("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["step"] == done["num_steps"] == 3 and done["progress"] == 100
    branches = done["teacache_stats"]["branches"]
    for branch in ("positive", "negative"):  # Wan's zoo default runs CFG: both branches cached apart
        assert (branches[branch]["computed_steps"], branches[branch]["skipped_steps"]) == ([0, 2], [1])
    video = tmp_path / "fox.mp4"
    video.write_bytes(client.videos.download_content(job.id).read())
    with imageio.get_reader(video, format="FFMPEG") as reader:
        frames = np.stack(list(reader.iter_data()))
    assert frames.shape == (5, 32, 48, 3)

    import dataclasses

    from teacache_models.pipelines import load_pipeline
    from teacache_models.zoo import load_zoo_entry

    pipe = load_pipeline(wan_folder, zoo_entry=load_zoo_entry(WAN_CONFIG))
    pipe.set_linear_kernel("onednn")
    params = pipe.default_sampling_params("slow", height=32, width=48, num_frames=5, num_inference_steps=3, seed=1)
    cache = dataclasses.replace(params.teacache_params, teacache_thresh=1e6, coefficients=(1.0, 0.0))
    expected = pipe("a red fox", dataclasses.replace(params, teacache_params=cache)).to_uint8()[0].numpy()
    # H.264 is lossy: the decoded video stays close to the frames written, not equal.
    assert np.abs(frames.astype(float) - expected.astype(float)).mean() < 4
    listed = tool.request(video_server.url, "GET", "/v1/videos").json()
    assert job.id in [item["id"] for item in listed["data"]]


def test_video_jobs_cancel_queued_and_running(video_server, tool):
    url = video_server.url
    running = tool.request(url, "POST", "/v1/videos", dict(VIDEO, num_inference_steps=1000)).json()
    wait_until(lambda: tool.request(url, "GET", f"/v1/videos/{running['id']}").json()["step"] >= 1, 60)
    # Wan's pipeline gives a call one timestep: a job arriving during a batch's generation waits in the queue.
    waiting = tool.request(url, "POST", "/v1/videos", dict(VIDEO, num_inference_steps=1000)).json()
    assert tool.request(url, "GET", f"/v1/videos/{waiting['id']}").json()["status"] == "queued"
    # A queued job is cancelled at once.
    reply = tool.request(url, "DELETE", f"/v1/videos/{waiting['id']}").json()
    assert reply["status"] == "cancelled" and reply["step"] == 0
    assert_clean_error(tool.request(url, "GET", f"/v1/videos/{waiting['id']}/content"), 409, None, ("cancelled",))
    # A running one stops at its next step boundary.
    assert tool.request(url, "DELETE", f"/v1/videos/{running['id']}").json()["cancel_requested"] is True
    stopped = wait_for_status(tool, url, running["id"], ("cancelled",), timeout=30)
    assert 1 <= stopped["step"] < 1000 and stopped["error"] is None
    assert idle(tool, url)
    # A finished job is deleted with its file.
    finished = tool.request(url, "POST", "/v1/videos", VIDEO).json()
    wait_for_status(tool, url, finished["id"], ("completed",))
    assert tool.request(url, "DELETE", f"/v1/videos/{finished['id']}").json()["deleted"] is True
    assert tool.request(url, "GET", f"/v1/videos/{finished['id']}").status == 404


def test_a_failing_job_fails_alone(video_server, tool):
    """A fault inside one job (its MP4 cannot be written) fails that job only; the next one completes."""
    url = video_server.url
    output_dir = video_server.output_dir
    output_dir.rename(output_dir.with_name("moved"))
    output_dir.write_text("a file where the folder was")
    try:
        failed = tool.request(url, "POST", "/v1/videos", VIDEO).json()
        failed = wait_for_status(tool, url, failed["id"], ("completed", "failed"))
    finally:
        output_dir.unlink()
        output_dir.with_name("moved").rename(output_dir)
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert "cannot write" in failed["error"]["message"] and "Traceback" not in failed["error"]["message"]
    assert_clean_error(tool.request(url, "GET", f"/v1/videos/{failed['id']}/content"), 409, None, ("failed",))
    after = tool.request(url, "POST", "/v1/videos", VIDEO).json()
    assert wait_for_status(tool, url, after["id"], ("completed", "failed"))["status"] == "completed"


def _video_form(fields: dict[str, str], files: dict[str, bytes]) -> bytes:
    """A multipart/form-data body (boundary `b`) of text fields and PNG file parts."""
    parts = [f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for name, data in files.items():
        head = f'--b\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
        parts.append(head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + b"--b--\r\n"


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def flf2v_server(tool, tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("ftfy")
    from tests.test_pipeline_fixtures import save_wan

    folder = save_wan(tmp_path_factory.mktemp("wan-flf2v"), "flf2v")
    output = tmp_path_factory.mktemp("flf2v-server")
    args = ["--model", str(folder), "--threads", "1", "--output-dir", str(output)]
    with tool.ServerProcess(args, log=output.parent / "flf2v-server.log") as process:
        yield process


def test_a_first_last_frame_video_takes_its_last_frame(flf2v_server, video_server, tool):
    fields = {k: str(v) for k, v in VIDEO.items()}
    multipart = "multipart/form-data; boundary=b"

    def send(url: str, files: dict[str, bytes]):
        return tool.request(url, "POST", "/v1/videos", raw=_video_form(fields, files), content_type=multipart)

    both = send(flf2v_server.url, {"input_reference": _png(0), "last_image": _png(1)})
    assert both.status == 200, both.body
    assert wait_for_status(tool, flf2v_server.url, both.json()["id"], ("completed", "failed"))["status"] == "completed"
    # The checkpoint needs its last frame; the last frame needs the first; a model without one refuses it.
    assert_clean_error(send(flf2v_server.url, {"input_reference": _png(0)}), 400, "last_image", ("pass last_image",))
    assert_clean_error(send(flf2v_server.url, {"last_image": _png(1)}), 400, "input_reference", ("is required",))
    assert_clean_error(
        send(flf2v_server.url, {"input_reference": _png(0), "last_image": b"no image"}), 400, "last_image"
    )
    assert_clean_error(send(video_server.url, {"last_image": _png(1)}), 400, "last_image", ("takes no last_image",))


def test_video_bad_input(video_server, tool):
    url = video_server.url
    form = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na fox\r\n'
        b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\nthis is no image\r\n--b--\r\n"
    )
    reply = tool.request(url, "POST", "/v1/videos", raw=form, content_type="multipart/form-data; boundary=b")
    assert_clean_error(reply, 400, "input_reference", ("not an image",))
    bad_frames = tool.request(url, "POST", "/v1/videos", dict(VIDEO, num_frames=6))
    assert_clean_error(bad_frames, 400, "num_frames", ("4k+1",))
    assert_clean_error(tool.request(url, "POST", "/v1/images/generations", {"prompt": "x"}), 400, "model")
    assert_clean_error(tool.request(url, "GET", "/v1/videos?limit=0"), 400, "limit")
    # A duration whose frame count overflows (seconds x fps) or exceeds the limit names seconds.
    too_long = {k: v for k, v in VIDEO.items() if k != "num_frames"} | {"seconds": 1000, "fps": 24}
    assert_clean_error(tool.request(url, "POST", "/v1/videos", too_long), 400, "seconds", ("at most 1025",))
    assert_clean_error(tool.request(url, "POST", "/v1/videos", too_long | {"seconds": 1e308}), 422, "seconds")
    huge = dict(VIDEO, size="8192x8192", num_frames=81)
    assert_clean_error(tool.request(url, "POST", "/v1/videos", huge), 400, "size", ("latent tokens per sample",))


# ---- several processes ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_under_torchrun_rank_0_serves_and_the_other_rank_follows(tool, tmp_path):
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    args = ["--model", "flux-digits", "--threads", "1", "--linear-kernel", "onednn", "--cfg-parallel"]
    args += ["--dist-timeout", "60"]
    process = tool.ServerProcess(args, log=tmp_path / "server.log", launcher=launcher)
    try:
        body = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 6, "teacache": "fast", "n": 2}
        reply = tool.request(process.url, "POST", "/v1/images/generations", body)
        assert reply.status == 200, reply.body
        from teacache_models.pipelines import load_pipeline

        pipe = load_pipeline("flux-digits")
        pipe.set_linear_kernel("onednn")
        expected = pipe([PROMPT] * 2, pipe.default_sampling_params("fast", seed=3, num_inference_steps=6))
        for item, pixels in zip(reply.json()["data"], expected.to_uint8().numpy(), strict=True):
            np.testing.assert_array_equal(png_pixels(item["b64_json"]), pixels)
        # Both branches' records, from the two ranks: the same decisions; the fit monitor's diagnostics to float32
        # rounding, since each rank computes its branch at batch size 1 where one process computes both at once.
        assert_same_record(reply.json()["data"][0]["teacache"], expected.teacache_stats.as_dict())
        # A stopped job stops on both ranks, which then serve the next one.
        send_and_disconnect(tool, process, LONG)
        wait_until(lambda: idle(tool, process.url))
        assert tool.request(process.url, "POST", "/v1/images/generations", body).json()["data"] == reply.json()["data"]
        # torchrun, when signalled itself, forwards the signal and exits 1 by its own design: signal rank 0, which
        # drains, tells the other rank to stop, and both exit 0 (so torchrun too).
        import psutil

        ranks = psutil.Process(process.pid).children()
        rank_0 = next(p for p in ranks if p.environ().get("RANK") == "0")
        rank_0.terminate()
        assert process.process.wait(60) == 0
        log = (tmp_path / "server.log").read_text()
        assert "Finished server process" in log and "Traceback" not in log
    finally:
        if process.process.poll() is None:  # a failed check must not leave torchrun and its ranks serving
            _kill_tree(process.pid)


def _kill_tree(pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        for child in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


# ---- the engine alone: faults injected through the pipeline it calls -----------------------------------


class FaultyPipe:
    """A stand-in for a pipeline that fails as a device would: out of memory on a chosen prompt."""

    def __call__(self, prompts, params, progress=None, **inputs):
        import torch

        if prompts[0] == "too big":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        for step in range(params.num_inference_steps):
            progress(step + 1, params.num_inference_steps)
        return prompts


def test_engine_out_of_memory_fails_one_job_and_the_next_runs():
    from teacache_models.params import SamplingParams
    from teacache_models.server.engine import Engine, Job

    engine = Engine(FaultyPipe(), max_queue=4)
    engine.start()
    try:
        failing = engine.submit(Job("image", ["too big"], SamplingParams(num_inference_steps=3)))
        after = engine.submit(Job("image", ["fine"], SamplingParams(num_inference_steps=3)))
        assert after.done.wait(10)
    finally:
        assert engine.stop(5)
    assert failing.status == "failed" and failing.error_code == "server_error"
    assert failing.error.startswith("out of memory on the device") and "Traceback" not in failing.error
    assert after.status == "completed" and after.result == ["fine"] and after.step == 3
