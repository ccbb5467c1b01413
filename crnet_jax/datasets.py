"""TFDS builders for public chest X-ray lung-segmentation sets (no TensorFlow needed).

Each builder reads files the user downloaded (``manual_dir``), stores every film and its
lung mask at a fixed size in ArrayRecord files with ``tfds.features.Tensor`` features
(ZLIB-compressed), and is read back with ``tfds.data_source`` (random access, for grain).

Builders (TFDS name: layout under manual_dir):

* ``montgomery_cxr``: ``MontgomerySet/CXR_png/*.png`` + ``ManualMask/leftMask/*.png`` and
  ``ManualMask/rightMask/*.png`` (merged into one lung mask).
* ``shenzhen_cxr``: ``ChinaSet_AllFiles/CXR_png/*.png`` + Kyiv masks ``mask/*_mask.png``.
* ``jsrt_scr``: JSRT ``*.IMG`` (2048 x 2048, 12-bit big-endian raw) + SCR
  ``masks/left lung/*.gif`` and ``masks/right lung/*.gif`` (1024 x 1024).
* ``v7_covid_lungs``: V7 Darwin COVID-19 X-ray set: ``images/<name>.<ext>`` + semantic
  masks ``masks/<name>.png`` (or ``all-images-semantic-masks/``) with ``class_mapping.csv``.
* ``cxr_folder``: generic ``images/<id>.<ext>`` + ``masks/<id>.png`` (+ ``manifest.csv``
  with columns id, source, finding and optionally patient).
* ``cxr_phantom``: synthetic phantoms (no manual data), see :mod:`crnet_jax.phantom`.

Directories are found anywhere below manual_dir (the layouts may sit one level deeper,
as archives unpack). Every example has the features

    image           uint16 (or uint8) (H, W, 1)  film, bright = dense, full range of the dtype
    mask            uint8 (H, W, 1)              lung mask 0..255 (resized soft mask; threshold at 128)
    id              text                          image id (file stem)
    patient_id      text                          what the splits are grouped by
    source          text                          montgomery / shenzhen / jsrt / v7-darwin / folder name / synthetic-phantom
    finding         text                          normal / abnormal / unknown
    finding_detail  text                          the set's own label (tb, nodule, ...) or ""
    pixel_spacing   float32 (2,)                  (row, col) mm of the ORIGINAL film, NaN when unknown
    original_shape  int32 (2,)                    (H0, W0) of the original film
    content_box     int32 (4,)                    (top, left, height, width) of the film inside the stored image

Size: default config ``512`` stores 512 x 512 stretched (like the shared mcsz512 data and the
authors, who stretched to 340 x 300), uint16 so 12/16-bit films keep their depth; about
0.3-0.5 MB per example after ZLIB. Other configs: ``1024``, ``300x340``, ``512_pad``
(aspect kept, zero padded), or any :class:`CxrConfig`.

Splits: train / validation / test by a SHA-256 hash of (split_salt, patient_id), so they
are deterministic, independent of file order, and no patient is in two splits. Splits that
would be empty are left out.

Bad data never stops a build: each problem (missing, empty or non-binary mask, size
mismatch, unreadable file, RGB film, duplicate id, ...) is counted, explained and printed
in a report at the end (also saved as ``build_report.json`` next to the data).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
from typing import Any, Callable, Container, Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from crnet_jax import phantom as phantom_lib
from crnet_jax import preprocess as pp
from crnet_jax import readers

SPLITS = ("train", "validation", "test")

# Problems that leave an example out, and notes on examples that are kept.
SKIP_CATEGORIES = ("missing_mask", "empty_mask", "size_mismatch", "unreadable_image", "unreadable_mask", "duplicate_id")
NOTE_CATEGORIES = ("rgb_converted", "non_binary_mask", "mask_resized", "orphan_mask", "image_note")


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(eq=False)
class CxrConfig(tfds.core.BuilderConfig):
    """Storage settings: size (H x W), ``stretch`` or ``pad`` (keep aspect, zero pad),
    image dtype (``uint16`` or ``uint8``), split fractions (train, validation, test) and the
    salt of the patient hash. Give a new ``name`` whenever you change a setting."""

    height: int = 512
    width: int = 512
    resize_mode: str = "stretch"
    image_dtype: str = "uint16"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_salt: str = "crnet-v1"

    def __post_init__(self) -> None:
        if self.image_dtype not in ("uint8", "uint16"):
            raise ValueError(f"CxrConfig {self.name!r}: image_dtype must be 'uint8' or 'uint16', got {self.image_dtype!r}")
        if self.resize_mode not in ("stretch", "pad"):
            raise ValueError(f"CxrConfig {self.name!r}: resize_mode must be 'stretch' or 'pad', got {self.resize_mode!r}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or not math.isclose(sum(self.split_fractions), 1.0, abs_tol=1e-6):
            raise ValueError(f"CxrConfig {self.name!r}: split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions}")
        if self.height < 8 or self.width < 8:
            raise ValueError(f"CxrConfig {self.name!r}: height and width must be >= 8, got {self.height} x {self.width}")


def _default_configs() -> list[CxrConfig]:
    return [
        CxrConfig(name="512", description="512 x 512, stretched, uint16 (default)"),
        CxrConfig(name="1024", height=1024, width=1024, description="1024 x 1024, stretched, uint16"),
        CxrConfig(name="300x340", height=300, width=340, description="300 x 340 (H x W) as the authors trained, stretched"),
        CxrConfig(name="512_pad", resize_mode="pad", description="512 x 512, aspect kept, zero padded, uint16"),
    ]


def split_of(patient_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), salt: str = "crnet-v1") -> str:
    """Split of a patient: hash (salt, patient_id) with SHA-256 to u in [0, 1) and cut at
    the cumulative fractions. Deterministic across machines and Python versions."""
    digest = hashlib.sha256(f"{salt}\x00{patient_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    cum = 0.0
    for name, f in zip(SPLITS, fractions):
        cum += f
        if u < cum:
            return name
    return SPLITS[-1]


# ----------------------------------------------------------------------------- report

@dataclasses.dataclass
class BuildReport:
    """What happened to every file of a build: counts and messages per category."""

    dataset: str
    found: int = 0
    written: dict[str, int] = dataclasses.field(default_factory=lambda: collections.Counter())
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    notes: dict[str, list[str]] = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def skip(self, category: str, message: str) -> None:
        self.skipped[category].append(message)

    def note(self, category: str, message: str) -> None:
        self.notes[category].append(message)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, max_messages: int = 5) -> str:
        lines = [f"Build report for {self.dataset}: {self.found} image(s) found, "
                 f"{sum(self.written.values())} written ({', '.join(f'{k} {v}' for k, v in sorted(self.written.items())) or 'none'}), "
                 f"{self.num_skipped} left out."]
        for title, table in (("left out", self.skipped), ("kept, with a note", self.notes)):
            for cat in sorted(table):
                msgs = table[cat]
                lines.append(f"  {title}: {cat}: {len(msgs)}")
                lines += [f"    - {m}" for m in msgs[:max_messages]]
                if len(msgs) > max_messages:
                    lines.append(f"    ... and {len(msgs) - max_messages} more (see build_report.json)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "found": self.found, "written": dict(self.written),
                "skipped": {k: list(v) for k, v in self.skipped.items()},
                "notes": {k: list(v) for k, v in self.notes.items()}}


# ----------------------------------------------------------------------------- items

@dataclasses.dataclass
class Item:
    """One film to store: paths and labels, before reading."""

    id: str
    image: pathlib.Path
    masks: list[pathlib.Path]           # merged with OR (e.g. left + right lung)
    patient_id: str
    source: str
    finding: str = "unknown"
    finding_detail: str = ""
    spacing: tuple[float, float] | None = None
    label_value: int | None = None      # semantic masks: the lung class value (else threshold)


def _find_dirs(root: pathlib.Path, name: str) -> list[pathlib.Path]:
    """Directories called ``name`` (case-insensitive) at any depth below root, root included, sorted."""
    name = name.lower()
    found = [root] if root.name.lower() == name else []
    found += [p for p in root.rglob("*") if p.is_dir() and p.name.lower() == name]
    return sorted(found)


def _files(folder: pathlib.Path, suffixes: Sequence[str]) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))


def _note_orphan_masks(report: BuildReport, masks: Iterable[pathlib.Path], image_keys: Container[str],
                       image_key_of: Callable[[pathlib.Path], str], where: str = "") -> None:
    """Note (``orphan_mask``) each mask, in the given order, whose image key is not in ``image_keys``.

    ``image_key_of`` maps a mask path to the key of the image it belongs to (e.g. its file name or
    stem); ``where`` is added after "mask without an image" in the note (e.g. ``" in <folder>"``).
    Such masks are ignored by the build."""
    for mask in masks:
        if image_key_of(mask) not in image_keys:
            report.note("orphan_mask", f"{mask}: mask without an image{where}; ignored")


def _finding_from_digit(pid: str, detail: str) -> tuple[str, str]:
    """NLM naming: the last digit is 0 for normal and 1 for abnormal (tuberculosis)."""
    m = re.search(r"_(\d)$", pid)
    if not m:
        return "unknown", ""
    return ("normal", "") if m.group(1) == "0" else ("abnormal", detail)


def _normalise_finding(raw: str) -> tuple[str, str]:
    raw = (raw or "").strip()
    low = raw.lower()
    if low in ("", "unknown", "na", "n/a", "none", "?"):
        return "unknown", ""
    if low in ("normal", "healthy", "no finding", "no_finding", "0"):
        return "normal", ""
    return "abnormal", ("" if low == "abnormal" else raw)


def _dedupe(items: list[Item], report: BuildReport) -> list[Item]:
    seen: dict[str, Item] = {}
    out = []
    for it in items:
        if it.id in seen:
            report.skip("duplicate_id", f"{it.image}: id {it.id!r} already used by {seen[it.id].image}; "
                                        "rename one of them (ids come from file names) - this one is left out")
            continue
        seen[it.id] = it
        out.append(it)
    return out


# ----------------------------------------------------------------------------- reading

def _read_mask_union(item: Item) -> tuple[np.ndarray, list[str]]:
    """Read and merge the item's masks -> bool (H, W), warnings. Raises ImageReadError."""
    union = None
    warns: list[str] = []
    for p in item.masks:
        if item.label_value is not None:
            labels = readers.read_label_image(p)
            m = labels == item.label_value
            if not m.any():
                raise readers.ImageReadError(f"{p}: mask is empty (no pixel has the lung value {item.label_value}). "
                                             "Fix or remove this mask; the image is left out.")
        else:
            values, _ = readers.read_image(p)
            m, info = readers.binarize_mask(values, where=os.fspath(p))
            warns += [f"{p}: {w}" for w in info.warnings]
        if union is None:
            union = m
        elif union.shape != m.shape:
            raise readers.ImageReadError(f"{p}: mask is {m.shape[1]} x {m.shape[0]} but {item.masks[0].name} is "
                                         f"{union.shape[1]} x {union.shape[0]}; the parts of one mask must match")
        else:
            union = union | m
    assert union is not None
    return union, warns


