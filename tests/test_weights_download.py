"""Resolving names to folders and the download script, with huggingface_hub mocked: no test reaches the network."""

import importlib.util
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors
from huggingface_hub.file_download import DryRunFileInfo

from teacache_models.models import FluxTransformer2DModel, WanTransformer3DModel
from teacache_models.weights import (
    CheckpointError,
    WeightsUnavailableError,
    load_manifest,
    plan_download,
    resolve_weights,
)
from tests.test_weights_loading import save_reference

FLUX_DEV = load_manifest()["flux1-dev"]


def http_error(error_class, message="refused"):
    response = mock.Mock(headers={}, status_code=401)
    return error_class(message, response=response)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """snapshot_download replaced by a recorder that returns tmp_path (or raises `hub.error`)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if getattr(hub_state, "error", None) is not None:
            raise hub_state.error
        if kwargs.get("dry_run"):
            return hub_state.plan
        return str(tmp_path)

    hub_state = mock.Mock(calls=calls, error=None, plan=[])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return hub_state


def test_manifest_name_fetches_only_its_components(hub, tmp_path):
    folder = resolve_weights("flux1-dev", cache_dir="/cache", token="hf_x")
    assert folder == tmp_path
    [(repo, kwargs)] = hub.calls
    assert repo == "black-forest-labs/FLUX.1-dev"
    assert kwargs == dict(
        revision="main",
        allow_patterns=FLUX_DEV.allow_patterns(),
        cache_dir="/cache",
        token="hf_x",
        local_files_only=False,
        dry_run=False,
    )
    resolve_weights("flux1-dev", components=["transformer"], revision="abc123")
    assert hub.calls[-1][1]["allow_patterns"] == ["model_index.json", "transformer/*"]
    assert hub.calls[-1][1]["revision"] == "abc123"
    with pytest.raises(ValueError, match=r"flux1-dev has no components \['unet'\]"):
        resolve_weights("flux1-dev", components=["unet"])


def test_hub_ids_local_paths_and_unknown_names(hub, tmp_path):
    assert resolve_weights("someone/some-model", components=["transformer"]) == tmp_path
    assert hub.calls[-1][0] == "someone/some-model"
    assert hub.calls[-1][1]["allow_patterns"] == ["model_index.json", "transformer/*"]
    resolve_weights("someone/original", components=[""])
    assert "*.safetensors" in hub.calls[-1][1]["allow_patterns"]
    assert resolve_weights(tmp_path) == tmp_path
    calls = len(hub.calls)
    with pytest.raises(ValueError, match=r"'no such thing' is not a manifest entry .*flux1-dev"):
        resolve_weights("no such thing")
    with pytest.raises(TypeError, match="name_or_path must be a string or a path, got int"):
        resolve_weights(3)
    assert len(hub.calls) == calls


def test_offline_mode_is_honoured_and_says_how_to_download(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_weights("flux1-schnell")
    assert hub.calls[-1][1]["local_files_only"] is True
    hub.error = errors.LocalEntryNotFoundError("not cached")
    with pytest.raises(
        WeightsUnavailableError, match=r"offline mode is on .*`python scripts/download_weights.py flux1-schnell`"
    ):
        resolve_weights("flux1-schnell")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsUnavailableError, match="offline mode is on"):
        resolve_weights("flux1-schnell", local_files_only=True)
    with pytest.raises(WeightsUnavailableError, match="the Hub could not be reached"):
        resolve_weights("flux1-schnell")


def test_gated_repository_without_a_token(hub, monkeypatch):
    hub.error = http_error(errors.GatedRepoError)
    with pytest.raises(
        WeightsUnavailableError,
        match=r"FLUX.1-dev is a gated repository and no token was given or found: accept its license at "
        r"https://huggingface.co/black-forest-labs/FLUX.1-dev",
    ):
        resolve_weights("flux1-dev")
    with pytest.raises(WeightsUnavailableError, match="the token used has no access to it"):
        resolve_weights("flux1-dev", token="hf_without_access")
    hub.error = http_error(errors.RepositoryNotFoundError)
    with pytest.raises(WeightsUnavailableError, match="someone/missing is not a Hub repository"):
        resolve_weights("someone/missing")


def test_sha256_listed_for_a_hub_entry_is_verified(hub, tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(
        "m:\n  family: flux\n  repo: a/b\n  components: [transformer, vae]\n  transformer_dtype: bfloat16\n"
        f"  transformer_parameters: 1.0e+3\n  sha256:\n    transformer/config.json: '{'0' * 64}'\n"
        f"    vae/config.json: '{'1' * 64}'\n"
    )
    with pytest.raises(CheckpointError, match=r"transformer/config\.json: sha256 .*, expected 0000"):
        resolve_weights("m", manifest=manifest)
    # Components that were not fetched are not checked.
    with pytest.raises(CheckpointError) as caught:
        resolve_weights("m", manifest=manifest, components=["transformer"])
    assert "vae" not in str(caught.value)


def test_from_pretrained_by_name_fetches_the_subfolder_and_checks_the_family(hub, tmp_path):
    with pytest.raises(ValueError, match="flux1-dev holds FluxTransformer2DModel weights, not WanTransformer3DModel"):
        WanTransformer3DModel.from_pretrained("flux1-dev")
    with pytest.raises(ValueError, match=r"has transformers in \['transformer', 'transformer_2'\], not in 'vae'"):
        WanTransformer3DModel.from_pretrained("wan2.2-t2v-a14b", subfolder="vae")
    assert hub.calls == []
    reference = save_reference("flux", tmp_path)
    # The tiny checkpoint is not the 12B release: the parameter count check catches the wrong weights.
    with pytest.raises(CheckpointError, match=r"flux1-schnell/transformer has [\d,]+ parameters, the manifest expects"):
        FluxTransformer2DModel.from_pretrained("flux1-schnell", torch_dtype="bfloat16", cache_dir="/c")
    assert hub.calls[-1][1]["allow_patterns"] == ["model_index.json", "transformer/*"]
    assert hub.calls[-1][1]["cache_dir"] == "/c"
    model = FluxTransformer2DModel.from_pretrained("someone/tiny-flux")
    assert torch.equal(model.proj_out.weight, reference.proj_out.weight)


def load_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "download_weights.py"
    spec = importlib.util.spec_from_file_location("download_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script_prints_the_plan_before_fetching(hub, capsys):
    hub.plan = [
        DryRunFileInfo("c0ffee", 23_800_000_000, "transformer/diffusion_pytorch_model.safetensors", "/x", False, True),
        DryRunFileInfo("c0ffee", 380, "transformer/config.json", "/x", True, False),
    ]
    printed_before_fetch = []
    fetch = huggingface_hub.snapshot_download

    def recording(repo_id, **kwargs):
        if not kwargs.get("dry_run"):
            printed_before_fetch.append(capsys.readouterr().out)
        return fetch(repo_id, **kwargs)

    with mock.patch.object(huggingface_hub, "snapshot_download", recording):
        status = load_script().main(["flux1-dev", "--token", "hf_x", "--components", "transformer"])
    assert status == 0
    [plan] = printed_before_fetch
    assert "fetch     23.8 GB  transformer/diffusion_pytorch_model.safetensors" in plan
    assert "1 of 2 files to download: 23.8 GB (380 B already cached)" in plan
    assert hub.calls[0][1]["dry_run"] is True
    assert hub.calls[1][1]["allow_patterns"] == ["model_index.json", "transformer/*"]
    assert "flux1-dev: ready in" in capsys.readouterr().out


def test_download_script_dry_run_and_errors(hub, capsys):
    assert load_script().main(["--dry-run", "qwen-image"]) == 0
    assert all(kwargs.get("dry_run") for _, kwargs in hub.calls)
    hub.error = http_error(errors.GatedRepoError)
    assert load_script().main(["flux1-dev"]) == 1
    assert "is a gated repository" in capsys.readouterr().err


def test_plan_of_a_hub_id_and_of_a_gated_entry(hub):
    hub.plan = [DryRunFileInfo("c0ffee", 380, "transformer/config.json", "/x", True, False)]
    plan = plan_download("someone/some-model", token="hf_x", components=["transformer"])
    assert (plan.source, plan.revision, plan.bytes_cached, plan.bytes_to_download) == (
        "someone/some-model",
        "main",
        380,
        0,
    )
    [(repo, kwargs)] = hub.calls
    assert repo == "someone/some-model" and kwargs["dry_run"] is True and kwargs["token"] == "hf_x"
    assert kwargs["allow_patterns"] == ["model_index.json", "transformer/*"]
    with pytest.raises(ValueError, match="neither a manifest entry nor a Hugging Face repository id"):
        plan_download("no-such-model")
    hub.error = http_error(errors.HfHubHTTPError)
    with pytest.raises(WeightsUnavailableError, match=r"flux1-dev: black-forest-labs/FLUX\.1-dev is a gated"):
        plan_download("flux1-dev", revision="abc")
    assert hub.calls[-1][1]["revision"] == "abc"


def test_dtype_is_passed_through(hub, tmp_path):
    save_reference("flux", tmp_path)
    model = FluxTransformer2DModel.from_pretrained("someone/tiny-flux", torch_dtype=torch.float16)
    assert model.proj_out.weight.dtype == torch.float16
