"""The README's Python API example runs as written (other tools are checked against it)."""

import re
from pathlib import Path

import torch


def test_readme_api_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## The model, and its stable Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)[1]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["indices"].shape == (10, 6) and scope["gates"].shape == (10, 6)
    assert scope["y"].shape == (2, 16, 256)
    torch.testing.assert_close(scope["model"].get_expert_bias(), scope["bias"] + 0.01)
    assert scope["logits"].shape == (1, 8, 256)
