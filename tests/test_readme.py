"""The README's 'Using a kernel in your model' example runs as written."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_kernel_example_runs():
    text = README.read_text()
    section = text.split("## Using a kernel in your model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    env: dict = {}
    exec(compile(code, str(README), "exec"), env)  # noqa: S102 - our own documentation
    a, y, q = env["a"], env["y"], env["q"]
    assert a.shape == q.shape and a.dtype == q.dtype
    assert y.shape == env["x"].shape and y.dtype == env["x"].dtype
