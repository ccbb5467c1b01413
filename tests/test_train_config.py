"""TrainConfig: --set parsing into nested dataclasses, config files, JSON round trips."""
from __future__ import annotations

import math
import pathlib

import pytest

from crnet_jax import train_config as tc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_overrides_are_typed_and_nested():
    cfg = tc.apply_overrides(tc.TrainConfig(), [
        "model.num_conv_res=3", "optim.learning_rate=3e-4", "data.augment=yes", "model.kernel_sizes=3,5",
        "model.dilations=[1, 2]", "optim.clip_norm=1", "data.source=folder", "data.path=/x", "seed=7",
        "augment.fill_mode=nearest", "batch_size=16",
    ])
    assert cfg.model.num_conv_res == 3 and isinstance(cfg.model.num_conv_res, int)
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.data.augment is True
    assert cfg.model.kernel_sizes == (3, 5) and cfg.model.dilations == (1, 2)
    assert cfg.optim.clip_norm == 1.0 and isinstance(cfg.optim.clip_norm, float)
    assert (cfg.data.source, cfg.data.path, cfg.seed, cfg.batch_size) == ("folder", "/x", 7, 16)
    assert cfg.augment.fill_mode == "nearest"
    assert tc.apply_overrides(cfg, ["optim.clip_norm=none"]).optim.clip_norm is None
    assert math.isnan(tc.apply_overrides(cfg, ["optim.learning_rate=nan"]).optim.learning_rate)


@pytest.mark.parametrize("item, message", [
    ("model.nope=1", "no field 'nope'"),
    ("batch_size=1.5", "expected an integer"),
    ("data.augment=maybe", "expected a boolean"),
    ("model=3", "nested config"),
    ("seed", "expected key=value"),
    ("data.source=ftp", "data.source must be one of"),
    ("augment.fill_mode=wrap", "expected one of"),
])
def test_bad_overrides_say_what_is_wrong(item, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tc.apply_overrides(tc.TrainConfig(), [item])


@pytest.mark.parametrize("name", ["default", "authors_lung", "lstm"])
def test_config_files_load_and_round_trip_through_json(name, tmp_path):
    cfg = tc.load_config(ROOT / "configs" / f"{name}.py")
    assert isinstance(cfg, tc.TrainConfig)
    path = tc.save_config(cfg, tmp_path / "config.json")
    assert tc.load_config(path) == cfg
    assert tc.load_config(tmp_path) == cfg  # a run directory works too


def test_the_shipped_configs_say_what_the_issue_asks():
    authors = tc.load_config(ROOT / "configs" / "authors_lung.py")
    assert (authors.optim.learning_rate, authors.loss, authors.batch_size) == (1e-3, "tanimoto_weighted", 8)
    assert (authors.data.height, authors.data.width) == (300, 340)
    lstm = tc.load_config(ROOT / "configs" / "lstm.py")
    assert (lstm.model.num_lstm_res, lstm.model.num_conv_res) == (1, 4)
    default = tc.load_config(ROOT / "configs" / "default.py")
    assert default.data.source == "phantom"
    assert default == tc.TrainConfig(), "configs/default.py and TrainConfig's defaults must agree"


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="bad.py"):
        tc.load_config(bad)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        tc.load_config(tmp_path / "missing.py")
    (tmp_path / "c.json").write_text('{"model": {"filterz": 3}}')
    with pytest.raises(ValueError, match="c.json"):
        tc.load_config(tmp_path / "c.json")
