"""evaluate: per-image figures, empty-mask policy, summaries, pooled scores, the folder CLI,
and the authors' JMS model on their samples."""
from __future__ import annotations

import csv
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_data as fx
from crnet_jax import evaluate as E
from crnet_jax.metrics import pooled_counts, pooled_scores, sum_counts


def _square(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[r0:r1, c0:c1] = True
    return m


def test_evaluate_pair_by_hand():
    truth = _square(10, 10, 2, 6, 2, 6)    # 16 px
    pred = _square(10, 10, 2, 6, 4, 8)     # 16 px, 8 overlap
    r = E.evaluate_pair(pred, truth, spacing=(0.5, 0.5))
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (8, 8, 8, 76)
    assert r["dice"] == pytest.approx(0.5) and r["iou"] == pytest.approx(1 / 3)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["accuracy"] == pytest.approx(0.84)
    assert r["hausdorff_px"] == pytest.approx(2.0) and r["hausdorff_mm"] == pytest.approx(1.0)
    assert "hd95_mm" not in E.evaluate_pair(pred, truth)
    with pytest.raises(ValueError, match="original films"):
        E.evaluate_pair(pred, truth[:5])


def test_empty_policy():
    z = np.zeros((6, 6), bool)
    m = _square(6, 6, 1, 3, 1, 3)
    both = E.evaluate_pair(z, z, empty="match")
    assert both["dice"] == 1.0 and both["precision"] == 1.0 and both["hd95_px"] == 0.0
    one = E.evaluate_pair(m, z, empty="match")
    assert one["dice"] == 0.0 and one["recall"] == 0.0 and math.isnan(one["hausdorff_px"])
    assert E.evaluate_pair(z, z, empty="zero")["dice"] == 0.0
    nan = E.evaluate_pair(z, z, empty="nan")
    assert math.isnan(nan["dice"]) and math.isnan(nan["assd_px"]) and nan["accuracy"] == 1.0


def test_describe_and_pooled():
    vals = [0.9, 0.8, float("nan"), 0.95, 0.7]
    d = E.describe(vals)
    ok = np.array([0.9, 0.8, 0.95, 0.7])
    assert d["n"] == 4 and d["n_undefined"] == 1
    assert d["mean"] == pytest.approx(ok.mean()) and d["sd"] == pytest.approx(ok.std(ddof=1))
    assert d["median"] == pytest.approx(np.median(ok))
    assert d["iqr"] == pytest.approx(np.percentile(ok, 75) - np.percentile(ok, 25))
    # pooled figures against the metrics module on one-hot (B, H, W, 2) arrays
    rng = np.random.default_rng(0)
    preds, truths = rng.random((3, 8, 9)) < 0.4, rng.random((3, 8, 9)) < 0.5
    rows = [E.evaluate_pair(p, t) for p, t in zip(preds, truths)]
    pooled = E.pooled(rows)
    onehot = lambda m: jnp.stack([m, ~m], -1).astype(jnp.float32)  # noqa: E731
    authors = pooled_scores(sum_counts([pooled_counts(onehot(preds), onehot(truths))]))
    assert pooled["authors_both_class_accuracy"] == pytest.approx(float(authors["dice"]))
    assert pooled["authors_both_class_accuracy"] == pytest.approx(np.mean(preds == truths))
    tp = (preds & truths).sum()
    assert pooled["dice"] == pytest.approx(2 * tp / (preds.sum() + truths.sum()))


def test_folder_cli(tmp_path, capsys):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "truth"
    for i in range(3):
        t = fx.blob_mask(30, 40, seed=i)
        fx.write_mask(truth_dir / "g" / f"case{i}_mask.png", t)
        fx.write_mask(pred_dir / "g" / f"case{i}.png", np.roll(t, i, axis=1))
    fx.write_mask(truth_dir / "g" / "lonely_mask.png", fx.blob_mask(30, 40))   # no prediction
    (pred_dir / "g" / "broken.png").write_bytes(b"not a png")                  # no truth either
    fx.write_mask(pred_dir / "g" / "case9.png", fx.blob_mask(20, 20))
    fx.write_mask(truth_dir / "g" / "case9_mask.png", fx.blob_mask(30, 40))    # shape mismatch
    out = tmp_path / "eval"
    rc = E.main(["--pred", str(pred_dir), "--truth", str(truth_dir), "--truth-suffix", "_mask", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dice" in printed and "pooled over" in printed and "authors' both-class pixel accuracy" in printed
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert [r["file"] for r in rows] == ["g/case0.png", "g/case1.png", "g/case2.png"]
    assert float(rows[0]["dice"]) == 1.0 and float(rows[0]["hausdorff_px"]) == 0.0
    assert float(rows[2]["hausdorff_px"]) == pytest.approx(2.0)
    assert "hd95_px" in rows[0] and "hd95_mm" not in rows[0]
    errors = {e["file"]: e["error"] for e in csv.DictReader(open(out / "errors.csv"))}
    assert set(errors) == {"g/broken.png", "g/case9.png", str(truth_dir / "g" / "lonely_mask.png")}
    assert "original films" in errors["g/case9.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["n_errors"] == 3 and summary["empty_policy"] == "match"
    assert summary["per_image"]["dice"]["n"] == 3 and 0 < summary["pooled"]["dice"] <= 1
    # with a spacing the distances are in mm
    out2 = tmp_path / "eval_mm"
    E.main(["--pred", str(pred_dir), "--truth", str(truth_dir), "--truth-suffix", "_mask", "--out", str(out2),
            "--spacing", "0.5", "0.25", "--quiet"])
    rows = list(csv.DictReader(open(out2 / "per_image.csv")))
    assert "hd95_mm" in rows[0] and "hd95_px" not in rows[0]
    assert float(rows[2]["hausdorff_mm"]) == pytest.approx(0.5)


def test_spacing_from_predict_csv(tmp_path):
    csv_path = tmp_path / "predictions.csv"
    csv_path.write_text("file,mask,spacing_row_mm,spacing_col_mm\na/x.dcm,masks/a/x.png,0.2,0.3\nb.png,masks/b.png,,\n")
    assert E.read_spacing_csv(csv_path) == {"a/x": (0.2, 0.3)}


def test_authors_jms_evaluated_on_their_samples(authors_dir, tmp_path):
    """Checkpoint mode: the JMS model on the authors' 952-set samples vs their lung masks."""
    images, truth = tmp_path / "images", tmp_path / "lungs"
    images.mkdir()
    truth.mkdir()
    for f in sorted(authors_dir.glob("samples/*_952/images/*.png")):
        (images / f.name).write_bytes(f.read_bytes())
        (truth / f.name).write_bytes((f.parent.parent / "lungs" / f.name).read_bytes())
    out = tmp_path / "eval"
    rc = E.main(["--checkpoint", str(authors_dir / "jms_model_all.h5"), "--images", str(images), "--truth", str(truth),
                 "--out", str(out), "--save", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 2 and summary["n_errors"] == 0
    assert summary["per_image"]["dice"]["min"] > 0.9
    assert summary["pooled"]["authors_both_class_accuracy"] > 0.95
    assert (out / "overlays" / "CHNCXR_0019_0.png").is_file()
