"""Every code block of the README runs as written (so the README stays true).

Python blocks run in one fresh namespace each; bash blocks run their `safa ...` commands
through the CLI entry point in a temporary working directory (the `make` block is what CI
itself runs).
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
BASH_COMMANDS = [" ".join(cmd.split()) for block in re.findall(r"```bash\n(.*?)```", TEXT, re.S)
                 for cmd in re.sub(r"\\\n", " ", block).splitlines() if cmd.strip().startswith("safa ")]


def test_readme_has_blocks():
    assert len(PYTHON_BLOCKS) >= 4 and len(BASH_COMMANDS) >= 3
    assert any("from safa_kernels" in b for b in PYTHON_BLOCKS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), scope)


@pytest.mark.parametrize("command", BASH_COMMANDS)
def test_cli_command_runs(command, tmp_path):
    (tmp_path / "out").mkdir()
    argv = shlex.split(command.split("#")[0])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "safa", *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_package_docstring_example_runs():
    import doctest

    import safa_kernels
    result = doctest.testmod(safa_kernels)
    assert result.attempted > 0 and result.failed == 0


def test_the_map_lists_every_module():
    start = TEXT.index("## How it is built")
    block = TEXT[start:TEXT.index("```\n", TEXT.index("```\n", start) + 4)]
    modules = [p for pkg in ("safa", "safa_kernels") for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py" and p.name != "__main__.py"]
    # a top-level module by its file name; a subpackage's modules by the subpackage
    missing = [str(p.relative_to(ROOT)) for p in modules
               if (p.name not in block if p.parent.name in ("safa", "safa_kernels") else f"{p.parent.name}/" not in block)]
    assert not missing, f"README's map lacks: {missing}"
