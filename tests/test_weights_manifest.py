"""weights_manifest.yaml: the shipped entries, the schema check, and shipped folders verified by sha256."""

import hashlib

import pytest
import torch
import yaml

from teacache_models.models import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from teacache_models.weights import CheckpointError, ManifestError, load_manifest, resolve_weights
from teacache_models.zoo import list_zoo, load_zoo_entry
from tests import test_flux
from tests.utils import randomize_

RELEASED = {  # zoo name -> (class, released transformer config, as in models.md)
    "flux1-dev": (FluxTransformer2DModel, dict(guidance_embeds=True)),
    "flux1-schnell": (FluxTransformer2DModel, dict(guidance_embeds=False)),
    "wan2.1-t2v-1.3b": (WanTransformer3DModel, dict(num_attention_heads=12, num_layers=30, ffn_dim=8960)),
    "wan2.1-t2v-14b": (WanTransformer3DModel, dict()),
    "wan2.1-i2v-14b-480p": (WanTransformer3DModel, dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)),
    "wan2.1-i2v-14b-720p": (WanTransformer3DModel, dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)),
    "wan2.2-t2v-a14b": (WanTransformer3DModel, dict()),
    "wan2.2-i2v-a14b": (WanTransformer3DModel, dict(in_channels=36)),
    "wan2.2-ti2v-5b": (
        WanTransformer3DModel,
        dict(num_attention_heads=24, num_layers=30, ffn_dim=14336, in_channels=48, out_channels=48),
    ),
    "hunyuanvideo": (HunyuanVideoTransformer3DModel, dict()),
    "hunyuanvideo1.5-480p-t2v": (HunyuanVideo15Transformer3DModel, dict(task_type="t2v")),
    "hunyuanvideo1.5-720p-t2v": (HunyuanVideo15Transformer3DModel, dict(task_type="t2v", target_size=960)),
    "hunyuanvideo1.5-480p-i2v": (HunyuanVideo15Transformer3DModel, dict()),
    "hunyuanvideo1.5-720p-i2v": (HunyuanVideo15Transformer3DModel, dict(target_size=960)),
    "hunyuanvideo1.5-480p-i2v-step-distilled": (HunyuanVideo15Transformer3DModel, dict(use_meanflow=True)),
    "qwen-image": (QwenImageTransformer2DModel, dict()),
    "qwen-image-2512": (QwenImageTransformer2DModel, dict()),
    "qwen-image-edit": (QwenImageTransformer2DModel, dict()),
    "qwen-image-edit-2509": (QwenImageTransformer2DModel, dict()),
    "qwen-image-layered": (QwenImageTransformer2DModel, dict(use_additional_t_cond=True, use_layer3d_rope=True)),
    "qwen-image-2.1": (QwenImage21Transformer2DModel, dict()),
    # FLUX.2: the reference code's Flux2Params (dev, diffusers' defaults), Klein4BParams and Klein9BParams.
    "flux2-dev": (Flux2Transformer2DModel, dict()),
    "flux2-klein-4b": (
        Flux2Transformer2DModel,
        dict(
            num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
        ),
    ),
    "flux2-klein-9b": (
        Flux2Transformer2DModel,
        dict(
            num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False
        ),
    ),
    "z-image-turbo": (ZImageTransformer2DModel, dict()),
}


def test_every_released_checkpoint_has_an_entry():
    manifest = load_manifest()
    assert set(RELEASED) <= set(manifest)
    assert manifest["flux1-dev"].gated and not manifest["flux1-schnell"].gated
    assert manifest["flux2-dev"].gated and not manifest["flux2-klein-4b"].gated  # the Hub's gate; Apache 2.0
    assert manifest["wan2.2-t2v-a14b"].transformers == ("transformer", "transformer_2")
    for name in list_zoo():
        entry = load_zoo_entry(name)
        assert manifest[entry.manifest].transformer_class == entry.transformer
    for entry in manifest.values():
        # Components only, never the whole repository.
        assert all(p == "model_index.json" or p.endswith("/*") for p in entry.allow_patterns())


@pytest.mark.parametrize("name", list(RELEASED))
def test_parameter_counts_match_the_released_configs(name):
    model_class, config = RELEASED[name]
    with torch.device("meta"):
        count = sum(p.numel() for p in model_class(**config).parameters())
    entry = load_manifest()[name]
    assert entry.transformer_class == model_class.__name__
    assert abs(count - entry.transformer_parameters) <= 5e-4 * count, f"{count:,}"


