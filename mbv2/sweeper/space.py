"""`hydra.sweeper.params` (and sweep overrides on the command line) as Optuna distributions,
and a trial's values back as the overrides its job gets.

The syntax is hydra-optuna-sweeper's, parsed with Hydra's own override parser:
`choice(a, b)` (categorical), `interval(a, b)` (uniform; ints stay ints),
`tag(log, interval(a, b))` (log-uniform), `range(a, b[, step])` (stepped; it stops before
`b`, as Hydra's range does; `shuffle(range(...))` is categorical) and a plain value (the
same for every trial). A sampled float is written as `%.6g`, so job dirs (named by
their overrides) stay short, readable and the same when a trial is retried.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer


class SearchSpaceError(ValueError):
    """A param Optuna cannot search."""


@dataclass
class Param:
    """One searched config key: its Optuna distribution and, for a choice, the text of
    each option as it was written."""

    name: str
    distribution: Any
    choice_text: tuple[str, ...] = ()

    def override(self, value: Any) -> str:
        return f"{self.name}={self.text(value)}"

    def text(self, value: Any) -> str:
        import optuna

        d = self.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return self.choice_text[d.to_internal_repr(value)]
        if isinstance(d, optuna.distributions.FloatDistribution):
            return format_float(value)
        return repr(value)

    def value(self, value: Any) -> Any:
        """The value the job trained with (a float as rounded for its override)."""
        text = self.text(value)
        return float(text) if isinstance(value, float) else value


def format_float(value: float) -> str:
    """`%.6g`, kept a float in Hydra's grammar: 0.0123457, 1e-05, 3.0."""
    text = "%.6g" % value
    return text if re.search(r"[.en]", text) else text + ".0"


def _choice(override: Override) -> Param:
    import optuna

    values = list(override.sweep_iterator(transformer=Transformer.encode))
    texts = tuple(override.sweep_string_iterator())
    for v in values:
        if not isinstance(v, (str, int, float, bool, type(None))):
            raise SearchSpaceError(f"{override.input_line}: a choice takes plain values, got {v!r}")
    return Param(override.get_key_element(), optuna.distributions.CategoricalDistribution(values),
                 texts)


def _range(override: Override) -> Param:
    import optuna

    value = override.value()
    values = list(override.sweep_iterator(transformer=Transformer.encode))
    if not values:
        raise SearchSpaceError(f"{override.input_line}: the range is empty")
    if value.shuffle:
        return _choice(override)
    low, high, step = values[0], values[-1], value.step
    name = override.get_key_element()
    if all(isinstance(x, int) for x in (low, high, step)):
        return Param(name, optuna.distributions.IntDistribution(low, high, step=step))
    return Param(name, optuna.distributions.FloatDistribution(float(low), float(high),
                                                               step=float(step)))


def _interval(override: Override) -> Param:
    import optuna

    value = override.value()
    log = "log" in value.tags
    name = override.get_key_element()
    if isinstance(value.start, int) and isinstance(value.end, int):
        return Param(name, optuna.distributions.IntDistribution(value.start, value.end, log=log))
    return Param(name, optuna.distributions.FloatDistribution(float(value.start),
                                                               float(value.end), log=log))


def parse_space(params: dict[str, str] | None, arguments: list[str]) -> tuple[list[Param], list[str]]:
    """(the searched params, the fixed overrides every trial gets). `params` first, then
    the command line's overrides; a key the command line fixes is not searched."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    searched: dict[str, Param] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed[key] = override.input_line
            searched.pop(key, None)
        elif override.is_choice_sweep():
            searched[key] = _choice(override)
        elif override.is_range_sweep():
            searched[key] = _range(override)
        elif override.is_interval_sweep():
            searched[key] = _interval(override)
        else:
            raise SearchSpaceError(f"{override.input_line}: not a sweep Optuna can search")
        if key in fixed and key in searched:
            del searched[key]
    return list(searched.values()), list(fixed.values())


def grid_space(space: list[Param]) -> dict[str, list[Any]]:
    """GridSampler's search space: every param must be a choice."""
    import optuna

    grid = {}
    for p in space:
        if not isinstance(p.distribution, optuna.distributions.CategoricalDistribution):
            raise SearchSpaceError(f"sampler=grid takes choice(...) params only; {p.name} is "
                                   f"{type(p.distribution).__name__}")
        grid[p.name] = list(p.distribution.choices)
    return grid
