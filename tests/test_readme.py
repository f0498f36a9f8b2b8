"""The guides stay true: every Python snippet of README.md and of every guide beside the code (``*/README.md``)
runs as written, and the README's test command is the one .ci/run runs.

A snippet preceded by ``<!-- readme-test: skip (reason) -->`` is skipped with that reason (a download, a GPU, a
finished run). One reason is a condition rather than a refusal: ``needs the project installed`` snippets run
whenever ``vit_peft`` is installed from this checkout (``pip install -e .``), without the checkout on
``sys.path``, as a user would run them; ``test_installed_snippets_run_when_installed`` runs them through a
stand-in install either way. The other snippets run in a fresh interpreter, with the repository root first on
``sys.path``, in a folder holding ``ViT-B_16.npz``: a random checkpoint of the tiny "testing" ViT in Google's
exact layout, standing in for Google's file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vit
from npz_factory import write_google_npz

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"runs", "build", "dist", "node_modules", "__pycache__"}


def guides(root: Path = ROOT) -> list[Path]:
    """README.md and every README.md in the repository's folders (not hidden ones, runs or build output)."""
    found = [p for p in root.rglob("README.md")
             if not any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info")
                        for part in p.relative_to(root).parts[:-1])]
    return sorted(found, key=lambda p: (len(p.relative_to(root).parts), str(p)))


BLOCK = re.compile(r"(?:<!-- readme-test: skip \((?P<why>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```", re.S)
INSTALLED = "needs the project installed"


def snippets(path: Path) -> list[tuple[int, str | None, str]]:
    """(line, skip reason or None, code) of every ```python block of a guide."""
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group("why"), m.group("code")) for m in BLOCK.finditer(text)]


GUIDES = guides()
SNIPPETS = [(g.relative_to(ROOT).as_posix(), *s) for g in GUIDES for s in snippets(g)]


def installed_from_here(root: Path = ROOT) -> str | None:
    """None when ``import vit_peft`` resolves to this checkout's peft/; else why the installed snippets skip."""
    spec = importlib.util.find_spec("vit_peft")
    if spec is None or not spec.origin:
        return "needs the project installed (pip install -e .): vit_peft is not importable"
    origin = Path(spec.origin).resolve()
    if not origin.is_relative_to((root / "peft").resolve()):
        return f"needs the project installed from this checkout: vit_peft resolves to {origin.parent}"
    return None


def run_snippet(code: str, folder: Path, pythonpath: list[str]) -> subprocess.CompletedProcess:
    write_google_npz(folder / "ViT-B_16.npz", vit.get_config("testing"), seed=0)
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and Path(p).resolve() != ROOT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath + kept)}
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_guide_is_found_and_has_snippets_to_run():
    """The finder sees the README and the guides beside the code; every python block is found, runnable or skipped
    with a reason, and every guide that shows Python runs at least one of its blocks."""
    names = {g.relative_to(ROOT).as_posix() for g in GUIDES}
    assert {"README.md", "vit/README.md", "loaders/README.md", "peft/README.md", "peft/finetune/README.md",
            "peft/bench/README.md", "tools/README.md", "tests/README.md"} <= names
    for g in GUIDES:
        found = snippets(g)
        assert len(found) == g.read_text().count("```python"), g
        assert all(why.strip() for _, why, _ in found if why is not None), g
    assert sum(why is None for _, why, _ in snippets(ROOT / "README.md")) >= 1


@pytest.mark.parametrize("guide, line, why, code", SNIPPETS, ids=[f"{g}:{n}" for g, n, _, _ in SNIPPETS])
def test_snippet_runs(guide, line, why, code, tmp_path):
    if why is not None and why.startswith(INSTALLED):
        reason = installed_from_here()
        if reason:
            pytest.skip(reason)
        out = run_snippet(code, tmp_path, [])  # as a user runs it: the installed package, not the checkout
    elif why is not None:
        pytest.skip(why)
    else:
        out = run_snippet(code, tmp_path, [str(ROOT)])
    assert out.returncode == 0, f"{guide} snippet at line {line} failed:\n{out.stderr[-3000:]}"


def test_installed_snippets_run_when_installed(tmp_path):
    """The snippets marked as needing the project installed run against an install of this checkout. The stand-in
    install is what ``pip install -e .`` sets up (vit_peft -> peft/, vit, loaders), made with links in a folder on
    ``sys.path``, so the test needs no pip; the checkout itself is not on ``sys.path``."""
    site = tmp_path / "site"
    site.mkdir()
    for name, target in (("vit_peft", "peft"), ("vit", "vit"), ("loaders", "loaders")):
        (site / name).symlink_to(ROOT / target, target_is_directory=True)
    marked = [(g, n, code) for g, n, why, code in SNIPPETS if why is not None and why.startswith(INSTALLED)]
    assert marked, "no snippet is marked as needing the project installed"
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('vit_peft').origin)"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                           timeout=120)
    assert Path(probe.stdout.strip()).resolve() == (ROOT / "peft" / "__init__.py").resolve(), probe.stderr
    for i, (guide, line, code) in enumerate(marked):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        out = run_snippet(code, folder, [str(site)])
        assert out.returncode == 0, f"{guide} snippet at line {line} failed when installed:\n{out.stderr[-3000:]}"


def test_installed_snippets_are_judged_by_where_vit_peft_resolves(tmp_path, monkeypatch):
    """An install of this checkout runs them; an install of another copy, or none, skips them saying why."""
    other = tmp_path / "other"
    (other / "peft").mkdir(parents=True)
    site = tmp_path / "site"
    site.mkdir()
    (site / "vit_peft").symlink_to(ROOT / "peft", target_is_directory=True)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "vit_peft", raising=False)
    importlib.invalidate_caches()
    assert installed_from_here(ROOT) is None
    assert "resolves to" in installed_from_here(other)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first_block = readme[readme.index("```bash"):readme.index("```", readme.index("```bash") + 3)]
    readme_cmd = re.search(r"pip install -e \"\.\[test\]\" && (python -m pytest[^\n]*)", first_block).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python3? -m pytest.*$", ci, re.M).group(0).replace("python3", "python") == readme_cmd