GOOD = dict(
    family="flux",
    repo="owner/name",
    components=["transformer", "vae"],
    transformer_dtype="bfloat16",
    transformer_parameters=1.0e9,
)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(extra=1), r"unknown keys \['extra'\]"),
        (dict(family="flux3"), "family 'flux3' is not one of"),
        (dict(transformer_dtype="float64"), "transformer_dtype 'float64' is not one of"),
        (dict(transformer_parameters="11.9e9"), "transformer_parameters must be a positive number, got '11.9e9'"),
        (dict(components=[]), "components must be a non-empty list"),
        (dict(components=["transformer", "transformer"]), "lists a folder twice"),
        (dict(transformers=["transformer_2"]), "must all be among components"),
        (dict(repo="not a repo"), "repo must be a Hub repository id"),
        (dict(local_path="demo"), "exactly one of repo"),
        (dict(gated="yes"), "gated must be true or false"),
        (dict(sha256={"transformer/x": "abc"}), "must be 64 lowercase hex digits, got .abc."),
        (dict(sha256={"../x": "0" * 64}), "must be a path relative to the checkpoint root"),
    ],
)
def test_schema_errors_name_the_entry_and_the_problem(change, match, tmp_path):
    entry = {k: v for k, v in (GOOD | change).items() if v is not None}
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"my-model": entry}))
    with pytest.raises(ManifestError, match=rf"entry 'my-model'.*{match}"):
        load_manifest(path)


def test_keys_left_out_take_the_defaults_and_given_ones_are_read(tmp_path):
    path = tmp_path / "manifest.yaml"
    given = dict(
        transformers=["transformer"],
        revision="v1.0",
        gated=True,
        approx_download_gb=3,
        sha256={"transformer/config.json": "a" * 64},
        description=7,
    )
    path.write_text(yaml.safe_dump({"bare": GOOD, "full": GOOD | given}))
    bare, full = load_manifest(path).values()
    assert (bare.name, bare.family, bare.components, bare.transformer_dtype) == (
        "bare",
        "flux",
        ("transformer", "vae"),
        "bfloat16",
    )
    assert (bare.transformers, bare.revision, bare.gated, bare.approx_download_gb) == (
        ("transformer",),
        "main",
        False,
        None,
    )
    assert (bare.sha256, bare.description, bare.repo, bare.local_path) == ({}, "", "owner/name", None)
    assert isinstance(bare.transformer_parameters, float) and bare.transformer_parameters == 1.0e9
    assert (full.revision, full.gated, full.approx_download_gb, full.description) == ("v1.0", True, 3.0, "7")
    assert isinstance(full.approx_download_gb, float) and full.sha256 == given["sha256"]


def test_missing_keys_and_shipped_entries_without_digests(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"m": {"family": "flux"}}))
    with pytest.raises(ManifestError, match=r"missing keys \['components', 'transformer_dtype'"):
        load_manifest(path)
    local = {k: v for k, v in GOOD.items() if k != "repo"} | {"local_path": "demo"}
    path.write_text(yaml.safe_dump({"m": local}))
    with pytest.raises(ManifestError, match="needs the sha256 of every file"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nowhere.yaml")


def test_an_entry_given_twice_is_an_error(tmp_path):
    path = tmp_path / "manifest.yaml"
    entry = yaml.safe_dump({"m": GOOD})
    path.write_text(entry + entry)
    with pytest.raises(ManifestError, match=r"manifest.yaml repeats the key 'm' \(line \d+\)"):
        load_manifest(path)


def shipped_manifest(tmp_path):
    """A tiny Flux saved by diffusers' layout under tmp/demo/, listed with the sha256 of every file."""
    from diffusers import FluxTransformer2DModel as ReferenceFlux

    reference = randomize_(ReferenceFlux(**test_flux.TINY), 0)
    folder = tmp_path / "demo"
    reference.save_pretrained(folder / "transformer", max_shard_size="20KB")
    digests = {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }
    entry = dict(
        family="flux",
        local_path="demo",
        components=["transformer"],
        transformer_dtype="float32",
        transformer_parameters=float(sum(p.numel() for p in reference.parameters())),
        sha256=digests,
    )
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump({"flux-demo": entry}))
    return path, folder, reference


def test_shipped_folder_is_verified_and_loads_by_name(tmp_path):
    path, folder, reference = shipped_manifest(tmp_path)
    assert resolve_weights("flux-demo", manifest=path) == folder
    model = FluxTransformer2DModel.from_pretrained("flux-demo", manifest=path)
    assert torch.equal(model.proj_out.weight, reference.proj_out.weight)


def test_sha256_mismatch_and_unlisted_files(tmp_path):
    path, folder, _ = shipped_manifest(tmp_path)
    shard = sorted((folder / "transformer").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one flipped bit in the tensor data: the header is intact, only the digest can tell
    shard.write_bytes(bytes(data))
    relative = str(shard.relative_to(folder))
    with pytest.raises(CheckpointError, match=rf"{relative}: sha256 [0-9a-f]{{64}}, expected"):
        FluxTransformer2DModel.from_pretrained("flux-demo", manifest=path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{relative}: missing"):
        resolve_weights("flux-demo", manifest=path)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"files without a sha256 in the manifest: notes\.txt"):
        resolve_weights("flux-demo", manifest=path)
