"""The README's promises that can break silently: its usage example runs, and CI runs the
README's command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_usage_example_runs(capsys):
    (example,) = re.findall(r"```python\n(.*?)```", README, re.S)
    exec(compile(example, "README.md", "exec"), {})
    assert "torch.Size([32, 100, 64])" in capsys.readouterr().out


def test_ci_runs_the_readme_command():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["bash scripts/setup.sh && python3 -m ruff check . && python3 -m pytest -q"]
    assert commands[0] in [line.split("  #")[0].strip() for line in README.splitlines()]
