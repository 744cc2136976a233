"""What the summarised jobs share and what tells them apart: the study one summary shows.

A sweep's jobs share most of their settings (the data set, the schedule, the epochs) and
differ in a few (width, LR). The aligned table shows a column only for a setting that
varies and lists the shared ones once above it; the plot's title and summary.md's heading
name the dir, the data and what varies; and a summary whose jobs trained on different
data (another data set, image size or number of classes) says so, because their
accuracies do not compare.

A setting a job does not state (None: a job that never started, a config it cannot read)
counts as unknown, neither a value of its own nor a difference.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbv2.summary.jobs import SETTING_KEYS, JobRow

# The table's header (and the title's word) for each setting.
SETTING_LABELS = {
    "model.scale": "scale",
    "model.bottleneck": "bottleneck",
    "optim.name": "optimizer",
    "optim.lr": "lr",
    "optim.weight_decay": "weight decay",
    "sched.name": "schedule",
    "trainer.epochs": "epochs planned",
    "trainer.batch_size": "batch",
    "data.name": "data",
    "data.image_size": "image px",
    "data.num_classes": "classes",
}
# What a model was trained and evaluated on: accuracies compare only where these agree.
DATA_KEYS = ("data.name", "data.image_size", "data.num_classes")
# Varying, yet no column of their own: the table's epochs column shows done/planned.
_NOT_COLUMNS = frozenset({"trainer.epochs"})
_MAX_VARYING_WORDS = 4  # the title names this many varying keys, then "…"
# A single run's dir is `<time>_<overrides>` (conf/hydra/default.yaml): the time prefix.
_NAME_PREFIX = re.compile(r"^([^=.,_]*_)(.*)$")


def format_setting(value: Any) -> str:
    """A setting as the table and the notes write it: 0.1 not 0.10000, lists as JSON."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _data_bit(key: str, value: Any) -> str:
    """`digits`, `32 px`, `10 classes`: one data key's value as a group's name says it."""
    text = "?" if value is None else format_setting(value)
    unit = {"data.image_size": " px", "data.num_classes": " classes"}.get(key, "")
    return text + unit


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _is_setting(override: str) -> bool:
    """Whether an override sets a SETTING_KEY, or picks its group (`data=digits`)."""
    key = _override_key(override)
    return key in SETTING_KEYS or f"{key}.name" in SETTING_KEYS


def _value_order(text: str) -> tuple[bool, float, str]:
    """Numbers in numeric order (32 before 224), then text in alphabetical order."""
    try:
        return False, float(text), text
    except ValueError:
        return True, 0.0, text


def known_values(rows: Iterable[JobRow], key: str) -> list[str]:
    """The distinct values (formatted) the rows state for a setting, in order."""
    values = {format_setting(v) for v in (row.settings.get(key) for row in rows) if v is not None}
    return sorted(values, key=_value_order)


def where_name(root: Path) -> str:
    """The summarised dir as a user names it: below outputs/ (`sweeps/<date>/<time>`),
    from sweeps/ or runs/ when no outputs/ is above it, else the dir's own name."""
    parts = Path(root).resolve().parts
    if "outputs" in parts:
        below = parts[len(parts) - parts[::-1].index("outputs") :]
        return "/".join(below) or "outputs"
    for anchor in ("sweeps", "runs"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor) :])
    return parts[-1] if len(parts) > 1 else str(Path(root).resolve())


def _is_shared(token: str, hidden: set[str], shared: dict[str, str]) -> bool:
    """Whether a `key=value` text says only what the shared list says."""
    key, _, value = token.partition("=")
    key = key.lstrip("+~")
    return token in hidden or key in shared or shared.get(f"{key}.name") == value


def _shared_overrides(
    rows: Sequence[JobRow], shared: dict[str, str]
) -> tuple[set[str], list[str]]:
    """(the override strings every job was given, those of them the shared list needs:
    the ones whose setting it does not list already)."""
    common = set(rows[0].overrides).intersection(*(row.overrides for row in rows[1:]))
    listed = []
    for override in rows[0].overrides:
        # `data=digits` says no more than data.name=digits
        if override in common and not _is_shared(override, set(), shared):
            listed.append(override)
    return common, listed


def _strip_name(job: str, hidden: set[str], shared: dict[str, str]) -> str:
    """The job's dir name without the `key=value` parts every job shares."""
    head, _, last = job.rpartition("/")
    match = _NAME_PREFIX.match(last)
    prefix, rest = (match.group(1), match.group(2)) if match else ("", last)
    tokens = rest.split(",")
    if not all("=" in token for token in tokens):
        return job  # not a dir named by overrides: keep it as it is
    kept = [t for t in tokens if not _is_shared(t, hidden, shared)]
    last = prefix + ",".join(kept) if kept else (prefix.rstrip("_") or ",".join(tokens))
    return f"{head}/{last}" if head else last


