"""Reading input volumes and writing output images.

Inputs are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``),
MetaImage (``.mha``, ``.mhd``) files or a folder holding a DICOM series.
Images come back as ``SimpleITK.Image`` with their geometry (size, spacing,
origin, direction, all in SimpleITK (x, y, z) order, LPS, mm) exactly as the
file stores it; DICOM pixel values have the rescale slope/intercept applied,
so a CT is in Hounsfield units.

Outputs are written atomically (:func:`atomic_write`, the one home of that rule,
used for label maps, JSON, the overview PNG and DICOM SEG / SR files alike): to a
temporary file in the destination folder, verified (an image is read back and compared
voxel for voxel, JSON byte for byte, a DICOM file re-read with pydicom, so a full disk
that the writer ignored is caught) and fsynced, then renamed over
the destination; on any failure the temporary file is removed and an existing
output is left as it was. Temporary files are named ``.NAME.tmp-PID-RANDOM.SUFFIX``;
one left behind by a killed process is removed the next time that output is
written (:func:`remove_stale_temp_files`).

Every problem a user can cause raises :class:`~KidneyTumorSegLib.errors.InputError`
or :class:`~KidneyTumorSegLib.errors.OutputError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError

logger = logging.getLogger(__name__)

#: File name endings :func:`read_image` accepts (case-insensitive).
SUPPORTED_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: File name endings for output label maps (single-file formats Slicer and ITK read).
LABEL_OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".nrrd")
#: What :func:`write_image_atomic` accepts: the label formats plus MetaImage.
WRITABLE_SUFFIXES = LABEL_OUTPUT_SUFFIXES + (".mha",)
# Formats whose writer compresses (NIfTI .nii is uncompressed by definition).
_COMPRESSED_SUFFIXES = (".nii.gz", ".nrrd", ".mha")

_DICOM_TAG_SERIES_DESCRIPTION = "0008|103e"
_DICOM_TAG_POSITION = "0020|0032"
_DICOM_TAG_ORIENTATION = "0020|0037"


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder.

    ``uid`` is the SeriesInstanceUID (may be ``""`` when the files lack it),
    ``n_files`` the number of files (slices), ``description`` the
    SeriesDescription of its first file (``""`` if absent), ``files`` the file
    paths sorted by slice position.
    """

    uid: str
    n_files: int
    description: str
    files: tuple[str, ...]


# --------------------------------------------------------------------------- names


