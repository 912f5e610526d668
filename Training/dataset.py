"""A dataset in the KiTS19 layout: ``DIR/case_XXXXX/imaging.nii.gz`` (+ ``segmentation.nii.gz``).

Case numbers select cases (``"0-129,140"``); folds split the labelled cases into ``k`` parts
with a fixed permutation, so a fold means the same cases on every machine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.errors import InputError, OutputError

IMAGE_NAME = "imaging.nii.gz"
LABELS_NAME = "segmentation.nii.gz"
#: the marker file of a validation-only dataset (``Training.validation_phantoms``): never training data
VALIDATION_ONLY_MARKER = "validation_phantoms.json"
_CASE_RE = re.compile(r"^case_(\d{5})$")
#: seed of the fold permutation (fixed: a fold must mean the same cases everywhere)
FOLD_SEED = 19


@dataclass(frozen=True)
class Case:
    """One case folder: its number, image path and label path (None when unlabelled)."""

    number: int
    image: Path
    labels: Optional[Path]

    @property
    def name(self) -> str:
        return case_name(self.number)


def case_name(number: int) -> str:
    """``case_00042`` for 42."""
    return f"case_{int(number):05d}"


def parse_case_selection(text: Optional[str]) -> Optional[list[int]]:
    """Case numbers from ``"0-129,140,150-152"`` (inclusive ranges); None or "" or "all" selects all."""
    if text is None or text.strip() in ("", "all"):
        return None
    numbers = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"case selection must look like '0-129,140', got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise InputError(f"case range {part!r} runs backwards")
        numbers.extend(range(lo, hi + 1))
    return sorted(set(numbers))


def list_cases(root: Path, selection: Optional[Iterable[int]] = None, need_labels: bool = True,
               image_name: str = IMAGE_NAME) -> list[Case]:
    """Case folders of a KiTS19-layout dataset, sorted by number.

    ``selection``: case numbers to keep (all when None); a selected number without a folder is
    an error. ``need_labels``: every listed case must have ``segmentation.nii.gz``.
    ``image_name``: the image file each case must hold (``segmentation.nii.gz`` to list label-only
    folders such as the shared KiTS19 labels).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    found = {}
    for p in root.iterdir():
        m = _CASE_RE.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    if not found:
        raise InputError(f"{root} holds no case_XXXXX folders (expected the KiTS19 layout case_XXXXX/{image_name})")
    wanted = sorted(found) if selection is None else sorted(set(selection))
    missing = [n for n in wanted if n not in found]
    if missing:
        shown = ", ".join(case_name(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"{root}: selected case(s) not found: {shown}")
    cases = []
    for n in wanted:
        folder = found[n]
        image = folder / image_name
        labels = folder / LABELS_NAME
        if not image.is_file():
            raise InputError(f"{folder}: missing {image_name}")
        if need_labels and not labels.is_file():
            raise InputError(f"{folder}: missing {LABELS_NAME} (training and evaluation need labels)")
        cases.append(Case(n, image, labels if labels.is_file() else None))
    return cases


_INTEGER_PIXELS = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
                   sitk.sitkUInt64, sitk.sitkInt64}


def checked_labels(labels) -> sitk.Image:
    """``labels`` as a uint8 SimpleITK image after checking it is a 3D scalar integer image with values 0-3
    (background, kidney, tumor, cyst); InputError saying what came in otherwise. The synthesizers' input check."""
    if not isinstance(labels, sitk.Image):
        raise InputError(f"expected a SimpleITK label image, got {type(labels).__name__}")
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"expected a 3D scalar label image, got {labels.GetDimension()}D with "
                         f"{labels.GetNumberOfComponentsPerPixel()} components per voxel")
    if labels.GetPixelID() not in _INTEGER_PIXELS:
        raise InputError(f"expected integer labels 0-3, got pixel type {labels.GetPixelIDTypeAsString()}")
    if labels.GetNumberOfPixels() == 0:
        return labels
    mm = sitk.MinimumMaximumImageFilter()
    mm.Execute(labels)
    if mm.GetMinimum() < 0 or mm.GetMaximum() > 3:
        raise InputError(f"expected label values 0-3 (background, kidney, tumor, cyst), got values from "
                         f"{mm.GetMinimum():g} to {mm.GetMaximum():g}")
    return sitk.Cast(labels, sitk.sitkUInt8) if labels.GetPixelID() != sitk.sitkUInt8 else labels


