"""The README stays true: every Python snippet that needs no network runs as written, and its test command is the
one .ci/run runs.

A snippet preceded by ``<!-- readme-test: skip (reason) -->`` is skipped with that reason (downloads, a GPU, a
finished run). The others run in a fresh interpreter in a folder holding ``ViT-B_16.npz``, a random checkpoint
of the tiny "testing" ViT in Google's exact layout, standing in for Google's file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vit
from npz_factory import write_google_npz

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<why>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```", re.S)
SNIPPETS = [(m.start(), m.group("why"), m.group("code")) for m in BLOCK.finditer(README)]


def test_the_readme_has_python_snippets_to_run():
    """The snippet finder finds what the README holds: every python block, runnable or skipped with a reason."""
    assert len(SNIPPETS) == README.count("```python") and sum(why is None for _, why, _ in SNIPPETS) >= 1
    assert all(why.strip() for _, why, _ in SNIPPETS if why is not None)


@pytest.mark.parametrize("where, why, code", SNIPPETS, ids=[f"line{README[:i].count(chr(10)) + 1}" for i, _, _ in SNIPPETS])
def test_snippet_runs(where, why, code, tmp_path):
    if why is not None:
        pytest.skip(why)
    write_google_npz(tmp_path / "ViT-B_16.npz", vit.get_config("testing"), seed=0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"README snippet at line {README[:where].count(chr(10)) + 1} failed:\n{out.stderr[-3000:]}"


def test_readme_test_command_is_what_ci_runs():
    first_block = README[README.index("```bash"):README.index("```", README.index("```bash") + 3)]
    readme_cmd = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n]*)", first_block).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python3? -m pytest.*$", ci, re.M).group(0).replace("python3", "python") == readme_cmd
