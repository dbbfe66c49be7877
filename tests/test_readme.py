"""The README's code runs as written, and CI runs the README's test command."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  # the file a user downloads, here with random weights (no network)
  torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-f37072fd.pth")
  monkeypatch.chdir(tmp_path)
  blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
  assert len(blocks) >= 2
  namespace = {"__name__": "readme_example"}  # read top to bottom: a block may use names defined above it
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
  section = README.split("## Quickstart", 1)[1]
  block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
  commands = [line for line in block.splitlines() if line.strip()]
  assert len(commands) == 2
  assert "pytest" in commands[1]
  assert "README.md" in (ROOT / ".ci" / "run").read_text()
