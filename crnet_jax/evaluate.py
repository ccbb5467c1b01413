"""Measure lung segmentations against truth masks: per-image CSV, summary table and JSON.

Two ways in:

    # masks already predicted (e.g. OUTPUT/masks of crnet_jax.predict) vs truth masks
    python -m crnet_jax.evaluate --pred OUTPUT/masks --truth data/masks --out eval/

    # a checkpoint run on an image folder vs its truth masks (predicted in memory)
    python -m crnet_jax.evaluate --checkpoint models/jms --images data/images --truth data/masks --out eval/

Files are paired by their path relative to the folder without the suffix (a/b/x.png ~ a/b/x.dcm),
falling back to the file name alone when that is unique; ``--truth-suffix _mask`` pairs x.png
with x_mask.png. Unpaired files and files that cannot be read are listed in errors.csv.

Per image (in the ORIGINAL geometry of the truth mask; both masks must have the same shape):
Dice, IoU, precision, recall and both-class pixel accuracy (crnet_jax.metrics, the lung class
after thresholding) and the Hausdorff distance, HD95 and average symmetric surface distance
(crnet_jax.surface: surface pixels = lung pixels with a 4-neighbour outside the lung; distances
between pixel centres scaled by the (row, col) spacing). Distances are in mm where the pixel
spacing is known (``--spacing``, the ``--spacing-csv`` that crnet_jax.predict wrote, or the
DICOM header of the film or mask), else in pixels; the unit is part of the column name
(``hd95_mm`` / ``hd95_px``; a run with both kinds of images has both columns).

Masks are read with crnet_jax.readers and thresholded as it does (at 0.5 of the full range, i.e.
>= 128 for 8-bit 0/255 masks, or at half the maximum for 0/1 label masks); an all-zero mask is
an EMPTY mask (not an error).

Empty masks (``--empty``, default ``match``):
  match: Dice/IoU/precision/recall are 1 when truth and prediction are both empty, 0 when only
         one is; surface distances are 0 when both are empty.
  zero:  every 0/0 ratio is 0; distances with both empty are NaN.
  nan:   every 0/0 ratio is NaN; distances with both empty are NaN.
  With exactly one mask empty the surface distances are always NaN (nothing to measure to).
  NaNs are left blank in the CSV, skipped by the summary and counted there (``n_undefined``).

Summary: per metric n, mean +- SD (sample SD, ddof = 1), median, IQR (25th-75th percentile),
min, max; and pooled figures over all pixels of all images: pooled Dice / IoU / precision /
recall of the lung, and the authors' pooled both-class score (their ``other_metrics``: both
channels thresholded and pooled over the set; for hard masks = pixel accuracy over both classes,
the "Dice 0.98" of the paper).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from crnet_jax.host_memory import reexec_with_host_memory_settings
from crnet_jax.metrics import EMPTY_POLICIES, metrics_from_counts, pooled_scores
from crnet_jax.readers import ImageReadError, binarize_mask, read_image
from crnet_jax.surface import DISTANCE_NAMES, surface_distances

OVERLAP_NAMES = ("dice", "iou", "precision", "recall", "accuracy")
Spacing = tuple[float, float] | None


# ------------------------------------------------------------------------------------------
# One pair of masks
# ------------------------------------------------------------------------------------------

def read_binary_mask(path: str | os.PathLike) -> tuple[np.ndarray, Spacing, tuple[str, ...]]:
    """A mask file -> (bool (H, W), pixel spacing (row, col) mm or None, warnings).

    Thresholded as crnet_jax.readers.binarize_mask does; an all-zero file is an empty mask
    (readers.read_mask refuses those, evaluation needs them for the empty policy).
    """
    values, meta = read_image(path)
    if float(values.max()) <= 0.0:
        return np.zeros(values.shape, bool), meta.pixel_spacing_mm, ()
    mask, info = binarize_mask(values, where=os.fspath(path))
    return mask, meta.pixel_spacing_mm, info.warnings


def confusion(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Lung confusion counts of two bool (H, W) masks: tp, fp, fn, tn (pixels)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(pred.size) - tp - fp - fn}


def evaluate_pair(pred: np.ndarray, truth: np.ndarray, spacing: Spacing = None,
                  empty: str = "match") -> dict[str, Any]:
    """All per-image figures of a predicted vs a truth mask (bool (H, W), same shape).

    Returns a dict: the counts (tp, fp, fn, tn), ``dice``, ``iou``, ``precision``, ``recall``,
    ``accuracy`` (crnet_jax.metrics.metrics_from_counts with ``empty``), distances in pixels
    ``hausdorff_px``, ``hd95_px``, ``assd_px`` and, when ``spacing`` (row, col mm) is given,
    the same in mm (``*_mm``).
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"predicted mask is {pred.shape[0]} x {pred.shape[1]} but the truth mask is "
                         f"{truth.shape[0]} x {truth.shape[1]}; predict on the original films (crnet_jax.predict "
                         "writes masks in the film's own geometry) or resize one of them")
    counts = confusion(pred, truth)
    scores = metrics_from_counts({k: np.int64(v) for k, v in counts.items()}, empty)
    out: dict[str, Any] = {**counts, **{k: float(scores[k]) for k in OVERLAP_NAMES}}
    for k, v in surface_distances(pred, truth, None, empty).items():
        out[f"{k}_px"] = v
    if spacing is not None:
        for k, v in surface_distances(pred, truth, spacing, empty).items():
            out[f"{k}_mm"] = v
    return out


