"""The README's kernel example runs as written (so the README stays true)."""
import re
from pathlib import Path


def test_readme_kernel_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "from safa_kernels" in b]
    assert blocks, "README lost its safa_kernels example"
    for block in blocks:
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
        assert scope["merged"].shape == (2, 8, scope["layout"].length, 16)


def test_package_docstring_example_runs():
    import doctest

    import safa_kernels
    result = doctest.testmod(safa_kernels)
    assert result.attempted > 0 and result.failed == 0
