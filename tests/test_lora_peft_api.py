"""diffusers' / PEFT's adapter API beyond loading files: `add_adapter` and `set_adapter` (training entry points),
DoRA adapters, and hotswapping an adapter's weights in place; each against diffusers' own class."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from tests.test_lora import build, lora_files, make_lora, run
from tests.utils import assert_parity

peft = pytest.importorskip("peft")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_config(**fields) -> peft.LoraConfig:
    return peft.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ATTENTION, "init_lora_weights": False, **fields}
    )


def check_weight_and_fusing(ours, reference, inputs, name: str) -> None:
    """At weight 0.5, then fused at weight 1, ours predicts what diffusers' class does (fused: to float32
    rounding); unfusing gives ours' unfused prediction back exactly."""
    unfused = run(ours, inputs)
    for model in (ours, reference):
        model.set_adapters(name, 0.5)
    assert_parity(run(ours, inputs), run(reference, inputs), 1e-6)
    for model in (ours, reference):
        model.set_adapters(name, 1.0)
        model.fuse_lora()
    assert_parity(run(ours, inputs), run(reference, inputs), 1e-5)
    assert_parity(run(ours, inputs), unfused, 1e-5)
    ours.unfuse_lora()
    assert torch.equal(run(ours, inputs), unfused)


def test_add_adapter_set_adapter_and_enable_disable_match_diffusers():
    ours, reference, inputs = build("flux")
    base = run(ours, inputs)
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    config = lora_config()
    torch.manual_seed(0)
    ours.add_adapter(config, adapter_name="a")
    config.r = 16  # the adapter keeps the config it was added with
    assert ours.peft_config["a"].r == 4 and ours.peft_config["a"] is not config
    torch.manual_seed(1)
    ours.add_adapter(lora_config(r=2, lora_bias=True), adapter_name="b")
    assert ours.active_adapters() == ["b"], "add_adapter makes the new adapter the only active one"
    for name in ("a", "b"):  # the same adapters in diffusers' class, by what ours hold
        metadata = ours.peft_config[name].to_dict()
        reference.load_lora_adapter(
            ours.get_adapter_state_dict(name), prefix=None, adapter_name=name, metadata=metadata
        )
    reference.set_adapter("b")
    only_b = run(ours, inputs)
    assert_parity(only_b, run(reference, inputs), 1e-6)
    for model in (ours, reference):
        model.set_adapter(["a", "b"])
    both = run(ours, inputs)
    assert_parity(both, run(reference, inputs), 1e-6)
    assert ours.active_adapters() == ["a", "b"] and not torch.equal(both, only_b)
    ours.disable_adapters()
    assert torch.equal(run(ours, inputs), base)
    ours.enable_adapters()
    assert torch.equal(run(ours, inputs), both)
    assert set(ours.get_adapter_state_dict("b")) == {
        f"{n}.lora_{p}"
        for n, m in ours.named_modules()
        if n.endswith(tuple(ATTENTION)) and hasattr(m, "lora_A")
        for p in ("A.weight", "B.weight", "B.bias")
    }

    adapted = [(n, type(m)) for n, m in ours.named_modules()]
    with pytest.raises(TypeError, match=r"must be a peft.LoraConfig .* got LoKrConfig"):
        ours.add_adapter(peft.LoKrConfig(r=4, target_modules=ATTENTION), adapter_name="c")
    with pytest.raises(ValueError, match="'a' is already in use"):
        ours.add_adapter(lora_config(), adapter_name="a")
    with pytest.raises(ValueError, match="not_a_module"):
        ours.add_adapter(lora_config(target_modules=["not_a_module"]), adapter_name="c")
    assert [(n, type(m)) for n, m in ours.named_modules()] == adapted and sorted(ours.peft_config) == ["a", "b"]
    with pytest.raises(ValueError, match="Adapter name c not found in the model"):
        ours.set_adapter("c")
    ours.unload_lora()
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules
    assert all(p.requires_grad for p in ours.parameters()), "add_adapter froze the base weights; unload thaws them"


