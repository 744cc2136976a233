"""Label lists and class-name files: parsing only, every bad line reported with file and line.

PaddleClas lists are `relative/path<delimiter>label` lines with a `class_id name` map file
(class_id_map_file); classification-pp writes `<class_id>;<path>` lines (`cls_train.txt`)
and a names file with one class a line (`cls_classes.txt`). Syntax, label range and empty
lists fail at once, all bad lines listed in one error. Files are UTF-8 (a BOM, CRLF line
ends and UTF-16 with a BOM are fine); binary or other-encoded files fail naming the key."""
from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Literal

from mbv2.data.errors import DataError, listed

# a class id: ASCII digits with an optional sign (int() would also take '1_0' and '١')
_INTEGER = re.compile(r"[+-]?[0-9]+")
_WHOLE_FLOAT = re.compile(r"[+-]?[0-9]+\.0*")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_DELIMITERS = {" ": "' '", "\t": "tab", ",": "','", ";": "';'"}


def resolve_delimiter(delimiter: str) -> str:
    """`\\t` and `tab` mean a tab: a shell or Hydra override cannot easily pass one."""
    return "\t" if delimiter in ("\\t", "tab") else delimiter


def _line_at(data: bytes, offset: int) -> int:
    """The 1-based line of byte `offset`, counting line ends as meaningful_lines does."""
    return len(_LINE_END.findall(data, 0, offset)) + 1


def read_text(path: Path, key: str) -> str:
    """A list or names file (config key `key`) as text: UTF-8 with or without a BOM, or
    UTF-16 with a BOM (Windows Notepad's "Unicode"); anything else fails naming the key."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.{key}: cannot read {path} ({type(e).__name__}: {e.strerror})") from e
    utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
    nul = -1 if utf16 else data.find(b"\0")
    if nul >= 0:
        line = _line_at(data, nul)
        raise DataError(f"data.{key}: {path}:{line} holds a NUL byte, so it is a binary file, "
                        f"not a text list; point data.{key} at the list file")
    try:
        return data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        line = _line_at(data, e.start)
        raise DataError(f"data.{key}: {path}:{line} is not {'UTF-16' if utf16 else 'UTF-8'} text "
                        f"(byte 0x{data[e.start]:02x}); save the file as UTF-8, or point "
                        f"data.{key} at the text list if this is not it") from e


def meaningful_lines(path: Path, key: str = "train_list") -> list[tuple[int, str]]:
    """(1-based line number, text) of a list file; blank lines at the end are ignored
    (editors add them), blank lines in between are kept so they can be reported."""
    # the line ends editors know; str.splitlines() would also split at \f, \x1c or U+2028
    # and number the lines differently from what the user sees
    lines = re.split(r"\r\n|\r|\n", read_text(path, key))
    while lines and not lines[-1].strip():
        lines.pop()
    return list(enumerate(lines, start=1))


def find_list_file(key: str, value: str, root: Path | None) -> Path:
    """A list file's path: absolute, or under data.root, or relative to the working dir."""
    path = Path(value).expanduser()
    tried = [path] if path.is_absolute() or root is None else [root / path, path]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    for candidate in tried:
        if candidate.is_dir():
            inside = sorted(p.name for p in candidate.glob("*.txt"))[:3]
            hint = f" (it holds {', '.join(inside)})" if inside else ""
            raise DataError(f"data.{key}={value!r}: {candidate} is a directory, not a list "
                            f"file; point data.{key} at the file itself{hint}")
    raise DataError(f"data.{key}={value!r}: no such file (looked at "
                    f"{', '.join(str(p) for p in tried)})")


def _split_line(text: str, line_format: Literal["paddleclas", "seed"],
                delimiter: str) -> tuple[str, str, str]:
    """(file, label, what a line should look like); file or label empty when malformed."""
    if line_format == "seed":
        parts = text.split(";", 1)
        label_text, file_text = parts if len(parts) == 2 else ("", "")
        return file_text.strip(), label_text.strip(), "'<class_id>;<path>'"
    parts = text.rsplit(delimiter, 1)
    file_text, label_text = parts if len(parts) == 2 else ("", "")
    return file_text.strip(), label_text.strip(), f"'relative/path{delimiter!r}label'"


def _format_hint(text: str, line_format: str, delimiter: str, lineno: int) -> str:
    """Why a line may not parse: another delimiter than data.delimiter, a seed line
    written path first, or a header line."""
    if lineno == 1 and not any(c.isdigit() for c in text):
        return "; if this is a header line, remove it"
    if line_format == "seed":
        path, _, label = text.rpartition(";")
        return "; the class id comes first" if path and _INTEGER.fullmatch(label.strip()) else ""
    for other, spelled in _DELIMITERS.items():
        parts = text.rsplit(other, 1)
        if other != delimiter and len(parts) == 2 and _INTEGER.fullmatch(parts[1].strip()):
            return f"; the line is split by {spelled}: set data.delimiter={spelled}"
    return ""