def make_dataset_folder(out_dir: Path) -> Path:
    """``out_dir`` created (with its parents) for a dataset writer; OutputError saying why when it cannot be."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    return out_dir


def refuse_validation_only(root: Path) -> None:
    """InputError when ``root`` is a validation-only dataset (it holds :data:`VALIDATION_ONLY_MARKER`): the
    independent validation generator's cases must never feed training, or they stop measuring transfer."""
    if (Path(root) / VALIDATION_ONLY_MARKER).is_file():
        raise InputError(f"{root} is a validation-only dataset ({VALIDATION_ONLY_MARKER}: never_train); evaluate on it "
                         "with 'python -m Training evaluate', never preprocess or train on it")


def _read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"cannot read {path}: {first[:200]}") from None


def read_labels(case: Case) -> sitk.Image:
    """The case's label map as uint8 (0 background, 1 kidney, 2 tumor, 3 cyst); InputError for other values."""
    if case.labels is None:
        raise InputError(f"{case.name} has no {LABELS_NAME}")
    labels = _read(case.labels)
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{case.labels}: expected a 3D scalar label map, got {labels.GetDimension()}D")
    arr = sitk.GetArrayViewFromImage(labels)
    if arr.size and (arr.min() < 0 or arr.max() > 3):
        raise InputError(f"{case.labels}: label values must be 0..3 (background, kidney, tumor, cyst), found {arr.min()}..{arr.max()}")
    return sitk.Cast(labels, sitk.sitkUInt8) if labels.GetPixelID() != sitk.sitkUInt8 else labels


def read_case(case: Case) -> tuple[sitk.Image, Optional[sitk.Image]]:
    """``(ct, labels)``: CT in HU (as stored), labels uint8 on exactly the CT's grid (None when unlabelled)."""
    ct = _read(case.image)
    if ct.GetDimension() != 3:
        raise InputError(f"{case.image}: expected a 3D CT, got {ct.GetDimension()}D")
    if case.labels is None:
        return ct, None
    labels = read_labels(case)
    if (ct.GetSize() != labels.GetSize() or not np.allclose(ct.GetSpacing(), labels.GetSpacing(), atol=1e-4)
            or not np.allclose(ct.GetOrigin(), labels.GetOrigin(), atol=1e-2)
            or not np.allclose(ct.GetDirection(), labels.GetDirection(), atol=1e-4)):
        raise InputError(f"{case.name}: imaging and segmentation grids differ (size {ct.GetSize()} vs {labels.GetSize()}, "
                         f"spacing {ct.GetSpacing()} vs {labels.GetSpacing()})")
    labels.CopyInformation(ct)
    return ct, labels


def fold_split(numbers: Sequence[int], fold: Optional[int], folds: int = 5) -> tuple[list[int], list[int]]:
    """``(train, validation)`` case numbers of ``fold`` (0..folds-1) of a fixed permutation.

    ``fold`` None trains on every case with no validation. With fewer cases than folds, fold k
    validates on case k of the permutation (when it exists) and trains on the rest.
    """
    numbers = sorted(int(n) for n in numbers)
    if fold is None:
        return numbers, []
    if not 0 <= fold < folds:
        raise InputError(f"fold must be in 0..{folds - 1}, got {fold}")
    order = [numbers[i] for i in np.random.default_rng(FOLD_SEED).permutation(len(numbers))]
    val = sorted(order[fold::folds])
    if len(numbers) > 1 and len(val) == len(numbers):
        val = val[:1]
    if len(val) == len(numbers):  # a single case: nothing left to train on
        raise InputError(f"fold {fold} of {len(numbers)} case(s) leaves no training case")
    train = [n for n in numbers if n not in set(val)]
    return train, val
