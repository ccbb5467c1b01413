"""End-to-end training runs on tiny phantoms: outputs, exact resume, NaN stop, early stopping,
folder data, the command line."""
from __future__ import annotations

import json
import pathlib

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from crnet_jax import train
from crnet_jax import train_config as tc
from crnet_jax.run_checkpoint import RunCheckpointer
from train_helpers import tiny_config


def _host(result):
    s = jax.device_get(result.state)
    return {"params": s.params, "batch_stats": s.batch_stats, "opt_state": s.opt_state, "step": s.step}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 4-step run straight through (shared by several tests)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    return train.run(tiny_config(), run_dir, progress=False, log=lambda *a: None)


def test_a_run_writes_everything_a_person_looks_at(straight):
    d = straight.run_dir
    for name in ("config.json", "metrics.csv", "curves.png", "val_overlays.png", "summary.json"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    assert list((d / "tb").glob("events.out.tfevents.*")), "TensorBoard event file"
    assert tc.load_config(d / "config.json") == tiny_config()
    from crnet_jax.report import read_metrics, series

    rows = read_metrics(d / "metrics.csv")
    steps, loss = series(rows, "train/loss")
    assert list(steps) == [0, 1, 2, 3] and np.all(np.isfinite(loss))
    assert list(series(rows, "val/dice_mean")[0]) == [2, 4]
    for tag in ("val/dice_median", "val/iou_mean", "val/precision_mean", "val/recall_mean", "val/accuracy_mean",
                "val/pooled_dice", "val/loss", "train/lr", "train/images_per_s"):
        assert len(series(rows, tag)[0]), tag
    summary = json.loads((d / "summary.json").read_text())
    assert summary["final_step"] == 4 and 0.0 <= summary["final_val"]["dice_mean"] <= 1.0
    assert straight.steps == 4 and not straight.stopped_early
    with Image.open(d / "val_overlays.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100


def test_the_best_model_is_an_inference_model(straight):
    from crnet_jax.checkpoint import load_model

    model = load_model(straight.run_dir / "model")
    p = model(np.zeros((1, 32, 32, 1), np.float32))
    assert p.shape == (1, 32, 32, 2)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, rtol=1e-5)


def test_the_inference_model_records_the_training_preprocessing(straight):
    """predict() must feed films at the size and contrast the run trained on."""
    from crnet_jax import train_data
    from crnet_jax.predict import predict

    saved = json.loads((straight.run_dir / "model" / "preprocess.json").read_text())
    want = train_data.preprocess_config(tiny_config().data)
    assert (saved["height"], saved["width"]) == (want.height, want.width)
    mask = predict(np.zeros((50, 70), np.float32), checkpoint=straight.run_dir / "model")
    assert mask.shape == (50, 70)


def test_checkpoints_keep_the_last_and_the_best(straight):
    steps = RunCheckpointer(straight.run_dir).steps()
    assert steps[-1] == 4 and set(steps) <= {2, 4}


def test_resume_continues_exactly(straight, tmp_path):
    """k steps + resume + k steps == 2k steps straight (dropout, augmentation, data order,
    Adam moments and BatchNorm statistics all carried over)."""
    run_dir = tmp_path / "run"
    first = train.run(tiny_config(), run_dir, progress=False, stop_at=2, log=lambda *a: None)
    assert first.steps == 2 and RunCheckpointer(run_dir).steps() == [2]
    second = train.run(tiny_config(), run_dir, resume=True, progress=False, log=lambda *a: None)
    assert second.steps == 4
    chex.assert_trees_all_equal(_host(second), _host(straight))
    from crnet_jax.report import read_metrics, series

    steps, _ = series(read_metrics(run_dir / "metrics.csv"), "train/loss")
    assert list(steps) == [0, 1, 2, 3], "the CSV of a resumed run has every step once"


def test_a_second_run_in_the_same_directory_needs_resume(straight):
    with pytest.raises(FileExistsError, match="--resume"):
        train.run(tiny_config(), straight.run_dir, progress=False, log=lambda *a: None)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train.run(tiny_config(), run_dir, progress=False, stop_at=2, log=lambda *a: None)
    bad = tc.apply_overrides(tiny_config(), ["optim.learning_rate=nan"])
    with pytest.raises(train.TrainingDiverged, match=r"last good checkpoint is step 2"):
        train.run(bad, run_dir, resume=True, progress=False, log=lambda *a: None)
    ckpt = RunCheckpointer(run_dir)
    assert ckpt.steps() == [2]
    state, meta = _restore(run_dir)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
    assert meta["data"]["next_step"] == 2


def _restore(run_dir: pathlib.Path):
    from flax import nnx

    from crnet_jax import optimizer, step
    from crnet_jax.model import ResCRNet

    cfg = tc.load_config(run_dir / "config.json")
    _, params, stats = step.split_model(ResCRNet(cfg.model, rngs=nnx.Rngs(0)))
    like = step.init_train_state(params, stats, optimizer.make_optimizer(cfg.optim, cfg.num_steps), cfg.seed)
    ckpt = RunCheckpointer(run_dir)
    try:
        return ckpt.restore(ckpt.latest_step(), like)
    finally:
        ckpt.close()


def test_early_stopping(tmp_path):
    cfg = tiny_config(num_steps=20, eval_every=2, early_stopping_patience=1, early_stopping_min_delta=10.0)
    result = train.run(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert result.stopped_early and result.steps == 4
    assert result.best["step"] == 2


def _phantom_folder(root: pathlib.Path, n: int) -> pathlib.Path:
    from crnet_jax.phantom import make_phantom

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = ["id,source,finding,patient"]
    for i in range(n):
        img, mask = make_phantom(i, 40, 48)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "images" / f"p{i:02d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"p{i:02d}.png")
        lines.append(f"p{i:02d},synthetic,normal,patient{i // 2}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def test_folder_split_is_by_patient(tmp_path):
    from crnet_jax.train_data import scan_folder

    root = _phantom_folder(tmp_path / "data", 24)
    parts = scan_folder(root, 0.3, "salt")
    ids = {k: {i for i, _, _ in v.items} for k, v in parts.items()}
    assert ids["train"] and ids["validation"] and not ids["train"] & ids["validation"]
    assert len(ids["train"]) + len(ids["validation"]) == 24
    for k, v in ids.items():  # both films of a patient are on the same side
        for i in v:
            twin = f"p{int(i[1:]) ^ 1:02d}"
            assert twin in v
    with pytest.raises(FileNotFoundError, match="images/"):
        scan_folder(tmp_path, 0.1, "salt")


def test_training_on_a_folder(tmp_path):
    root = _phantom_folder(tmp_path / "data", 24)
    cfg = tc.apply_overrides(tiny_config(num_steps=2, eval_every=2),
                             ["data.source=folder", f"data.path={root}", "data.val_fraction=0.3"])
    result = train.run(cfg, tmp_path / "run", progress=False, log=lambda *a: None)
    assert result.steps == 2 and "folder" in json.loads((result.run_dir / "summary.json").read_text())["data"]


def test_command_line(tmp_path, capsys):
    assert train.main(["--print-config", "--set", "model.num_conv_res=2"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["num_conv_res"] == 2
    assert train.main(["--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert train.main(["--workdir", str(tmp_path / "none"), "--resume"]) == 2
