"""LoRA adapters on every family: the same file loaded into diffusers' class (PEFT) and into ours predicts the
same, unfused and fused, at several weights and with two adapters; fusing is undone exactly; unloading leaves
nothing behind; and every bad input is refused before anything is applied."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from teacache_models.layers.linear import onednn_available
from tests import test_flux2, test_qwen_image21
from tests.test_weights_loading import FAMILIES, predict
from tests.utils import assert_parity, randomize_

pytest.importorskip("peft")

# family -> (ours, diffusers class, tiny config, inputs): the weights-loading families, FLUX.2, Qwen-Image-2.1.
LORA_FAMILIES = {
    **FAMILIES,
    "flux2": (
        test_flux2.Flux2Transformer2DModel,
        test_flux2.ReferenceFlux2,
        test_flux2.CONFIGS["tiny-dev"],
        lambda c: test_flux2.make_inputs(c, 2, 2, 3, 5),
    ),
    "qwen_image21": (
        test_qwen_image21.QwenImage21Transformer2DModel,
        test_qwen_image21.ReferenceQwenImage21,
        test_qwen_image21.TINY,
        lambda c: test_qwen_image21.make_inputs(c, *test_qwen_image21.CASES["one-condition-padded"]),
    ),
}
PARITY_FAMILIES = [
    "flux",
    "flux2",
    "wan-t2v",
    "wan-i2v",
    "hunyuan_video",
    "hunyuan_video15",
    "qwen_image",
    "qwen_image21",
    "z_image",
]


def make_lora(model: nn.Module, seed: int, rank: int = 4, prefix: str = "transformer.", every: int = 1) -> dict:
    """A random LoRA in the PEFT layout on every `every`-th linear layer of `model`; every third gets rank 2,
    so that the adapter mixes ranks."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for index, (name, module) in enumerate(linears[::every]):
        r = 2 if index % 3 == 0 else rank
        state_dict[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, module.in_features, generator=generator) * 0.3
        state_dict[f"{prefix}{name}.lora_B.weight"] = torch.randn(module.out_features, r, generator=generator) * 0.3
    return state_dict


def flat(output) -> torch.Tensor:
    """Z-Image predicts one tensor per sample: compare them joined."""
    return torch.cat([t.flatten() for t in output]) if isinstance(output, list) else output


def build(family: str, seed: int = 0):
    ours_class, reference_class, config, make_inputs = LORA_FAMILIES[family]
    reference = randomize_(reference_class(**config), seed).eval()
    ours = ours_class(**config).eval()
    ours.load_state_dict(reference.state_dict())
    return ours, reference, make_inputs(config)


def run(model, inputs) -> torch.Tensor:
    return flat(predict(model, inputs))


