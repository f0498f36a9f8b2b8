"""Installing the project beside Hugging Face's ``peft``: the wheel claims no file of another distribution, and in a
fresh environment both ``pip install .`` and ``pip install -e .`` leave HF peft's files untouched, its import
working, ``import vit_peft`` unambiguous, the ``vit-peft`` command usable from any folder, and ``pip uninstall``
removing only this project.

A stand-in for HF peft (a real wheel named ``peft`` with ``peft/__init__.py``, ``peft/functional.py`` and a
sub-package, the files the old layout overwrote) is built in the test; the real package needs transformers and
more from the network. The environments are venvs without pip or site-packages of their own that see this
machine's torch through a ``.pth`` line, so nothing is downloaded and the machine's own installs are not used.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = {"vit", "loaders", "vit_peft"}


def pip(python: Path, *args, cwd=None) -> str:
    out = subprocess.run([str(python), "-m", "pip", *args, "--no-input", "--disable-pip-version-check", "-q"],
                         capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def build_wheel(project: Path, dest: Path) -> Path:
    pip(Path(sys.executable), "wheel", str(project), "--no-deps", "--no-build-isolation", "-w", str(dest))
    return next(dest.glob("*.whl"))


@pytest.fixture(scope="module")
def our_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of its files (setuptools writes build/ beside the sources)."""
    copy = tmp_path_factory.mktemp("project")
    for name in ("vit", "loaders", "peft"):
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    return build_wheel(copy, tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_only_our_three_packages_and_every_source_file(our_wheel):
    names = zipfile.ZipFile(our_wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == OUR_PACKAGES  # in particular no peft/: that name belongs to Hugging Face's distribution
    expected = {f"vit_peft/{p.relative_to(ROOT / 'peft').as_posix()}" for p in (ROOT / "peft").rglob("*")
                if p.is_file() and p.suffix in (".py", ".cu", ".cpp", ".h") and "__pycache__" not in p.parts}
    for pkg in ("vit", "loaders"):
        expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert expected == {n for n in names if n.split("/")[0] in OUR_PACKAGES}  # setup.cfg's package list is complete
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vit-peft = vit_peft.cli:main" in zipfile.ZipFile(our_wheel).read(entry).decode()


@pytest.fixture(scope="module")
def fake_hf_peft_wheel(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("hf-peft")
    (project / "peft" / "utils").mkdir(parents=True)
    (project / "peft" / "__init__.py").write_text("__version__ = '0.99'\nclass LoraConfig:\n    pass\n")
    (project / "peft" / "functional.py").write_text("HF = True\n")
    (project / "peft" / "utils" / "__init__.py").write_text("")
    (project / "setup.cfg").write_text("[metadata]\nname = peft\nversion = 0.99\n\n[options]\npackages = find:\n")
    (project / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                            'build-backend = "setuptools.build_meta"\n')
    return build_wheel(project, tmp_path_factory.mktemp("hf-wheel"))


def fresh_env(folder: Path) -> Path:
    """A venv that sees this machine's torch, numpy, pip and setuptools through a .pth line, and nothing of this
    project (the .pth line adds a folder to sys.path without running the .pth files inside it)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                         text=True, check=True).stdout.strip()
    Path(own, "_machine_packages.pth").write_text(site.getsitepackages()[0] + "\n")
    return python


def hf_files(python: Path) -> dict[str, str]:
    """sha256 of every file of the installed HF peft stand-in, from the distribution's own RECORD."""
    code = ("import importlib.metadata as m, hashlib; d = m.distribution('peft'); "
            "print('\\n'.join(f'{f} ' + hashlib.sha256(d.locate_file(f).read_bytes()).hexdigest() "
            "for f in d.files if str(f).startswith('peft/')))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def run_py(python: Path, code: str, cwd: Path) -> str:
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_install_beside_hugging_face_peft(tmp_path, fake_hf_peft_wheel, our_wheel, editable):
    python = fresh_env(tmp_path / "env")
    pip(python, "install", "--no-index", "--no-deps", str(fake_hf_peft_wheel))
    before = hf_files(python)
    assert {"peft/__init__.py", "peft/functional.py"} <= set(before)
    if editable:
        pip(python, "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(ROOT))
    else:
        pip(python, "install", "--no-index", "--no-deps", str(our_wheel))
    assert hf_files(python) == before  # not one byte of HF peft changed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_py(python, "import peft, peft.functional, vit_peft, vit, loaders; from peft import LoraConfig; "
                         "from vit_peft.finetune.checkpoint import load_checkpoint; "
                         "print(peft.functional.HF, vit_peft.__vit_project__, hasattr(peft, 'apply_rlrr'), "
                         "vit_peft.apply_rlrr.__module__)", elsewhere)
    assert out.split() == ["True", "True", "False", "vit_peft.rlrr"]
    cli = subprocess.run([str(python.parent / "vit-peft"), "finetune", "--help"], capture_output=True, text=True,
                         cwd=elsewhere, timeout=300)
    assert cli.returncode == 0 and "--lora-rank" in cli.stdout, cli.stderr[-2000:]
    pip(python, "uninstall", "-y", "vit-peft")
    assert hf_files(python) == before
    assert run_py(python, "from peft import LoraConfig; import peft.functional; print('ok')", elsewhere).strip() == "ok"
    gone = subprocess.run([str(python), "-c", "import vit_peft"], capture_output=True, text=True, cwd=elsewhere)
    assert gone.returncode != 0


def test_checkout_imports_without_installing(tmp_path):
    """From the repository root, `import vit, loaders, peft` finds this checkout's packages (no install)."""
    python = fresh_env(tmp_path / "env")
    out = run_py(python, "import vit, loaders, peft; print(peft.__vit_project__, peft.__file__)", ROOT)
    assert out.split()[0] == "True" and out.split()[1] == str(ROOT / "peft" / "__init__.py")
