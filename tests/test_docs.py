"""The guides hold together and speak of this repository alone: every relative link (and its #anchor) between them
resolves, every ``python tools/X.py --flag`` they show names a real tool and a flag it accepts, the README's tour of
``vit/model.py`` names its pieces in the file's order, every tool and method has its option table (rendered from
the option fields; tests/test_options_docs.py compares them), and no file of the repository names a path outside it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_readme import GUIDES, ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, _ and - stay), spaces -> -."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def test_slugs_follow_githubs_rule():
    assert slug("Fine-tuning: `tools/finetune.py`") == "fine-tuning-toolsfinetunepy"
    assert slug("The fused CUDA kernel (optional)") == "the-fused-cuda-kernel-optional"
    assert slug("VTAB-1k and FGVC: the paper's benchmarks") == "vtab-1k-and-fgvc-the-papers-benchmarks"
    assert slug("`gpu_check.sh`") == "gpu_checksh"


@pytest.mark.parametrize("guide", GUIDES, ids=[g.relative_to(ROOT).as_posix() for g in GUIDES])
def test_every_relative_link_resolves(guide):
    """Files exist inside the repository; an #anchor exists in the markdown file it points into."""
    broken = []
    for target in relative_links(guide):
        file, _, anchor = target.partition("#")
        dest = (guide.parent / file).resolve() if file else guide
        if not dest.is_relative_to(ROOT) or not dest.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{guide.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_checker_catches_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\n## Twice\n\n## Twice\n\n```\n# not a heading\n```\n")
    assert anchors(tmp_path / "a.md") == {"title-here", "twice", "twice-1"}
    (tmp_path / "b.md").write_text("[ok](a.md#twice-1) [gone](missing.md) ![fig](a.md) [web](https://x.org/y)\n"
                                   "```\n[not a link](nowhere.md)\n```\n")
    assert relative_links(tmp_path / "b.md") == ["a.md#twice-1", "missing.md", "a.md"]


# ── the commands the guides show ────────────────────────────────────────────────────────────────────────────

def tool_commands() -> list[tuple[str, str, str]]:
    """(guide, tool, flags text) for every `python tools/X.py ...` (also after torchrun) in code blocks and spans."""
    found = []
    for guide in GUIDES:
        text = guide.read_text().replace("\\\n", " ")
        pieces = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
        pieces += re.findall(r"`([^`\n]*tools/\w+\.py[^`\n]*)`", FENCE.sub("", text))
        for piece in pieces:
            command = piece.split(" #")[0]
            for m in re.finditer(r"tools/([a-z_]+)\.py((?:(?!&&|\||;).)*)", command):
                found.append((guide.relative_to(ROOT).as_posix(), m.group(1), m.group(2)))
    return found


HELP_SCRIPT = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import importlib
out = {}
for name in sys.argv[2:]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            importlib.import_module("peft.cli." + name).main(["--help"])
        except SystemExit:
            pass
    out[name] = buf.getvalue()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def tool_flags():
    tools = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))
    out = subprocess.run([sys.executable, "-c", HELP_SCRIPT, str(ROOT), *tools], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    helps = json.loads(out.stdout)
    return {t: set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", h)) for t, h in helps.items()}


def wrong_flags(commands, tool_flags) -> list[str]:
    wrong = []
    for guide, tool, args in commands:
        if tool not in tool_flags:
            wrong.append(f"{guide}: tools/{tool}.py does not exist")
            continue
        wrong += [f"{guide}: tools/{tool}.py has no flag {flag}"
                  for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", args) if flag not in tool_flags[tool]]
    return wrong


def test_every_tool_command_in_the_guides_uses_real_flags(tool_flags):
    commands = tool_commands()
    assert len({tool for _, tool, _ in commands}) >= 8  # the guides show nearly every tool
    assert all("--help" in flags for flags in tool_flags.values())  # every tool's help was read
    assert wrong_flags(commands, tool_flags) == []


def test_the_flag_check_sees_a_wrong_flag(tool_flags):
    assert wrong_flags([("g.md", "finetune", " --mode rlrr --no-such-flag 3 --lr 1e-3"), ("g.md", "gone", "")],
                       tool_flags) == ["g.md: tools/finetune.py has no flag --no-such-flag", "g.md: tools/gone.py does not exist"]
    assert "--threads" in tool_flags["quickstart"] and "--rehearsal" in tool_flags["vtab"]


# ── the tour of vit/model.py ────────────────────────────────────────────────────────────────────────────────

def tour(readme: str) -> list[str]:
    section = readme[readme.index("## Read the model"):]
    rows = re.findall(r"^\| `([\w.]+)`", section[:section.index("```")], re.M)
    return [r.rpartition(".")[2] for r in rows]


def test_the_tours_name_model_py_pieces_in_file_order():
    """README.md's ten rows and vit/README.md's tour: each name is defined in vit/model.py, in the file's order."""
    source = (ROOT / "vit" / "model.py").read_text()
    guide = (ROOT / "vit" / "README.md").read_text()
    section = guide[guide.index("## A tour of `vit/model.py`"):]
    cells = re.findall(r"^\| ([^|]+)\|", section[:section.index("```")], re.M)[1:]  # below the header
    names = [n.rpartition(".")[2] for cell in cells for n in re.findall(r"`(\w[\w.]*)", cell)]
    lines = [re.search(rf"^\s*(?:class|def) {n}\b", source, re.M) for n in names]
    assert all(lines), [n for n, m in zip(names, lines) if not m]
    assert [m.start() for m in lines] == sorted(m.start() for m in lines) and len(names) >= 10
    names = tour((ROOT / "README.md").read_text())
    lines = []
    for name in names:
        m = re.search(rf"^\s*(?:class|def) {name}\b", source, re.M)
        assert m, f"the README's tour names {name}, which vit/model.py does not define"
        lines.append(source[:m.start()].count("\n"))
    assert len(names) == 10 and lines == sorted(lines)


# ── nothing outside the repository ──────────────────────────────────────────────────────────────────────────

# Written in pieces so that this file does not match its own patterns.
OUTSIDE = re.compile("|".join(["/" + "work/", r"\.\./" + "shared", "shared/" + "hooks", "file:///" + "shared",
                               r"\." + "library/"]))


def repository_files() -> list[Path]:
    """The files git tracks (a scratch file beside them is the user's, not the repository's)."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:  # not a git checkout (an unpacked archive): every file but hidden folders
        return [p for p in ROOT.rglob("*") if p.is_file() and not any(s.startswith(".") for s in
                                                                        p.relative_to(ROOT).parts[:-1])]
    return [ROOT / name for name in out.stdout.splitlines() if (ROOT / name).is_file()]


# How the project was made is no part of it: a reader needs the conditions of a measurement, not its history.
DEVELOPMENT = re.compile("|".join(["in this " + "session", "was " + "lent", "were " + "lent", "sessions " + "that",
                                   "this project's " + "(?:2-core|build machine|CPU box)"]), re.I)


def mentions(pattern: re.Pattern) -> list[str]:
    hits = []
    for path in repository_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images
        hits += [f"{path.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
                 for m in pattern.finditer(text)]
    return hits


def test_no_file_names_a_path_outside_the_repository():
    assert mentions(OUTSIDE) == []


def test_no_file_tells_how_the_project_was_developed():
    assert mentions(DEVELOPMENT) == []


def test_the_outside_path_pattern_matches_what_it_should():
    assert OUTSIDE.search("python ../" + "shared/" + "hooks/x.py") and OUTSIDE.search("see /" + "work/notes")
    assert OUTSIDE.search("url='file:///" + "shared/models/a.npz'")
    assert not OUTSIDE.search("~/.cache/vit-peft and /usr/share/datasets/fashion-mnist, file:///mnt/models/a.npz")
    assert DEVELOPMENT.search("No GPU was " + "lent while this kernel was written")
    assert DEVELOPMENT.search("on this project's " + "2-core CPU box") and not DEVELOPMENT.search("a 2-core AMD EPYC")


# ── the methods tables ──────────────────────────────────────────────────────────────────────────────────────

def methods_table(path: Path) -> list[dict[str, str]]:
    """The rows of a guide's table under '## The methods', as {column: cell}."""
    text = path.read_text()
    section = text[text.index("## The methods"):]
    lines = [l for l in section.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(head) or not cells[0].startswith("`"):
            break
        rows.append(dict(zip(head, cells)))
    return rows


@pytest.mark.parametrize("guide", ["README.md", "peft/README.md"])
def test_the_methods_tables_say_what_the_registry_holds(guide):
    """Every registered method in the registry's order, its ViT-B/16 count as counted on the meta device, whether it
    merges, and (where the table shows it) its default learning rate."""
    import peft
    from conftest import b16

    rows = methods_table(ROOT / guide)
    assert [r["method"].strip("`") for r in rows] == list(peft.METHOD_NAMES)
    for r in rows:
        mode = r["method"].strip("`")
        model = b16()
        peft.apply_method(model, mode)
        count = int(re.match(r"[\d,]+", r["ViT-B/16 params"]).group(0).replace(",", ""))
        assert count == peft.trainable_parameters(model)[0] - 769 * 10, mode
        method = peft.METHODS[mode]
        merges = next(v for k, v in r.items() if k.startswith("merge")).replace("*", "").split()[0]
        assert merges == ("–" if not method.wrappers else "yes" if method.mergeable else "no"), mode
        if "default lr" in r:
            assert float(r["default lr"]) == method.lr, mode


def test_the_readme_stays_short():
    """What it is, the two commands, three paths, the methods, the guides: the reference lives in the guides."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


# ── the files the guides name ───────────────────────────────────────────────────────────────────────────────

PATH = re.compile(r"(?<![\w./-])((?:vit|loaders|peft|tools|tests|img)/[\w/-]*\w\.(?:py|md|cu|cpp|h|sh|png))(?![\w*])")


def placeholder(path: str) -> bool:
    """`tools/NAME.py`, `peft/mymethod.py`: names that stand for any file."""
    stem = Path(path).stem
    return stem.isupper() or stem.startswith("my")


def test_every_file_a_guide_names_exists():
    """`peft/finetune/recipes.py`, `tests/test_recipes.py`, `img/...png`: a renamed or removed file leaves no stale
    mention behind (paths are from the repository root)."""
    missing = [f"{g.relative_to(ROOT)}: {p}" for g in GUIDES for p in sorted(set(PATH.findall(g.read_text())))
               if not (ROOT / p).exists() and not placeholder(p)]
    assert not missing, "\n".join(missing)


def test_the_file_finder_reads_paths_as_written():
    text = "see `peft/modes.py`, tools/finetune.py --x, img/a.png, tests/test_kernel*.py and runs/peft/x.py"
    assert PATH.findall(text) == ["peft/modes.py", "tools/finetune.py", "img/a.png"]  # not globs, not under runs/
    assert placeholder("tools/NAME.py") and placeholder("peft/mymethod.py") and not placeholder("peft/modes.py")


def test_the_tests_guide_names_every_test_file():
    """tests/README.md says what each test file holds the code to: a new file gets its row."""
    guide = (ROOT / "tests" / "README.md").read_text()
    unnamed = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if f"`{p.name}`" not in guide]
    assert not unnamed, f"tests/README.md has no row for {', '.join(unnamed)}"


# ── the option tables ───────────────────────────────────────────────────────────────────────────────────────

OPTIONS_MARK = re.compile(r"<!-- options: ([\w.]+) -->\n(.*?)<!-- /options -->", re.S)


def test_the_guides_hold_the_option_table_of_every_tool_and_method():
    """The fine-tuning, suite, quick-start and benchmark options and every method's config each have their table where
    a reader looks for them. The tables are `peft.fields.options_table` of the fields (help, default, range):
    tests/test_options_docs.py fails when one differs from the metadata, this test when one is missing (a new
    method needs its table in peft/README.md)."""
    import dataclasses
    import peft

    wanted = {"peft/finetune/README.md": ["peft.finetune.options.FinetuneOptions", "peft.finetune.suite.SuiteOptions"],
              "peft/bench/README.md": ["peft.bench.suite.BenchmarkOptions"],
              "tools/README.md": ["peft.finetune.quickstart.QuickstartOptions"],
              "peft/README.md": [f"{m.config.__module__}.{m.config.__name__}" for m in peft.METHODS.values()
                                 if m.config is not None and dataclasses.fields(m.config)]}
    for guide, classes in wanted.items():
        found = {dotted for dotted, _ in OPTIONS_MARK.findall((ROOT / guide).read_text())}
        assert sorted(set(classes) - found) == [], f"{guide} lacks these option tables"
