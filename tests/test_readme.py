"""The README's offline examples run as written, and its commands are the ones CI runs."""

import argparse
import configparser
import dataclasses
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from teacache_models import SamplingParams, TeaCacheParams
from teacache_models.zoo import list_zoo, load_zoo_entry

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_api_examples_run(capsys):
    loop = next(b for b in python_blocks() if "enable_teacache" in b)
    with pytest.warns(RuntimeWarning, match="coefficients do not fit FluxTransformer2DModel"):
        exec(compile(loop, "README.md", "exec"), {})
    assert re.search(r"positive: \d+ computed, \d+ skipped", capsys.readouterr().out)
    pipeline = next(b for b in python_blocks() if "load_pipeline" in b)
    exec(compile(pipeline, "README.md", "exec"), {})
    assert re.search(r"positive: \d+ computed, \d+ skipped; .*torch.Size\(\[1, 3, 16, 16\]\)", capsys.readouterr().out)


def extras_only_modules() -> set[str]:
    """The import names of what the extras of setup.cfg add to the core install, and Pillow, which only they
    bring in (diffusers, matplotlib)."""
    config = configparser.ConfigParser()
    config.read(README.parent / "setup.cfg")
    names = lambda text: {re.split(r"[<>=!\[ ]", line.strip())[0] for line in text.splitlines() if line.strip()}  # noqa: E731
    core = names(config["options"]["install_requires"])
    extras = set().union(*(names(text) for text in config["options.extras_require"].values())) - core
    renamed = {"scikit-learn": "sklearn", "python-multipart": "multipart", "Pillow": "PIL"}
    return {renamed.get(name, name).replace("-", "_") for name in extras | {"Pillow"}}


