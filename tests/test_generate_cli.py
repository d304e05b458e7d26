"""scripts/generate.py end to end on a tiny local Flux folder: PNG + sidecar, summary line, every error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline_fixtures import save_flux

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "generate.py"
CONFIG = SCRIPT.parent.parent / "configs" / "flux1-dev.yaml"


def load_cli():
    spec = importlib.util.spec_from_file_location("generate_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cli():
    return load_cli()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_flux(tmp_path_factory.mktemp("flux"), guidance_embeds=True)


def base_args(folder, output):
    return [
        "--model", str(folder), "--config", str(CONFIG), "--prompt", "a red fox", "--height", "16", "--width", "24",
        "--steps", "5", "--seed", "3", "--no-progress", "--output", str(output),
    ]  # fmt: skip


def test_png_sidecar_and_summary(cli, folder, tmp_path, capsys):
    output = tmp_path / "out" / "fox.png"
    args = [*base_args(folder, output), "--teacache-thresh", "1e6", "--teacache-coefficients", "1,0"]
    assert cli.main(args) == 0
    from PIL import Image

    with Image.open(output) as image:
        pixels = np.asarray(image)
    assert pixels.shape == (16, 24, 3) and pixels.dtype == np.uint8
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["sampling_params"]["seed"] == 3 and record["sampling_params"]["num_inference_steps"] == 5
    assert record["sampling_params"]["teacache_params"]["teacache_thresh"] == 1e6
    assert record["sampling_params"]["teacache_params"]["coefficients"] == [1.0, 0.0]
    assert record["teacache_stats"]["branches"]["positive"] == {"computed_steps": [0, 4], "skipped_steps": [1, 2, 3]}
    assert set(record["timings_s"]) == {"text_encoding", "denoising", "decoding", "total"}
    assert record["zoo_entry"] == "flux1-dev" and record["dtype"] == "float32"
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "positive: 2 computed, 3 skipped" in out and "wall time" in out
    assert not list(output.parent.glob(".partial-*")), "no temporary file is left behind"


def test_teacache_off_matches_the_python_api(cli, folder, tmp_path):
    output = tmp_path / "off.png"
    assert cli.main([*base_args(folder, output), "--teacache", "off"]) == 0
    from PIL import Image

    from teacache_models import SamplingParams
    from teacache_models.pipelines import load_pipeline

    result = load_pipeline(folder)(
        "a red fox",
        SamplingParams(num_inference_steps=5, guidance_scale=3.5, seed=3, height=16, width=24, teacache_params=None),
    )
    with Image.open(output) as image:
        assert np.array_equal(np.asarray(image), result.to_uint8()[0].numpy())
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["teacache"] == "off" and record["teacache_stats"]["enabled"] is False


def test_list_models_and_help(cli, capsys):
    assert cli.main(["--list-models"]) == 0
    listing = capsys.readouterr().out
    assert "flux1-dev" in listing and "wan2.2-ti2v-5b" in listing
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model", "--config", "--prompt", "--negative-prompt", "--image", "--height", "--width", "--num-frames",
        "--steps", "--guidance-scale", "--seed", "--teacache", "--teacache-thresh", "--teacache-coefficients",
        "--device", "--dtype", "--output", "--list-models",
    ):  # fmt: skip
        assert flag in text


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model", "flux1-deb"], "Did you mean 'flux1-dev'|did you mean 'flux1-dev'"),
        (["--height", "18"], "height must be a multiple of 4"),
        (["--teacache", "medium"], "offers 'off' or"),
        (["--teacache", "off", "--teacache-thresh", "0.3"], "contradicts"),
        (["--teacache-coefficients", "1,x"], "comma-separated numbers"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--prompt", ""], "--prompt is required"),
        (["--image", "missing.png"], "only for image-to-video"),
    ],
)
def test_bad_flags_fail_cleanly(cli, folder, tmp_path, capsys, change, message):
    output = tmp_path / "bad.png"
    args = base_args(folder, output)
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i : i + 2]
    assert cli.main(args) == 1
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not output.exists() and not output.with_suffix(".json").exists()


def test_image_to_video_errors(cli, folder, tmp_path, capsys):
    i2v = str(CONFIG.parent / "wan2.1-i2v-14b-480p.yaml")
    assert cli.main(["--config", i2v, "--model", str(folder), "--prompt", "a fox"]) == 1
    assert "--image FILE is required" in capsys.readouterr().err
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(b"not an image")
    assert cli.main(["--config", i2v, "--model", str(folder), "--prompt", "a fox", "--image", str(garbage)]) == 1
    assert "cannot be read as an image" in capsys.readouterr().err


def test_unwritable_output_and_missing_weights(cli, folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(base_args(folder, blocker / "out.png")) == 1
    assert "cannot be written" in capsys.readouterr().err
    assert cli.main(base_args(folder, tmp_path / "out.jpg")) == 1
    assert "writes .png" in capsys.readouterr().err
    args = base_args(folder, tmp_path / "x.png")
    args[args.index("--model") + 1] = "nobody/no-such-model"
    assert cli.main(args) == 1
    assert "nobody/no-such-model" in capsys.readouterr().err