def image_suffix(path: str | os.PathLike) -> str:
    """Return the lower-case image suffix of ``path``: ``".nii.gz"`` for a
    gzipped NIfTI, otherwise the last suffix (``".nrrd"``, ``".png"``, or
    ``""`` when the name has none)."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def case_name(path: str | os.PathLike) -> str:
    """Name of the case a path holds: the file name without its image suffix
    (``case_00001.nii.gz`` -> ``case_00001``), or the folder name for a DICOM
    folder."""
    p = Path(path)
    if p.is_dir():
        return p.resolve().name
    suffix = image_suffix(p)
    if suffix and suffix in SUPPORTED_IMAGE_SUFFIXES:
        return p.name[: -len(suffix)]
    return p.stem


# --------------------------------------------------------------------------- ITK helpers


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence ITK's own stderr warnings (e.g. GDCM's "No Series were found"
    for every non-DICOM folder); the caller reports what matters through
    logging instead."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def native_stderr_to_log(what: str) -> Iterator[None]:
    """Send what C/C++ libraries print on file descriptor 2 meanwhile (MetaIO's
    "M_ReadElementsData: data not read completely", NIfTI's "NWAD: wrote only ...")
    to this module's debug log instead of the terminal: the caller turns the
    failure into one ``error:`` line, and such noise must not precede it."""
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
            yield
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode("utf-8", "replace").strip()
                if text:
                    logger.debug("%s: native libraries said: %s", what, " | ".join(text.splitlines()))


_ITK_PREFIX = re.compile(r"^(?:sitk|itk|ITK)(?:::|\s+)ERROR:\s*(?:\w+\s*\(0x[0-9a-fA-F]+\):\s*)?")
_NRRD_PREFIX = re.compile(r"^\[nrrd\]\s*\w+:\s*")


def _condense_itk_error(exc: BaseException, limit: int = 300) -> str:
    """Turn ITK's multi-line exception text (source file, line, object
    address, nested library messages) into one short line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    main = ""
    detail = ""
    for ln in lines:
        if _ITK_PREFIX.match(ln) and not main:
            main = _ITK_PREFIX.sub("", ln)
        elif ln.startswith("[nrrd]"):
            detail = _NRRD_PREFIX.sub("", ln).rstrip(":")  # the innermost reason comes last
    if not main:
        main = lines[-1] if lines else type(exc).__name__
    text = f"{main} ({detail})" if detail and detail not in main else main
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- NIfTI completeness


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 needs (voxel offset + voxel data) per
    its header, or None when the header is not one we can interpret."""
    if len(header) < 348:
        return None
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            header_end = 352
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            header_end = 544
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8:
        return None
    n_voxels = 1
    for d in dims[1 : ndim + 1]:
        if d <= 0:
            return None
        n_voxels *= d
    return max(vox_offset, header_end) + n_voxels * (bitpix // 8)


def _gzip_uncompressed_size(path: Path) -> int:
    """Decompress ``path`` as a stream (constant memory) and return its size;
    raises EOFError / OSError when the stream is truncated or corrupt."""
    total = 0
    with gzip.open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 24)
            if not block:
                return total
            total += len(block)


def _check_nifti_complete(path: Path, suffix: str) -> None:
    """Refuse a truncated NIfTI file: ITK reads one silently and fills the
    missing voxels with zeros (a classic result of an interrupted download)."""
    try:
        if suffix == ".nii.gz":
            with gzip.open(path, "rb") as fh:
                header = fh.read(544)
        else:
            with open(path, "rb") as fh:
                header = fh.read(544)
    except (OSError, EOFError):
        return  # not gzip / unreadable: ITK reports it in its own words
    expected = _nifti_expected_bytes(header)
    if expected is None:
        return
    if suffix == ".nii":
        actual = path.stat().st_size
        if actual < expected:
            raise InputError(
                f"Cannot read {path}: the file is truncated ({actual} bytes, its header needs {expected})"
            )
        return
    # The gzip trailer stores the uncompressed size mod 2**32: a cheap check
    # that a truncated file fails (its last 4 bytes are compressed data); a
    # file failing it (also a valid multi-member or padded one) gets a full,
    # streaming decompression to decide.
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    if isize == expected % (1 << 32):
        return
    try:
        actual = _gzip_uncompressed_size(path)
    except (EOFError, OSError, gzip.BadGzipFile) as exc:
        raise InputError(f"Cannot read {path}: the compressed file is truncated or corrupt ({exc})") from exc
    if actual < expected:
        raise InputError(
            f"Cannot read {path}: the file is truncated ({actual} bytes uncompressed, its header needs {expected})"
        )


# --------------------------------------------------------------------------- DICOM


def _folder_may_hold_dicom(folder: Path) -> bool:
    """Cheap pre-filter: a folder whose visible files all carry a known image
    suffix cannot hold a DICOM series, so GDCM need not scan it."""
    try:
        for entry in folder.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_file() and image_suffix(entry) not in SUPPORTED_IMAGE_SUFFIXES:
                return True
    except OSError:
        return False
    return False


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """List the DICOM series directly inside ``folder`` (not recursive),
    sorted by number of files, most first (ties by UID). Returns an empty
    list when there is none; raises InputError if ``folder`` is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Expected a folder holding a DICOM series, got {folder} (not a folder)")
    if not _folder_may_hold_dicom(folder):
        return []
    with _itk_warnings_off():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        found = []
        for uid in uids:
            files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            if not files:
                continue
            found.append(DicomSeries(uid=uid, n_files=len(files), description=_series_description(files[0]), files=files))
    found.sort(key=lambda s: (-s.n_files, s.uid))
    return found


