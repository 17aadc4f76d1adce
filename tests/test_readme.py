"""README's code must keep working: the "In a notebook" section is run exactly as written, and CI
runs exactly the test command the quickstart gives."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def section(title):
    text = open(README, encoding="utf-8").read()
    assert f"\n## {title}\n" in text, f"README has no '## {title}' section"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_notebook_section_runs_as_written(tmp_path):
    cells = re.findall(r"```python\n(.*?)```", section("In a notebook"), flags=re.S)
    assert len(cells) >= 2
    script = tmp_path / "notebook.py"
    script.write_text("\n".join(cells))
    # As a notebook would: the repository on the path, any working folder, no display for plots.
    environment = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment,
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = [name for folder, _, names in os.walk(tmp_path) for name in names]
    assert "report.md" in written and "rlhf.pt" in written


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(python -m pytest[^#\n]*?)\s*(?:#.*)?$", section("Quickstart"), flags=re.M)
    assert commands, "the quickstart names no test command"
    ci_lines = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8")]
    assert commands[0].strip() in ci_lines