def _parse_label(label_text: str, num_classes: int | None, classes_from: str) -> int | str:
    """The label, or the problem with it."""
    if not _INTEGER.fullmatch(label_text):
        whole = _WHOLE_FLOAT.fullmatch(label_text)
        hint = f"; write it as {int(float(label_text))}" if whole else ""
        return f"label {label_text!r} is not an integer{hint}"
    label = int(label_text)
    if label < 0:
        return f"label {label} is out of range; labels must be >= 0 (class ids count from 0)"
    if num_classes is not None and label >= num_classes:
        return (f"label {label} is out of range; labels must be below the number of "
                f"classes ({num_classes}){classes_from}")
    return label


def read_label_list(path: Path, image_root: Path, line_format: Literal["paddleclas", "seed"],
                    delimiter: str = " ", num_classes: int | None = None, key: str = "train_list",
                    classes_from: str = "") -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and their origins (`file:line`) of a label list (config key `key`).

    paddleclas: `relative/path<delimiter>label`, split at the last delimiter, so paths
    may contain the delimiter. seed (classification-pp): `<class_id>;<path>`. Relative
    image paths are taken from `image_root`. Every bad line is collected, then one error
    names them all; `classes_from` ends an out-of-range message (where num_classes came
    from, and the fix)."""
    samples, origins, problems = [], [], []
    for lineno, line in meaningful_lines(path, key):
        where = f"{path}:{lineno}"
        text = line.strip()
        if not text:
            problems.append(f"{where}: empty line; remove it")
            continue
        file_text, label_text, want = _split_line(text, line_format, delimiter)
        label = (_parse_label(label_text, num_classes, classes_from) if file_text and label_text
                 else f"expected {want}, got {line!r}")
        if isinstance(label, str):
            hint = "" if "out of range" in label else _format_hint(text, line_format, delimiter, lineno)
            problems.append(f"{where}: {label}{hint}")
            continue
        image = Path(file_text).expanduser()
        samples.append((str(image if image.is_absolute() else image_root / image), label))
        origins.append(where)
    if problems:
        raise DataError(f"{len(problems)} bad line(s) in the label list {path}:{listed(problems)}")
    if not samples:
        want = "'<class_id>;<path>'" if line_format == "seed" else "'path label'"
        raise DataError(f"{path}: the label list has no samples (data.{key}); write one "
                        f"{want} line per image")
    return samples, origins


def read_class_names(path: Path, line_format: Literal["id_name", "names"]) -> list[str]:
    """id_name (PaddleClas class_id_map_file): `id name` lines, ids 0..K-1 in any order,
    names may contain spaces. names (classification-pp cls_classes.txt): one per line,
    line i naming class i."""
    lines = meaningful_lines(path, "class_names")
    want = "'class_id name'" if line_format == "id_name" else "class name"
    if not lines:
        raise DataError(f"data.class_names: {path} has no class names; write one {want} line "
                        f"per class, or leave data.class_names unset to number the classes "
                        f"0..K-1 from the labels")
    if line_format == "names":
        blank = [f"{path}:{n}: empty line, so class {n - 1} has no name; write its name or "
                 f"remove the line (the ids after it move down by one)"
                 for n, line in lines if not line.strip()]
        if blank:
            raise DataError(f"bad class names file (data.class_names):{listed(blank)}")
        return [line.strip() for _, line in lines]
    names, problems = parse_id_names(path, lines)
    if problems:
        raise DataError(f"bad class names file (data.class_names):{listed(problems)}")
    return names


def parse_id_names(path: Path, lines: list[tuple[int, str]]) -> tuple[list[str], list[str]]:
    """PaddleClas's class_id_map_file lines (`meaningful_lines`): `id name`, ids 0..K-1 in
    any order, names may contain spaces. The names by id, and what is wrong (`path:line:
    ...` sentences; the caller says which setting pointed at the file)."""
    names: dict[int, str] = {}
    problems = []
    for lineno, line in lines:
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not _INTEGER.fullmatch(parts[0]):
            problems.append(f"{path}:{lineno}: expected 'class_id name', got {line!r}")
        elif int(parts[0]) in names:
            problems.append(f"{path}:{lineno}: class id {parts[0]} appears twice")
        else:
            names[int(parts[0])] = parts[1]
    missing = sorted(set(range(len(names))) - set(names))
    if not problems and missing:
        problems.append(f"{path}: class ids must be 0..{len(names) - 1} without gaps; missing "
                        f"{missing[:10]}, extra {sorted(set(names) - set(range(len(names))))[:10]}")
    return ([names[i] for i in range(len(names))] if not problems else []), problems