def _aspect_ok(a: tuple[int, int], b: tuple[int, int], tol: float = 0.02) -> bool:
    return abs(a[0] / a[1] - b[0] / b[1]) <= tol * (a[0] / a[1])


def _vet(item: Item, report: BuildReport) -> bool:
    """Cheap checks before a build (image header, masks decoded). False = leave out."""
    if not item.masks or not all(p.exists() for p in item.masks):
        missing = [str(p) for p in item.masks if not p.exists()] or ["(no mask file)"]
        report.skip("missing_mask", f"{item.image}: no lung mask (expected {', '.join(missing)}); the image is left out")
        return False
    try:
        meta = readers.probe_image(item.image)
    except readers.ImageReadError as e:
        report.skip("unreadable_image", str(e))
        return False
    try:
        mask, warns = _read_mask_union(item)
    except readers.ImageReadError as e:
        report.skip("empty_mask" if "mask is empty" in str(e) else "unreadable_mask", str(e))
        return False
    if mask.shape != meta.shape and not _aspect_ok(mask.shape, meta.shape):
        report.skip("size_mismatch", f"{item.image}: image is {meta.shape[1]} x {meta.shape[0]} (W x H) but its mask "
                                     f"{item.masks[0].name} is {mask.shape[1]} x {mask.shape[0]} with a different aspect ratio; "
                                     "the pair is left out - check that the mask belongs to this image")
        return False
    for w in warns:
        report.note("non_binary_mask", w)
    return True


