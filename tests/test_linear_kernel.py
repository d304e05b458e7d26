"""The choice of linear kernel: where oneDNN runs, where PyTorch's kernel takes over, and the bad names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from teacache_models.layers import linear as linear_module
from teacache_models.layers.linear import (
    OneDNNLinear,
    linear_activation,
    linear_kernel_of,
    onednn_available,
    resolve_linear_kernel,
    set_linear_kernel,
)
from teacache_models.models import WanExpertPair, WanTransformer3DModel
from tests.tiny_configs import WAN_TINY

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")


class Counting:
    """Counts the calls of the oneDNN kernel and forwards them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._kernel = linear_module._onednn_linear
        monkeypatch.setattr(linear_module, "_onednn_linear", self)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self._kernel(*args)


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3, bias=False), nn.LayerNorm(3))


@needs_onednn
def test_swap_keeps_parameters_and_keys_and_switches_back():
    model = block()
    weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    assert set_linear_kernel(model, "onednn") == 2
    assert type(model[0]) is OneDNNLinear and isinstance(model[0], nn.Linear)
    assert linear_kernel_of(model) == "onednn"
    assert {n: torch.equal(p, weights[n]) for n, p in model.state_dict().items()} == dict.fromkeys(weights, True)
    assert set_linear_kernel(model, "aten") == 2
    assert type(model[0]) is nn.Linear and linear_kernel_of(model) == "aten"
    assert linear_kernel_of(nn.GELU()) is None


@needs_onednn
def test_inference_runs_onednn_and_matches_to_float32_rounding(monkeypatch):
    model, x = block(), torch.randn(2, 5, 6)
    with torch.no_grad():
        expected = model(x)
        set_linear_kernel(model, "onednn")
        counter = Counting(monkeypatch)
        actual = model(x)
        strided = model(torch.randn(5, 2, 6).transpose(0, 1))
    assert counter.calls == 4  # two layers, two calls
    torch.testing.assert_close(actual, expected)
    assert strided.shape == (2, 5, 3)
    with torch.inference_mode():
        model(x)
    assert counter.calls == 6


@needs_onednn
@pytest.mark.parametrize(
    "case",
    ["gradient", "bfloat16", "float64", "autocast"],
)
def test_other_uses_take_pytorchs_kernel_exactly(case, monkeypatch):
    model, x = block(), torch.randn(2, 5, 6)
    reference = block()
    if case == "bfloat16":
        model, reference, x = model.bfloat16(), reference.bfloat16(), x.bfloat16()
    if case == "float64":
        model, reference, x = model.double(), reference.double(), x.double()
    set_linear_kernel(model, "onednn")
    counter = Counting(monkeypatch)
    # Under CPU autocast a float32 model's products run in bfloat16, which oneDNN's operator would not do.
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
    if case == "gradient":
        out = model(x.requires_grad_())
        out.sum().backward()
        assert model[0].weight.grad is not None and x.grad is not None
    else:
        with torch.no_grad(), precision:
            out = model(x)
    assert counter.calls == 0
    with torch.no_grad(), precision:
        expected = reference(x)
    assert out.dtype == expected.dtype and torch.equal(out, expected)


@needs_onednn
def test_compiled_model_traces_pytorchs_kernel(monkeypatch):
    model, x = block(), torch.randn(2, 5, 6)
    set_linear_kernel(model, "onednn")
    with torch.no_grad():
        eager = model(x)
        counter = Counting(monkeypatch)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert counter.calls == 0
    torch.testing.assert_close(compiled, eager)


def test_bad_kernel_names_are_rejected():
    with pytest.raises(ValueError, match=r"one of \['aten', 'onednn'\], got 'cuda'"):
        set_linear_kernel(block(), "cuda")
    with pytest.raises(ValueError, match="'auto' or one of"):
        resolve_linear_kernel("mkl", "cpu", torch.float32)
    model = WanTransformer3DModel(**WAN_TINY)
    with pytest.raises(ValueError, match="linear kernel must be"):
        model.set_linear_kernel("fast")
    assert model.linear_kernel == "aten", "a rejected name changes nothing"


def test_missing_onednn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(linear_module, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match="lacks; use 'aten'"):
        set_linear_kernel(block(), "onednn")
    assert resolve_linear_kernel("auto", "cpu", torch.float32) == "aten"


def timed_as(calls: list, aten: float, onednn: float):
    def measure():
        calls.append((aten, onednn))
        return aten, onednn

    return measure


@pytest.fixture
def verdict_store(monkeypatch, tmp_path):
    """A fresh on-disk verdict store and an empty per-process cache; a real timing is never run."""
    monkeypatch.setenv("TEACACHE_MODELS_CACHE", str(tmp_path))
    monkeypatch.setattr(linear_module, "onednn_available", lambda: True)
    linear_module._timed_check.cache_clear()
    yield tmp_path / "linear_kernel.json"
    linear_module._timed_check.cache_clear()


