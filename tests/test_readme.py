"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_api_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert re.search(r"positive: \d+ computed, \d+ skipped", capsys.readouterr().out)


def test_readme_names_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    install = re.search(r"```bash\n(pip install .*?)\n```", text).group(1)
    assert install.replace("pip install", "pip install -q") in ci
    assert "pytest -q" in text and "pytest -q" in ci