# ------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------

def describe(values: Iterable[float]) -> dict[str, float | int]:
    """n, n_undefined (NaN), mean, sd (ddof 1), median, q1, q3, iqr, min, max of the finite values."""
    v = np.asarray([float(x) for x in values], np.float64)
    ok = v[~np.isnan(v)]
    out: dict[str, float | int] = {"n": int(ok.size), "n_undefined": int(v.size - ok.size)}
    if ok.size == 0:
        return {**out, **{k: math.nan for k in ("mean", "sd", "median", "q1", "q3", "iqr", "min", "max")}}
    q1, med, q3 = np.percentile(ok, [25, 50, 75])
    return {**out, "mean": float(ok.mean()), "sd": float(ok.std(ddof=1)) if ok.size > 1 else math.nan,
            "median": float(med), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1),
            "min": float(ok.min()), "max": float(ok.max())}


def pooled(rows: Sequence[dict[str, Any]], empty: str = "match") -> dict[str, float]:
    """Figures over all pixels of all images: lung Dice/IoU/precision/recall of the summed counts
    and the authors' pooled both-class score (= pixel accuracy over both classes)."""
    total = {k: np.int64(sum(int(r[k]) for r in rows)) for k in ("tp", "fp", "fn", "tn")}
    lung = metrics_from_counts(total, empty)
    n = total["tp"] + total["fp"] + total["fn"] + total["tn"]
    # Authors' other_metrics on one-hot masks: tp summed over BOTH channels = correctly labelled
    # pixels, pred = true = all pixels (each pixel is in exactly one channel).
    authors = pooled_scores({"tp": total["tp"] + total["tn"], "pred": n, "true": n}, empty)
    return {"dice": float(lung["dice"]), "iou": float(lung["iou"]), "precision": float(lung["precision"]),
            "recall": float(lung["recall"]), "authors_both_class_accuracy": float(authors["dice"]),
            "pixels": int(n)}


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Metric columns present in the rows: overlap scores, then distances in px (if some image
    has no spacing) and in mm (if some image has one)."""
    cols = list(OVERLAP_NAMES)
    if any(r.get("spacing_row_mm") in (None, "") for r in rows):
        cols += [f"{k}_px" for k in DISTANCE_NAMES]
    if any(r.get("spacing_row_mm") not in (None, "") for r in rows):
        cols += [f"{k}_mm" for k in DISTANCE_NAMES]
    return cols


def summarize(rows: Sequence[dict[str, Any]], empty: str = "match") -> dict[str, Any]:
    """The summary dict written to summary.json."""
    cols = metric_columns(rows)
    return {
        "n_images": len(rows),
        "empty_policy": empty,
        "n_empty_truth": sum(1 for r in rows if int(r["tp"]) + int(r["fn"]) == 0),
        "n_empty_pred": sum(1 for r in rows if int(r["tp"]) + int(r["fp"]) == 0),
        "per_image": {c: describe(r.get(c, math.nan) for r in rows) for c in cols},
        "pooled": pooled(rows, empty) if rows else {},
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    lines = [f"{summary['n_images']} image(s), empty-mask policy '{summary['empty_policy']}' "
             f"({summary['n_empty_truth']} empty truth, {summary['n_empty_pred']} empty prediction)",
             f"{'metric':<14}{'n':>6}  {'mean +- SD':>20}  {'median [IQR]':>26}  {'min - max':>22}"]
    for name, d in summary["per_image"].items():
        und = f" ({d['n_undefined']} undefined)" if d["n_undefined"] else ""
        lines.append(f"{name:<14}{d['n']:>6}  {d['mean']:>9.4f} +- {d['sd']:<7.4f}  "
                     f"{d['median']:>8.4f} [{d['q1']:.4f}, {d['q3']:.4f}]  {d['min']:>9.4f} - {d['max']:<9.4f}{und}")
    if summary["pooled"]:
        p = summary["pooled"]
        lines.append(f"pooled over {p['pixels']:,} pixels: Dice {p['dice']:.4f}, IoU {p['iou']:.4f}, precision "
                     f"{p['precision']:.4f}, recall {p['recall']:.4f}; authors' both-class pixel accuracy "
                     f"{p['authors_both_class_accuracy']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------

def _key(rel: pathlib.Path, suffix: str = "") -> str:
    stem = rel.stem
    if suffix and stem.endswith(suffix):
        stem = stem[: -len(suffix)]
    return (rel.parent / stem).as_posix()


def pair_files(left: Sequence[pathlib.Path], left_root: pathlib.Path, right: Sequence[pathlib.Path],
               right_root: pathlib.Path, right_suffix: str = "") -> tuple[list[tuple[pathlib.Path, pathlib.Path]], list[pathlib.Path], list[pathlib.Path]]:
    """Pair files of two folders by relative path without suffix (``right_suffix`` removed from the
    right-hand stems), else by bare name when unique on both sides.

    Returns (pairs, unpaired left files, unpaired right files)."""
    by_rel: dict[str, pathlib.Path] = {}
    by_name: dict[str, list[pathlib.Path]] = {}
    for f in right:
        k = _key(f.relative_to(right_root), right_suffix)
        by_rel[k] = f
        by_name.setdefault(k.rsplit("/", 1)[-1], []).append(f)
    left_names: dict[str, int] = {}
    for f in left:
        n = _key(f.relative_to(left_root)).rsplit("/", 1)[-1]
        left_names[n] = left_names.get(n, 0) + 1
    pairs, lonely, used = [], [], set()
    for f in left:
        k = _key(f.relative_to(left_root))
        match = by_rel.get(k)
        name = k.rsplit("/", 1)[-1]
        if match is None and len(by_name.get(name, [])) == 1 and left_names[name] == 1:
            match = by_name[name][0]
        if match is None or match in used:
            lonely.append(f)
        else:
            pairs.append((f, match))
            used.add(match)
    return pairs, lonely, [f for f in right if f not in used]


def read_spacing_csv(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """Pixel spacings from a crnet_jax.predict predictions.csv: key (mask path relative to
    masks/, without suffix) -> (row, col) mm; images without a spacing are left out."""
    out: dict[str, tuple[float, float]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"mask", "spacing_row_mm", "spacing_col_mm"}
        if not need <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: needs columns {sorted(need)} (the predictions.csv written by crnet_jax.predict)")
        for row in reader:
            if row["spacing_row_mm"] and row["spacing_col_mm"]:
                rel = pathlib.PurePosixPath(row["mask"].replace(os.sep, "/"))
                rel = pathlib.PurePosixPath(*rel.parts[1:]) if rel.parts and rel.parts[0] == "masks" else rel
                out[(rel.parent / rel.stem).as_posix()] = (float(row["spacing_row_mm"]), float(row["spacing_col_mm"]))
    return out


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_outputs(out_dir: pathlib.Path, rows: list[dict[str, Any]], errors: list[dict[str, str]],
                  empty: str) -> dict[str, Any]:
    """Write per_image.csv, errors.csv and summary.json into ``out_dir``; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = metric_columns(rows)
    fields = ["file", "truth", "height", "width", "spacing_row_mm", "spacing_col_mm",
              "truth_area_px", "pred_area_px", *cols, "tp", "fp", "fn", "tn", "warnings"]
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in fields})
    with open(out_dir / "errors.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ("file", "error"))
        w.writeheader()
        w.writerows(errors)
    summary = summarize(rows, empty)
    summary["n_errors"] = len(errors)
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False))
    return summary


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, (ImageReadError, ValueError, OSError)) else f"{type(e).__name__}: {e}"


