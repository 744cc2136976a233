"""mbv2's Optuna sweeper for Hydra: `hydra/sweeper=mbv2_optuna` (needs `pip install -e .[sweep]`).

A study on Optuna >= 4 kept in `<sweep dir>/optuna.journal` (a rerun into the same sweep
dir continues it), trials launched in batches through Hydra's launcher, pruning of
hopeless trials from inside `fit` (mbv2.train.pruning), and
`<sweep dir>/optimization_results.yaml` after every batch.

* `config`: the structured config (no optuna needed);
* `space`: `hydra.sweeper.params` to Optuna distributions and back to overrides;
* `study`: the journal, samplers and pruners, stale trials, the results file, and the
  trial identity a job finds in `MBV2_OPTUNA_TRIAL`;
* `sweeper`: the Hydra `Sweeper` itself.

Hydra instantiates a sweeper only from a class it has registered whose `_target_` lies in
the `hydra_plugins` package; instead of shipping a `hydra_plugins` namespace package,
`register_sweeper` makes a subclass of `sweeper.OptunaSweeper` under that name at run time
and registers it with Hydra's plugin registry. Nothing here
imports optuna until a study starts.
"""
from __future__ import annotations

import importlib
import sys
import types

from mbv2.sweeper.config import PLUGIN_MODULE, MBV2OptunaSweeperConf

_REGISTERED: list[type] = []


def plugin_class() -> type:
    """mbv2's sweeper under the name Hydra finds plugins by (`config.PLUGIN_TARGET`): a
    subclass of `sweeper.OptunaSweeper` in a module made at run time, importable by that
    name (Hydra imports `_target_`) wherever mbv2.sweeper was imported."""
    if not _REGISTERED:
        from mbv2.sweeper.sweeper import OptunaSweeper

        cls = type("MBV2OptunaSweeper", (OptunaSweeper,),
                   {"__module__": PLUGIN_MODULE, "__doc__": OptunaSweeper.__doc__})
        try:
            importlib.import_module("hydra_plugins")
        except ImportError:  # no Hydra plugin installed at all: an empty namespace
            namespace = types.ModuleType("hydra_plugins")
            namespace.__path__ = []
            sys.modules["hydra_plugins"] = namespace
        module = types.ModuleType(PLUGIN_MODULE, "mbv2's Optuna sweeper (mbv2.sweeper)")
        module.MBV2OptunaSweeper = cls
        sys.modules.setdefault(PLUGIN_MODULE, module)
        _REGISTERED.append(cls)
    return _REGISTERED[0]


def register_sweeper(cs) -> None:
    """The sweeper's config group option in Hydra's ConfigStore, and its class in Hydra's
    plugin registry; idempotent."""
    from hydra.core.plugins import Plugins

    cs.store(group="hydra/sweeper", name="mbv2_optuna", node=MBV2OptunaSweeperConf,
             provider="mbv2")
    Plugins.instance().register(plugin_class())