@pytest.mark.parametrize("family", ["flux", "wan-t2v"])
@pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
def test_dora_matches_diffusers_unfused_weighted_and_fused(family, low_cpu_mem_usage, tmp_path):
    """A DoRA adapter written by diffusers' class (with its magnitude vectors) predicts the same in ours."""
    ours, reference, inputs = build(family)
    base = run(ours, inputs)
    torch.manual_seed(0)
    reference.add_adapter(lora_config(use_dora=True, target_modules=[*ATTENTION, "proj_out"]), adapter_name="d")
    with torch.no_grad():  # magnitudes as trained, not the initial norms (with which DoRA equals the LoRA)
        for name, parameter in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.rand(parameter.shape, generator=torch.Generator().manual_seed(3)) + 0.5)
    reference.save_lora_adapter(tmp_path, adapter_name="d")
    ours.load_lora_adapter(tmp_path, prefix=None, adapter_name="d", low_cpu_mem_usage=low_cpu_mem_usage)
    assert ours.peft_config["d"].use_dora
    unfused = run(ours, inputs)
    assert_parity(unfused, run(reference, inputs), 1e-6)
    lora_only = {k: v for k, v in ours.get_adapter_state_dict("d").items() if "magnitude" not in k}
    again, _, _ = build(family)
    again.load_lora_adapter(lora_only, prefix=None, metadata=dict(ours.peft_config["d"].to_dict(), use_dora=False))
    assert not torch.equal(run(again, inputs), unfused), "the magnitudes take part"
    check_weight_and_fusing(ours, reference, inputs, "d")
    assert not any(getattr(m, "_caches", None) for m in ours.modules()), "unfusing drops DoRA's cached norms"
    ours.unload_lora()
    assert torch.equal(run(ours, inputs), base)


def test_dora_magnitude_shape_and_partial_magnitudes_are_refused(tmp_path):
    ours, _, _ = build("flux")
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    state_dict = make_lora(ours, 0)
    key = "transformer.transformer_blocks.0.attn.to_q"
    with pytest.raises(ValueError, match=r"DoRA magnitudes .* are missing for"):
        ours.load_lora_adapter(dict(state_dict, **{f"{key}.lora_magnitude_vector": torch.ones(32)}))
    everywhere = {
        f"{k.removesuffix('.lora_B.weight')}.lora_magnitude_vector": torch.ones(v.shape[0])
        for k, v in state_dict.items()
        if k.endswith("lora_B.weight")
    }
    with pytest.raises(ValueError, match=r"to_q.lora_magnitude_vector has shape \(7,\), the layer needs \(32,\)"):
        ours.load_lora_adapter({**state_dict, **everywhere, f"{key}.lora_magnitude_vector": torch.ones(7)})
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules


# ---- hotswap ----------------------------------------------------------------------------------------


def adapter_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize(("family", "every"), [("flux", 1), ("qwen_image", 1), ("flux", 2)])
def test_hotswap_matches_a_fresh_load_and_diffusers_keeping_the_same_parameters(family, every, tmp_path):
    """Hotswapping gives what loading the new file into a fresh model gives (every=2: the new file adapts half
    the modules, and the others then add nothing), and, where diffusers' class accepts the swap, what it gives."""
    ours, reference, inputs = build(family)
    first, second = (tmp_path / "first.safetensors", tmp_path / "second.safetensors")
    save_file(make_lora(ours, seed=1), str(first))
    save_file(make_lora(ours, seed=2, every=every), str(second))
    fresh, _, _ = build(family)
    fresh.load_lora_adapter(second)
    expected = run(fresh, inputs)
    ours.load_lora_adapter(first, adapter_name="style")
    before = adapter_parameters(ours)
    key = ours.lora_state_key()
    ours.load_lora_adapter(second, adapter_name="style", hotswap=True)
    after = adapter_parameters(ours)
    assert list(after) == list(before) and all(after[n] is before[n] for n in before), "no module or tensor replaced"
    assert ours.lora_state_key() != key, "TeaCache sees the new weights"
    assert torch.equal(run(ours, inputs), expected)
    ours.set_adapters("style", 0.5)
    fresh.set_adapters("default_0", 0.5)
    assert torch.equal(run(ours, inputs), run(fresh, inputs)), "weights scale the new adapter's own alphas"
    if every == 1:  # diffusers refuses a swap whose per-module alphas differ (here: fewer modules)
        reference.load_lora_adapter(first, adapter_name="style")
        reference.load_lora_adapter(second, adapter_name="style", hotswap=True)
        reference.set_adapters("style", 0.5)
        assert_parity(run(ours, inputs), run(reference, inputs), 1e-6)