def test_auto_picks_onednn_only_where_the_timing_finds_it_faster(monkeypatch, tmp_path, verdict_store):
    calls = []
    for index, ((aten, onednn), expected) in enumerate(
        [((1.0, 0.5), "onednn"), ((1.0, 0.97), "aten"), ((0.5, 1.0), "aten")]
    ):
        monkeypatch.setenv("TEACACHE_MODELS_CACHE", str(tmp_path / str(index)))
        linear_module._timed_check.cache_clear()
        monkeypatch.setattr(linear_module, "measure_linear_kernels", timed_as(calls, aten, onednn))
        assert resolve_linear_kernel("auto", "cpu", torch.float32) == expected
        assert resolve_linear_kernel("auto", "cpu", "float32") == expected  # cached: timed once
        assert calls.pop() == (aten, onednn) and not calls


def test_the_verdict_is_stored_and_later_processes_read_it(monkeypatch, verdict_store):
    calls = []
    monkeypatch.setattr(linear_module, "measure_linear_kernels", timed_as(calls, 1.0, 0.5))
    assert linear_module.onednn_is_faster() and len(calls) == 1
    stored = json.loads(verdict_store.read_text())
    assert list(stored.values()) == [True]
    assert f"torch {torch.__version__}" in next(iter(stored))
    # A new process (an empty per-process cache) takes the stored verdict, even where a timing now differs.
    linear_module._timed_check.cache_clear()
    monkeypatch.setattr(linear_module, "measure_linear_kernels", timed_as(calls, 0.5, 1.0))
    assert resolve_linear_kernel("auto", "cpu", torch.float32) == "onednn" and len(calls) == 1
    # Another thread count is another setting: timed and stored beside the first.
    linear_module._timed_check.cache_clear()
    assert not linear_module._timed_check(torch.get_num_threads() + 1) and len(calls) == 2
    assert sorted(json.loads(verdict_store.read_text()).values()) == [False, True]


def test_a_damaged_store_is_measured_again_and_rewritten(monkeypatch, verdict_store):
    calls = []
    monkeypatch.setattr(linear_module, "measure_linear_kernels", timed_as(calls, 1.0, 0.5))
    verdict_store.write_text("{not json")
    assert linear_module.onednn_is_faster() and len(calls) == 1
    assert list(json.loads(verdict_store.read_text()).values()) == [True]


def test_an_unwritable_store_keeps_the_verdict_in_the_process(monkeypatch, tmp_path, verdict_store):
    calls = []
    monkeypatch.setattr(linear_module, "measure_linear_kernels", timed_as(calls, 1.0, 0.5))
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("TEACACHE_MODELS_CACHE", str(blocker / "cache"))  # a folder inside a file: unwritable
    assert linear_module.onednn_is_faster() and linear_module.onednn_is_faster() and len(calls) == 1
    assert not (blocker / "cache").exists()


def test_the_store_is_under_the_user_cache_unless_moved(monkeypatch, tmp_path):
    monkeypatch.delenv("TEACACHE_MODELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert linear_module.linear_kernel_cache_path() == tmp_path / "teacache_models" / "linear_kernel.json"


def test_the_kernel_timing_runs_on_this_machine():
    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    aten, onednn = linear_module.measure_linear_kernels()
    assert aten > 0 and onednn > 0


def test_auto_picks_onednn_only_for_float32_on_cpu():
    fast = "onednn" if linear_module.onednn_is_faster() else "aten"
    assert resolve_linear_kernel("auto", "cpu", torch.float32) == fast
    assert resolve_linear_kernel("auto", torch.device("cpu"), "float32") == fast
    assert resolve_linear_kernel("auto", "cpu", "bfloat16") == "aten"
    assert resolve_linear_kernel("auto", "cuda", torch.float32) == "aten"
    assert resolve_linear_kernel("aten", "cpu", torch.float32) == "aten"
    with pytest.raises(ValueError, match="runs float32 on a CPU; this run is bfloat16 on cpu"):
        resolve_linear_kernel("onednn", "cpu", "bfloat16")
    with pytest.raises(ValueError, match="on cuda: use 'aten' or 'auto'"):
        resolve_linear_kernel("onednn", "cuda", torch.float32)


@needs_onednn
def test_pipeline_switches_both_wan_experts(tmp_path):
    pytest.importorskip("diffusers")
    from teacache_models.pipelines import load_pipeline
    from tests.test_pipeline_fixtures import save_wan

    pipe = load_pipeline(save_wan(tmp_path / "wan", "t2v-a14b"))
    pipe.set_linear_kernel("onednn")
    experts = pipe.teacache_models()
    assert len(experts) == 2
    assert all(linear_kernel_of(model) == "onednn" for model in experts.values())
    pair = WanExpertPair(*experts.values(), boundary_ratio=0.875, num_train_timesteps=1000)
    assert linear_kernel_of(pair) == "onednn"


@needs_onednn
@pytest.mark.parametrize(
    ("activation", "function"),
    [("gelu", torch.nn.GELU()), ("gelu_tanh", torch.nn.GELU(approximate="tanh")), ("silu", torch.nn.SiLU())],
)
def test_fused_activation_matches_the_layer_then_the_function(activation, function, monkeypatch):
    layer, x = nn.Linear(6, 8), torch.randn(3, 4, 6) * 3
    with torch.no_grad():
        expected = function(layer(x))
        assert torch.equal(linear_activation(layer, x, activation), expected), "PyTorch's kernel: exactly"
        set_linear_kernel(layer, "onednn")
        counter = Counting(monkeypatch)
        fused = linear_activation(layer, x, activation)
    assert counter.calls == 1, "one oneDNN call computes the product and the activation"
    torch.testing.assert_close(fused, expected)