def _json_safe(obj: Any) -> Any:
    """NaN -> None (null) recursively, so summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _row(file: str, truth_file: str, pred: np.ndarray, truth: np.ndarray, spacing: Spacing,
         empty: str, warnings: Sequence[str]) -> dict[str, Any]:
    r = evaluate_pair(pred, truth, spacing, empty)
    r.update(file=file, truth=truth_file, height=truth.shape[0], width=truth.shape[1],
             spacing_row_mm="" if spacing is None else spacing[0], spacing_col_mm="" if spacing is None else spacing[1],
             truth_area_px=int(truth.sum()), pred_area_px=int(pred.sum()), warnings="; ".join(warnings))
    return r


def evaluate_folders(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, *, truth_suffix: str = "",
                     spacing: Spacing = None, spacing_csv: str | os.PathLike | None = None,
                     empty: str = "match", progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Predicted mask folder vs truth mask folder -> (rows, errors)."""
    from tqdm import tqdm

    from crnet_jax.predict import find_inputs

    pred_root, truth_root = pathlib.Path(pred_dir), pathlib.Path(truth_dir)
    pairs, lonely_pred, lonely_truth = pair_files(find_inputs(pred_root), pred_root, find_inputs(truth_root),
                                                  truth_root, truth_suffix)
    spacings = read_spacing_csv(spacing_csv) if spacing_csv else {}
    rows: list[dict[str, Any]] = []
    errors = [{"file": str(f.relative_to(pred_root)), "error": "no truth mask with this name"} for f in lonely_pred]
    errors += [{"file": str(truth_root / f.relative_to(truth_root)), "error": "truth mask without a prediction"} for f in lonely_truth]
    for p, t in tqdm(pairs, unit="mask", disable=not progress, desc="evaluating"):
        rel = str(p.relative_to(pred_root))
        try:
            pred, pred_sp, pw = read_binary_mask(p)
            truth, truth_sp, tw = read_binary_mask(t)
            sp = spacing or spacings.get(_key(p.relative_to(pred_root))) or truth_sp or pred_sp
            rows.append(_row(rel, str(t.relative_to(truth_root)), pred, truth, sp, empty,
                             [f"pred: {w}" for w in pw] + [f"truth: {w}" for w in tw]))
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            errors.append({"file": rel, "error": _message(e)})
    return rows, errors