def lora_files(ours, tmp_path, count: int = 2) -> list:
    paths = []
    for index in range(count):
        path = tmp_path / f"lora{index}.safetensors"
        save_file(make_lora(ours, seed=10 + index, every=1 + index), str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_lora_matches_diffusers_unfused_fused_weights_and_two_adapters(family, tmp_path):
    ours, reference, inputs = build(family)
    base = run(ours, inputs)
    first, second = lora_files(ours, tmp_path)
    for model in (ours, reference):
        model.load_lora_adapter(str(first), adapter_name="first")
        model.load_lora_adapter(str(second), adapter_name="second")
    assert sorted(ours.peft_config) == ["first", "second"]

    def both(tolerance: float = 1e-5) -> torch.Tensor:
        actual, expected = run(ours, inputs), run(reference, inputs)
        assert_parity(actual, expected, tolerance)
        return actual

    mixed = both()
    assert not torch.equal(mixed, base), "the adapters must change the prediction"
    for weight in (0.0, 0.5, 1.0):
        for model in (ours, reference):
            model.set_adapters("first", weight)
        single = both()
        if weight == 0.0:
            assert torch.equal(single, base), "weight 0 is the base model exactly"
    for model in (ours, reference):
        model.set_adapters(["first", "second"], [0.5, 0.7])
    unfused = both()
    assert ours.active_adapters() == ["first", "second"]

    for model in (ours, reference):
        model.fuse_lora(lora_scale=0.5)
    both()  # fused weights round once more than the unfused sum: equal to float32 rounding
    for model in (ours, reference):
        model.unfuse_lora()
    # As in diffusers, fusing with lora_scale keeps the weights scaled. Diffusers subtracts the fused delta
    # again (exact to rounding); ours restores the base weights bit for bit.
    scaled = both()
    assert not torch.equal(scaled, unfused)
    ours.disable_lora()
    assert torch.equal(run(ours, inputs), base)
    ours.enable_lora()
    assert torch.equal(run(ours, inputs), scaled)
    ours.set_adapters(["first", "second"], [0.5, 0.7])
    assert torch.equal(run(ours, inputs), unfused)


@pytest.mark.parametrize("family", ["flux", "wan-t2v"])
def test_unfuse_restores_base_weights_bit_for_bit(family, tmp_path):
    ours, _, inputs = build(family)
    weights = {k: v.clone() for k, v in ours.state_dict().items()}
    base = run(ours, inputs)
    (path,) = lora_files(ours, tmp_path, count=1)
    ours.load_lora_adapter(path, adapter_name="style")
    unfused = run(ours, inputs)
    ours.fuse_lora()
    fused = run(ours, inputs)
    assert_parity(fused, unfused, 1e-5)
    ours.unfuse_lora()
    assert torch.equal(run(ours, inputs), unfused)
    ours.unload_lora()
    assert torch.equal(run(ours, inputs), base)
    assert {k: torch.equal(v, weights[k]) for k, v in ours.state_dict().items()} == dict.fromkeys(weights, True)


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_unload_leaves_no_module_parameter_or_memory_behind(family, tmp_path):
    ours, _, inputs = build(family)
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    parameters = {n: (p.data_ptr(), p.requires_grad) for n, p in ours.named_parameters()}
    base = run(ours, inputs)
    for path in lora_files(ours, tmp_path):
        ours.load_lora_adapter(path)
    assert len(list(ours.named_modules())) > len(modules)
    ours.fuse_lora()
    ours.unfuse_lora()
    ours.unload_lora()
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules
    assert {n: (p.data_ptr(), p.requires_grad) for n, p in ours.named_parameters()} == parameters
    assert not any(k.startswith(("peft_config", "_lora_unfused", "_lora_base")) for k in vars(ours))
    assert torch.equal(run(ours, inputs), base)
    # Deleting the last adapter is an unload too.
    (path,) = lora_files(ours, tmp_path, count=1)
    name = ours.load_lora_adapter(path)
    ours.delete_adapters(name)
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules


def test_adapter_saved_by_diffusers_loads_with_its_config(tmp_path):
    """A file diffusers' save_lora_adapter writes (alpha != rank in its stored config, no prefix) loads as it is."""
    from peft import LoraConfig

    ours, reference, inputs = build("flux")
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)
    reference.add_adapter(config, adapter_name="trained")
    reference.save_lora_adapter(tmp_path, adapter_name="trained")
    ours.load_lora_adapter(tmp_path, prefix=None, adapter_name="trained")
    assert ours.peft_config["trained"].lora_alpha == 2
    assert_parity(run(ours, inputs), run(reference, inputs), 1e-6)


def test_our_saved_adapter_loads_into_diffusers_and_back(tmp_path):
    ours, reference, inputs = build("qwen_image")
    (path,) = lora_files(ours, tmp_path, count=1)
    ours.load_lora_adapter(path, adapter_name="style")
    ours.set_adapters("style", 0.5)  # a weight is not part of the adapter: the file holds it at 1
    ours.set_adapters("style", 1.0)
    written = ours.save_lora_adapter(tmp_path / "saved", adapter_name="style")
    assert written.name == "pytorch_lora_weights.safetensors"
    reference.load_lora_adapter(str(written.parent), prefix=None, adapter_name="style", weight_name=written.name)
    assert_parity(run(reference, inputs), run(ours, inputs), 1e-6)
    again, _, _ = build("qwen_image")
    again.load_lora_adapter(written, prefix=None)
    assert torch.equal(run(again, inputs), run(ours, inputs))
    with pytest.raises(ValueError, match="Adapter name absent not found in the model"):
        ours.save_lora_adapter(tmp_path / "other", adapter_name="absent")