def _encode(item: Item, cfg: CxrConfig, report: BuildReport) -> dict[str, Any] | None:
    """Read, check and resize one item into a TFDS example; None (and a report entry) if bad."""
    try:
        img, meta = readers.read_image(item.image)
    except readers.ImageReadError as e:
        report.skip("unreadable_image", str(e))
        return None
    try:
        mask, _ = _read_mask_union(item)
    except readers.ImageReadError as e:
        report.skip("empty_mask" if "mask is empty" in str(e) else "unreadable_mask", str(e))
        return None
    if meta.was_rgb:
        report.note("rgb_converted", f"{item.image}: {'; '.join(meta.notes)}")
    for n in meta.notes:  # only the unusual ones; format conventions (JSRT inversion, windows) are routine
        if any(k in n for k in ("frames", "min-max", "alpha", "shifted", "ImagerPixelSpacing")):
            report.note("image_note", f"{item.image}: {n}")
    if mask.shape != img.shape:
        if not _aspect_ok(mask.shape, img.shape):
            report.skip("size_mismatch", f"{item.image}: image is {img.shape[1]} x {img.shape[0]} (W x H) but its mask is "
                                         f"{mask.shape[1]} x {mask.shape[0]} with a different aspect ratio; left out")
            return None
        if not (item.source == "jsrt" and mask.shape[0] * 2 == img.shape[0]):  # SCR masks are half size by design
            report.note("mask_resized", f"{item.image}: mask {mask.shape[1]} x {mask.shape[0]} resized to the image's "
                                        f"{img.shape[1]} x {img.shape[0]} (same aspect ratio)")
    geom = pp.compute_geometry(img.shape, (cfg.height, cfg.width), cfg.resize_mode)
    top, left, ch, cw = geom.box
    canvas = np.zeros((cfg.height, cfg.width), np.float32)
    canvas[top:top + ch, left:left + cw] = np.clip(pp.resize_plane(img, (ch, cw)), 0.0, 1.0)
    soft = np.zeros((cfg.height, cfg.width), np.float32)
    soft[top:top + ch, left:left + cw] = np.clip(pp.resize_plane(mask.astype(np.float32), (ch, cw)), 0.0, 1.0)
    top_value = 65535.0 if cfg.image_dtype == "uint16" else 255.0
    spacing = meta.pixel_spacing_mm or item.spacing
    return {
        "image": np.rint(canvas * top_value).astype(cfg.image_dtype)[..., None],
        "mask": np.rint(soft * 255.0).astype(np.uint8)[..., None],
        "id": item.id,
        "patient_id": item.patient_id,
        "source": item.source,
        "finding": item.finding,
        "finding_detail": item.finding_detail,
        "pixel_spacing": np.array(spacing if spacing else (np.nan, np.nan), np.float32),
        "original_shape": np.array(img.shape, np.int32),
        "content_box": np.array(geom.box, np.int32),
    }