def test_hotswap_of_other_ranks_after_enable_lora_hotswap(tmp_path):
    ours, _, inputs = build("flux")
    first, second = (tmp_path / "first.safetensors", tmp_path / "second.safetensors")
    save_file(make_lora(ours, seed=1, rank=3), str(first))
    save_file(make_lora(ours, seed=2, rank=8), str(second))
    fresh, _, _ = build("flux")
    fresh.load_lora_adapter(second)
    ours.enable_lora_hotswap(target_rank=8)
    ours.load_lora_adapter(first, adapter_name="style")
    padded = {n: p.shape for n, p in adapter_parameters(ours).items()}
    assert all(8 in shape for shape in padded.values()), "the first adapter is padded to the target rank"
    ours.load_lora_adapter(second, adapter_name="style", hotswap=True)
    assert {n: p.shape for n, p in adapter_parameters(ours).items()} == padded
    assert_parity(run(ours, inputs), run(fresh, inputs), 1e-6)


def test_hotswap_replaces_weights_in_place_and_refuses_what_cannot_be_swapped(tmp_path, caplog):
    ours, _, inputs = build("flux")
    plain, _, _ = build("flux")  # files made from a model without adapters: their keys name its modules only
    ours.load_lora_adapter(make_lora(plain, seed=1, every=2), adapter_name="style")
    kept = {n: p.detach().clone() for n, p in adapter_parameters(ours).items()}
    output = run(ours, inputs)

    def unchanged() -> None:
        assert {n: torch.equal(p, kept[n]) for n, p in adapter_parameters(ours).items()} == dict.fromkeys(kept, True)
        assert torch.equal(run(ours, inputs), output)

    with pytest.raises(ValueError, match=r"no existing adapter by that name.*loaded: \['style'\]"):
        ours.load_lora_adapter(make_lora(plain, seed=2, every=2), adapter_name="other", hotswap=True)
    with pytest.raises(
        ValueError, match=r"adapts .* modules that adapter 'style' does not adapt: .*transformer_blocks"
    ):
        ours.load_lora_adapter(make_lora(plain, seed=2), adapter_name="style", hotswap=True)
    unchanged()
    with_bias = make_lora(plain, seed=2, every=2)
    with_bias.update(
        {k.replace("weight", "bias"): torch.ones(v.shape[0]) for k, v in with_bias.items() if "lora_B" in k}
    )
    with pytest.raises(ValueError, match="cannot replace adapter 'style': lora_bias: False -> True"):
        ours.load_lora_adapter(with_bias, adapter_name="style", hotswap=True)
    with pytest.raises(ValueError, match="cannot replace adapter 'style': use_dora: False -> True"):
        dora = make_lora(plain, seed=2, every=2)
        dora.update(
            {
                k.replace("lora_B.weight", "lora_magnitude_vector"): torch.ones(v.shape[0])
                for k, v in dora.items()
                if "lora_B" in k
            }
        )
        ours.load_lora_adapter(dora, adapter_name="style", hotswap=True)
    unchanged()
    ours.fuse_lora()
    with pytest.raises(ValueError, match="fused into the weights; unfuse_lora"):
        ours.load_lora_adapter(make_lora(plain, seed=2, every=2), adapter_name="style", hotswap=True)
    ours.unfuse_lora()
    unchanged()

    with pytest.raises(RuntimeError, match="Call `enable_lora_hotswap` before loading the first adapter"):
        ours.enable_lora_hotswap(target_rank=8)
    with pytest.raises(ValueError, match=r"check_compiled must be one of .* got 'bogus'"):
        ours.enable_lora_hotswap(target_rank=8, check_compiled="bogus")
    with pytest.raises(ValueError, match="target_rank must be a positive integer"):
        ours.enable_lora_hotswap(target_rank=0, check_compiled="ignore")
    with caplog.at_level(logging.WARNING):
        ours.enable_lora_hotswap(target_rank=8, check_compiled="warn")
    assert "recommended to call `enable_lora_hotswap` before loading the first adapter" in caplog.text
    (path,) = lora_files(plain, tmp_path, count=1)
    ours.load_lora_adapter(path, adapter_name="next")  # the adapter prepared: padded to rank 8
    assert {p.shape[0] for n, p in adapter_parameters(ours).items() if ".lora_A.next." in n} == {8}


def test_save_options_and_safetensors_only(tmp_path):
    ours, _, _ = build("flux")
    ours.to(torch.bfloat16)
    ours.add_adapter(lora_config(), adapter_name="a")
    written = ours.save_lora_adapter(tmp_path, adapter_name="a", upcast_before_saving=True)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(written).values()} == {torch.float32}
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}, "the model itself is not cast"
    with pytest.raises(ValueError, match="safe_serialization=False is refused"):
        ours.save_lora_adapter(tmp_path, adapter_name="a", safe_serialization=False)
    for option in ("use_safetensors", "safe_serialization"):
        with pytest.raises(ValueError, match=f"{option}=False: only safetensors"):
            ours.load_lora_adapter(written, prefix=None, **{option: False})
    assert ours.load_lora_adapter(written, prefix=None, use_safetensors=True, safe_serialization=True) == "default_1"