def _series_description(file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    if reader.HasMetaDataKey(_DICOM_TAG_SERIES_DESCRIPTION):
        return reader.GetMetaData(_DICOM_TAG_SERIES_DESCRIPTION).strip()
    return ""


def _describe(series: DicomSeries) -> str:
    label = series.uid or "(no SeriesInstanceUID)"
    desc = f", '{series.description}'" if series.description else ""
    return f"{label} ({series.n_files} files{desc})"


def _holds_dicom_series(folder: Path) -> bool:
    return bool(list_dicom_series(folder))


def select_dicom_series(folder: str | os.PathLike, series_uid: str | None = None, warn: bool = True) -> DicomSeries:
    """The series :func:`read_image` reads from ``folder``: ``series_uid``, or the one with most
    files (a warning names the others unless ``warn`` is False). Raises InputError when there is
    none or no such UID."""
    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        n_images = sum(1 for f in folder.iterdir() if f.is_file() and image_suffix(f) in SUPPORTED_IMAGE_SUFFIXES)
        hint = f"; it holds {n_images} image file(s): give them as inputs instead" if n_images else ""
        raise InputError(
            f"Expected an image file ({', '.join(SUPPORTED_IMAGE_SUFFIXES)}) or a folder holding a DICOM series, "
            f"got folder {folder} with no DICOM series{hint}"
        )
    if series_uid is not None:
        chosen = next((s for s in series if s.uid == series_uid), None)
        if chosen is None:
            available = "; ".join(_describe(s) for s in series)
            raise InputError(f"No DICOM series with UID {series_uid} in {folder}; available: {available}")
        return chosen
    chosen = series[0]
    if len(series) > 1 and warn:
        others = "; ".join(_describe(s) for s in series[1:])
        logger.warning(
            "%s holds %d DICOM series; reading %s, the one with most slices (others: %s); "
            "use --series UID to choose another",
            folder, len(series), _describe(chosen), others,
        )
    return chosen


def _read_dicom_folder(folder: Path, series_uid: str | None) -> sitk.Image:
    chosen = select_dicom_series(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with _itk_warnings_off(), native_stderr_to_log(str(folder)):
            image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"Cannot read the DICOM series {_describe(chosen)} in {folder}: {_condense_itk_error(exc)}") from exc
    _warn_irregular_slices(reader, chosen, folder)
    return image


def _warn_irregular_slices(reader: sitk.ImageSeriesReader, series: DicomSeries, folder: Path) -> None:
    """ITK stacks the slices at a uniform spacing; warn when the slice
    positions say otherwise (missing slices, variable spacing), because the
    volume's geometry is then only approximate."""
    n = series.n_files
    if n < 3:
        return
    try:
        positions = [
            [float(v) for v in reader.GetMetaData(i, _DICOM_TAG_POSITION).split("\\")] for i in range(n)
        ]
        orientation = [float(v) for v in reader.GetMetaData(0, _DICOM_TAG_ORIENTATION).split("\\")]
    except (RuntimeError, ValueError, IndexError):
        return
    if len(orientation) != 6 or any(len(p) != 3 for p in positions):
        return
    r, c = orientation[:3], orientation[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    along = [sum(p[k] * normal[k] for k in range(3)) for p in positions]
    gaps = [abs(b - a) for a, b in zip(along, along[1:])]
    if max(gaps) - min(gaps) > 1e-3 * max(max(gaps), 1e-6) + 1e-3:
        logger.warning(
            "DICOM series %s in %s has irregular slice spacing (%.3g to %.3g mm between slices); "
            "the volume is stacked at a uniform spacing, so its geometry is only approximate",
            _describe(series), folder, min(gaps), max(gaps),
        )


# --------------------------------------------------------------------------- reading


def _checked_input_path(path: str | os.PathLike, series_uid: str | None) -> Path:
    """``path`` as a Path once it is known to be a DICOM folder or a file with a readable suffix."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"Input not found: {p}")
    if p.is_dir():
        return p
    if series_uid is not None:
        raise InputError(f"A DICOM series UID ({series_uid}) was given but the input {p} is a file, not a DICOM folder")
    if not p.is_file():
        raise InputError(f"Expected an image file or a DICOM folder, got {p} (neither a regular file nor a folder)")
    suffix = image_suffix(p)
    if suffix not in SUPPORTED_IMAGE_SUFFIXES:
        dicom_hint = " (for DICOM give the folder holding the series)" if suffix in ("", ".dcm", ".ima") else ""
        raise InputError(
            f"Unsupported input {p.name!r}: expected a file ending in {', '.join(SUPPORTED_IMAGE_SUFFIXES)} "
            f"or a DICOM series folder{dicom_hint}"
        )
    return p


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says, before (or without) reading its voxels: dimension,
    size and spacing ((x, y, z) order), row-major direction, pixel type, components per
    voxel and bytes per component. ``ImageInfo.of(image)`` describes a loaded image."""

    dimension: int
    size: tuple
    spacing: tuple
    direction: tuple
    pixel_id: int
    pixel_type: str
    components: int
    component_bytes: int

    @classmethod
    def of(cls, image: sitk.Image) -> "ImageInfo":
        return cls(image.GetDimension(), tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetDirection()),
                   image.GetPixelID(), image.GetPixelIDTypeAsString(), image.GetNumberOfComponentsPerPixel(),
                   image.GetSizeOfPixelComponent())

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.size:
            n *= int(s)
        return n


def _reader_info(reader: sitk.ImageFileReader, size=None, spacing=None) -> ImageInfo:
    try:
        probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    except (RuntimeError, TypeError, ValueError):
        probe = None
    pixel_type = probe.GetPixelIDTypeAsString() if probe is not None else str(reader.GetPixelID())
    component_bytes = probe.GetSizeOfPixelComponent() if probe is not None else 8
    return ImageInfo(reader.GetDimension(), tuple(size or reader.GetSize()), tuple(spacing or reader.GetSpacing()),
                     tuple(reader.GetDirection()), reader.GetPixelID(), pixel_type, reader.GetNumberOfComponents(),
                     component_bytes)


def read_image_information(path: str | os.PathLike, series_uid: str | None = None) -> ImageInfo:
    """The header of what :func:`read_image` would read, without reading the voxels (cheap
    even for a 5000^3 header), so that size, spacing and memory can be checked first.
    For a DICOM folder: the chosen series' first file, with the number of files as the
    third size and the distance between the first two slice positions as its spacing.
    Raises InputError like :func:`read_image` for anything it cannot read."""
    p = _checked_input_path(path, series_uid)
    reader = sitk.ImageFileReader()
    if p.is_dir():
        chosen = select_dicom_series(p, series_uid, warn=False)
        reader.SetFileName(chosen.files[0])
        what = f"the DICOM series {_describe(chosen)} in {p}"
    else:
        reader.SetFileName(str(p))
        what = str(p)
    try:
        with _itk_warnings_off(), native_stderr_to_log(what):
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"Cannot read {what}: {_condense_itk_error(exc)}") from exc
    if not p.is_dir():
        return _reader_info(reader)
    size = list(reader.GetSize())[:2] + [len(chosen.files)]
    spacing = list(reader.GetSpacing())[:2] + [reader.GetSpacing()[2] if reader.GetDimension() > 2 else 1.0]
    if len(chosen.files) > 1:
        second = sitk.ImageFileReader()
        second.SetFileName(chosen.files[1])
        with contextlib.suppress(RuntimeError, ValueError), _itk_warnings_off(), native_stderr_to_log(what):
            second.ReadImageInformation()
            a = [float(v) for v in reader.GetMetaData(_DICOM_TAG_POSITION).split("\\")]
            b = [float(v) for v in second.GetMetaData(_DICOM_TAG_POSITION).split("\\")]
            gap = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
            if gap > 0:
                spacing[2] = gap
    info = _reader_info(reader, size=size[:3], spacing=spacing[:3])
    if reader.GetDimension() == 2:  # a slice read as 2D: the series is a 3D volume all the same
        d = reader.GetDirection()
        info = ImageInfo(3, info.size, info.spacing, (d[0], d[1], 0.0, d[2], d[3], 0.0, 0.0, 0.0, 1.0), info.pixel_id,
                         info.pixel_type, info.components, info.component_bytes)
    return info