def test_attention_kwargs_scale_weights_the_adapters_for_one_call(tmp_path):
    ours, reference, inputs = build("flux")
    (path,) = lora_files(ours, tmp_path, count=1)
    for model in (ours, reference):
        model.load_lora_adapter(path)
    plain = run(ours, inputs)
    scaled_inputs = dict(inputs, joint_attention_kwargs={"scale": 0.3})
    assert_parity(run(ours, scaled_inputs), run(reference, scaled_inputs), 1e-6)
    assert torch.equal(run(ours, inputs), plain), "the call's scale does not outlive the call"
    with pytest.raises(ValueError, match="finite number"):
        run(ours, dict(inputs, joint_attention_kwargs={"scale": math.nan}))
    assert torch.equal(run(ours, inputs), plain)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_lora_on_the_onednn_kernel(tmp_path):
    ours, reference, inputs = build("wan-t2v")
    ours.set_linear_kernel("onednn")
    (path,) = lora_files(ours, tmp_path, count=1)
    for model in (ours, reference):
        model.load_lora_adapter(path)
    assert ours.linear_kernel == "onednn", "the adapter's layers run on the model's kernel"
    assert_parity(run(ours, inputs), run(reference, inputs), 1e-5)
    for model in (ours, reference):
        model.fuse_lora()
    assert_parity(run(ours, inputs), run(reference, inputs), 1e-5)
    ours.unfuse_lora()
    ours.unload_lora()
    assert ours.linear_kernel == "onednn"


# ---- bad input ------------------------------------------------------------------------------------


def assert_untouched(model, modules) -> None:
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert "peft_config" not in vars(model)


def test_lora_of_another_family_names_every_unmatched_module_and_applies_nothing(tmp_path):
    flux, _, _ = build("flux")
    wan, _, _ = build("wan-t2v")
    modules = [(n, type(m)) for n, m in wan.named_modules()]
    path = tmp_path / "flux.safetensors"
    save_file(make_lora(flux, 0), str(path))
    with pytest.raises(ValueError, match="not in WanTransformer3DModel") as error:
        wan.load_lora_adapter(path)
    assert "transformer_blocks.0.attn.to_q" in str(error.value) and "nothing was loaded" in str(error.value)
    assert_untouched(wan, modules)
    # Partly matching (Wan's blocks also have attn1.to_q ...): still nothing applied.
    mixed = {**make_lora(wan, 0), **make_lora(flux, 1)}
    with pytest.raises(ValueError, match="not in WanTransformer3DModel"):
        wan.load_lora_adapter(mixed)
    assert_untouched(wan, modules)


def test_rank_and_shape_mismatches_are_named(tmp_path):
    ours, _, _ = build("flux")
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    state_dict = make_lora(ours, 0)
    key = "transformer.transformer_blocks.0.attn.to_q"
    bad_rank = dict(state_dict, **{f"{key}.lora_B.weight": torch.randn(32, 3)})
    with pytest.raises(ValueError, match=r"transformer_blocks.0.attn.to_q: lora_A has rank 4 but lora_B rank 3"):
        ours.load_lora_adapter(bad_rank)
    bigger = dict(state_dict, **{f"{key}.lora_A.weight": torch.randn(2, 64)})
    with pytest.raises(ValueError, match=r"to_q.lora_A has shape \(2, 64\), the layer needs \(rank, 32\)"):
        ours.load_lora_adapter(bigger)
    lonely = {k: v for k, v in state_dict.items() if k != f"{key}.lora_B.weight"}
    with pytest.raises(ValueError, match="to_q has lora_A without its pair"):
        ours.load_lora_adapter(lonely)
    assert_untouched(ours, modules)


def test_a_layout_whose_keys_name_no_module_of_the_model_says_so(tmp_path):
    ours, _, _ = build("flux")
    lora = make_lora(ours, 0, prefix="")
    kohya = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in lora.items()}
    with pytest.raises(
        ValueError, match=r"looks like the Kohya .* none of its keys .* name a module of FluxTransformer2D"
    ):
        ours.load_lora_adapter(kohya)
    assert "peft_config" not in vars(ours)