@dataclass(frozen=True)
class Study:
    """The jobs of one summary, and what they share and where they differ."""

    where: str  # the summarised dir, e.g. sweeps/2026-12-01/09-30-00
    rows: tuple[JobRow, ...]
    shared: dict[str, str]  # setting key -> the one value every job that says has
    shared_overrides: tuple[str, ...]  # override strings every job has, not in shared
    hidden: frozenset[str]  # `key=value` texts every job shares: shown once, in neither
    varying: tuple[str, ...]  # SETTING_KEYS with more than one value, in that order
    names: dict[str, str]  # job -> its name in the table, shared parts left out

    @property
    def columns(self) -> tuple[str, ...]:
        """The settings the aligned table shows a column for."""
        return tuple(key for key in self.varying if key not in _NOT_COLUMNS)

    @property
    def mixed(self) -> tuple[str, ...]:
        """The DATA_KEYS that differ between jobs: () when all trained on the same data."""
        return tuple(key for key in DATA_KEYS if key in self.varying)

    def shared_lines(self) -> list[str]:
        """`key=value` for every setting and override all jobs share, each once."""
        settings = [f"{key}={value}" for key, value in self.shared.items()]
        return settings + list(self.shared_overrides)

    def name(self, row: JobRow) -> str:
        return self.names.get(row.job, row.job)

    def _extra_overrides(self, row: JobRow) -> list[str]:
        """The row's overrides that neither a setting nor the shared list covers."""
        return [o for o in row.overrides if o not in self.hidden and not _is_setting(o)]

    def overrides_cell(self, row: JobRow) -> str:
        """The row's overrides that neither a column, the shared list nor its name shows."""
        shown = set(self.name(row).rpartition("/")[2].split(","))
        return ",".join(o for o in self._extra_overrides(row) if o not in shown)

    def group(self, row: JobRow, keys: Sequence[str] | None = None) -> str:
        """The row's data group, by the data keys that differ (or by `keys`)."""
        keys = self.mixed if keys is None else keys
        return ", ".join(_data_bit(key, row.settings.get(key)) for key in keys)

    def data_text(self) -> str:
        """`data=digits, 32 px, 10 classes`; `mixed data: data=digits/cifar10, ...`."""
        name, size, classes = (known_values(self.rows, key) for key in DATA_KEYS)
        bits = [f"data={'/'.join(name) or '?'}"]
        if size:
            bits.append(f"{'/'.join(size)} px")
        if classes:
            bits.append(f"{'/'.join(classes)} classes")
        text = ", ".join(bits)
        return f"mixed data: {text}" if self.mixed else text

    def varies_text(self) -> str:
        """What tells the jobs apart, e.g. `scale x lr`; '' when nothing does."""
        words = [SETTING_LABELS[key] for key in self.varying if key not in DATA_KEYS]
        groups = {key.partition(".")[0] for key in SETTING_KEYS}  # data=..., optim=...
        for row in self.rows:
            for override in self._extra_overrides(row):
                key = _override_key(override)
                if key and key not in groups and not key.startswith("hydra"):
                    words.append(key)
        words = list(dict.fromkeys(words))
        if len(words) > _MAX_VARYING_WORDS:
            words = [*words[:_MAX_VARYING_WORDS], "…"]
        return " x ".join(words)

    def headline(self) -> str:
        """The line that heads summary.md and titles the plot."""
        n = len(self.rows)
        parts = [self.where, self.data_text(), self.varies_text(), f"{n} run{'s' * (n != 1)}"]
        return " — ".join(part for part in parts if part)

    def warning(self) -> str | None:
        """A warning when the jobs trained on different data; None when they did not."""
        if not self.mixed:
            return None
        keys = [key for key in DATA_KEYS if known_values(self.rows, key)]
        counts = Counter(self.group(row, keys) for row in self.rows)
        groups = "; ".join(f"{label}: {n} job{'s' * (n != 1)}" for label, n in counts.most_common())
        return (
            f"warning: these jobs mix data sets ({groups}); their accuracies compare only "
            "within one data set, image size and number of classes"
        )


def describe(rows: Sequence[JobRow], where: str = ".") -> Study:
    """The Study of these rows (summarised from the dir `where` names)."""
    rows = tuple(rows)
    shared: dict[str, str] = {}
    varying: list[str] = []
    for key in SETTING_KEYS:
        values = known_values(rows, key)
        if len(values) == 1:
            shared[key] = values[0]
        elif len(values) > 1:
            varying.append(key)
    common, listed = _shared_overrides(rows, shared) if rows else (set(), [])
    hidden = common | {f"{k}={v}" for k, v in shared.items()}
    names = {row.job: _strip_name(row.job, hidden, shared) for row in rows}
    taken = Counter(names.values())
    names = {job: job if taken[name] > 1 else name for job, name in names.items()}
    return Study(where, rows, shared, tuple(listed), frozenset(hidden), tuple(varying), names)
