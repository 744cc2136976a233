"""Every config group composes; invalid values fail with the key named."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from mbv2.config import ConfigValueError, check_config
from tests.conftest import CONF_DIR

GROUPS = ["model", "data", "optim", "sched", "loss", "trainer"]


@pytest.mark.parametrize("group,option", [
    (g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_every_group_option_composes_and_checks(cfg_factory, group, option):
    extra = ["data.root=/tmp"] if (group, option) == ("data", "folder") else []
    cfg = cfg_factory([f"{group}={option}", *extra])
    check_config(cfg)
    if group in ("optim", "sched", "data", "loss"):
        assert cfg[group].name == option


def test_defaults(cfg_factory):
    cfg = cfg_factory()
    assert cfg.model.name == "mobilenet_v2" and cfg.model.scale == 0.5
    # null: PaddleClas's table, which lives once, in the network module
    assert cfg.model.bottleneck is None
    from mbv2.model import build_model

    assert build_model(cfg.model, num_classes=10).bottleneck == [
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    assert cfg.data.name == "digits" and cfg.optim.name == "momentum"
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 4e-5
    assert cfg.sched.name == "cosine"


@pytest.mark.parametrize("override,key", [
    ("model.scale=abc", "model.scale"),
    ("trainer.epochs=two", "trainer.epochs"),
    ("optim.lrr=0.1", "lrr"),
    ("model.bottleneck=[[1,x,1,1]]", "model.bottleneck"),
])
def test_wrong_types_fail_at_composition(cfg_factory, override, key):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        cfg_factory([override])
    text = str(e.value) + str(e.value.__cause__ or "")
    assert key in text


@pytest.mark.parametrize("override,key", [
    ("optim.lr=-1", "optim.lr"),
    ("model.scale=0", "model.scale"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("optim.name=lbfgs", "optim.name"),
    ("data.image_size=4", "data.image_size"),
    ("data.crop_scale=[0.9,0.1]", "data.crop_scale"),
    ("trainer.device=tpu", "trainer.device"),
    ("model.cpu_kernels=maybe", "model.cpu_kernels"),
])
def test_out_of_range_values_name_the_key(cfg_factory, override, key):
    cfg = cfg_factory([override])
    with pytest.raises(ConfigValueError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_folder_needs_root(cfg_factory):
    cfg = cfg_factory(["data=folder"])
    with pytest.raises(ConfigValueError, match="data.root"):
        check_config(cfg)


def test_hparams_are_short_undotted_scalars_core_plus_what_varies(cfg_factory):
    from mbv2.config import CORE_HPARAMS, MAX_HPARAM_NAME, MAX_HPARAMS, run_hparams

    cfg = cfg_factory(["model.scale=0.75", "optim.lr=0.02", "data.hflip=true"])
    hp = run_hparams(cfg, varying=["model.scale", "data.hflip", "sched.warmup_epochs", "nope.key",
                                   "optim.lr_reference_batch"])
    names = list(hp)
    assert names[:len(CORE_HPARAMS) - 1] == [n for n in CORE_HPARAMS if n != "ema"]  # null: left out
    # VisualDL reads dots as nested paths; a name wider than its axis freezes the view
    assert all("." not in n and len(n) <= MAX_HPARAM_NAME for n in names)
    for name, value in hp.items():
        assert type(value) in (int, float, str), name
    assert hp["scale"] == 0.75 and hp["lr"] == 0.02 and hp["optim"] == "momentum"
    assert hp["hflip"] == "true" and hp["warmup"] == 1.0 and "lr_batch" not in hp  # null
    assert "nope" not in hp and "ema" not in hp
    many = [f"optim.{k}" for k in ("momentum", "beta1", "beta2", "epsilon", "rho", "nesterov")]
    many += ["sched.eta_min", "sched.gamma", "data.split_seed"]
    assert len(run_hparams(cfg, varying=many)) == MAX_HPARAMS


def test_hparam_names_stay_short_and_unique():
    from mbv2.config import hparam_name

    assert hparam_name("model.scale") == "scale" and hparam_name("loss.label_smoothing") == "smoothing"
    assert hparam_name("sched.warmup_epochs") == "warmup"
    assert hparam_name("data.max_image_pixels") == "max_px"
    assert hparam_name("trainer.something_very_long") == "something"
    assert hparam_name("optim.momentum", taken=["momentum"]) == "momentum2"


def test_experiments_compose(cfg_factory):
    from mbv2.config import EXPERIMENTS_DIR

    for path in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        cfg = cfg_factory([f"experiment={path.stem}"], return_hydra_config=True)
        assert cfg.model.name == "mobilenet_v2", path