def test_unknown_format_names_the_formats_tried(tmp_path):
    ours, _, _ = build("flux")
    with pytest.raises(ValueError, match="unknown LoRA format for FluxTransformer2DModel") as error:
        ours.load_lora_adapter({"model.layer.weight_up": torch.ones(2, 2)})
    for name in ("diffusers / PEFT", "Kohya", "XLabs", "BFL"):
        assert name in str(error.value)


def test_missing_file_pickle_and_not_safetensors_are_refused(tmp_path):
    ours, _, _ = build("flux")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ours.load_lora_adapter(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ours.load_lora_adapter(str(tmp_path / "absent.safetensors"))
    pickle = tmp_path / "lora.bin"
    torch.save(make_lora(ours, 0), pickle)
    with pytest.raises(ValueError, match="pickle files are refused"):
        ours.load_lora_adapter(pickle)
    with pytest.raises(ValueError, match="only pickle files"):
        ours.load_lora_adapter(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ours.load_lora_adapter(garbage)
    with pytest.raises(TypeError, match="a path, a Hub id or a state dict"):
        ours.load_lora_adapter(42)
    assert "peft_config" not in vars(ours)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", None, True])
def test_scale_must_be_a_finite_number(bad, tmp_path):
    ours, _, inputs = build("flux")
    (path,) = lora_files(ours, tmp_path, count=1)
    ours.load_lora_adapter(path, adapter_name="a")
    error = (ValueError, TypeError)
    if bad is not None:  # None is "weight 1" for set_adapters, as in diffusers
        with pytest.raises(error, match="finite number"):
            ours.set_adapters("a", bad)
    with pytest.raises(error, match="finite number"):
        ours.fuse_lora(lora_scale=bad)
    with pytest.raises(error, match="finite number"):
        run(ours, dict(inputs, joint_attention_kwargs={"scale": bad}))
    ours.set_adapters("a", 1.0)


def test_adapter_names_and_operations_without_adapters(tmp_path):
    from peft import LoraConfig

    ours, _, _ = build("flux")
    with pytest.raises(ValueError, match="no LoRA adapter loaded"):
        ours.set_adapters("a")
    (path,) = lora_files(ours, tmp_path, count=1)
    ours.load_lora_adapter(path, adapter_name="a")
    with pytest.raises(ValueError, match="already in use"):
        ours.load_lora_adapter(path, adapter_name="a")
    with pytest.raises(ValueError, match=r"Adapter name b not found in the model. Loaded adapters: \['a'\]"):
        ours.set_adapters(["a", "b"])
    with pytest.raises(ValueError, match="2 weights for 1 adapters"):
        ours.set_adapters(["a"], [1.0, 2.0])
    ours.fuse_lora()
    with pytest.raises(ValueError, match="unfuse_lora"):
        ours.delete_adapters("a")
    with pytest.raises(TypeError, match="unexpected keyword argument 'adapter_nam'"):
        ours.load_lora_adapter(path, adapter_nam="b")
    with pytest.raises(ValueError, match=r"no LoRA key starts with 'transformer\.'"):
        ours.load_lora_adapter(make_lora(ours, 0, prefix="unet."))
    for bad in ("", "style.v2"):
        with pytest.raises(ValueError, match=rf"adapter_name must be a non-empty name without '\.', got '{bad}'"):
            ours.load_lora_adapter(path, adapter_name=bad)
    # PEFT keeps an adapter's layers in nn.ModuleDicts under its name: torch refuses "train" with a bare KeyError.
    for bad in ("train", "to"):
        with pytest.raises(ValueError, match=rf"adapter_name '{bad}' is the name of a torch.nn.ModuleDict attribute"):
            ours.load_lora_adapter(path, adapter_name=bad)
        with pytest.raises(ValueError, match=rf"adapter_name '{bad}' is the name of a torch.nn.ModuleDict attribute"):
            ours.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name=bad)
    assert list(ours.peft_config) == ["a"], "a refused name changes nothing"
    for bad in (3, ["a", 3], None):
        with pytest.raises(TypeError, match="adapter_names must be an adapter name or a list of names"):
            ours.set_adapters(bad)


# ---- TeaCache ---------------------------------------------------------------------------------------


def test_teacache_computes_again_when_the_adapters_or_their_weights_change(tmp_path):
    from teacache_models import TeaCacheParams

    ours, _, inputs = build("flux")
    (path,) = lora_files(ours, tmp_path, count=1)
    ours.load_lora_adapter(path, adapter_name="a")
    # A threshold no step reaches: every step after the first is skipped unless something forces it.
    ours.enable_teacache(TeaCacheParams(teacache_thresh=1e9, coefficients=(1.0, 0.0)), num_inference_steps=8)
    changes = {
        2: lambda: ours.set_adapters("a", 0.5),
        3: lambda: None,
        4: ours.disable_lora,
        5: ours.enable_lora,
        6: lambda: None,
    }
    for step in range(7):
        changes.get(step, lambda: None)()
        call_inputs = dict(inputs, timestep=inputs["timestep"] * (1 - step / 10))
        if step == 6:
            call_inputs["joint_attention_kwargs"] = {"scale": 0.5}  # a call's own scale is a change too
        with torch.no_grad(), ours.teacache_step(step):
            cached = flat(ours(**call_inputs, return_dict=False)[0])
        if step in (2, 4, 5, 6):
            assert torch.equal(cached, run(ours, call_inputs)), f"step {step} must compute"
    stats = ours.teacache_stats().positive
    assert stats.computed_steps == (0, 2, 4, 5, 6) and stats.skipped_steps == (1, 3)


# ---- community layouts ----------------------------------------------------------------------------------

COMMUNITY = {
    "flux-kohya": ("flux", "flux_kohya", "FluxLoraLoaderMixin"),
    "flux-xlabs": ("flux", "flux_xlabs", "FluxLoraLoaderMixin"),
    "flux2-ai-toolkit": ("flux2", "flux2_ai_toolkit", "Flux2LoraLoaderMixin"),
    "flux2-peft-names": ("flux2", "flux2_peft_names", "Flux2LoraLoaderMixin"),
    "flux2-kohya": ("flux2", "flux2_kohya", "Flux2LoraLoaderMixin"),
    "wan-original": ("wan-t2v", "wan_original", "WanLoraLoaderMixin"),
    "wan-musubi": ("wan-t2v", "wan_musubi", "WanLoraLoaderMixin"),
    "hunyuan_video-original": ("hunyuan_video", "hunyuan_video_original", "HunyuanVideoLoraLoaderMixin"),
    "qwen_image-community": ("qwen_image", "qwen_image_community", "QwenImageLoraLoaderMixin"),
    "qwen_image21-community": ("qwen_image21", "qwen_image21_community", "QwenImageLoraLoaderMixin"),
    "z_image-community": ("z_image", "z_image_community", "ZImageLoraLoaderMixin"),
}


@pytest.mark.parametrize("case", list(COMMUNITY))
def test_community_layouts_load_as_diffusers_pipelines_load_them(case, tmp_path):
    """The file a community trainer writes, loaded into our model, predicts what diffusers' pipeline loader
    (its family's `lora_state_dict`, then `load_lora_adapter`) makes of it; the caller's tensors are untouched."""
    from diffusers.loaders import lora_pipeline

    from tests import lora_community

    family, writer, loader = COMMUNITY[case]
    ours, reference, inputs = build(family)
    base = run(ours, inputs)
    state_dict = getattr(lora_community, writer)(ours)
    kept = {k: v.clone() for k, v in state_dict.items()}
    path = tmp_path / "community.safetensors"
    save_file(state_dict, str(path))
    # diffusers' converters may scale their input in place: give them their own copy.
    converted = getattr(lora_pipeline, loader).lora_state_dict({k: v.clone() for k, v in state_dict.items()})
    alphas = converted[1] if isinstance(converted, tuple) else None
    converted = converted[0] if isinstance(converted, tuple) else converted
    reference.load_lora_adapter(converted, network_alphas=alphas or None, prefix="transformer")
    ours.load_lora_adapter(state_dict, adapter_name="from_dict")
    assert {k: torch.equal(v, kept[k]) for k, v in state_dict.items()} == dict.fromkeys(kept, True)
    expected = run(reference, inputs)
    assert not torch.equal(expected, base)
    assert_parity(run(ours, inputs), expected, 1e-6)
    ours.unload_lora()
    ours.load_lora_adapter(path)  # the same from the file
    assert_parity(run(ours, inputs), expected, 1e-6)


def test_refused_layouts_say_why():
    ours, _, _ = build("flux")
    with pytest.raises(ValueError, match="Control LoRAs widen x_embedder"):
        ours.load_lora_adapter({"lora_unet_x.query_norm.scale": torch.ones(4)})
    with pytest.raises(ValueError, match="LoKr adapters are loaded in PEFT's layout only"):
        ours.load_lora_adapter({"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.ones(2, 2)})
    with pytest.raises(ValueError, match="LoHa adapters"):
        ours.load_lora_adapter({"transformer.x.hada_w1_a": torch.ones(2, 2), "transformer.x.hada_w2_b": torch.ones(2)})
    with pytest.raises(ValueError, match=r"DoRA in the PEFT layout .* is loaded"):
        ours.load_lora_adapter(
            {"transformer.x.lora_A.weight": torch.ones(2, 2), "transformer.x.dora_scale": torch.ones(2)}
        )
    # A layout recognised whose converter does not fit: the layout is named.
    with pytest.raises(ValueError, match="looks like the Kohya / ComfyUI"):
        ours.load_lora_adapter({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.ones(4, 32)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_adapter_adds_exactly_its_own_tensors(dtype, tmp_path):
    """Loading holds the adapter's tensors and nothing else (in the layer's dtype, on its device); the file's
    tensors are not kept beside them."""
    ours, _, _ = build("flux")
    ours.to(dtype)
    (path,) = lora_files(ours, tmp_path, count=1)
    from safetensors.torch import load_file

    numel = sum(t.numel() for t in load_file(path).values())
    before = {id(p): p for p in ours.parameters()}
    ours.load_lora_adapter(path)
    added = [p for p in ours.parameters() if id(p) not in before]
    assert sum(p.numel() for p in added) == numel
    assert {p.dtype for p in added} == {dtype} and all(p.device.type == "cpu" for p in added)
    assert len(list(ours.buffers())) == len(list(build("flux")[0].buffers()))


def test_stored_config_must_agree_with_the_tensors(tmp_path):
    ours, _, _ = build("flux")
    state_dict = make_lora(ours, 0)
    with pytest.raises(ValueError, match=r"states other ranks than its tensors: .*to_q \(config 8, tensors 4\)"):
        ours.load_lora_adapter(state_dict, metadata={"r": 8, "lora_alpha": 8, "target_modules": ["to_q"]})
    with pytest.raises(TypeError, match=r"`LoraConfig` class could not be instantiated.*'rank'"):
        ours.load_lora_adapter(state_dict, metadata={"rank": 4, "target_modules": ["to_q"]})
    with pytest.raises(ValueError, match="use_dora=True, but its tensors lack DoRA magnitudes"):
        ours.load_lora_adapter(state_dict, metadata={"r": 4, "use_dora": True, "target_modules": ["to_q"]})
    with pytest.raises(ValueError, match="network_alphas and a LoraConfig"):
        ours.load_lora_adapter(state_dict, metadata={"r": 4}, network_alphas={"transformer.x.alpha": 2.0})
    assert "peft_config" not in vars(ours)


def test_default_adapter_names_never_collide(tmp_path):
    ours, _, _ = build("flux")
    (path,) = lora_files(ours, tmp_path, count=1)
    assert [ours.load_lora_adapter(path) for _ in range(2)] == ["default_0", "default_1"]
    ours.delete_adapters("default_0")
    assert ours.load_lora_adapter(path) == "default_2"
    assert sorted(ours.peft_config) == ["default_1", "default_2"]


def test_diffusers_pipeline_loads_a_lora_into_our_transformer(tmp_path):
    """`pipe.load_lora_weights` of a diffusers pipeline whose transformer is ours (`apply_teacache`) goes through
    diffusers' loader into our `load_lora_adapter`, and predicts what diffusers' own transformer does."""
    from teacache_models import TeaCacheParams, apply_teacache
    from tests.test_pipeline_fixtures import save_flux
    from tests.test_pipeline_video import reference

    folder = save_flux(tmp_path / "flux", guidance_embeds=True)
    theirs, ours = reference(folder, "FluxPipeline"), reference(folder, "FluxPipeline")
    apply_teacache(ours, TeaCacheParams(teacache_thresh=0.0))
    assert type(ours.transformer).__module__.startswith("teacache_models")
    path, swapped = tmp_path / "lora.safetensors", tmp_path / "swapped.safetensors"
    save_file(make_lora(theirs.transformer, 0), str(path))
    save_file(make_lora(theirs.transformer, 1), str(swapped))

    def generate(pipe):
        # diffusers' pipeline-level set_adapters looks for its own model classes only: the model's method.
        pipe.transformer.set_adapters("style", 0.5)
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe("a fox", num_inference_steps=2, generator=generator, output_type="pt").images

    for pipe in (theirs, ours):
        pipe.load_lora_weights(str(path), adapter_name="style")
    assert_parity(generate(ours), generate(theirs), 1e-5)
    assert ours.transformer.active_adapters() == ["style"]
    for pipe in (theirs, ours):  # diffusers' hotswap goes through our load_lora_adapter too
        pipe.load_lora_weights(str(swapped), adapter_name="style", hotswap=True)
    assert_parity(generate(ours), generate(theirs), 1e-5)


# ---- FLUX.1 LoRAs in BFL's names (fal, ai-toolkit) ---------------------------------------------------------

# FLUX.1-dev's architecture: the class's defaults (as diffusers'), with the guidance embedder.
FLUX1_DEV = dict(guidance_embeds=True)


def bfl_fused_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of the layers of BFL's FLUX.1 that diffusers' fal converter reads, from the architecture: width
    D, MLP 4 D, modulations of 6 D (double blocks) and 3 D (single blocks), Q, K, V and the MLP's input fused."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * d
    shapes = {"final_layer.linear": (config["in_channels"], d)}
    for i in range(config["num_layers"]):
        for stream in ("img", "txt"):
            shapes |= {
                f"double_blocks.{i}.{stream}_mod.lin": (6 * d, d),
                f"double_blocks.{i}.{stream}_attn.qkv": (3 * d, d),
                f"double_blocks.{i}.{stream}_attn.proj": (d, d),
                f"double_blocks.{i}.{stream}_mlp.0": (mlp, d),
                f"double_blocks.{i}.{stream}_mlp.2": (d, mlp),
            }
    for i in range(config["num_single_layers"]):
        shapes |= {
            f"single_blocks.{i}.modulation.lin": (3 * d, d),
            f"single_blocks.{i}.linear1": (3 * d + mlp, d),
            f"single_blocks.{i}.linear2": (d, d + mlp),
        }
    return shapes


def bfl_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, (rows, columns) in shapes.items():
        state_dict[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, columns, generator=generator)
        state_dict[f"base_model.model.{name}.lora_B.weight"] = torch.randn(rows, rank, generator=generator)
    return state_dict


def test_bfl_layout_converts_as_diffusers_converter_does_on_full_size_flux():
    """diffusers' converter only runs at FLUX.1's full size: compare there, on a model built on the meta device
    (the conversion reads the model's configuration, not its weights) and a rank-1 LoRA on every layer."""
    from diffusers.loaders.lora_conversion_utils import _convert_fal_kontext_lora_to_diffusers

    from teacache_models.lora.flux_bfl import convert_bfl_flux_lora
    from teacache_models.models import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX1_DEV)
    assert (model.config["num_layers"], model.config["num_single_layers"], model.config["num_attention_heads"]) == (
        19,
        38,
        24,
    )
    state_dict = bfl_lora(bfl_fused_shapes(model.config), rank=1, seed=0)
    ours = convert_bfl_flux_lora(model, state_dict)
    theirs = _convert_fal_kontext_lora_to_diffusers(dict(state_dict))
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def test_bfl_layout_on_a_tiny_flux_matches_diffusers_with_the_same_lora_unfused():
    """The same tiny BFL-layout file (a subset of the layers, which diffusers' converter would refuse, with the
    final modulation and an alpha) predicts in ours what diffusers' class predicts with the LoRA it means: a
    fused layer's lora_A shared by its parts, its lora_B cut into their rows, the modulation's halves swapped."""
    ours, reference, inputs = build("flux")
    config = dict(ours.config)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    fused = bfl_fused_shapes(dict(config, num_layers=1, num_single_layers=1))
    picked = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mod.lin", "single_blocks.0.linear1"]
    shapes = {name: fused[name] for name in picked} | {"final_layer.adaLN_modulation.1": (2 * d, d)}
    state_dict = bfl_lora(shapes, rank=3, seed=1)
    state_dict["base_model.model.double_blocks.0.img_attn.qkv.alpha"] = torch.tensor(6.0)

    def part(name: str, which: str) -> torch.Tensor:
        return state_dict[f"base_model.model.{name}.lora_{which}.weight"]

    meant = {}  # the LoRA in diffusers' modules, written out by hand
    qkv_b = part("double_blocks.0.img_attn.qkv", "B").chunk(3)
    for target, rows in zip(("to_q", "to_k", "to_v"), qkv_b, strict=True):
        meant[f"transformer_blocks.0.attn.{target}"] = (part("double_blocks.0.img_attn.qkv", "A"), rows, 6.0)
    meant["transformer_blocks.0.norm1_context.linear"] = (*(part("double_blocks.0.txt_mod.lin", w) for w in "AB"), 3.0)
    linear1_b = part("single_blocks.0.linear1", "B").split([d, d, d, 4 * d])
    for target, rows in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), linear1_b, strict=True):
        meant[f"single_transformer_blocks.0.{target}"] = (part("single_blocks.0.linear1", "A"), rows, 3.0)
    shift, scale = part("final_layer.adaLN_modulation.1", "B").chunk(2)
    meant["norm_out.linear"] = (part("final_layer.adaLN_modulation.1", "A"), torch.cat([scale, shift]), 3.0)
    expected = {}
    for module, (down, up, alpha) in meant.items():
        expected |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up, f"{module}.alpha": alpha}
    alphas = {f"transformer.{k}": v for k, v in expected.items() if k.endswith(".alpha")}
    reference.load_lora_adapter(
        {f"transformer.{k}": v.clone() for k, v in expected.items() if not k.endswith(".alpha")},
        network_alphas=alphas,
    )
    ours.load_lora_adapter(state_dict)
    assert_parity(run(ours, inputs), run(reference, inputs), 1e-6)


def test_bfl_layout_of_another_size_names_what_does_not_fit():
    ours, _, _ = build("flux")
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    flux1_width = dict(num_attention_heads=24, attention_head_dim=128, in_channels=64)
    full = bfl_lora(bfl_fused_shapes(dict(flux1_width, num_layers=2, num_single_layers=1)), rank=1, seed=0)
    with pytest.raises(
        ValueError,
        match=r"does not fit this model; nothing was loaded: .*to_q.lora_A has shape \(1, 3072\), the layer needs "
        r"\(rank, 32\)",
    ):
        ours.load_lora_adapter(full)
    config = dict(ours.config)
    deeper = bfl_lora(bfl_fused_shapes(dict(config, num_layers=3, num_single_layers=1)), rank=1, seed=0)
    with pytest.raises(ValueError, match=r"not in FluxTransformer2DModel .*transformer_blocks\.2\.attn\.add_k_proj"):
        ours.load_lora_adapter(deeper)
    with pytest.raises(ValueError, match=r"does not cover: .*double_blocks\.0\.img_attn\.norm\.query_norm"):
        ours.load_lora_adapter(bfl_lora({"double_blocks.0.img_attn.norm.query_norm": (4, 4)}, rank=1, seed=0))
    assert_untouched(ours, modules)