def evaluate_checkpoint(checkpoint: Any, images_dir: str | os.PathLike, truth_dir: str | os.PathLike, *,
                        truth_suffix: str = "", spacing: Spacing = None, empty: str = "match",
                        tta: bool = False, postprocess: bool = True, border_last: bool = False, preprocess=None,
                        batch_size: int = 8,
                        save_dir: pathlib.Path | None = None, progress: bool = True
                        ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """A checkpoint run on an image folder vs its truth masks -> (rows, errors). With ``save_dir``
    the predicted masks (save_dir/masks) and overlays with the truth outline in magenta
    (save_dir/overlays) are written too."""
    from tqdm import tqdm

    from crnet_jax.overlay import save_overlay
    from crnet_jax.predict import find_inputs, output_names, segment_many, write_mask_png

    img_root, truth_root = pathlib.Path(images_dir), pathlib.Path(truth_dir)
    pairs, lonely_img, lonely_truth = pair_files(find_inputs(img_root), img_root, find_inputs(truth_root),
                                                 truth_root, truth_suffix)
    truth_of = dict(pairs)
    names = output_names([p for p, _ in pairs], img_root)
    rows: list[dict[str, Any]] = []
    errors = [{"file": str(f.relative_to(img_root)), "error": "no truth mask with this name"} for f in lonely_img]
    errors += [{"file": str(truth_root / f.relative_to(truth_root)), "error": "truth mask without an image"} for f in lonely_truth]
    results = segment_many(list(truth_of), checkpoint, preprocess=preprocess, tta=tta, postprocess=postprocess,
                           border_last=border_last, batch_size=batch_size)
    for path, seg in tqdm(results, total=len(truth_of), unit="film", disable=not progress, desc="evaluating"):
        rel = str(path.relative_to(img_root))
        try:
            if isinstance(seg, Exception):
                raise seg
            truth, truth_sp, tw = read_binary_mask(truth_of[path])
            sp = spacing or seg.spacing or truth_sp
            rows.append(_row(rel, str(truth_of[path].relative_to(truth_root)), seg.mask, truth, sp, empty,
                             [f"truth: {w}" for w in tw]))
            if save_dir is not None:
                write_mask_png(save_dir / "masks" / names[path], seg.mask)
                save_overlay(save_dir / "overlays" / names[path], seg.film, seg.mask, truth=truth)
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            errors.append({"file": rel, "error": _message(e)})
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command line: malloc settings and block cache (crnet_jax.host_memory)
        reexec_with_host_memory_settings("crnet_jax.evaluate", ("crnet-evaluate",))
    parser = argparse.ArgumentParser(
        prog="python -m crnet_jax.evaluate",
        description="Lung segmentation vs truth masks: per-image Dice, IoU, precision, recall, Hausdorff, HD95, ASSD "
                    "(per_image.csv), summary table (printed) and summary.json. Give --pred, or --checkpoint with --images.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Empty-mask policy (--empty): 'match' (default) scores 1 (distances 0) when truth and prediction are both "
               "empty and 0 when only one is; 'zero' makes every 0/0 ratio 0; 'nan' makes it NaN. Surface distances "
               "with one mask empty are NaN. NaNs are blank in the CSV and skipped (and counted) in the summary.")
    parser.add_argument("--truth", required=True, help="folder of truth lung masks")
    parser.add_argument("--out", required=True, help="output folder (per_image.csv, summary.json, errors.csv)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred", help="folder of predicted masks (e.g. OUTPUT/masks of crnet_jax.predict)")
    src.add_argument("--checkpoint", help="model directory or authors' Keras .h5: predict on --images first")
    parser.add_argument("--images", help="with --checkpoint: folder of films matching the truth masks")
    parser.add_argument("--truth-suffix", default="", help="suffix of truth file names before the extension (e.g. _mask)")
    parser.add_argument("--spacing", type=float, nargs="+", metavar="MM",
                        help="pixel spacing in mm, one value or ROW COL (overrides any other source)")
    parser.add_argument("--spacing-csv", help="with --pred: the predictions.csv of crnet_jax.predict (its DICOM spacings)")
    parser.add_argument("--empty", choices=EMPTY_POLICIES, default="match", help="empty-mask policy (see below)")
    parser.add_argument("--tta", action="store_true", help="with --checkpoint: flip test-time augmentation")
    parser.add_argument("--no-postprocess", action="store_true", help="with --checkpoint: no clean-up of the masks")
    parser.add_argument("--border-last", action="store_true",
                        help="with --checkpoint: post-processing ranks components touching the image border last")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--save", action="store_true", help="with --checkpoint: also write masks/ and overlays/ (truth outline in magenta)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from crnet_jax.predict import CheckpointError, add_preprocess_args, preprocess_from_args

    add_preprocess_args(parser)
    args = parser.parse_args(argv)
    if args.checkpoint and not args.images:
        parser.error("--checkpoint needs --images (the films to segment)")
    spacing = None
    if args.spacing:
        if len(args.spacing) not in (1, 2) or min(args.spacing) <= 0:
            parser.error("--spacing takes one or two positive numbers (mm)")
        spacing = (args.spacing[0], args.spacing[-1])
    out = pathlib.Path(args.out)
    try:
        if args.pred:
            rows, errors = evaluate_folders(args.pred, args.truth, truth_suffix=args.truth_suffix, spacing=spacing,
                                            spacing_csv=args.spacing_csv, empty=args.empty, progress=not args.quiet)
        else:
            rows, errors = evaluate_checkpoint(
                args.checkpoint, args.images, args.truth, truth_suffix=args.truth_suffix, spacing=spacing,
                empty=args.empty, tta=args.tta, postprocess=not args.no_postprocess, border_last=args.border_last,
                preprocess=preprocess_from_args(args, args.checkpoint), batch_size=args.batch_size,
                save_dir=out if args.save else None, progress=not args.quiet)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = write_outputs(out, rows, errors, args.empty)
    print(format_table(summary))
    print(f"per-image figures: {out / 'per_image.csv'}; summary: {out / 'summary.json'}")
    if errors:
        print(f"{len(errors)} file(s) not evaluated: see {out / 'errors.csv'}", file=sys.stderr)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