# ----------------------------------------------------------------------------- base builder

def cxr_features(height: int, width: int, image_dtype: Any = np.uint16) -> tfds.features.FeaturesDict:
    """The feature spec shared by all builders (see module docstring)."""
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(height, width, 1), dtype=np.dtype(image_dtype), encoding=zlib),
        "mask": tfds.features.Tensor(shape=(height, width, 1), dtype=np.uint8, encoding=zlib),
        "id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "source": tfds.features.Text(),
        "finding": tfds.features.Text(),
        "finding_detail": tfds.features.Text(),
        "pixel_spacing": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "original_shape": tfds.features.Tensor(shape=(2,), dtype=np.int32),
        "content_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
    })


class _CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: scan -> vet -> split by patient -> encode; report at the end."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = _default_configs()
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""

    def __init__(self, *args: Any, file_format: str = "array_record", **kwargs: Any):
        super().__init__(*args, file_format=file_format, **kwargs)
        self.build_report: BuildReport | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=cxr_features(cfg.height, cfg.width, cfg.image_dtype),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
        )

    # Subclasses implement: list the candidate items (reporting problems found by name).
    def _scan(self, root: pathlib.Path, report: BuildReport) -> list[Item]:
        raise NotImplementedError

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        report = BuildReport(self.name)
        self.build_report = report
        root = self._root(dl_manager)
        scanned = self._scan(root, report)
        report.found = len(scanned) + report.num_skipped  # scan-time skips are files that never became items
        items = _dedupe(scanned, report)
        good = [it for it in items if _vet(it, report)]
        cfg = self.builder_config
        by_split: dict[str, list[Item]] = {s: [] for s in SPLITS}
        for it in good:
            by_split[split_of(it.patient_id, cfg.split_fractions, cfg.split_salt)].append(it)
        gens = {s: self._generate_examples(v) for s, v in by_split.items() if v}
        if not gens:
            raise ValueError(f"{self.name}: no usable image/mask pairs under {root}.\n{report.summary()}\n\n"
                             f"Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return gens

    def _root(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
        return pathlib.Path(os.fspath(dl_manager.manual_dir))

    def _generate_examples(self, items: list[Item]) -> Iterator[tuple[str, dict[str, Any]]]:
        report = self.build_report
        assert report is not None
        cfg = self.builder_config
        for it in items:
            ex = _encode(it, cfg, report)
            if ex is None:
                continue
            report.written[split_of(it.patient_id, cfg.split_fractions, cfg.split_salt)] += 1
            yield it.id, ex

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:  # noqa: D401
        """As TFDS, then prints the build report and saves it as build_report.json."""
        super().download_and_prepare(*args, **kwargs)
        if self.build_report is not None:
            print(self.build_report.summary())
            try:
                (pathlib.Path(os.fspath(self.data_path)) / "build_report.json").write_text(
                    json.dumps(self.build_report.to_json(), indent=1))
            except OSError:
                pass


# ----------------------------------------------------------------------------- Montgomery

class MontgomeryCxr(_CxrBuilder):
    """Montgomery County (USA) TB set, NLM: 138 PA films (4020 x 4892), manual lung masks."""

    name = "montgomery_cxr"
    DESCRIPTION = "Montgomery County chest X-rays (NLM) with manual left/right lung masks merged into one lung mask."
    HOMEPAGE = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
    CITATION = "Jaeger S, et al. Two public chest X-ray datasets for computer-aided screening of pulmonary diseases. QIMS 2014;4(6):475-477."
    SPACING_MM = 0.0875
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the Montgomery County set from the NLM (see the homepage), unpack it and put
    (or link) it into manual_dir so that this layout exists somewhere below it:
      MontgomerySet/CXR_png/MCUCXR_0001_0.png ...
      MontgomerySet/ManualMask/leftMask/MCUCXR_0001_0.png ...
      MontgomerySet/ManualMask/rightMask/MCUCXR_0001_0.png ...
    The last digit of the id is 0 for normal, 1 for tuberculosis. Research use under NLM's terms.
    """

    def _scan(self, root: pathlib.Path, report: BuildReport) -> list[Item]:
        cxr_dirs = _find_dirs(root, "CXR_png")
        left_dirs, right_dirs = _find_dirs(root, "leftMask"), _find_dirs(root, "rightMask")
        if not cxr_dirs:
            raise FileNotFoundError(f"{root}: no CXR_png folder found. Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        cxr = cxr_dirs[0]
        left = left_dirs[0] if left_dirs else cxr.parent / "ManualMask" / "leftMask"
        right = right_dirs[0] if right_dirs else cxr.parent / "ManualMask" / "rightMask"
        items = []
        for p in _files(cxr, (".png",)):
            pid = p.stem
            finding, detail = _finding_from_digit(pid, "tb")
            items.append(Item(pid, p, [left / p.name, right / p.name], pid, "montgomery", finding, detail,
                              (self.SPACING_MM, self.SPACING_MM)))
        names = {p.name for p in _files(cxr, (".png",))}
        for d in (left, right):
            if d.exists():
                _note_orphan_masks(report, _files(d, (".png",)), names, lambda m: m.name, where=f" in {cxr}")
        return items


# ----------------------------------------------------------------------------- Shenzhen

class ShenzhenCxr(_CxrBuilder):
    """Shenzhen No.3 Hospital TB set (NLM) with the Kyiv lung masks (566 of 662 films)."""

    name = "shenzhen_cxr"
    DESCRIPTION = "Shenzhen chest X-rays (NLM) with lung masks by Stirenko et al. (Kyiv); films without a mask are left out."
    HOMEPAGE = "https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets"
    CITATION = ("Jaeger S, et al. QIMS 2014;4(6):475-477. Masks: Stirenko S, et al. Chest X-ray analysis of tuberculosis "
                "by deep learning with segmentation and augmentation. ELNANO 2018.")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the Shenzhen set from the NLM and the lung masks of Stirenko et al. (Kyiv,
    e.g. the "Shenzhen Hospital CXR Set - lung masks" on Kaggle; CC BY-NC-SA 4.0), and
    arrange them below manual_dir as:
      ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png ...
      mask/CHNCXR_0001_0_mask.png ...
    Films without a mask are reported and left out. Last digit: 0 normal, 1 tuberculosis.
    """

    def _scan(self, root: pathlib.Path, report: BuildReport) -> list[Item]:
        cxr_dirs = _find_dirs(root, "CXR_png")
        if not cxr_dirs:
            raise FileNotFoundError(f"{root}: no CXR_png folder found. Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        cxr = cxr_dirs[0]
        mask_dirs = [d for d in _find_dirs(root, "mask") + _find_dirs(root, "masks") if any(d.glob("*_mask.png"))]
        mask_dir = mask_dirs[0] if mask_dirs else root / "mask"
        items = []
        images = _files(cxr, (".png",))
        for p in images:
            pid = p.stem
            finding, detail = _finding_from_digit(pid, "tb")
            items.append(Item(pid, p, [mask_dir / f"{pid}_mask.png"], pid, "shenzhen", finding, detail))
        stems = {p.stem for p in images}
        if mask_dir.exists():
            _note_orphan_masks(report, sorted(mask_dir.glob("*_mask.png")), stems, lambda m: m.name[: -len("_mask.png")],
                               where=f" in {cxr}")
        return items


# ----------------------------------------------------------------------------- JSRT + SCR

class JsrtScr(_CxrBuilder):
    """JSRT (247 films, 2048 x 2048, 12 bit) with SCR lung masks (heart excluded)."""

    name = "jsrt_scr"
    DESCRIPTION = "JSRT chest radiographs with the SCR (van Ginneken) left and right lung masks merged into one lung mask."
    HOMEPAGE = "http://db.jsrt.or.jp/eng.php"
    CITATION = ("Shiraishi J, et al. AJR 2000;174:71-74. van Ginneken B, Stegmann MB, Loog M. Segmentation of anatomical "
                "structures in chest radiographs using supervised methods. Med Image Anal 2006;10:19-40.")
    SPACING_MM = readers.JSRT_SPACING_MM
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the JSRT images (*.IMG, 2048 x 2048, 12-bit big-endian raw) from the JSRT and
    the SCR masks from the SCR database site, and put both below manual_dir, e.g.:
      All247images/JPCLN001.IMG ...
      scr/masks/left lung/JPCLN001.gif ...
      scr/masks/right lung/JPCLN001.gif ...
    (SCR's fold1/fold2 folders also work: every 'left lung'/'right lung' folder is searched.)
    JPCLN = lung nodule (abnormal), JPCNN = no nodule (normal).
    """

    def _scan(self, root: pathlib.Path, report: BuildReport) -> list[Item]:
        imgs = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".img")
        if not imgs:
            raise FileNotFoundError(f"{root}: no JSRT .IMG files found. Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        lefts: dict[str, pathlib.Path] = {}
        rights: dict[str, pathlib.Path] = {}
        for table, name in ((lefts, "left lung"), (rights, "right lung")):
            for d in _find_dirs(root, name):
                for m in _files(d, (".gif", ".png")):
                    table.setdefault(m.stem.upper(), m)
        items = []
        for p in imgs:
            pid = p.stem.upper()
            finding, detail = ("abnormal", "nodule") if pid.startswith("JPCLN") else (("normal", "") if pid.startswith("JPCNN") else ("unknown", ""))
            masks = [lefts.get(pid, root / "masks" / "left lung" / f"{pid}.gif"), rights.get(pid, root / "masks" / "right lung" / f"{pid}.gif")]
            items.append(Item(pid, p, masks, pid, "jsrt", finding, detail, (self.SPACING_MM, self.SPACING_MM)))
        stems = {p.stem.upper() for p in imgs}
        for table in (lefts, rights):
            for k, m in table.items():
                if k not in stems:
                    report.note("orphan_mask", f"{m}: mask without a JSRT image; ignored")
        return items


# ----------------------------------------------------------------------------- V7 Darwin

_KERMANY_PATIENT = [
    re.compile(r"^(person\d+)_", re.IGNORECASE),                 # person1_bacteria_1
    re.compile(r"^((?:NORMAL\d*-)?IM-\d+)-\d+", re.IGNORECASE),  # IM-0115-0001, NORMAL2-IM-1427-0001
]


def v7_patient_id(stem: str) -> str:
    """Patient of a V7 image from its file name: Kermany pneumonia names carry the patient
    (``person12_bacteria_46`` -> ``person12``, ``IM-0115-0001`` -> ``IM-0115``); other names
    are taken as one patient each unless patients.csv says otherwise."""
    for rx in _KERMANY_PATIENT:
        m = rx.match(stem)
        if m:
            return m.group(1)
    return stem


class V7CovidLungs(_CxrBuilder):
    """V7 Labs' COVID-19 chest X-ray set (6500 AP/PA films, lung polygons incl. the heart)."""

    name = "v7_covid_lungs"
    DESCRIPTION = ("V7 Darwin COVID-19 chest X-ray dataset with semantic lung masks (lungs include the region "
                   "behind the heart; the 'Ignore' class counts as non-lung).")
    HOMEPAGE = "https://github.com/v7labs/covid-19-xray-dataset"
    CITATION = "V7 Labs COVID-19 X-ray dataset (CC BY 4.0); images from Cohen et al. arXiv:2003.11597 and Kermany et al. 2018."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Get the V7 COVID-19 chest X-ray set (darwin-py: `darwin dataset pull
    v7-labs/covid-19-chest-x-ray-dataset:all-images`, or the GitHub repository
    v7labs/covid-19-xray-dataset) and arrange below manual_dir:
      images/<name>.<png|jpg|jpeg>                  the films as downloaded
      masks/<name>.png                              semantic masks (folder may also be called
                                                    all-images-semantic-masks), one per film,
                                                    matched by file stem
      masks/class_mapping.csv                       class_idx,class_name (0 __background__,
                                                    127 Ignore, 255 Lung); lung = the 'Lung' value
      patients.csv (optional)                       columns name,patient to group films by patient
    ASSUMED layout (the set ships Darwin JSON polygons; export them as semantic masks with
    darwin-py if you only have the JSON). Films without a mask (lateral views, CT slices) are
    reported and left out. Without patients.csv, patients come from Kermany-style names
    (personN_..., IM-NNNN-...) or one per film.
    """

    def _scan(self, root: pathlib.Path, report: BuildReport) -> list[Item]:
        img_dirs = _find_dirs(root, "images")
        mask_dirs = _find_dirs(root, "all-images-semantic-masks") + _find_dirs(root, "masks")
        if not img_dirs:
            raise FileNotFoundError(f"{root}: no images folder found. Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        mask_dir = mask_dirs[0] if mask_dirs else root / "masks"
        lung_value = None
        for cm in [mask_dir / "class_mapping.csv", *sorted(root.rglob("class_mapping.csv"))]:
            if cm.exists():
                with open(cm, newline="") as f:
                    for row in csv.DictReader(f):
                        if (row.get("class_name") or "").strip().lower() == "lung":
                            lung_value = int(row["class_idx"])
                break
        patients: dict[str, str] = {}
        pcsv = next(iter(sorted(root.rglob("patients.csv"))), None)
        if pcsv is not None:
            with open(pcsv, newline="") as f:
                for row in csv.DictReader(f):
                    key = pathlib.Path(row.get("name") or row.get("id") or "").stem
                    if key and row.get("patient"):
                        patients[key] = row["patient"].strip()
        items = []
        images = [p for d in img_dirs for p in _files(d, readers.RASTER_SUFFIXES + readers.DICOM_SUFFIXES)]
        for p in images:
            pid = patients.get(p.stem, v7_patient_id(p.stem))
            items.append(Item(p.stem, p, [mask_dir / f"{p.stem}.png"], pid, "v7-darwin", label_value=lung_value))
        stems = {p.stem for p in images}
        if mask_dir.exists():
            _note_orphan_masks(report, _files(mask_dir, (".png",)), stems, lambda m: m.stem)
        return items


# ----------------------------------------------------------------------------- generic folder

class CxrFolder(_CxrBuilder):
    """Any folder of films with lung masks: images/<id>.<ext> + masks/<id>.png."""

    name = "cxr_folder"
    DESCRIPTION = "Chest X-rays with lung masks from a generic images/ + masks/ folder."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put your data below manual_dir as:
      images/<id>.<png|jpg|jpeg|tif|tiff|dcm|...>   one film per id (8/16-bit, DICOM, ...)
      masks/<id>.png                                lung mask (0 = background, lung > half
                                                    the maximum; 0/255 and 0/1 both work)
      manifest.csv (optional)                       columns id, source, finding [, patient]
    Without a manifest the source is the folder name, the finding 'unknown' and each id its
    own patient. Use a distinct config name per folder, e.g.
      CxrFolder(config=CxrConfig(name="mydata_512"), data_dir=...).
    """

    def _scan(self, root: pathlib.Path, report: BuildReport) -> list[Item]:
        img_dir, mask_dir = root / "images", root / "masks"
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{root}: no images/ folder. Expected layout:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        manifest: dict[str, dict[str, str]] = {}
        mpath = root / "manifest.csv"
        if mpath.exists():
            with open(mpath, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("id"):
                        manifest[row["id"].strip()] = {k: (v or "").strip() for k, v in row.items() if k}
        items = []
        files = []
        for p in sorted(img_dir.iterdir()):
            if p.name.startswith(".") or p.is_dir():
                continue
            if not p.exists():  # a dangling symbolic link
                report.skip("unreadable_image", f"{p}: broken link (target missing); fix the link or remove it")
                continue
            files.append(p)
        for p in files:
            if p.suffix.lower() not in readers.SUPPORTED_SUFFIXES:
                report.skip("unreadable_image", f"{p}: unsupported file type {p.suffix or '(none)'!r}; "
                                                f"supported: {', '.join(readers.SUPPORTED_SUFFIXES)}")
                continue
            row = manifest.get(p.stem, {})
            finding, detail = _normalise_finding(row.get("finding", ""))
            mask = mask_dir / f"{p.stem}.png"
            if not mask.exists():
                alt = sorted(q for q in mask_dir.glob(f"{p.stem}.*") if q.suffix.lower() in readers.RASTER_SUFFIXES) if mask_dir.exists() else []
                mask = alt[0] if alt else mask
            items.append(Item(p.stem, p, [mask], row.get("patient") or row.get("patient_id") or p.stem,
                              row.get("source") or root.name, finding, detail))
        stems = {p.stem for p in files}
        if mask_dir.exists():
            raster_masks = [m for m in sorted(mask_dir.iterdir()) if m.is_file() and m.suffix.lower() in readers.RASTER_SUFFIXES]
            _note_orphan_masks(report, raster_masks, stems, lambda m: m.stem)
        return items


# ----------------------------------------------------------------------------- synthetic phantoms

@dataclasses.dataclass(eq=False)
class PhantomConfig(tfds.core.BuilderConfig):
    """Synthetic phantom set: size and number of examples per split; phantom seeds are
    consecutive from ``seed_offset`` (train first, then validation, then test)."""

    height: int = 256
    width: int = 256
    num_train: int = 800
    num_validation: int = 100
    num_test: int = 100
    seed_offset: int = 0


class CxrPhantom(tfds.core.GeneratorBasedBuilder):
    """SYNTHETIC chest X-ray phantoms with exact lung masks (no download needed)."""

    name = "cxr_phantom"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        PhantomConfig(name="256", description="1000 synthetic 256 x 256 phantoms"),
        PhantomConfig(name="300x340", height=300, width=340, description="1000 synthetic 300 x 340 phantoms"),
        PhantomConfig(name="tiny", height=64, width=64, num_train=8, num_validation=2, num_test=2, description="12 tiny phantoms, for tests"),
    ]

    def __init__(self, *args: Any, file_format: str = "array_record", **kwargs: Any):
        super().__init__(*args, file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="SYNTHETIC procedural chest X-ray phantoms (crnet_jax.phantom); ids start with 'synthetic_'.",
            features=cxr_features(cfg.height, cfg.width, np.uint16),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        cfg = self.builder_config
        start = cfg.seed_offset
        out = {}
        for split, n in (("train", cfg.num_train), ("validation", cfg.num_validation), ("test", cfg.num_test)):
            if n > 0:
                out[split] = self._generate_examples(range(start, start + n))
            start += n
        return out

    def _generate_examples(self, seeds: range) -> Iterator[tuple[str, dict[str, Any]]]:
        cfg = self.builder_config
        for s in seeds:
            rec = phantom_lib.phantom_record(s, cfg.height, cfg.width)
            rec["content_box"] = np.array([0, 0, cfg.height, cfg.width], np.int32)
            yield rec["id"], rec


# ----------------------------------------------------------------------------- helpers

BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    b.name: b for b in (MontgomeryCxr, ShenzhenCxr, JsrtScr, V7CovidLungs, CxrFolder, CxrPhantom)
}


def build(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
          config: str | tfds.core.BuilderConfig | None = None) -> tfds.core.DatasetBuilder:
    """Build (or reuse) a dataset and return its builder; prints the build report.

    Example: ``build("cxr_folder", "~/tfds", "../shared/data/mcsz512", CxrConfig(name="mcsz512"))``.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](data_dir=os.fspath(os.path.expanduser(data_dir)), config=config)
    dl_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=dl_config)
    return builder


def data_source(name: str, split: str, data_dir: str | os.PathLike, config: str | tfds.core.BuilderConfig | None = None) -> Any:
    """Random-access source of a built dataset (``tfds.data_source``, no TensorFlow needed).

    Records are dicts of NumPy arrays / bytes with the features listed in the module docstring.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    kwargs = {"config": config} if config is not None else {}
    return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False, builder_kwargs=kwargs)
