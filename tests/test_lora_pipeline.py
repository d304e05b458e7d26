"""LoRA through the pipelines, the CLI's --lora and a zoo entry's `loras`, on the shipped demo models."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from teacache_models.lora import LoraSpec, parse_lora_argument
from teacache_models.pipelines import load_pipeline
from teacache_models.zoo import load_zoo_entry
from tests.test_lora import make_lora

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a handwritten digit 3", "the number seven"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    """A random LoRA on every linear layer of flux-digits, in the layout `save_lora_weights` writes."""
    pipe = load_pipeline("flux-digits")
    path = tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors"
    save_file({k: v * 0.3 for k, v in make_lora(pipe.transformer, seed=3).items()}, str(path))
    return path


def generate(pipe, **overrides):
    params = pipe.default_sampling_params("off", seed=0, num_inference_steps=4, **overrides)
    return pipe(PROMPTS, params).images


def test_pipeline_load_set_fuse_unload(lora_file):
    pipe = load_pipeline("flux-digits")
    base = generate(pipe)
    name = pipe.load_lora_weights(lora_file, adapter_name="style")
    assert name == "style" and pipe.get_list_adapters() == {"transformer": ["style"]}
    styled = generate(pipe)
    assert not torch.equal(styled, base)
    pipe.set_adapters("style", 0.0)
    assert torch.equal(generate(pipe), base)
    pipe.set_adapters(["style"], [1.0])
    assert torch.equal(generate(pipe), styled)
    pipe.fuse_lora()
    torch.testing.assert_close(generate(pipe), styled, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    assert torch.equal(generate(pipe), styled)
    pipe.disable_lora()
    assert torch.equal(generate(pipe), base)
    pipe.enable_lora()
    assert pipe.get_active_adapters() == ["style"]
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe), base) and pipe.get_list_adapters() == {}
    # A file without the transformer. prefix (as a model's save_lora_adapter writes it) loads too.
    folder = lora_file.parent / "unprefixed"
    folder.mkdir(exist_ok=True)
    from safetensors.torch import load_file

    unprefixed = {k.removeprefix("transformer."): v for k, v in load_file(lora_file).items()}
    save_file(unprefixed, str(folder / "adapter.safetensors"))
    pipe.load_lora_weights(folder)
    assert torch.equal(generate(pipe), styled)
    with pytest.raises(ValueError, match="no adapter named"):
        pipe.set_adapters("absent")
    with pytest.raises(ValueError, match=r"no adapter named \['absent'\]"):
        pipe.fuse_lora(adapter_names=["absent"])
    with pytest.raises(TypeError, match="adapter_names must be an adapter name or a list of names"):
        pipe.delete_adapters(3)
    with pytest.raises(ValueError, match="has no transformer_2"):
        pipe.load_lora_weights(lora_file, load_into_transformer_2=True)


def test_lora_argument_parsing():
    assert parse_lora_argument("owner/style") == LoraSpec("owner/style", 1.0)
    assert parse_lora_argument("style.safetensors:0.5") == LoraSpec("style.safetensors", 0.5)
    assert parse_lora_argument("C:/loras/x.safetensors") == LoraSpec("C:/loras/x.safetensors", 1.0)
    for bad in ("style:nan", "style:inf"):
        with pytest.raises(ValueError, match="finite number"):
            parse_lora_argument(bad)


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("generate_cli_lora", REPO / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_lora_flags_and_sidecar(cli, lora_file, tmp_path, capsys):
    common = ["--model", "flux-digits", "--prompt", *PROMPTS, "--steps", "4", "--seed", "0", "--teacache", "off"]
    common += ["--no-progress", "--threads", "1", "--linear-kernel", "aten"]
    assert cli.main([*common, "--output", str(tmp_path / "base.png")]) == 0
    args = [*common, "--lora", f"{lora_file}:0.5", "--lora", str(lora_file), "--output", str(tmp_path / "lora.png")]
    assert cli.main(args) == 0
    record = json.loads((tmp_path / "lora.json").read_text())
    assert [(r["source"], r["scale"]) for r in record["loras"]] == [(str(lora_file), 0.5), (str(lora_file), 1.0)]
    assert (tmp_path / "lora-0.png").read_bytes() != (tmp_path / "base-0.png").read_bytes()
    capsys.readouterr()
    assert cli.main([*common, "--lora", str(tmp_path / "absent.safetensors")]) != 0
    error = capsys.readouterr().err
    assert "--lora: LoRA file" in error and "does not exist" in error
    with pytest.raises(SystemExit):
        cli.main([*common, "--lora", f"{lora_file}:nan"])
    assert "finite number" in capsys.readouterr().err


def test_zoo_entry_lists_loras(lora_file, tmp_path):
    data = yaml.safe_load((REPO / "configs" / "flux-digits.yaml").read_text())
    shutil.copy(lora_file, tmp_path / "style.safetensors")
    data["loras"] = [{"source": "style.safetensors", "scale": 0.5, "adapter_name": "style"}]
    path = tmp_path / "flux-digits-style.yaml"
    path.write_text(yaml.safe_dump(data))
    entry = load_zoo_entry(path)
    assert entry.loras == (LoraSpec(str((tmp_path / "style.safetensors").resolve()), 0.5, None, "style"),)
    pipe = load_pipeline("flux-digits", zoo_entry=entry)
    assert pipe.get_list_adapters() == {"transformer": ["style"]}
    reference = load_pipeline("flux-digits")
    reference.load_lora_weights(lora_file, "style")
    reference.set_adapters("style", 0.5)
    assert torch.equal(generate(pipe), generate(reference))
    for loras, match in (
        ([{"source": "style.safetensors", "weight": 1}], "unknown keys"),
        ([{"source": "style.safetensors", "scale": "high"}], "finite number"),
        ({"source": "x"}, "must be a list"),
    ):
        path.write_text(yaml.safe_dump(dict(data, loras=loras)))
        with pytest.raises(ValueError, match=match):
            load_zoo_entry(path)


def test_wan_expert_pair_loads_each_expert(tmp_path):
    """Wan2.2 A14B: load_into_transformer_2 targets the low-noise expert, as in diffusers."""
    from teacache_models.models import WanTransformer3DModel
    from teacache_models.pipelines.lora import PipelineLoraMixin
    from tests.tiny_configs import WAN_TINY

    @dataclasses.dataclass
    class TwoExperts(PipelineLoraMixin):
        transformer: WanTransformer3DModel
        transformer_2: WanTransformer3DModel

        def teacache_models(self):
            return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    pipe = TwoExperts(WanTransformer3DModel(**WAN_TINY), WanTransformer3DModel(**WAN_TINY))
    path = tmp_path / "lora.safetensors"
    save_file(make_lora(pipe.transformer, 0), str(path))
    pipe.load_lora_weights(path, "high")
    pipe.load_lora_weights(path, "low", load_into_transformer_2=True)
    assert pipe.get_list_adapters() == {"transformer": ["high"], "transformer_2": ["low"]}
    pipe.set_adapters(["high", "low"], [0.5, 0.25])
    assert next(m for m in pipe.transformer.modules() if hasattr(m, "scaling")).scaling == {"high": 0.5}
    assert next(m for m in pipe.transformer_2.modules() if hasattr(m, "scaling")).scaling == {"low": 0.25}
    with pytest.raises(ValueError, match=r"no adapter named \['absent'\]; loaded adapters: \['high', 'low'\]"):
        pipe.delete_adapters(["low", "absent"])
    pipe.delete_adapters("low")  # only transformer_2 holds it
    assert pipe.get_list_adapters() == {"transformer": ["high"]}


def test_calibration_records_the_model_with_its_loras(lora_file, tmp_path, capsys):
    from tests.utils import load_script

    calibrate = load_script("calibrate")
    args = ["--model", "flux-digits", "--seeds", "1", "--steps", "4", "--degree", "1"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 2\n")
    args += ["--prompts-file", str(prompts)]
    assert calibrate.main([*args, "--json", str(tmp_path / "base.json")]) == 0
    assert calibrate.main([*args, "--lora", f"{lora_file}:0.7", "--json", str(tmp_path / "lora.json")]) == 0
    base, lora = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "lora"))
    assert lora["loras"] == [{"source": str(lora_file), "scale": 0.7, "weight_name": None, "adapter_name": None}]
    assert lora["fit"]["num_points"] == base["fit"]["num_points"] == 6  # 3 step pairs x 2 branches
    assert lora["points"] != base["points"], "the LoRA is active while the points are recorded"
    assert "R^2" in capsys.readouterr().out


# ---- the shipped demo LoRAs -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["flux-digits", "wan-digits"])
def test_shipped_demo_lora_makes_bolder_digits_that_still_read_right(model):
    import numpy as np

    from teacache_models.demo import fit_digit_classifier

    path = REPO / "demo_loras" / f"{model}-bold.safetensors"
    if not path.is_file():
        pytest.skip(f"{path.name} is not shipped")
    pipe = load_pipeline(model)
    prompts = [f"a handwritten digit {d}" for d in range(10)]
    base = pipe(prompts, pipe.default_sampling_params("off", seed=0)).images
    pipe.load_lora_weights(path, adapter_name="bold")
    bold = pipe(prompts, pipe.default_sampling_params("off", seed=0)).images
    assert bold.mean() > base.mean() + 0.05, "thicker strokes: more ink"
    read = fit_digit_classifier()
    assert np.mean(read(bold[:, :1] * 2 - 1) == np.arange(10)) >= 0.8


def test_benchmark_lora_script_reports_both_runs(tmp_path):
    from tests.utils import load_script

    if not (REPO / "demo_loras" / "flux-digits-bold.safetensors").is_file():
        pytest.skip("the flux-digits LoRA is not shipped")
    script = load_script("benchmark_lora")
    args = ["--models", "flux-digits", "--digits", "1", "--seeds", "1", "--calibration-seeds", "1"]
    assert script.main([*args, "--json", str(tmp_path / "lora.json")]) == 0
    (result,) = json.loads((tmp_path / "lora.json").read_text())["results"]
    assert set(result["presets"]) == set(load_zoo_entry("flux-digits").presets)
    for row in result["presets"].values():
        for label in ("base", "lora"):
            assert 0 < row[label]["skipped_fraction"] < 1 and row[label]["psnr_db_mean"] > 20
    assert result["mean_ink"]["lora"] > result["mean_ink"]["base"]
    assert result["coefficients"]["lora"]["points"] == 2 * 19  # 19 step pairs x 2 CFG branches
