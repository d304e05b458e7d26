"""`scripts/benchmark_serving.py` on the flux demo, tiny: the three modes serve the same requests, and the batched
modes give every request its solo output and TeaCache schedule."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_serving.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmark_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark_serving"] = module
    spec.loader.exec_module(module)
    return module


def test_modes_serve_the_same_requests_with_solo_outputs(script, tmp_path, capsys):
    out = tmp_path / "serving.json"
    args = ["--model", "flux-digits", "--requests", "4", "--concurrency", "3", "--steps", "6"]
    summary = script.main([*args, "--arrival-interval", "0", "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert list(summary) == ["one at a time", "static batches", "continuous"]
    for mode in ("static batches", "continuous"):
        assert summary[mode]["schedules_equal"], mode
        assert summary[mode]["max_diff"] < 1e-5, mode
    # Mixed thresholds (0.0 among them): some rows skip, not all; the same rows compute in every mode.
    fractions = {mode: s["rows_computed"] for mode, s in summary.items()}
    assert 0 < fractions["one at a time"] < 1 and len(set(fractions.values())) == 1, fractions
    assert summary["one at a time"]["speedup"] == 1.0
    record = json.loads(out.read_text())
    assert record["args"]["device"] == "cpu" and set(record["modes"]) == set(summary)
    # The ceiling compares one request's forward with a forward carrying `--concurrency` requests' rows.
    ceiling = record["ceiling"]
    assert ceiling["rows"] == 3 and len(ceiling["repeats"]) == 1
    assert ceiling["ceiling"] > 0 and summary["continuous"]["share_of_ceiling"] > 0
    assert "on cpu" in capsys.readouterr().out


def test_first_call_capture_leaves_the_transformer_as_it_was(script):
    from teacache_models.pipelines import load_pipeline

    pipe = load_pipeline("flux-digits")
    prompt, params = script.make_requests(pipe, 1, 2, 16)[0]
    args, kwargs = script.capture_first_call(pipe, lambda: pipe(prompt, params))
    assert "forward" not in vars(pipe.transformer)
    assert script._rows((args, kwargs)) == 1 and kwargs["timestep"].shape == (1,)
    # Replayed with TeaCache off, the captured call is the model's plain forward on those inputs.
    assert script.time_call(pipe, (args, kwargs)) > 0
    assert not pipe.transformer.teacache_enabled


@pytest.mark.parametrize(
    "change, message",
    [
        (["--device", "gpu"], "--device: device must be 'cpu', 'cuda'"),
        (["--requests", "0"], "--requests must be at least 1, got 0"),
        (["--arrival-interval", "-1"], "--arrival-interval must be >= 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(script, capsys, change, message):
    with pytest.raises(SystemExit) as raised:
        script.main(["--requests", "2", *change])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
