"""The README's promises that can break silently: its examples run (usage, ONNX export), and CI
runs the README's command."""
import re
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def test_usage_example_runs(capsys):
    usage, _, _ = EXAMPLES
    exec(compile(usage, "README.md", "exec"), {})
    assert "torch.Size([32, 100, 64])" in capsys.readouterr().out


def test_cell_options_example_runs(capsys):
    _, options, _ = EXAMPLES
    exec(compile(options, "README.md", "exec"), {})
    assert "torch.Size([32, 100, 64]) torch.Size([32, 64])" in capsys.readouterr().out


def test_onnx_export_example_runs(tmp_path, monkeypatch):
    _, _, export = EXAMPLES
    monkeypatch.chdir(tmp_path)  # the example writes model.onnx
    exec(compile(export, "README.md", "exec"), {})
    assert "GRU" in [node.op_type for node in onnx.load("model.onnx").graph.node]


def test_ci_runs_the_readme_command():
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["bash scripts/setup.sh && bash scripts/lint.sh && python3 -m pytest -q"]
    assert commands[0] in [line.split("  #")[0].strip() for line in README.splitlines()]
