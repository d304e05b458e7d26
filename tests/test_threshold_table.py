"""Threshold from a target speedup: calibrate.py measures a threshold table, the zoo stores it, the CLI and the
Python API pick from it, and refuse clearly without one."""

from __future__ import annotations

import json

import pytest
import yaml

from teacache_models.pipelines import load_pipeline
from teacache_models.zoo import ZOO_DIR, load_zoo_entry
from tests.utils import load_script

ROWS = [[0.1, 0.7, 45.0], [0.3, 0.4, 38.0], [0.5, 0.3, 31.0]]


def config_with_table(tmp_path, rows=ROWS, preset="slow"):
    data = yaml.safe_load((ZOO_DIR / "flux-digits.yaml").read_text())
    data["teacache"]["threshold_table"] = {"preset": preset, "source": "test", "rows": rows}
    path = tmp_path / "flux-digits.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_lowest_threshold_that_reaches_the_target_is_picked(tmp_path):
    entry = load_zoo_entry(config_with_table(tmp_path))
    slow = entry.presets["slow"].params
    assert entry.teacache_for_speedup(1.2).teacache_thresh == 0.1  # 1 / 0.7 = 1.43x
    assert entry.teacache_for_speedup(2.0).teacache_thresh == 0.3  # 2.5x
    picked = entry.teacache_for_speedup(3.0)
    assert picked.teacache_thresh == 0.5 and picked.coefficients == slow.coefficients
    assert picked.residual_order == slow.residual_order and picked.indicator == slow.indicator
    params = entry.sampling_params(target_speedup=2.0, seed=1)
    assert params.teacache_params.teacache_thresh == 0.3 and params.seed == 1
    with pytest.raises(ValueError, match=r"beyond the threshold table: its fastest row, threshold 0.5, computes 30%"):
        entry.teacache_for_speedup(4)
    with pytest.raises(ValueError, match="target_speedup must be a finite number >= 1"):
        entry.teacache_for_speedup(0.5)
    with pytest.raises(ValueError, match="leave teacache='default'"):
        entry.sampling_params("fast", target_speedup=2.0)


def test_without_a_table_the_target_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"flux1-dev has no TeaCache threshold table.*scripts/calibrate.py"):
        load_zoo_entry("flux1-dev").teacache_for_speedup(2.0)
    assert load_zoo_entry("flux-digits").threshold_table.preset == "slow"  # the demo ships one


def plain_config(tmp_path):
    """flux-digits' entry without its threshold table (the file's own text, as calibrate.py edits it)."""
    lines = (ZOO_DIR / "flux-digits.yaml").read_text().splitlines(keepends=True)
    path = tmp_path / "plain.yaml"
    path.write_text("".join(line for line in lines if not line.lstrip().startswith("threshold_table:")))
    return path


@pytest.mark.parametrize(
    "rows, preset, message",
    [
        ([[0.1, 1.5, 30.0]], "slow", r"rows\[0\] must be \[threshold >= 0, computed fraction in \(0, 1\]"),
        ([[0.1, 0.5]], "slow", r"rows\[0\] must be"),
        ([], "slow", "rows must be a non-empty list"),
        (ROWS, "medium", "preset 'medium' is not one of"),
    ],
)
def test_a_bad_table_is_an_error_naming_it(tmp_path, rows, preset, message):
    with pytest.raises(ValueError, match=f"teacache.threshold_table: {message}"):
        load_zoo_entry(config_with_table(tmp_path, rows, preset))


def test_calibrate_writes_a_table_that_the_cli_and_the_pipeline_pick_from(tmp_path, capsys):
    config = plain_config(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    args = ["--model", "flux-digits", "--config", str(config), "--prompts-file", str(prompts), "--seeds", "1"]
    args += ["--write-config", str(config), "--table-thresholds", "0.1", "0.5", "--table-pairs", "2"]
    args += ["--json", str(tmp_path / "fit.json")]
    assert load_script("calibrate").main(args) == 0
    table = load_zoo_entry(config).threshold_table
    assert table.preset == "slow" and [row.teacache_thresh for row in table.rows] == [0.1, 0.5]
    assert table.rows[0].computed_fraction > table.rows[1].computed_fraction
    assert table.rows[0].psnr_db > table.rows[1].psnr_db
    record = json.loads((tmp_path / "fit.json").read_text())
    assert record["threshold_table"]["rows"][1][1] == pytest.approx(table.rows[1].computed_fraction, abs=1e-4)
    # The CLI picks the threshold whose computed steps give at least the target.
    target = table.rows[1].speedup
    cli = load_script("generate")
    output = tmp_path / "picked.png"
    run = ["--config", str(config), "--prompt", "3", "--no-progress", "--threads", "1", "--output", str(output)]
    assert cli.main([*run, "--teacache-target-speedup", f"{target:.3f}"]) == 0
    sidecar = json.loads(output.with_suffix(".json").read_text())
    assert sidecar["sampling_params"]["teacache_params"]["teacache_thresh"] == 0.5
    capsys.readouterr()
    assert cli.main([*run, "--teacache-target-speedup", "2", "--teacache-thresh", "0.3"]) == 2
    assert "drop --teacache-thresh" in capsys.readouterr().err
    (tmp_path / "again").mkdir()
    plain = ["--config", str(plain_config(tmp_path / "again")), *run[2:]]
    assert cli.main([*plain, "--teacache-target-speedup", "2"]) == 2
    assert "flux-digits has no TeaCache threshold table" in capsys.readouterr().err
    # The Python equivalent, through a pipeline holding the entry.
    pipe = load_pipeline("flux-digits", zoo_entry=load_zoo_entry(config))
    assert pipe.default_sampling_params(target_speedup=target).teacache_params.teacache_thresh == 0.5