# Runs a script with every module of `extras_only_modules()` unimportable, as on a core install.
CORE_ONLY = """
import importlib.abc, importlib.machinery, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is not part of the core install")
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
sys.meta_path.insert(0, Finder())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_offline(args: list[str]) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository root, as a user with no Hub access and a bare PATH runs it."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_readme_demo_command_runs_offline_on_the_core_install(tmp_path):
    """The demo command, as written, offline, with nothing of the extras importable ("The core is enough")."""
    command = re.search(r"```bash\n(python scripts/generate.py --model flux-digits .*?)\n```", README.read_text())
    # {0..9} is bash brace expansion: two of its ten prompts, written out.
    line = command.group(1).replace('"a handwritten digit "{0..9}', '"a handwritten digit 3" "a handwritten digit 7"')
    args = shlex.split(line)
    args += ["--output", str(tmp_path / "demo.png"), "--no-progress", "--repeats", "1", "--num-images", "1"]
    blocked = extras_only_modules()
    assert {"diffusers", "transformers", "PIL", "peft", "fastapi", "sklearn"} <= blocked
    done = run_offline(["-c", CORE_ONLY, ",".join(sorted(blocked)), *args[1:]])
    assert done.returncode == 0, done.stderr
    assert re.search(r"speedup [\d.]+x with TeaCache", done.stdout)
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "demo.json").is_file()


def test_readme_names_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    install = re.search(r"```bash\n(pip install .*?)\n```", text).group(1)
    assert install.replace("pip install", "pip install -q") in ci
    assert "pytest -q" in text and "pytest -q" in ci


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, README.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")} - {"--help"}


@pytest.mark.parametrize("program", ["generate", "teacache-serve"])
def test_every_flag_of_the_cli_and_the_server_is_in_the_readme(program):
    from teacache_models.server.main import build_parser as server_parser

    parser = load_script("generate").build_parser() if program == "generate" else server_parser()
    text = README.read_text()
    missing = sorted(flag for flag in option_strings(parser) if not re.search(rf"`[^`\n]*{flag}(?![\w-])", text))
    assert not missing, f"{program} flags the README does not name: {missing}"
    # Flags documented with their choices (`--flag a|b|c`) list exactly the parser's.
    for flag, listed in re.findall(r"`(--[a-z-]+) ((?:[\w-]+\|)+[\w-]+)`", text):
        action = next((a for a in parser._actions if flag in a.option_strings), None)
        if action is not None and action.choices is not None:
            assert set(listed.split("|")) == set(action.choices), flag


def documented_fields(name: str) -> dict[str, str]:
    """`name(field=default, ...)` as the README writes it, its longest mention: {field: default's source text}."""
    mentions = re.findall(rf"`{name}\(((?:[^()`]|\(\))*)\)`", README.read_text())
    assert mentions, f"the README shows no `{name}(field=default, ...)`"
    return dict(part.split("=", 1) for part in re.split(r",\s+", max(mentions, key=len)))


@pytest.mark.parametrize("cls", [SamplingParams, TeaCacheParams], ids=lambda cls: cls.__name__)
def test_the_readme_lists_every_sampling_field_with_its_default(cls):
    documented = documented_fields(cls.__name__)
    assert list(documented) == [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert eval(documented[f.name], {"TeaCacheParams": TeaCacheParams}) == default, f.name


def zoo_table_rows() -> dict[str, list[str]]:
    """The README's zoo table: {zoo name: the row's cells}; `-720p-t2v` after `hunyuanvideo1.5-480p-t2v` names
    `hunyuanvideo1.5-720p-t2v`."""
    table = re.search(r"\| zoo name \| family .*?\n\n", README.read_text(), re.S).group(0)
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        for name in names:
            if name.startswith("-"):
                parts = names[0].split("-")
                name = "-".join(parts[: len(parts) - name.count("-")]) + name
            rows[name] = cells
    return rows


def test_the_zoo_table_lists_every_entry_with_its_steps_guidance_and_presets():
    rows = zoo_table_rows()
    assert sorted(rows) == sorted(list_zoo())
    for name, (_, family, steps, guidance, presets) in rows.items():
        entry = load_zoo_entry(name)
        assert entry.family in family and steps == str(entry.sampling.num_inference_steps), name
        assert float(guidance.split()[0]) == entry.sampling.guidance_scale, name
        if not entry.presets:
            assert presets.startswith("none"), name
        for preset, spec in entry.presets.items():
            assert re.search(rf"(^|[ ,;/]){re.escape(preset)} ", presets), (name, preset)
            assert f"{spec.params.teacache_thresh:g}" in presets, (name, preset)


def test_the_compute_quality_table_holds_the_numbers_of_its_result_files():
    text = README.read_text()
    for model in ("flux-digits", "wan-digits"):
        summary = json.loads((README.parent / "docs" / "results" / f"benchmark-{model}.json").read_text())["summary"]
        assert f"docs/results/benchmark-{model}.json" in text
        for method, goals in summary.items():
            cells = []
            for goal in (goals["at_30db"], goals["at_35db"]):
                noise = " (above ideal: noise)" if goal["above_ideal"] else ""
                cells += [
                    f"{goal['work_fraction']:.3f} ({goal['setting']})",
                    f"{goal['speedup']:.2f}x, {goal['speedup_min']:.2f}-{goal['speedup_max']:.2f}{noise}",
                ]
            assert f"| {model} | {method} | {' | '.join(cells)} |" in text, (model, method)


def test_the_speed_and_lora_tables_hold_the_numbers_of_their_result_files():
    text = README.read_text()
    results = README.parent / "docs" / "results"
    for name in ("benchmark-speed-medium-cpu.json", "benchmark-speed-medium-cpu-hunyuan_video15.json"):
        assert f"docs/results/{name}" in text
        for row in json.loads((results / name).read_text())["results"]:
            ratios = f"{row['forward_ratio']:.2f} | {row['forward_ratio_fast']:.2f}"
            numbers = f"{ratios} | {100 * row['skipped_step_cost']:.1f}%"
            assert re.search(rf"\| {row['family']}( \([^)|]*\))? \| {re.escape(numbers)}", text), row["family"]
    assert "docs/results/lora-teacache.json" in text
    for model in json.loads((results / "lora-teacache.json").read_text())["results"]:
        for preset, runs in model["presets"].items():
            base, lora = runs["base"], runs["lora"]
            cells = [f"{base['skipped_fraction']:.2f}", f"{lora['skipped_fraction']:.2f}"]
            cells += [f"{base['psnr_db_mean']:.1f}", f"{lora['psnr_db_mean']:.1f}"]
            assert f"| {model['model']} | {preset} | {' | '.join(cells)} |" in text, (model["model"], preset)
    rerun = text[text.index("The four demo-model rows were rerun") :][:700]
    for name in ("flux-digits", "flux-digits-all-at-once", "wan-digits", "wan-digits-all-at-once"):
        continuous = json.loads((results / f"benchmark-serving-{name}.json").read_text())["modes"]["continuous"]
        assert f"{continuous['speedup']:.2f}x" in rerun and f"{100 * continuous['rows_computed']:.1f}%" in rerun, name
        assert continuous["schedules_equal"], name
    for name in ("flux-digits-ceiling", "wan-digits-ceiling", "flux-medium-1-thread", "flux-medium-2-threads"):
        record = json.loads((results / f"benchmark-serving-{name}.json").read_text())
        row = re.search(rf"^\|[^\n]*`docs/results/benchmark-serving-{name}\.json` \|$", text, re.MULTILINE)
        assert row is not None, name
        ceiling, continuous = record["ceiling"], record["modes"]["continuous"]
        each = ", ".join(f"{r['ceiling']:.2f}" for r in ceiling["repeats"])
        assert f"| {ceiling['ceiling']:.2f}x ({each}) | **{continuous['speedup']:.2f}x** (" in row.group(), name
        assert f"| {100 * continuous['share_of_ceiling']:.0f}%" in row.group() and continuous["schedules_equal"], name
    load = json.loads((results / "load-test-server-flux-digits.json").read_text())
    cells = [load["requests"], load["concurrency"], load["answered_200"], load["errors"], load["retried_429"]]
    cells += [
        f"{load['latency_p50_s']:.2f} s / {load['latency_p95_s']:.2f} s",
        f"{load['throughput_rps']:.1f} requests/s",
    ]
    assert f"| {' | '.join(map(str, cells))} |" in text and "docs/results/load-test-server-flux-digits.json" in text


def test_readme_lora_example_runs_in_order(tmp_path, monkeypatch):
    """The LoRA block of the README, line by line as written, on a tiny Flux and files in the layout a
    pipeline's `save_lora_weights` writes (keys under `transformer.`)."""
    peft = pytest.importorskip("peft")
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from teacache_models.models import FluxTransformer2DModel

    def tiny() -> FluxTransformer2DModel:
        config = dict(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
        config |= dict(joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
        return FluxTransformer2DModel(**config).eval()

    monkeypatch.chdir(tmp_path)
    source = tiny()
    (tmp_path / "owner" / "detail-lora").mkdir(parents=True)
    files = {"style.safetensors": ["to_q", "to_k"], "other.safetensors": ["to_q"]}
    files["owner/detail-lora/lora.safetensors"] = ["to_v"]
    for i, (path, modules) in enumerate(files.items()):
        config = peft.LoraConfig(r=4, target_modules=modules, init_lora_weights=False)
        source.add_adapter(config, adapter_name=f"a{i}")
        source.save_lora_adapter(tmp_path, adapter_name=f"a{i}", weight_name=path)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        save_file({f"transformer.{k}": v for k, v in load_file(path).items()}, path, metadata=metadata)
    block = re.search(r"```python\n(model\.load_lora_adapter.*?)```", README.read_text(), re.S).group(1)
    model = tiny()
    exec(compile(block, "README.md", "exec"), {"model": model, "peft": peft})
    assert model.active_adapters() == ["finetune"] and list(model.peft_config) == ["finetune"]
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())


def test_the_files_the_readme_names_exist_and_it_names_every_script():
    text = README.read_text()
    folders = ("scripts/", "tests/", "docs/", "configs/", "demo_models/", "demo_loras/", "teacache_models/", ".ci/")
    named = re.findall(rf"(?<![\w/.-])((?:{'|'.join(map(re.escape, folders))})[\w./-]*\w)(?![\w*<-])", text)
    # Not files of this repository: placeholders (`configs/NAME.yaml`, `myfam`; globs and `<...>` are not matched)
    # and the folder of a diffusers checkout that scripts/run_diffusers_model_tests.py runs.
    others = {"tests/models/transformers"}
    named = {path for path in named if "myfam" not in path and not re.search(r"[A-Z]{3}", path)} - others
    missing = sorted(path for path in named if not (README.parent / path).exists())
    assert not missing, f"the README names files that do not exist: {missing}"
    scripts = sorted(path.name for path in (README.parent / "scripts").glob("*.py"))
    assert [name for name in scripts if name not in text] == []


def test_every_option_of_every_script_is_in_the_readme():
    """Read from the scripts' sources (their `add_argument` calls), so it costs no import; hidden options (help
    suppressed: a script's own subprocess) are left out."""
    text = README.read_text()
    missing = []
    for script in sorted((README.parent / "scripts").glob("*.py")):
        for call in re.findall(r"add_argument\((.*?)\)\n", script.read_text(), re.S):
            flag = re.match(r'\s*"(--[\w-]+)"', call)
            if flag and "SUPPRESS" not in call and not re.search(rf"{flag.group(1)}(?![\w-])", text):
                missing.append(f"{script.name} {flag.group(1)}")
    assert not missing, f"script options the README does not name: {missing}"


# The forecast table's rows: their curve in the result files ("{m}": the model), and the file of the TeaCache
# row each ratio divides by.
FORECAST_ROWS = {
    "TeaCache (as published)": ("benchmark-forecast-{m}.json", "TeaCache"),
    "Forecast, extrapolation x0.5": ("benchmark-forecast-{m}.json", "Forecast (extrapolation x0.5)"),
    "Forecast, extrapolation x1": ("benchmark-forecast-{m}.json", "Forecast (extrapolation x1)"),
    "Forecast, x0.5, slope from the indicator": (
        "benchmark-forecast-slope-{m}.json",
        "Forecast (extrapolation x0.5, slope from the indicator)",
    ),
    "Forecast, x0.5, slope from the indicator, cadence, last 2 steps forecast": (
        "benchmark-forecast-cadence-{m}.json",
        "Forecast (extrapolation x0.5, slope from the indicator, cadence, last 2 steps forecast)",
    ),
    "TeaCache, extrapolated residual": ("benchmark-{m}.json", "TeaCache (extrapolated residual)"),
}


def test_the_forecast_table_holds_the_work_and_ratios_of_its_result_files():
    text = README.read_text()
    table = re.search(r"\| model \| method \| work at >= 30 dB \| / TeaCache .*?\n\n", text, re.S).group(0)

    def summary(name: str) -> dict:
        return json.loads((README.parent / "docs" / "results" / name).read_text())["summary"]

    checked = 0
    for line in table.strip().splitlines()[2:]:
        model, method, *cells = [cell.strip().replace("*", "") for cell in line.strip("|").split("|")]
        if method not in FORECAST_ROWS:
            continue  # the peers' rows, whose cells are the compute-quality table's
        name, curve = FORECAST_ROWS[method]
        # wan-digits-deep ran every curve but the cadence's in one run, benchmark-wan-digits-deep.json.
        deep = "benchmark-wan-digits-deep.json"
        if model == "wan-digits-deep" and "cadence" not in name:
            name = deep
        base = summary(deep if model == "wan-digits-deep" else f"benchmark-forecast-{model}.json")["TeaCache"]
        expected = []
        for goal in ("at_30db", "at_35db"):
            point = summary(name.format(m=model))[curve][goal]
            ratio = point["work_fraction"] / base[goal]["work_fraction"]
            expected += [f"{point['work_fraction']:.3f} ({point['setting']})", "1" if ratio == 1 else f"{ratio:.2f}"]
        assert cells == expected, (model, method)
        checked += 1
    assert checked == 15


def test_the_readme_names_every_route_of_the_server():
    app = (README.parent / "teacache_models" / "server" / "app.py").read_text()
    routes = re.findall(r'@app\.(get|post|delete)\("([^"]+)"\)', app)
    assert len(routes) >= 10
    # Path parameters by any name: the README writes /v1/videos/{id}.
    parameter = re.compile(r"\{\w+\}")
    text = parameter.sub("{}", README.read_text())
    named = [method.upper() + " " + parameter.sub("{}", path) for method, path in routes]
    assert [route for route in named if route not in text] == []


@pytest.mark.parametrize(
    ("model", "picture"),
    [("flux-digits", "docs/demo-flux-digits.png"), ("flux-digits-bold", "docs/demo-flux-digits-bold.png")],
)
def test_the_readme_pictures_are_what_its_demo_commands_make(model, picture, tmp_path):
    """The README's demo command of `model`, run as written (ten prompts; the timing flags, which change no
    pixel, left out), makes its picture pixel for pixel."""
    np = pytest.importorskip("numpy")
    image_module = pytest.importorskip("PIL.Image")
    line = re.search(rf"```bash\n(python scripts/generate.py --model {model} .*?)\n", README.read_text()).group(1)
    args = shlex.split(
        line.replace('"a handwritten digit "{0..9}', " ".join(f'"a handwritten digit {d}"' for d in range(10)))
    )
    args = [a for a in args if a not in ("--compare",)]
    if "--repeats" in args:
        del args[args.index("--repeats") : args.index("--repeats") + 2]
    output = tmp_path / "grid.png"
    done = run_offline([*args[1:], "--output", str(output), "--no-progress"])
    assert done.returncode == 0, done.stderr
    made = np.asarray(image_module.open(output))
    shipped = np.asarray(image_module.open(README.parent / picture))
    assert f"({picture})" in README.read_text() and made.shape == shipped.shape and (made == shipped).all()