def read_image(path: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read a volume from an image file or a DICOM series folder.

    ``path``: a file ending in one of :data:`SUPPORTED_IMAGE_SUFFIXES`, or a
    folder holding a DICOM series (several series: the one with most files is
    read and a warning names the others; ``series_uid`` picks one).
    Returns the image with size/spacing/origin/direction exactly as stored
    and the stored pixel type; DICOM values have rescale slope/intercept
    applied (CT in HU). Raises InputError with a one-line message for a
    missing path, an unsupported suffix, an unreadable/corrupt/truncated file
    or an unknown ``series_uid``. The input is never modified.
    """
    p = _checked_input_path(path, series_uid)
    if p.is_dir():
        return _read_dicom_folder(p, series_uid)
    suffix = image_suffix(p)
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_complete(p, suffix)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with native_stderr_to_log(str(p)):
            return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"Cannot read {p}: {_condense_itk_error(exc)}") from exc


@dataclass(frozen=True)
class InputCase:
    """One case :func:`discover_cases` found: ``path`` (an image file, or a folder holding a DICOM
    series) and ``name``, unique among the cases found together (output files are named after it)."""

    path: Path
    name: str

    @property
    def is_dicom(self) -> bool:
        return self.path.is_dir()


def _search_folder(root: Path) -> list[tuple[Path, str]]:
    """``(path, name)`` of the cases below ``root``: its image files, and every folder at any depth
    that holds a DICOM series (not searched further: a series folder is one case). Names are the
    path below ``root`` with ``_`` for the separators (``patient1/ct`` -> ``patient1_ct``)."""
    found: list[tuple[Path, str]] = []
    skipped: list[Path] = []  # image files in sub-folders: said, since a user may expect them
    visited = {root.resolve()}  # symlinked folders are followed once (no loops)

    def visit(folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:
            logger.warning("Cannot search %s: %s", folder, exc)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files include our own temporary outputs
            if entry.is_file():
                if image_suffix(entry) in SUPPORTED_IMAGE_SUFFIXES:
                    if folder == root:
                        found.append((entry, case_name(entry)))
                    else:
                        skipped.append(entry)
            elif entry.is_dir() and entry.resolve() not in visited:
                visited.add(entry.resolve())
                if _holds_dicom_series(entry):
                    found.append((entry, "_".join(entry.relative_to(root).parts)))
                else:
                    visit(entry)

    visit(root)
    if skipped:
        logger.warning("%d image file(s) in sub-folders of %s are not cases (only DICOM series are searched "
                       "below the folder given), e.g. %s: give those files or folders as inputs",
                       len(skipped), root, skipped[0])
    return found


def discover_cases(paths: Sequence[str | os.PathLike]) -> list[InputCase]:
    """The cases in the inputs ``paths``: the one rule of the command line and Slicer's batch mode.

    A file is a case as given (even a missing or unsupported one, so that it fails as its own
    case). A folder that itself holds a DICOM series is one case. Any other folder contributes
    the image files directly inside it and every folder below it, at any depth, that holds a
    DICOM series (a PACS export nests patient/study/series folders; hidden entries skipped).
    Image files in sub-folders are not cases: a case folder often keeps label maps next to its
    CT (``case_00000/imaging.nii.gz``, ``segmentation.nii.gz``), which must not be segmented.
    Cases come sorted by path within a folder, in the order of ``paths``, without duplicates;
    a name already taken gets its parent folder's name in front, then ``_2``, ``_3``, ...
    Raises InputError when nothing is found.
    """
    cases: list[InputCase] = []
    seen: set[Path] = set()
    names: set[str] = set()

    def add(p: Path, name: str) -> None:
        key = p.resolve()
        if key in seen:
            return
        seen.add(key)
        if name in names:  # e.g. case_00000/imaging.nii.gz and case_00001/imaging.nii.gz
            name = f"{key.parent.name}_{name}"
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}_{n}"
        names.add(unique)
        cases.append(InputCase(p, unique))

    for raw in paths:
        p = Path(raw)
        if not p.is_dir():
            add(p, case_name(p))
            continue
        if _holds_dicom_series(p):
            ignored = [f.name for f in p.iterdir() if f.is_file() and image_suffix(f) in SUPPORTED_IMAGE_SUFFIXES]
            if ignored:
                logger.warning("%s holds a DICOM series, read as one case; its image files %s are ignored", p, ignored)
            add(p, case_name(p))
            continue
        found = _search_folder(p)
        if not found:
            logger.warning("No image files or DICOM series found in %s", p)
        for path, name in found:
            add(path, name)
    if not cases:
        given = ", ".join(str(p) for p in paths) or "(nothing)"
        raise InputError(
            f"No input images found in {given}: expected files ending in {', '.join(SUPPORTED_IMAGE_SUFFIXES)} "
            "or folders holding DICOM series"
        )
    return cases


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_TEMP_MARK = ".tmp-"


def _output_suffix(path: Path) -> str:
    return image_suffix(path) or ""


def _temp_prefix(path: Path) -> str:
    suffix = _output_suffix(path)
    stem = path.name[: -len(suffix)] if suffix else path.name
    return f".{stem}{_TEMP_MARK}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files a killed run left next to output ``path``: names
    ``.NAME.tmp-PID-...SUFFIX`` whose process is gone (or that carry no PID: older
    versions' ``.NAME.tmp-XXXX.SUFFIX`` and ``.NAME.SUFFIX.tmp``). A live process's
    temporary file is kept. Returns what was removed; never raises."""
    p = Path(path)
    suffix = _output_suffix(p)
    prefix = _temp_prefix(p)
    legacy = f".{p.name}.tmp"
    removed = []
    try:
        entries = list(p.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name != legacy and not (name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix) + len(suffix)):
            continue
        pid_text = name[len(prefix):].split("-", 1)[0]
        if name != legacy and pid_text.isdigit() and "-" in name[len(prefix):] and _pid_alive(int(pid_text)):
            continue
        try:
            if entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry)
                logger.info("removed %s, a temporary file left by an interrupted run", entry)
        except OSError:
            pass
    return removed


