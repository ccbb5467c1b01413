"""Seeing a run: a CSV of every logged value, TensorBoard event files, and PNG figures.

* ``metrics.csv``: one row per logged value, columns ``step, tag, value, wall_time`` (seconds
  since the run started); tags are ``train/loss``, ``val/dice_mean``, ... .
* ``tb/``: TensorBoard event files written with ``tensorboardX`` (no TensorFlow needed); when
  tensorboardX is not installed only the CSV is written (a warning says so).
* ``curves.png``: training loss, learning rate and validation scores against the step.
* ``val_overlays.png``: validation films with the truth and the predicted lungs.

Figures use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import math
import pathlib
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

CSV_NAME = "metrics.csv"
TB_DIR = "tb"


class MetricsWriter:
    """Appends scalars to ``run_dir/metrics.csv`` and to TensorBoard (``run_dir/tb``).

    A resumed run appends to the same files; rows of steps >= the resume step that an
    interrupted run had written are dropped first, so every (step, tag) appears once.
    """

    def __init__(self, run_dir: str | pathlib.Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = pathlib.Path(run_dir)
        self.path = self.run_dir / CSV_NAME
        self.start = time.time()
        if resume_step is not None and self.path.exists():
            rows = read_metrics(self.path)
            offset = max((r["wall_time"] for r in rows), default=0.0)
            self.start -= offset
            with open(self.path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "tag", "value", "wall_time"])
                for r in rows:
                    if r["step"] < resume_step or (r["step"] == resume_step and not r["tag"].startswith("train/")):
                        w.writerow([r["step"], r["tag"], repr(r["value"]), f"{r['wall_time']:.3f}"])
        elif not self.path.exists() or resume_step is None:
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "tag", "value", "wall_time"])
        self._file = open(self.path, "a", newline="")
        self._csv = csv.writer(self._file)
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn("tensorboardX is not installed: TensorBoard event files are not written "
                              "(pip install tensorboardX); metrics.csv has every value.", RuntimeWarning, stacklevel=2)
            else:
                self.tb = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=resume_step)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log ``{tag: value}`` at ``step``."""
        now = time.time() - self.start
        for tag, value in scalars.items():
            value = float(value)
            self._csv.writerow([int(step), tag, repr(value), f"{now:.3f}"])
            if self.tb is not None:
                self.tb.add_scalar(tag, value, int(step), walltime=self.start + now)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    """Rows of a metrics.csv as dicts {step: int, tag: str, value: float, wall_time: float}."""
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "tag": r["tag"], "value": float(r["value"]), "wall_time": float(r["wall_time"])}
                for r in csv.DictReader(f)]


def series(rows: Sequence[dict], tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one tag, in step order."""
    pts = sorted((r["step"], r["value"]) for r in rows if r["tag"] == tag)
    if not pts:
        return np.zeros((0,)), np.zeros((0,))
    s, v = zip(*pts)
    return np.asarray(s), np.asarray(v, np.float64)


def _agg():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_and_close(fig: Any, png_path: str | pathlib.Path, *, title: str, title_fontsize: float) -> pathlib.Path:
    """Finish a matplotlib figure made after :func:`_agg`: add ``title`` (if any) as its suptitle
    (``title_fontsize`` in points), lay it out tightly, save it as a PNG at 110 dpi to ``png_path``,
    close it, and return ``png_path`` as a Path."""
    import matplotlib.pyplot as plt  # already on the Agg backend: _agg() ran before the figure was made

    if title:
        fig.suptitle(title, fontsize=title_fontsize)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_curves(csv_path: str | pathlib.Path, png_path: str | pathlib.Path, title: str = "") -> pathlib.Path:
    """Training loss (and its running mean), learning rate, validation loss and scores."""
    plt = _agg()
    rows = read_metrics(csv_path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    s, v = series(rows, "train/loss")
    if len(s):
        ax.plot(s, v, color="0.7", lw=0.8, label="train (every step)")
        k = max(1, len(v) // 20)
        if k > 1:
            ax.plot(s[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), color="C0", label=f"train (mean of {k})")
    s, v = series(rows, "val/loss")
    if len(s):
        ax.plot(s, v, "o-", color="C3", label="validation")
    ax.set(title="loss", xlabel="step")
    ax.legend(fontsize=8)
    ax = axes[1]
    for tag, style in (("val/dice_mean", "o-"), ("val/dice_median", "s--"), ("val/iou_mean", "^-"),
                       ("val/pooled_dice", "d:")):
        s, v = series(rows, tag)
        if len(s):
            ax.plot(s, v, style, label=tag.removeprefix("val/"))
    ax.set(title="validation (lung)", xlabel="step", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    s, v = series(rows, "train/lr")
    if len(s):
        ax.plot(s, v, color="C2")
    ax.set(title="learning rate", xlabel="step")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return _save_and_close(fig, png_path, title=title, title_fontsize=10)


def plot_overlays(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, png_path: str | pathlib.Path, *,
                  ids: Sequence[str] = (), dice: Sequence[float] = (), title: str = "") -> pathlib.Path:
    """Grid of validation examples: film | truth lungs | predicted lungs (truth outline in magenta).

    Args:
      images: (N, H, W) or (N, H, W, 1) films in [0, 1].
      truths, preds: (N, H, W) bool lung masks.
      ids, dice: optional per-example names and Dice scores for the titles.
    """
    from crnet_jax.overlay import overlay

    plt = _agg()
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    n = len(images)
    cols = 2 if n > 1 else 1  # pairs of (film, truth, prediction) triplets per row
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 2.1, rows * 2.3), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        film, truth, pred = images[i], np.asarray(truths[i], bool), np.asarray(preds[i], bool)
        name = ids[i] if i < len(ids) else f"#{i}"
        panels = [(np.repeat(np.clip(film, 0, 1)[..., None], 3, -1), name),
                  (overlay(film, truth, labels=False), "truth"),
                  (overlay(film, pred, truth=truth, labels=False),
                   f"prediction (Dice {dice[i]:.3f})" if i < len(dice) else "prediction")]
        for j, (img, label) in enumerate(panels):
            ax = axes[r, 3 * c + j]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(label, fontsize=7)
    return _save_and_close(fig, png_path, title=title, title_fontsize=9)
