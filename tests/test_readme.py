"""Every code block of the README runs as written, and prints what its comments say (so the README stays true).

Python blocks run in one fresh namespace each; a ``print(...)`` whose line ends in a comment
is checked against it: the comment up to its first ``: `` outside brackets (the rest is
prose) is the printed text, ``...`` standing for anything. The CLI block (the bash block that
activates ``.venv``) runs word for word in bash, in a temporary directory whose
``.venv/bin/activate`` puts a ``safa`` command running this checkout on PATH, as ``make``'s
``.venv`` does. The ``make`` block is what CI itself runs.
"""
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", TEXT, re.S)
CLI_BLOCKS = [b for b in BASH_BLOCKS if "source .venv/bin/activate" in b]


def claim_of(line: str) -> Optional[str]:
    """The printed text a ``print(...)  # comment`` line claims, or None for a line that states none."""
    if not line.lstrip().startswith("print(") or "  #" not in line:
        return None
    comment = line.split("  #", 1)[1].strip()
    depth = 0
    for i, ch in enumerate(comment):
        depth += (ch in "([{") - (ch in ")]}")
        if depth == 0 and comment.startswith(": ", i):
            return comment[:i].strip()
    return comment


def matches(claim: str, printed: str) -> bool:
    """``printed`` is ``claim`` up to whitespace, ``...`` in the claim standing for anything."""
    pattern = r"\s*".join(r".*".join(re.escape(part) for part in word.split("...")) for word in claim.split())
    return re.fullmatch(pattern, " ".join(printed.split()), re.S) is not None


def test_the_claim_reader():
    assert claim_of("print(x.shape)   # (1, 480000): (batch, samples)") == "(1, 480000)"
    assert claim_of("print(a, b)  # None {'denoise': ..., 'decode': ...}") == "None {'denoise': ..., 'decode': ...}"
    assert claim_of("x = 1  # 2") is None
    assert matches("3 views of 10.24 s ..., loop of 24 s", "3 views of 10.24 s (256 latent frames), loop of 24 s")
    assert not matches("(1, 384000) 16000", "(1, 384001) 16000")


def test_readme_has_blocks():
    assert len(PYTHON_BLOCKS) >= 4 and len(CLI_BLOCKS) == 1
    assert sum(claim_of(line) is not None for b in PYTHON_BLOCKS for line in b.splitlines()) >= 8
    assert any("from safa_kernels" in b for b in PYTHON_BLOCKS)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_block_prints_what_it_says(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"README.md python block {index}"
    printed: Dict[int, List[str]] = {}

    def recording_print(*args, sep=" ", end="\n", **kwargs):
        frame = sys._getframe(1)
        if frame.f_code.co_filename == name:
            printed.setdefault(frame.f_lineno, []).append(sep.join(map(str, args)))
        print(*args, sep=sep, end=end, **kwargs)

    exec(compile(PYTHON_BLOCKS[index], name, "exec"), {"print": recording_print})
    for number, line in enumerate(PYTHON_BLOCKS[index].splitlines(), 1):
        claim = claim_of(line)
        if claim is not None:
            assert number in printed, f"{name}, line {number} printed nothing: {line}"
            assert matches(claim, " ".join(printed[number])), f"{name}, line {number}: {printed[number]} vs # {claim}"


def test_cli_block_runs_word_for_word(tmp_path):
    # The stand-in for make's .venv: `source .venv/bin/activate` puts a `safa` on PATH that runs this checkout.
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "safa").write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m safa "$@"\n')
    (bin_dir / "safa").chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAFA_BACKEND")}
    proc = subprocess.run(["bash", "-e", "-c", CLI_BLOCKS[0]], cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in ("out/rain.wav", "out/rain.png", "out/three.wav", "out/evaluate/evaluate.png", "out/evaluate/evaluate.txt"):
        assert (tmp_path / path).stat().st_size > 1000, path
    assert not (tmp_path / "out" / "evaluate.png").exists()  # the demo's plot is not overwritten


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
