"""The README's offline examples run as written, and its commands are the ones CI runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_api_examples_run(capsys):
    loop = next(b for b in python_blocks() if "enable_teacache" in b)
    exec(compile(loop, "README.md", "exec"), {})
    assert re.search(r"positive: \d+ computed, \d+ skipped", capsys.readouterr().out)
    pipeline = next(b for b in python_blocks() if "load_pipeline" in b)
    exec(compile(pipeline, "README.md", "exec"), {})
    assert re.search(r"positive: \d+ computed, \d+ skipped; .*torch.Size\(\[1, 3, 16, 16\]\)", capsys.readouterr().out)


def test_readme_demo_command_runs_offline(tmp_path):
    command = re.search(r"```bash\n(python scripts/generate.py --model flux-digits .*?)\n```", README.read_text())
    # {0..9} is bash brace expansion: two of its ten prompts, written out.
    line = command.group(1).replace('"a handwritten digit "{0..9}', '"a handwritten digit 3" "a handwritten digit 7"')
    args = shlex.split(line)
    args += ["--output", str(tmp_path / "demo.png"), "--no-progress", "--repeats", "1", "--num-images", "1"]
    done = subprocess.run(
        [sys.executable, *args[1:]],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"speedup [\d.]+x with TeaCache", done.stdout)
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "demo.json").is_file()


def test_readme_names_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    install = re.search(r"```bash\n(pip install .*?)\n```", text).group(1)
    assert install.replace("pip install", "pip install -q") in ci
    assert "pytest -q" in text and "pytest -q" in ci