# ---- LoKr ---------------------------------------------------------------------------------------------------


def lokr_file(reference, tmp_path, **fields) -> None:
    """A LoKr adapter written by diffusers' class (random factors, its config in the metadata)."""
    config = peft.LoKrConfig(**{"r": 4, "alpha": 4, "target_modules": ATTENTION, "init_weights": False, **fields})
    torch.manual_seed(0)
    reference.add_adapter(config, adapter_name="kron")
    reference.save_lora_adapter(tmp_path, adapter_name="kron")


@pytest.mark.parametrize(("family", "fields"), [("flux", {}), ("qwen_image", {"decompose_both": True})])
def test_lokr_matches_diffusers_weighted_fused_and_without_its_config(family, fields, tmp_path):
    ours, reference, inputs = build(family)
    base = run(ours, inputs)
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    lokr_file(reference, tmp_path, **fields)
    ours.load_lora_adapter(tmp_path, prefix=None, adapter_name="kron")
    assert type(ours.peft_config["kron"]).__name__ == "LoKrConfig"
    loaded = run(ours, inputs)
    assert not torch.equal(loaded, base)
    assert_parity(loaded, run(reference, inputs), 1e-6)
    check_weight_and_fusing(ours, reference, inputs, "kron")

    # Without the stored config, both derive it from the factors (diffusers' own derivation).
    tensors = ours.get_adapter_state_dict("kron")
    ours.unload_lora()
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules
    again, fresh_reference, _ = build(family)
    again.load_lora_adapter(tensors, prefix=None)
    fresh_reference.load_lora_adapter(dict(tensors), prefix=None)
    assert_parity(run(again, inputs), run(fresh_reference, inputs), 1e-6)
    again.delete_adapters("default_0")
    assert [(n, type(m)) for n, m in again.named_modules()] == modules


def test_lokr_that_does_not_fit_or_mixes_with_lora_is_refused(tmp_path):
    ours, reference, _ = build("flux")
    lokr_file(reference, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    modules = [(n, type(m)) for n, m in ours.named_modules()]
    key = next(k for k in tensors if k.endswith("to_q.lokr_w1"))
    wrong = dict(tensors, **{key: torch.ones(3, 3)})
    with pytest.raises(ValueError, match=r"\(LoKr\) does not fit .*to_q: the factors \(3, 3\) and"):
        ours.load_lora_adapter(wrong, prefix=None)
    with pytest.raises(ValueError, match=r"nothing was loaded: not_a_module \(no such module\)"):
        ours.load_lora_adapter({**tensors, "not_a_module.lokr_w1": torch.ones(2, 2)}, prefix=None)
    with pytest.raises(ValueError, match=r"norm_q \(RMSNorm: LoKr adapters are loaded on linear layers only\)"):
        ours.load_lora_adapter({"transformer_blocks.0.attn.norm_q.lokr_w1": torch.ones(2, 2)}, prefix=None)
    assert [(n, type(m)) for n, m in ours.named_modules()] == modules

    ours.load_lora_adapter(tensors, prefix=None, adapter_name="kron")
    with pytest.raises(ValueError, match="this is a LoRA adapter and the model holds adapters of another kind"):
        ours.load_lora_adapter(make_lora(build("flux")[0], 0), adapter_name="lora")
    with pytest.raises(ValueError, match="this is a LoRA adapter"):
        ours.add_adapter(lora_config(), adapter_name="lora")
    with pytest.raises(ValueError, match="hotswap=True and network_alphas are for LoRA adapters"):
        ours.load_lora_adapter(tensors, prefix=None, adapter_name="kron", hotswap=True)
    with pytest.raises(ValueError, match="hotswap=True and network_alphas are for LoRA adapters"):
        ours.load_lora_adapter(tensors, prefix=None, network_alphas={"x.alpha": 1.0})
    assert list(ours.peft_config) == ["kron"]
    ours.unload_lora()
    ours.load_lora_adapter(make_lora(build("flux")[0], 0), adapter_name="lora")
    with pytest.raises(ValueError, match="this is a LoKr adapter and the model holds adapters of another kind"):
        ours.load_lora_adapter(tensors, prefix=None)
