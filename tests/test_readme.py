"""The README's Python snippets run as written."""

import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "README has no python block"
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert scope["loss"].isfinite()
        grad = scope["encoder"][0].weight.grad
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0
