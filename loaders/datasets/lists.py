"""Reading the lists that name images (VTAB-1k ``.txt``, FGVC ``.json``, CSV/TSV exports) without trusting them.

Every path read from a list must stay inside its data root: absolute paths, ``..`` components and symlinks that
lead out are refused with the file and line named. Lists are UTF-8 (invalid bytes are an error naming the line);
labels are plain ASCII decimal integers (``³`` or ``--3`` are errors); JSON nested too deeply is an error, not a
RecursionError.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from .base import DataNotFoundError, DatasetError

_DECIMAL = re.compile(r"[0-9]+")


def read_text(path: Path) -> str:
    """The file as UTF-8 text; invalid bytes are a DatasetError naming the line."""
    if not path.is_file():
        raise DataNotFoundError(f"{path} not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def parse_label(text: str, where: str) -> int:
    """A class id written as plain ASCII digits."""
    if not _DECIMAL.fullmatch(text):
        raise DatasetError(f"{where}: label {text!r} is not a plain decimal integer")
    return int(text)


def inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel``, refusing a path that is absolute, has a ``..`` part or resolves (symlinks) outside root."""
    if not rel or "\x00" in rel:
        raise DatasetError(f"{where}: empty or invalid path {rel!r}")
    pure = Path(rel)
    if pure.is_absolute() or rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise DatasetError(f"{where}: absolute path {rel!r}; paths must be relative to {root}")
    if ".." in re.split(r"[\\/]", rel):
        raise DatasetError(f"{where}: path {rel!r} climbs out with '..'; paths must stay inside {root}")
    path = root / pure
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise DatasetError(f"{where}: {rel!r} leads outside {root} (a symlink to {real})")
    return path


def load_json(path: Path, max_depth: int = 32):
    """A JSON file (UTF-8), refusing nesting deeper than ``max_depth`` before the parser recurses."""
    text = read_text(path)
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # a cheap bracket count outside strings: deep nesting never reaches the recursive parser
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > max_depth:
                raise DatasetError(f"{path}: JSON nested deeper than {max_depth} levels")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


def read_csv_list(path: Path) -> list[tuple[str, str, int]]:
    """(path, label text, line number) of a ``path,label`` list (``.tsv``: tab-separated); a first line
    ``path,label`` (or file/filename/image, label/class) is a header and skipped."""
    text = read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = []
    for n, row in enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), 1):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DatasetError(f"{path}:{n}: expected 2 fields 'path{delimiter}label', got {len(row)}")
        name, label = row[0].strip(), row[1].strip()
        if n == 1 and name.lower() in ("path", "file", "filename", "image") and label.lower() in ("label", "class"):
            continue
        if not label:
            raise DatasetError(f"{path}:{n}: empty label")
        rows.append((name, label, n))
    if not rows:
        raise DatasetError(f"{path} lists no images")
    return rows
