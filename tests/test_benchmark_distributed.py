"""`scripts/benchmark_distributed.py`: the collectives two sequence-parallel CPU ranks run, step by step, are what its
formula (the one behind its predictions for the released models) says, fit monitor included."""

from __future__ import annotations

import importlib
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark_distributed.py"


def test_the_formula_predicts_every_measured_step_of_sequence_parallel_ranks(monkeypatch):
    # The ranks, started by a forkserver, import the script by name from the parent's sys.path.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    module = importlib.import_module("benchmark_distributed")
    ranks = module.measure("sp2", 6, "gloo")
    for family in ("wan", "hunyuan"):
        skipped = ranks[0][family]["skipped_steps"]
        # Skipped steps between computed ones, so the fit monitor's reductions over a span are counted too.
        assert all(steps and max(steps) < 5 for steps in skipped.values()), skipped
        assert module.formula_mismatches("sp2", family, ranks, 6) == [], family