def check_output_writable(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse, before any work is done, an output that could not be written: an existing
    file without ``overwrite``, an existing folder, a parent that is a file, or a folder
    (the nearest existing one) in which no file can be created (read-only, no permission,
    full). Creates nothing that stays."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"cannot write {p}: it is an existing folder, expected a file name")
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OutputError(f"{p} already exists; pass --overwrite to replace it")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {p}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{_temp_prefix(p)}{os.getpid()}-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: the folder {parent} is not writable ({exc.strerror or exc})") from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], verify: Optional[Callable[[Path], None]] = None,
                 overwrite: bool = False) -> Path:
    """Write ``path`` atomically: the one home of that rule (label maps, JSON, manifests, the
    overview PNG, DICOM SEG and SR files).

    ``write(tmp)`` writes a temporary file in the same folder (same suffix, so a writer
    that picks the format from the name works); ``verify(tmp)`` must raise when what is
    there is not what was meant (a writer that ignored ENOSPC); the file is then fsynced
    (a delayed write error surfaces here), given ordinary permissions and renamed over
    ``path``. On any failure, an interrupt included, the temporary file is removed and an
    existing ``path`` is left untouched. Raises OutputError (one line) for an existing
    ``path`` without ``overwrite``, a folder that cannot be created or written, and any
    write, verify or fsync failure.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"Cannot write {p}: it is an existing folder, expected a file name")
    if p.exists() and not overwrite:
        raise OutputError(f"Output {p} already exists; pass --overwrite to replace it")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"Cannot create the output folder {parent}: {exc.strerror or exc}") from exc
    remove_stale_temp_files(p)
    tmp = None
    try:
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f"{_temp_prefix(p)}{os.getpid()}-", suffix=_output_suffix(p), dir=parent)
        except OSError as exc:
            raise OutputError(f"Cannot write in the output folder {parent}: {exc.strerror or exc}") from exc
        tmp = Path(tmp_name)
        os.close(fd)
        write(tmp)
        if verify is not None:
            verify(tmp)
        # mkstemp creates the file 0600; give the output ordinary permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        tmp = None
        with contextlib.suppress(OSError):  # make the rename itself durable (best effort)
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(exc, OutputError):
            raise
        if isinstance(exc, RuntimeError):
            raise OutputError(f"Cannot write {p}: {_condense_itk_error(exc)}") from exc
        if isinstance(exc, OSError):
            raise OutputError(f"Cannot write {p}: {exc.strerror or exc}") from exc
        raise
    return p


def _verify_image_file(tmp: Path, image: sitk.Image, final: Path) -> None:
    """Read the written file back and compare it with ``image`` (geometry and every voxel);
    a NIfTI file must also hold every byte its header promises."""
    problem = None
    suffix = image_suffix(tmp)
    try:
        if tmp.stat().st_size == 0:
            problem = "the file is empty"
        elif suffix in (".nii", ".nii.gz"):
            _check_nifti_complete(tmp, suffix)
        if problem is None:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(tmp))
            with _itk_warnings_off(), native_stderr_to_log(f"verifying {final}"):
                back = reader.Execute()
            if back.GetSize() != image.GetSize() or back.GetNumberOfComponentsPerPixel() != image.GetNumberOfComponentsPerPixel():
                problem = f"it reads back as size {back.GetSize()} instead of {image.GetSize()}"
            elif not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
                problem = "its voxels read back differently"
    except InputError as exc:
        problem = str(exc).split(": ", 1)[-1]
    except (RuntimeError, OSError, EOFError) as exc:
        problem = f"it cannot be read back ({_condense_itk_error(exc)})"
    if problem is not None:
        raise OutputError(f"Cannot write {final}: what was written is incomplete or wrong ({problem}); "
                          "is the disk full? Any existing file is unchanged")


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` atomically (:func:`atomic_write`) and return the path.

    The suffix must be one of :data:`WRITABLE_SUFFIXES` (``.nii``,
    ``.nii.gz``, ``.nrrd``, ``.mha``); ``.nii.gz``, ``.nrrd`` and ``.mha`` are
    compressed. The parent folder is created if missing. The written file is
    read back and compared with ``image`` before it replaces ``path``, so a
    full disk fails with OutputError and an existing ``path`` is left
    untouched. Raises OutputError if the suffix is not writable, ``path``
    exists and ``overwrite`` is False, or the folder cannot be written.
    """
    p = Path(path)
    suffix = image_suffix(p)
    if suffix not in WRITABLE_SUFFIXES:
        raise OutputError(
            f"Cannot write {p}: expected a file name ending in {', '.join(WRITABLE_SUFFIXES)}, got {suffix or 'no suffix'!r}"
        )

    def write(tmp: Path) -> None:
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetUseCompression(suffix in _COMPRESSED_SUFFIXES)
        with native_stderr_to_log(f"writing {p}"):
            writer.Execute(image)

    return atomic_write(p, write, lambda tmp: _verify_image_file(tmp, image, p), overwrite=overwrite)


def write_json_atomic(data, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically (:func:`atomic_write`), verified by
    reading the bytes back."""
    text = (json.dumps(data, indent=2) + "\n").encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(text)

    def verify(tmp: Path) -> None:
        if tmp.read_bytes() != text:
            raise OutputError(f"Cannot write {path}: what was written is incomplete ({tmp.stat().st_size} of "
                              f"{len(text)} bytes); is the disk full? Any existing file is unchanged")

    return atomic_write(path, write, verify, overwrite=overwrite)
