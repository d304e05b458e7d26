"""Run diffusers' own model tests for the transformer classes against this package's native classes.

    python scripts/run_diffusers_model_tests.py /path/to/diffusers [--family flux ...] [-- -k name ...]

The path is a checkout of the diffusers repository (its `tests/` folder is read, nothing is copied
here). Each test module keeps its code; only the name of the class under test, which the module
imported from diffusers, is rebound to the native class before each test runs, and diffusers' LoRA tests'
check that the class is a diffusers `PeftAdapterMixin` checks for this package's `LoraMixin` instead (the
native models speak that mixin's API without depending on diffusers). Test classes for machinery
diffusers' models have and these do not (attention processors and backends, hooks: caches, group
offloading and layerwise casting, quantization backends, single-file loading, context and tensor
parallelism, IP adapters) are left out with their reason, and so are the few tests that expect a log line
where this package raises a clear error (`POLICY`); the rest run, and the script prints passed / skipped /
failed per test class and the failures.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter, defaultdict
from pathlib import Path

# Test module of each family in tests/models/transformers, and the class names it tests.
MODULES = {
    "flux": ("test_models_transformer_flux.py", "FluxTransformer2DModel"),
    "flux2": ("test_models_transformer_flux2.py", "Flux2Transformer2DModel"),
    "wan": ("test_models_transformer_wan.py", "WanTransformer3DModel"),
    "hunyuan_video": ("test_models_transformer_hunyuan_video.py", "HunyuanVideoTransformer3DModel"),
    "qwen_image": ("test_models_transformer_qwenimage.py", "QwenImageTransformer2DModel"),
    "z_image": ("test_models_transformer_z_image.py", "ZImageTransformer2DModel"),
}
# Other diffusers classes the test modules import whose native equivalents the models return: (module, name).
NATIVE_HELPERS = {
    "Flux2KVCache": ("teacache_models.models.flux2", "Flux2KVCache"),
    "Flux2KVLayerCache": ("teacache_models.models.flux2", "Flux2KVLayerCache"),
}
# Test-class name endings of machinery out of scope, and why.
OUT_OF_SCOPE = {
    "AttentionBackend": "attention backends: the native models call scaled_dot_product_attention directly",
    "Attention": "attention processors: the native models have no processor objects to swap",
    "ContextParallelAttnBackends": "context parallelism through diffusers' hooks (this package has its own)",
    "ContextParallel": "context parallelism through diffusers' hooks (this package has its own)",
    "TensorParallel": "tensor parallelism through diffusers' plans",
    "TensorParallelNeuron": "tensor parallelism through diffusers' plans",
    "FBCCache": "diffusers' cache hooks (FirstBlockCache); TeaCache is built in instead",
    "FasterCache": "diffusers' cache hooks (FasterCache)",
    "MagCache": "diffusers' cache hooks (MagCache)",
    "TaylorSeerCache": "diffusers' cache hooks (TaylorSeer)",
    "PABCache": "diffusers' cache hooks (Pyramid Attention Broadcast)",
    "Memory": "diffusers' hooks: group offloading and layerwise casting",
    "IPAdapter": "IP adapters replace attention processors",
    "BitsAndBytes": "quantization backends (bitsandbytes, GPU)",
    "BitsAndBytesCompile": "quantization backends (bitsandbytes, GPU)",
    "GGUF": "quantization backends (GGUF)",
    "GGUFCompile": "quantization backends (GGUF)",
    "Quanto": "quantization backends (optimum-quanto)",
    "QuantoCompile": "quantization backends (optimum-quanto)",
    "TorchAo": "quantization backends (torchao)",
    "TorchAoCompile": "quantization backends (torchao)",
    "ModelOpt": "quantization backends (NVIDIA ModelOpt)",
    "ModelOptCompile": "quantization backends (NVIDIA ModelOpt)",
    "SDNQ": "quantization backends (SDNQ)",
    "SDNQCompile": "quantization backends (SDNQ)",
    "SingleFile": "single-file checkpoints from the Hub",
}


# Tests, by a part of their name, of machinery out of scope within test classes that otherwise run.
OUT_OF_SCOPE_TESTS = {
    "layerwise_casting": "diffusers' hooks: layerwise casting",
    "test_extract_mode_returns_cache": "sets diffusers' KV-cache attention processors (set_processor); the native "
    "FLUX.2 extracts its KV cache without processors",
    "test_layered_model_with_mask": "asserts diffusers' internal RoPE module class (the native model computes its "
    "layered RoPE without a module)",
}


# Tests that expect diffusers to log and go on where this package refuses the input with an error naming it
# (bad input is an error here, never a log line): the test, and where our own tests cover the error.
POLICY = {
    "test_lora_missing_keys_warning": "a LoRA with a lora_B but no lora_A for a module is refused with a ValueError "
    "naming the module (diffusers logs the missing key and loads the rest); tests/test_lora.py::"
    "test_rank_and_shape_mismatches_are_named",
    "test_lora_unexpected_keys_warning": "a key that is no LoRA weight is refused with a ValueError naming it "
    "(diffusers logs it and loads the rest); tests/test_lora.py::test_unknown_format_names_the_formats_tried",
    "test_logs_info_when_no_lora_keys_found": "a LoRA with no key under the prefix is refused with a ValueError "
    "naming the prefixes found (diffusers logs and loads nothing); tests/test_lora.py::"
    "test_adapter_names_and_operations_without_adapters",
    "test_enable_lora_hotswap_wrong_check_compiled_argument_raises": "the error names the argument check_compiled "
    "(diffusers' message says check_compiles); tests/test_lora.py::"
    "test_hotswap_replaces_weights_in_place_and_refuses_what_cannot_be_swapped",
    "test_hotswap_second_adapter_targets_more_layers_raises": "hotswapping a LoRA that adapts more modules is "
    "refused with a ValueError naming them, before PEFT would raise its RuntimeError; tests/test_lora.py::"
    "test_hotswap_replaces_weights_in_place_and_refuses_what_cannot_be_swapped",
}


# diffusers gates its whole hotswap test class on an accelerator, because most of its tests compile with CUDA
# graphs; these of its tests neither compile nor use an accelerator, so they run on the CPU too.
ACCELERATOR_SKIP = "test requires accelerator+PyTorch"
CPU_ABLE = ("test_hotswapping_model", "test_enable_lora_hotswap_")


def out_of_scope_reason(class_name: str, test_name: str = "") -> str | None:
    """Why a test is left out (its class first, then its name), None when it runs."""
    for suffix in sorted(OUT_OF_SCOPE, key=len, reverse=True):
        if class_name.endswith(suffix):
            return OUT_OF_SCOPE[suffix]
    by_name = {**OUT_OF_SCOPE_TESTS, **{name: f"our policy: {reason}" for name, reason in POLICY.items()}}
    return next((reason for part, reason in by_name.items() if part in test_name), None)


class NativeClasses:
    """A pytest plugin: rebinds the class under test to the native class, leaves out-of-scope classes out,
    and counts outcomes per test class."""

    def __init__(self) -> None:
        from teacache_models import models
        from teacache_models.lora import LoraMixin

        self.native = {name: getattr(models, name) for _, name in MODULES.values()}
        for name, (module, attribute) in NATIVE_HELPERS.items():
            self.native[name] = getattr(importlib.import_module(module), attribute)
        self.native["PeftAdapterMixin"] = LoraMixin
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.left_out: dict[str, str] = {}
        self.failures: list[tuple[str, str]] = []
        self.skip_reasons: Counter = Counter()

    def pytest_collection_modifyitems(self, config, items) -> None:
        kept, dropped = [], []
        for item in items:
            reason = out_of_scope_reason(item.cls.__name__, item.name) if item.cls is not None else None
            if reason is None:
                kept.append(item)
            else:
                dropped.append(item)
                whole_class = out_of_scope_reason(item.cls.__name__) is not None
                self.left_out[item.cls.__name__ if whole_class else f"{item.cls.__name__}.{item.name}"] = reason
        items[:] = kept
        config.hook.pytest_deselected(items=dropped)
        gated = [item for item in kept if any(_is_accelerator_skip(m) for m in item.iter_markers("skipif"))]
        for item in gated:
            _run_on_cpu_where_able(item)

    def pytest_runtest_setup(self, item) -> None:
        # The class under test is a name in the test's module; the LoRA tests' PeftAdapterMixin check is a name
        # in the module defining the tester mixin.
        for module in {item.module} | _tester_modules(item):
            for name, native in self.native.items():
                if hasattr(module, name):
                    setattr(module, name, native)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            group = report.nodeid.split("::")[1] if "::" in report.nodeid else report.nodeid
            self.outcomes[group][report.outcome] += 1
            if report.outcome == "failed":
                self.failures.append((report.nodeid, report.longreprtext.strip().splitlines()[-1][:300]))
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                self.skip_reasons[report.longrepr[2].removeprefix("Skipped: ")[:160]] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("diffusers", type=Path, help="a checkout of the diffusers repository")
    parser.add_argument("--family", action="append", choices=sorted(MODULES), help="run only these (repeatable)")
    args, pytest_args = parser.parse_known_args()  # the rest (after --) goes to pytest
    folder = args.diffusers / "tests" / "models" / "transformers"
    if not folder.is_dir():
        parser.error(f"{args.diffusers} has no tests/models/transformers: pass a diffusers checkout")
    files = [str(folder / MODULES[f][0]) for f in (args.family or MODULES)]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        parser.error(f"missing test modules {missing}")

    import pytest

    plugin = NativeClasses()
    extra = [a for a in pytest_args if a != "--"]
    code = pytest.main(
        ["-q", "-p", "no:cacheprovider", "--rootdir", str(args.diffusers), *files, *extra], plugins=[plugin]
    )
    print("\nper test class (passed / skipped / failed):")
    totals: Counter = Counter()
    for group, counts in sorted(plugin.outcomes.items()):
        totals.update(counts)
        print(f"  {group}: {counts['passed']} / {counts['skipped']} / {counts['failed']}")
    print(f"total: {totals['passed']} passed, {totals['skipped']} skipped, {totals['failed']} failed")
    print("skipped by the tests themselves, by reason:")
    for reason, count in plugin.skip_reasons.most_common():
        print(f"  {count}: {reason}")
    print("left out:")
    for reason, classes in sorted(_group(plugin.left_out).items()):
        print(f"  {reason}: {', '.join(sorted(classes))}")
    for nodeid, line in plugin.failures:
        print(f"FAILED {nodeid}: {line}")
    return int(code)


def _run_on_cpu_where_able(item) -> None:
    """Lift the class-wide accelerator skip off the `CPU_ABLE` tests; the class's other tests keep it."""
    import pytest

    test_class = item.getparent(pytest.Class)
    test_class.own_markers[:] = [m for m in test_class.own_markers if not _is_accelerator_skip(m)]
    if not item.name.startswith(CPU_ABLE):
        item.add_marker(pytest.mark.skip(reason=ACCELERATOR_SKIP))


def _is_accelerator_skip(mark) -> bool:
    return mark.name == "skipif" and mark.kwargs.get("reason") == ACCELERATOR_SKIP


def _tester_modules(item) -> set:
    """The modules defining the tester mixins the item's class inherits from (diffusers' `testing_utils`)."""
    classes = type(item.instance).__mro__ if item.instance is not None else ()
    return {sys.modules[c.__module__] for c in classes if "testing_utils" in c.__module__}


def _group(left_out: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for name, reason in left_out.items():
        grouped[reason].append(name)
    return grouped


if __name__ == "__main__":
    sys.exit(main())
