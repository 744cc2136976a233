"""Label lists and class-name files: parsing only, every bad line reported with file and line.

PaddleClas lists are `relative/path<delimiter>label` lines with a `class_id name` map file
(class_id_map_file); classification-pp writes `<class_id>;<path>` lines (`cls_train.txt`)
and a names file with one class a line (`cls_classes.txt`). Syntax, label range and empty
lists fail at once, all bad lines listed in one error."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from mbv2.data.errors import DataError, listed


def resolve_delimiter(delimiter: str) -> str:
    """`\\t` and `tab` mean a tab: a shell or Hydra override cannot easily pass one."""
    return "\t" if delimiter in ("\\t", "tab") else delimiter


def meaningful_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of a list file; blank lines at the end are ignored
    (editors add them), blank lines in between are kept so they can be reported."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
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


def _parse_label(label_text: str, num_classes: int | None) -> int | str:
    """The label, or the problem with it."""
    try:
        label = int(label_text)
    except ValueError:
        return f"label {label_text!r} is not an integer"
    if label < 0 or (num_classes is not None and label >= num_classes):
        limit = f"below the number of classes ({num_classes})" if num_classes else ">= 0"
        return f"label {label} is out of range; labels must be {limit}"
    return label


def read_label_list(path: Path, image_root: Path, line_format: Literal["paddleclas", "seed"],
                    delimiter: str = " ", num_classes: int | None = None
                    ) -> tuple[list[tuple[str, int]], list[str]]:
    """Samples and their origins (`file:line`) of a label list.

    paddleclas: `relative/path<delimiter>label`, split at the last delimiter, so paths
    may contain the delimiter. seed (classification-pp): `<class_id>;<path>`. Relative
    image paths are taken from `image_root`. Every bad line is collected, then one error
    names them all."""
    samples, origins, problems = [], [], []
    for lineno, line in meaningful_lines(path):
        where = f"{path}:{lineno}"
        text = line.strip()
        if not text:
            problems.append(f"{where}: empty line; remove it")
            continue
        file_text, label_text, want = _split_line(text, line_format, delimiter)
        if not file_text or not label_text:
            problems.append(f"{where}: expected {want}, got {line!r}")
            continue
        label = _parse_label(label_text, num_classes)
        if isinstance(label, str):
            problems.append(f"{where}: {label}")
            continue
        image = Path(file_text).expanduser()
        samples.append((str(image if image.is_absolute() else image_root / image), label))
        origins.append(where)
    if problems:
        raise DataError(f"{len(problems)} bad line(s) in the label list {path}:{listed(problems)}")
    if not samples:
        raise DataError(f"{path}: the label list has no samples")
    return samples, origins


def read_class_names(path: Path, line_format: Literal["id_name", "names"]) -> list[str]:
    """id_name (PaddleClas class_id_map_file): `id name` lines, ids 0..K-1 in any order,
    names may contain spaces. names (classification-pp cls_classes.txt): one per line."""
    lines = meaningful_lines(path)
    if line_format == "names":
        return [line.strip() for _, line in lines]
    names: dict[int, str] = {}
    problems = []
    for lineno, line in lines:
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not parts[0].lstrip("-").isdigit():
            problems.append(f"{path}:{lineno}: expected 'class_id name', got {line!r}")
        elif int(parts[0]) in names:
            problems.append(f"{path}:{lineno}: class id {parts[0]} appears twice")
        else:
            names[int(parts[0])] = parts[1]
    if not problems and sorted(names) != list(range(len(names))):
        problems.append(f"{path}: class ids must be 0..{len(names) - 1} without gaps, got "
                        f"{sorted(names)[:10]}...")
    if problems:
        raise DataError(f"bad class names file (data.class_names):{listed(problems)}")
    return [names[i] for i in range(len(names))]
