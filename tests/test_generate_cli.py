"""scripts/generate.py end to end on tiny local folders: PNG (Flux) and MP4 (Wan) + sidecar, summary line,
every error."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from teacache_models.zoo import list_zoo
from tests.test_pipeline_fixtures import save_flux, save_wan

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "generate.py"
ZOO = SCRIPT.parent.parent / "configs"
CONFIG = ZOO / "flux1-dev.yaml"


def schedule(branch: dict) -> dict:
    """A sidecar branch record without its coefficient fit (measured floats, checked in test_fit_monitor)."""
    assert set(branch["coefficient_fit"]) >= {"points", "mean_ratio", "misfit"}
    return {k: v for k, v in branch.items() if k != "coefficient_fit"}


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
    assert schedule(record["teacache_stats"]["branches"]["positive"]) == {
        "computed_steps": [0, 4],
        "skipped_steps": [1, 2, 3],
        "limit_forced_steps": [],
    }
    assert set(record["timings_s"]) == {"text_encoding", "denoising", "decoding", "total"}
    assert record["zoo_entry"] == "flux1-dev" and record["dtype"] == "float32"
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert "positive: 2 computed, 3 skipped" in out and "wall time" in out
    assert not list(output.parent.glob(".partial-*")), "no temporary file is left behind"


def test_unknown_linear_kernel_is_an_argparse_error(cli, folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([*base_args(folder, tmp_path / "x.png"), "--linear-kernel", "mkl"])
    assert "invalid choice: 'mkl' (choose from 'auto', 'aten', 'onednn')" in capsys.readouterr().err


def test_a_zoo_entry_without_presets_runs_uncached_unless_a_threshold_is_given(cli, tmp_path, capsys):
    from tests.test_pipeline_fixtures import save_z_image

    folder = save_z_image(tmp_path / "z-image")
    args = ["--model", str(folder), "--config", str(ZOO / "z-image-turbo.yaml"), "--prompt", "a red fox"]
    args += ["--height", "16", "--width", "16", "--steps", "4", "--seed", "1", "--no-progress"]
    assert cli.main([*args, "--output", str(tmp_path / "off.png")]) == 0
    assert json.loads((tmp_path / "off.json").read_text())["teacache_stats"]["enabled"] is False
    assert cli.main([*args, "--teacache-thresh", "1e6", "--output", str(tmp_path / "on.png")]) == 0
    record = json.loads((tmp_path / "on.json").read_text())
    assert record["teacache_stats"]["branches"]["positive"]["skipped_steps"] == [1, 2]
    assert cli.main([*args, "--teacache", "slow", "--output", str(tmp_path / "bad.png")]) == 2
    assert "offers 'off' or []" in capsys.readouterr().err
    assert cli.main([*args, "--teacache-residual-order", "1", "--output", str(tmp_path / "bad.png")]) == 2
    assert "--teacache-residual-order need --teacache-thresh" in capsys.readouterr().err


def test_residual_order_and_skip_limit_flags(cli, folder, tmp_path):
    output = tmp_path / "limited.png"
    args = [*base_args(folder, output), "--teacache-thresh", "1e6", "--teacache-coefficients", "1,0"]
    args += ["--teacache-residual-order", "1", "--teacache-max-consecutive-skips", "2"]
    assert cli.main(args) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    params = record["sampling_params"]["teacache_params"]
    assert params["residual_order"] == 1 and params["max_consecutive_skips"] == 2
    # Two skips in a row at most: step 3 computes although the threshold is never reached, and is recorded as
    # the limit's doing (step 4, the last, always computes).
    assert schedule(record["teacache_stats"]["branches"]["positive"]) == {
        "computed_steps": [0, 3, 4],
        "skipped_steps": [1, 2],
        "limit_forced_steps": [3],
    }


def test_teacache_off_matches_the_python_api(cli, folder, tmp_path):
    output = tmp_path / "off.png"
    assert cli.main([*base_args(folder, output), "--teacache", "off"]) == 0
    from PIL import Image

    from teacache_models import SamplingParams
    from teacache_models.layers.linear import resolve_linear_kernel
    from teacache_models.pipelines import load_pipeline

    pipe = load_pipeline(folder)
    # The CLI's default kernel: oneDNN for float32 on CPU where measured faster (equal to float32 rounding only).
    pipe.set_linear_kernel(resolve_linear_kernel("auto", "cpu", "float32"))
    result = pipe(
        "a red fox",
        SamplingParams(num_inference_steps=5, guidance_scale=3.5, seed=3, height=16, width=24, teacache_params=None),
    )
    with Image.open(output) as image:
        assert np.array_equal(np.asarray(image), result.to_uint8()[0].numpy())
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["teacache"] == "off" and record["teacache_stats"]["enabled"] is False
    assert record["linear_kernel"] == resolve_linear_kernel("auto", "cpu", "float32")


def test_list_models_and_help(cli, capsys):
    assert cli.main(["--list-models"]) == 0
    listing = capsys.readouterr().out
    assert "flux1-dev" in listing and "wan2.2-ti2v-5b" in listing
    # One row per zoo entry, its columns aligned however long the longest name is.
    rows = listing.splitlines()
    assert len(rows) == len(list_zoo()) and len({row.index(" steps ") for row in rows}) == 1
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


def test_forecast_method_flags(cli, folder, tmp_path):
    output = tmp_path / "forecast.png"
    args = [*base_args(folder, output), "--teacache-thresh", "1e6", "--teacache-method", "forecast"]
    args += ["--teacache-residual-order", "1", "--teacache-extrapolation-scale", "0.5"]
    args += ["--teacache-forecast-slope", "indicator"]
    assert cli.main(args) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    params = record["sampling_params"]["teacache_params"]
    assert (params["method"], params["residual_order"], params["extrapolation_scale"]) == ("forecast", 1, 0.5)
    assert params["forecast_slope"] == "indicator"
    # The forecast never misses by a millionfold: every step between the forced first and last skips.
    branch = record["teacache_stats"]["branches"]["positive"]
    assert (branch["computed_steps"], branch["skipped_steps"]) == ([0, 4], [1, 2, 3])


def test_forecast_cadence_and_tail_flags(cli, folder, tmp_path):
    output = tmp_path / "cadence.png"
    args = [*base_args(folder, output), "--teacache-thresh", "1e-6", "--teacache-method", "forecast"]
    args += ["--teacache-forecast-cadence", "--teacache-forecast-tail", "2", "--teacache-end-skipping", "0"]
    assert cli.main(args) == 0
    record = json.loads(output.with_suffix(".json").read_text())
    params = record["sampling_params"]["teacache_params"]
    assert (params["forecast_cadence"], params["forecast_tail"], params["end_skipping"]) == (True, 2, 0)
    # A threshold no forecast meets computes every step, except the last two: they are forecast.
    branch = record["teacache_stats"]["branches"]["positive"]
    assert (branch["computed_steps"], branch["skipped_steps"]) == ([0, 1, 2], [3, 4])


@pytest.mark.parametrize(
    "change, message",
    [
        (["--teacache-forecast-tail", "2"], "forecast_tail=2 is a setting of the forecast method"),
        (["--teacache-method", "forecast", "--teacache-forecast-tail", "2"], "end_skipping=1 makes the last steps"),
        (["--teacache-end-skipping", "-1"], "end_skipping must be an integer >= 0, got -1"),
        (["--teacache-method", "magcache"], r"method must be one of \['teacache', 'forecast'\], got 'magcache'"),
        (["--teacache-forecast-slope", "indicator"], r"forecast_slope='indicator' .* but method is 'teacache'"),
        (["--teacache-extrapolation-scale", "2", "--teacache-residual-order", "1"], r"must be in \[0, 1\], got 2"),
        (["--teacache", "off", "--teacache-method", "forecast"], "contradicts --teacache-method"),
        (["--model", "flux1-deb"], "Did you mean 'flux1-dev'|did you mean 'flux1-dev'"),
        (["--height", "18"], "height must be a multiple of 4"),
        (["--teacache", "medium"], "offers 'off' or"),
        (["--teacache", "off", "--teacache-thresh", "0.3"], "contradicts --teacache-thresh"),
        (["--teacache", "off", "--teacache-residual-order", "1"], "contradicts --teacache-residual-order"),
        (["--teacache-residual-order", "2"], r"residual_order must be one of \[0, 1\], got 2"),
        (["--teacache-max-consecutive-skips", "0"], "max_consecutive_skips must be an integer >= 1, got 0"),
        (["--linear-kernel", "onednn", "--dtype", "bfloat16"], "--linear-kernel: linear kernel 'onednn' runs float32"),
        (["--teacache-coefficients", "1,x"], "comma-separated numbers"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--steps", "20000"], r"num_inference_steps must be an integer in \[1, 10000\], got 20000"),
        (["--height", "65536", "--width", "65536"], r"latent tokens per sample; at most 1,048,576 are allowed"),
        (["--prompt", ""], "--prompt must not be blank for .*: only a layered model"),
        (["--image", "missing.png"], "--image has no effect on flux1-dev: it takes no input image"),
        (["--teacache-coefficients", ""], "--teacache-coefficients is empty"),
        (["--teacache", ""], "--teacache is empty: give off, slow, fast"),
        (["--device", "gpu"], "--device: device must be 'cpu', 'cuda', 'cuda:N' .* got 'gpu'"),
        (["--device", ""], "--device: device must be .* got ''"),
        (["--device", "meta"], "--device: device 'meta' holds no data"),
        (["--device", "cuda:99"], "--device: device 'cuda:99' is not available on this machine: "),
        (["--dist-timeout", "nan"], "--dist-timeout must be a finite number of seconds > 0, got nan"),
        (["--model", " "], "--model is empty"),
        (["--negative-prompt", "blurry"], "--negative-prompt 'blurry' has no effect on flux1-dev: no negative branch"),
        (["--true-cfg-scale", "4"], "--true-cfg-scale 4.0 has no effect on flux1-dev: it needs a negative prompt"),
        (
            ["--config", str(ZOO / "wan2.1-t2v-1.3b.yaml")],
            "--config wan2.1-t2v-1.3b is a wan model, but --model .* flux",
        ),
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
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    # One line states the error (loading progress bars of the text encoders may precede it).
    lines = [line for line in error.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and re.search(message, lines[0]) and "Traceback" not in error, error
    assert not output.exists() and not output.with_suffix(".json").exists()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--output", "", "argument --output: expected a file path, got an empty string"),
        ("--config", "", "argument --config: expected a file path, got an empty string"),
        ("--image", "", "argument --image: expected a file path, got an empty string"),
        ("--steps", "2.5", "argument --steps: invalid int value: '2.5'"),
        ("--guidance-scale", "high", "argument --guidance-scale: invalid float value: 'high'"),
        ("--dtype", "float8", "argument --dtype: invalid choice: 'float8'"),
        ("--bogus", "1", "unrecognized arguments: --bogus 1"),
    ],
)
def test_argparse_errors_are_one_line_with_status_2(cli, folder, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base_args(folder, tmp_path / "x.png"), flag, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error


def test_flags_a_model_would_ignore_fail(cli, tmp_path, capsys):
    from tests.test_pipeline_fixtures import save_flux

    schnell = save_flux(tmp_path / "schnell", guidance_embeds=False)
    args = base_args(schnell, tmp_path / "x.png")
    args[args.index("--config") + 1] = str(ZOO / "flux1-schnell.yaml")
    assert cli.main([*args, "--guidance-scale", "3.5"]) == 2
    assert "--guidance-scale 3.5 has no effect on flux1-schnell: this transformer has no guidance embedding" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\n  bad: [\n", "is not valid YAML"),
        ("just text\n", "must be a mapping, got str"),
        (None, "is not a YAML file"),
    ],
    ids=["broken", "not-a-mapping", "a-folder"],
)
def test_broken_config_fails_cleanly(cli, folder, tmp_path, capsys, text, message):
    config = tmp_path / "config.yaml"
    if text is None:
        config = tmp_path
    else:
        config.write_text(text)
    args = base_args(folder, tmp_path / "x.png")
    args[args.index("--config") + 1] = str(config)
    assert cli.main(args) == 2
    assert re.search(f"error: --config: .*{message}", capsys.readouterr().err)


def test_config_alone_loads_its_own_weights(cli, tmp_path, capsys):
    # A renamed copy of a zoo config: its manifest, not a zoo name, says which weights to load.
    config = tmp_path / "my-digits.yaml"
    config.write_text((ZOO / "flux-digits.yaml").read_text().replace("name: flux-digits", "name: my-digits"))
    output = tmp_path / "digit.png"
    args = ["--config", str(config), "--prompt", "a handwritten digit 3", "--steps", "2", "--seed", "0"]
    assert cli.main([*args, "--no-progress", "--output", str(output)]) == 0
    assert json.loads(output.with_suffix(".json").read_text())["zoo_entry"] == "my-digits"
    broken = tmp_path / "broken.yaml"
    broken.write_text(config.read_text().replace("manifest: flux-digits", "manifest: no-such-weights"))
    assert cli.main(["--config", str(broken), "--prompt", "a digit", "--no-progress"]) == 2
    assert "'no-such-weights' is not a manifest entry" in capsys.readouterr().err


def test_write_failure_names_the_output(cli, folder, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    output = tmp_path / "x.png"
    assert cli.main(base_args(folder, output)) == 2
    assert f"--output: cannot write {str(output)!r} in {str(tmp_path)!r}: Permission denied" in capsys.readouterr().err


def test_image_to_video_errors(cli, wan_folders, tmp_path, capsys):
    i2v, folder = str(CONFIG.parent / "wan2.1-i2v-14b-480p.yaml"), wan_folders["i2v"]
    assert cli.main(["--config", i2v, "--model", str(folder), "--prompt", "a fox"]) == 2
    assert "--image FILE is required" in capsys.readouterr().err
    garbage = tmp_path / "bad.png"
    garbage.write_bytes(b"not an image")
    assert cli.main(["--config", i2v, "--model", str(folder), "--prompt", "a fox", "--image", str(garbage)]) == 2
    assert "cannot be read as an image" in capsys.readouterr().err
    # Refused from the zoo entry's task, before any image is read or weights are loaded.
    two = ["--image", str(tmp_path / "missing.png"), "--image", str(garbage)]
    assert cli.main(["--config", i2v, "--model", str(folder), "--prompt", "a fox", *two]) == 2
    assert "--image given 2 times, but wan2.1-i2v-14b-480p takes at most 1 input image" in capsys.readouterr().err


def test_an_editing_entry_refuses_a_run_without_an_image_before_loading(cli, tmp_path, capsys):
    config = tmp_path / "my-edit.yaml"
    text = (ZOO / "qwen-image.yaml").read_text().replace("name: qwen-image", "name: my-edit")
    config.write_text(text.replace("task: t2i", "task: edit"))
    args = ["--config", str(config), "--prompt", "make it blue", "--no-progress", "--output", str(tmp_path / "x.png")]
    assert cli.main(args) == 2  # the weights are not in the cache: an image check after loading would fail otherwise
    assert "error: my-edit needs an input image: --image FILE is required (up to" in capsys.readouterr().err


def test_unwritable_output_and_missing_weights(cli, folder, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(base_args(folder, blocker / "out.png")) == 2
    assert "cannot be written" in capsys.readouterr().err
    assert cli.main(base_args(folder, tmp_path / "out.jpg")) == 2
    assert "writes .png" in capsys.readouterr().err
    args = base_args(folder, tmp_path / "x.png")
    args[args.index("--model") + 1] = "nobody/no-such-model"
    assert cli.main(args) == 1  # the Hub cannot be reached: a failure, not bad input
    assert "nobody/no-such-model" in capsys.readouterr().err


# ---- video: MP4 from a tiny Wan folder ---------------------------------------------------------------

WAN_CONFIG = CONFIG.parent / "wan2.1-t2v-1.3b.yaml"
WAN_I2V_CONFIG = CONFIG.parent / "wan2.1-i2v-14b-480p.yaml"


@pytest.fixture(scope="module")
def wan_folders(tmp_path_factory):
    return {kind: save_wan(tmp_path_factory.mktemp(f"wan-{kind}"), kind) for kind in ("t2v", "i2v", "flf2v")}


def wan_args(folder, config, output):
    return [
        "--model", str(folder), "--config", str(config), "--prompt", "a red fox", "--height", "32", "--width", "48",
        "--num-frames", "5", "--steps", "3", "--seed", "1", "--no-progress", "--output", str(output),
    ]  # fmt: skip


def read_video(path):
    imageio = pytest.importorskip("imageio.v2")
    with imageio.get_reader(path, format="FFMPEG") as reader:
        return np.stack(list(reader.iter_data())), reader.get_meta_data()["fps"]


def test_wan_mp4_sidecar_and_summary(cli, wan_folders, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("ftfy")
    output = tmp_path / "video" / "fox.mp4"
    args = [
        *wan_args(wan_folders["t2v"], WAN_CONFIG, output),
        "--teacache-thresh",
        "1e6",
        "--teacache-coefficients",
        "1,0",
    ]
    assert cli.main(args) == 0
    frames, fps = read_video(output)
    assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8 and fps == 16
    record = json.loads(output.with_suffix(".json").read_text())
    assert record["sampling_params"]["num_frames"] == 5 and record["sampling_params"]["fps"] == 16
    branches = record["teacache_stats"]["branches"]
    for branch in ("positive", "negative"):  # Wan's zoo default runs CFG 5.0: both branches cached apart
        assert schedule(branches[branch]) == {"computed_steps": [0, 2], "skipped_steps": [1], "limit_forced_steps": []}
    assert "negative: 2 computed, 1 skipped" in capsys.readouterr().out
    assert not list(output.parent.glob(".partial-*"))

    from teacache_models.pipelines import load_pipeline
    from teacache_models.zoo import load_zoo_entry

    pipe = load_pipeline(wan_folders["t2v"], zoo_entry=load_zoo_entry(WAN_CONFIG))
    params = pipe.default_sampling_params("slow", height=32, width=48, num_frames=5, num_inference_steps=3, seed=1)
    cache = dataclasses.replace(params.teacache_params, teacache_thresh=1e6, coefficients=(1.0, 0.0))
    expected = pipe("a red fox", dataclasses.replace(params, teacache_params=cache)).to_uint8()[0].numpy()
    # H.264 is lossy: the decoded video stays close to the frames written, not equal.
    assert np.abs(frames.astype(float) - expected.astype(float)).mean() < 4


def test_wan_image_to_video_mp4(cli, wan_folders, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("ftfy")
    from PIL import Image

    picture = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(picture)
    output = tmp_path / "i2v.mp4"
    args = [*wan_args(wan_folders["i2v"], WAN_I2V_CONFIG, output), "--image", str(picture), "--teacache", "off"]
    assert cli.main(args) == 0
    frames, _ = read_video(output)
    assert frames.shape == (5, 32, 48, 3)
    assert json.loads(output.with_suffix(".json").read_text())["images"] == [str(picture)]


def test_wan_first_last_frame_mp4(cli, wan_folders, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("ftfy")
    from PIL import Image

    first, last = tmp_path / "first.png", tmp_path / "last.png"
    for seed, path in enumerate((first, last)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    output = tmp_path / "flf2v.mp4"
    args = [*wan_args(wan_folders["flf2v"], WAN_I2V_CONFIG, output), "--image", str(first), "--teacache", "off"]
    args.remove("--config")
    args.remove(str(WAN_I2V_CONFIG))
    assert cli.main([*args, "--last-image", str(last)]) == 0
    frames, _ = read_video(output)
    assert frames.shape == (5, 32, 48, 3)
    assert json.loads(output.with_suffix(".json").read_text())["last_image"] == str(last)
    assert cli.main(args) == 2  # FLF2V needs the last frame
    assert "pass last_image=<last frame> as well as image=" in capsys.readouterr().err
    no_first = [a for a in args if a not in ("--image", str(first))]
    assert cli.main([*no_first, "--last-image", str(last)]) == 2
    assert "--last-image FILE is the last frame: give the first with --image FILE" in capsys.readouterr().err
    # Refused from the zoo entry's task before loading, and from the loaded pipeline without an entry.
    ti2v = wan_args(wan_folders["t2v"], CONFIG.parent / "wan2.2-ti2v-5b.yaml", tmp_path / "ti2v.mp4")
    assert cli.main([*ti2v, "--image", str(first), "--last-image", str(last)]) == 2
    assert "--last-image has no effect on wan2.2-ti2v-5b: it is for first-last-frame" in capsys.readouterr().err
    t2v = wan_args(wan_folders["t2v"], WAN_CONFIG, tmp_path / "t2v.mp4")
    t2v.remove("--config")
    t2v.remove(str(WAN_CONFIG))
    assert cli.main([*t2v, "--image", str(first), "--last-image", str(last)]) == 2
    assert "it takes no input image" in capsys.readouterr().err
    i2v = wan_args(wan_folders["i2v"], WAN_I2V_CONFIG, tmp_path / "i2v.mp4")
    assert cli.main([*i2v, "--image", str(first), "--last-image", str(last)]) == 2
    assert "last_image needs a first-last-frame checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, change, message",
    [
        ("t2v", ["--num-frames", "6"], r"num_frames must be of the form 4k\+1 for Wan"),
        ("t2v", ["--height", "40"], "height must be a multiple of 16"),
        ("t2v", ["--output", "x.png"], "a video model writes .mp4"),
        ("t2v", ["--config", None, "--image", "first.png"], "--image has no effect on .*: it takes no input image"),
        ("i2v", ["--config", None], "needs an input image: --image FILE is required"),
        (
            "i2v",
            ["--config", None, "--image", "first.png", "--image", "first.png"],
            "--image given 2 times, but .* takes at most 1 input image$",
        ),
    ],
)
def test_bad_video_flags_fail_cleanly(cli, wan_folders, tmp_path, capsys, kind, change, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "first.png")
    output = tmp_path / "bad.mp4"
    args = wan_args(wan_folders[kind], WAN_CONFIG, output)
    for flag, value in zip(change[::2], change[1::2], strict=True):
        if value is None:
            index = args.index(flag)
            del args[index : index + 2]
        elif flag in args and flag != "--image":
            args[args.index(flag) + 1] = str(tmp_path / value) if flag in ("--output", "--image") else value
        else:
            args += [flag, str(tmp_path / value) if flag in ("--output", "--image") else value]
    assert cli.main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob("*.json"))
