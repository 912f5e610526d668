"""Checks that an input volume is a CT the library can segment, and that it
fits in memory: the one home of the CT check (every entry point, the command line,
``KidneyTumorSegLib.segment`` and ``Segmenter.segment``, passes through it).

Two levels: :func:`validate_ct_header` needs only the header (dimension, components,
pixel type, size, spacing: what ``imageio.read_image_information`` returns before
any voxel is read) and :func:`validate_ct_image` adds the intensity checks of a
loaded image. :func:`check_memory` works on either, from the header and the model's
stage grids, so a volume too large is refused before it is read.

The checks never copy the whole volume: they read it through
``sitk.GetArrayViewFromImage`` in slabs of at most :data:`CHUNK_VOXELS`
voxels, and compute percentiles on a strided subsample of about
:data:`SAMPLE_VOXELS` voxels.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, InsufficientMemoryError, NotCTLikeError
from .imageio import ImageInfo

logger = logging.getLogger(__name__)

#: Voxels per slab when scanning the whole volume (bounds temporary memory).
CHUNK_VOXELS = 1 << 22
#: Target size of the strided subsample used for percentiles.
SAMPLE_VOXELS = 1 << 18

# CT-likeness rule, from HU physics. A CT of the abdomen contains air outside
# the body or in lungs/bowel (about -1000 HU) and fat (about -100 HU), so its
# 0.5th percentile is far below -300; soft tissue is 0..100 HU and bone up to
# ~2000-3000, so the 99.5th percentile lies in [-100, 4000]; and no scanner
# produces values outside [-4000, 40000] (extended HU scales for metal stay
# below ~31000). MR, PET, raw stored values without the DICOM rescale (air ~0)
# and normalised images ([0, 1], z-scores) all fail the first rule.
CT_LOW_PERCENTILE_MAX = -300.0
CT_HIGH_PERCENTILE_RANGE = (-100.0, 4000.0)
CT_VALUE_RANGE = (-4000.0, 40000.0)
# Values below air's -1024 HU are not tissue: when the minimum lies there it
# is taken as a pixel-padding value (outside the reconstruction circle; e.g.
# -2000, -3024, -32768) and its voxels are left out of the rule above.
_PADDING_BELOW = -1024.0

# Geometry a CT can have. The finest clinical CT voxel is about 0.2 mm (photon-counting,
# ultra-high-resolution scanners) and the thickest reconstructed slice 10 mm; a spacing
# outside [0.1, 15] mm is a wrong header (e.g. spacing in cm, or in um), and since every
# stage works on a grid of the volume's *physical* extent, trusting it would cost memory
# and time out of all proportion to the file (128x128x36 voxels at 60 mm span 7.7 m).
# No scanner field of view or scan length exceeds 2 m along an axis (whole-body CT).
MIN_SPACING_MM = 0.1
MAX_SPACING_MM = 15.0
MAX_EXTENT_MM = 2000.0

#: Fixed memory cost of a run (torch runtime, model weights, network activations of a window).
FIXED_MEMORY_BYTES = 600 * 10**6
#: Bytes per input-grid voxel besides the input itself, in the worst case of kidney
#: everywhere (a localize stage firing on noise): the uint8 output array, the uint8 lesion
#: probability beside it and the label image (3), post-processing's connected components
#: (uint32, 4) and masks (2), and the measurements' per-kidney-voxel indices, coordinates and
#: component ids (int64/float64: 3 x 8 + 3 x 8 + 8). Measured (before the lesion probability):
#: 131 B per voxel beyond the input for a 160x160x80 volume segmented as kidney everywhere;
#: this model says 67 + the stage grids' share.
EXTRA_BYTES_PER_VOXEL = 3 + 4 + 2 + 24 + 24 + 8
#: of which the measurements' share, paid per voxel of the final kidneys only: a model whose post-processing
#: keeps only plausible kidneys (at most ``max_kidney_components`` of at most ``plausibility.max_volume_ml``
#: each) bounds it by that volume instead of the whole scan
MEASURE_BYTES_PER_KIDNEY_VOXEL = 24 + 24 + 8

_SCALAR_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


ImageOrInfo = Union[sitk.Image, ImageInfo]


def _info(image: ImageOrInfo) -> ImageInfo:
    return image if isinstance(image, ImageInfo) else ImageInfo.of(image)


def _size_text(image: ImageOrInfo) -> str:
    return "x".join(str(s) for s in _info(image).size)


def _slabs(array: np.ndarray):
    """Yield views of ``array`` (z, y, x) in slabs along axis 0 of at most
    CHUNK_VOXELS voxels (at least one plane)."""
    plane = max(1, array[0].size)
    step = max(1, CHUNK_VOXELS // plane)
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]


def _strided_sample(array: np.ndarray) -> np.ndarray:
    """A strided view of about SAMPLE_VOXELS voxels spread over the whole volume."""
    stride = max(1, math.ceil((array.size / SAMPLE_VOXELS) ** (1.0 / 3.0)))
    return array[::stride, ::stride, ::stride]


def validate_ct_header(image: ImageOrInfo) -> None:
    """Check what the header of a CT must say: 3D, at least 2 voxels along each axis,
    one scalar (integer or float) component per voxel, a spacing within
    [:data:`MIN_SPACING_MM`, :data:`MAX_SPACING_MM`] mm and a physical extent of at most
    :data:`MAX_EXTENT_MM` mm along each axis. ``image``: a ``sitk.Image`` or the
    ``ImageInfo`` of a header not yet read. Raises InputError (one line)."""
    info = _info(image)
    if info.dimension != 3:
        raise InputError(f"Expected a 3D CT volume, got a {info.dimension}D image of size {_size_text(info)}")
    if info.components > 1:
        raise InputError(
            f"Expected one intensity per voxel (a CT), got {info.components} components per voxel "
            f"({info.pixel_type}; a vector, RGB or multi-channel image)"
        )
    if info.pixel_id not in _SCALAR_TYPES:
        raise InputError(f"Expected a scalar integer or float CT image, got pixel type {info.pixel_type}")
    if min(info.size) < 2:
        raise InputError(
            f"Expected a 3D CT volume with at least 2 voxels along each axis, got size {_size_text(info)} "
            "(a single 2D slice)"
        )
    spacing = tuple(float(v) for v in info.spacing)
    spacing_text = " x ".join(f"{v:g}" for v in spacing)
    if not all(math.isfinite(v) and MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in spacing):
        raise InputError(
            f"Implausible voxel spacing {spacing_text} mm for a CT (expected {MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm "
            "per axis); the header's spacing is wrong (in cm or um?): fix it before segmenting"
        )
    direction = np.asarray(info.direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(f"Expected an orthonormal direction matrix in the header, got {tuple(info.direction)}")
    extent = [n * v for n, v in zip(info.size, spacing)]
    if max(extent) > MAX_EXTENT_MM:
        raise InputError(
            f"Implausible CT extent {' x '.join(f'{e:.0f}' for e in extent)} mm ({_size_text(info)} voxels of "
            f"{spacing_text} mm; no CT spans more than {MAX_EXTENT_MM:g} mm along an axis); check the header's spacing"
        )


def validate_ct_image(image: sitk.Image, force: bool = False) -> None:
    """Check that ``image`` is a 3D single-channel CT volume in HU.

    Raises InputError (one-line message) for: everything :func:`validate_ct_header`
    refuses (not 3D, a single slice, several components or a non-scalar pixel type,
    an implausible spacing or extent), NaN or infinite voxels, a constant
    image, and intensities that are not CT-like (see the ``CT_*`` rule
    constants). With ``force=True`` the CT-likeness failure is logged as a
    warning instead; the other checks still raise. Returns None.
    """
    validate_ct_header(image)
    array = sitk.GetArrayViewFromImage(image)
    is_float = np.issubdtype(array.dtype, np.floating)
    n_nan = n_inf = 0
    vmin = vmax = None
    for slab in _slabs(array):
        if is_float:
            finite = np.isfinite(slab)
            if not finite.all():
                nan = int(np.count_nonzero(np.isnan(slab)))
                n_nan += nan
                n_inf += int(slab.size - np.count_nonzero(finite)) - nan
                continue  # min/max are meaningless now; the error below is raised
        lo, hi = slab.min(), slab.max()
        vmin = lo if vmin is None else min(vmin, lo)
        vmax = hi if vmax is None else max(vmax, hi)
    if n_nan or n_inf:
        raise InputError(
            f"Expected finite intensities, got {n_nan} NaN and {n_inf} infinite voxel(s) "
            f"in the {_size_text(image)} volume"
        )
    if vmin == vmax:
        raise InputError(f"Expected a CT with varying intensities, got a constant image (every voxel is {float(vmin):g})")

    problem = _ct_likeness_problem(array, float(vmin), float(vmax))
    if problem is None:
        return
    if force:
        logger.warning("Input is not CT-like: %s; segmenting anyway because force was given", problem)
        return
    raise NotCTLikeError(f"Input is not CT-like: {problem}; pass --force to segment it anyway")


def _ct_likeness_problem(array: np.ndarray, vmin: float, vmax: float) -> str | None:
    """Return a description of why ``array`` is not CT-like, or None."""
    padding = vmin if vmin < _PADDING_BELOW else None
    vmax_typed = array.dtype.type(vmax)
    real_min = vmin
    if padding is not None:
        real_min = math.inf
        for slab in _slabs(array):
            # ``where=`` masks without copying the slab's values.
            real_min = min(real_min, float(np.min(slab, where=slab != padding, initial=vmax_typed)))
    sample = _strided_sample(array)
    if padding is not None:
        sample = sample[sample != padding]
    if sample.size == 0 or not math.isfinite(real_min):
        return f"only the padding value {padding:g} was found (no body)"
    p_lo, p_hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    ok = (
        p_lo <= CT_LOW_PERCENTILE_MAX
        and CT_HIGH_PERCENTILE_RANGE[0] <= p_hi <= CT_HIGH_PERCENTILE_RANGE[1]
        and CT_VALUE_RANGE[0] <= real_min
        and vmax <= CT_VALUE_RANGE[1]
    )
    if ok:
        return None
    pad_text = f", padding value {padding:g} ignored" if padding is not None else ""
    return (
        f"0.5th percentile {p_lo:g}, 99.5th percentile {p_hi:g}, values {real_min:g}..{vmax:g}{pad_text}; "
        f"a CT in HU has air/fat (0.5th percentile <= {CT_LOW_PERCENTILE_MAX:g}), "
        f"a 99.5th percentile within [{CT_HIGH_PERCENTILE_RANGE[0]:g}, {CT_HIGH_PERCENTILE_RANGE[1]:g}] "
        f"and values within [{CT_VALUE_RANGE[0]:g}, {CT_VALUE_RANGE[1]:g}]"
    )


def _stage_voxels(stage, info: ImageInfo) -> tuple[int, int]:
    """(voxels of the stage's working grid in the worst case, voxels of one window batch).

    The worst case is the stage's whole region at its spacing: the whole volume for
    ``whole`` regions, ``size_mm`` for ``fixed_box``, and for ``components`` regions the
    volume cut to ``max_size_mm`` (a localize stage that finds kidney everywhere gets at
    most that box per region, regions run one after another); never less than one patch
    along an axis (the sliding window pads to it)."""
    from . import geometry as geo

    direction = np.asarray(info.direction, dtype=float).reshape(3, 3)
    _, perm, _ = geo.canonical_axes(direction.ravel())
    native = [float(info.spacing[perm[k]]) for k in range(3)]
    extent = [info.size[perm[k]] * native[k] for k in range(3)]
    voxels = 1
    for k in range(3):
        spacing = native[k] if stage.spacing_mm[k] is None else float(stage.spacing_mm[k])
        span = extent[k]
        if stage.region.kind == "fixed_box":
            span = min(span, float(stage.region.size_mm[k]))
        elif stage.region.kind == "components" and stage.region.max_size_mm is not None:
            span = min(span, float(stage.region.max_size_mm[k]))  # regions run one at a time, each bounded
        voxels *= max(int(math.ceil(span / spacing - 1e-6)), int(stage.patch_size[k]), 1)
    return voxels, stage.batch_size * math.prod(stage.patch_size)


def estimate_memory_bytes(image: ImageOrInfo, manifest=None) -> int:
    """Peak memory (bytes) a segmentation of ``image`` needs, input included, from its
    header alone (``sitk.Image`` or ``ImageInfo``) and the model's stages.

    Model, in the worst case (the localize stage finds kidney everywhere):
    ``voxels * (input bytes per voxel + EXTRA_BYTES_PER_VOXEL) + FIXED_MEMORY_BYTES``
    on the input grid, plus, per stage, its working grid (:func:`_stage_voxels`: the
    physical extent at the stage's spacing) times ``24 + 8 C + 12 K`` bytes (resampled
    HU and C input channels, twice; K class accumulators, probabilities and their
    image; the argmax), the resample-back slabs of ``segment``/``overlay`` stages, and a
    localize stage's kept probabilities (``4 K + 1`` bytes per voxel) for the rest of the
    run. Stages run one after another, so the largest stage counts once. Without a
    manifest only the input-grid part and the fixed cost are counted.
    """
    info = _info(image)
    voxels = info.voxels
    input_bytes = info.component_bytes * info.components
    total = voxels * (input_bytes + EXTRA_BYTES_PER_VOXEL) + FIXED_MEMORY_BYTES
    if manifest is None:
        return total
    kidney_voxels = _kidney_voxel_bound(info, manifest)
    total -= (voxels - kidney_voxels) * MEASURE_BYTES_PER_KIDNEY_VOXEL
    from .pipeline import _BACK_RESAMPLE_VOXELS

    kept, largest = 0, 0
    for stage in manifest.stages:
        c, k = manifest.network_in_channels(stage), stage.num_outputs
        grid_voxels, window_voxels = _stage_voxels(stage, info)
        working = grid_voxels * (24 + 8 * c + 12 * k) + window_voxels * 4 * (2 * c + 2 * k)
        if stage.role == "localize":
            kept += grid_voxels * (4 * k + 1)
        else:
            working += min(_BACK_RESAMPLE_VOXELS, voxels) * (8 * k + 9 + 13)  # + the lesion probability's slab
        largest = max(largest, working)
    return total + kept + largest


def _kidney_voxel_bound(info: ImageInfo, manifest) -> int:
    """Most input-grid voxels the final kidneys can hold: all of them, unless post-processing keeps only
    plausible kidney components (each at most ``plausibility.max_volume_ml``)."""
    post = manifest.postprocessing
    if not post.plausibility.enabled:
        return info.voxels
    voxel_ml = float(np.prod(info.spacing)) / 1000.0
    most = max(1, int(post.max_kidney_components)) * float(post.plausibility.max_volume_ml) / max(voxel_ml, 1e-12)
    return int(min(info.voxels, math.ceil(most)))


def estimate_region_memory_bytes(grid_size, in_channels: int, num_classes: int) -> int:
    """Memory (bytes) one stage region of ``grid_size`` (x, y, z) voxels needs beyond the fixed cost:
    float32 input channels, the sliding window's probability sum and weight map, and the probability
    image resampled back (``FIXED_MEMORY_BYTES`` covers the runtime, the weights and one window batch)."""
    return 4 * math.prod(int(s) for s in grid_size) * (in_channels + 2 * num_classes + 1)


def check_region_memory(stage_name: str, grid_sizes, in_channels: int, num_classes: int, available: int | None = None) -> None:
    """Raise InsufficientMemoryError when the largest region of a stage (regions run one at a time)
    needs more memory than is available now; no check where that is unknown."""
    if not grid_sizes:
        return
    needed = max(estimate_region_memory_bytes(g, in_channels, num_classes) for g in grid_sizes)
    if available is None:
        available = available_memory_bytes()
        if available is None:
            return
    if needed > available:
        largest = max(grid_sizes, key=lambda g: math.prod(g))
        raise InsufficientMemoryError(
            f"Not enough memory for stage {stage_name!r}: its largest region ({'x'.join(str(int(s)) for s in largest)} voxels) "
            f"needs about {needed / 1e9:.1f} GB, {available / 1e9:.1f} GB available"
        )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _own_cgroup_paths(proc_self_cgroup: Path) -> tuple[Optional[str], Optional[str]]:
    """This process's cgroup paths from ``/proc/self/cgroup``: (v2 path, v1 memory path)."""
    v2 = v1 = None
    try:
        lines = proc_self_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _cgroup_chain(base: Path, own: Optional[str]) -> list[Path]:
    """``base/own`` and every folder above it up to ``base`` (limits nest: the smallest wins)."""
    chain = []
    if own:
        d = base / own.strip("/")
        while True:
            chain.append(d)
            if d == base or base not in d.parents:
                break
            d = d.parent
    if base not in chain:
        chain.append(base)
    return [d for d in chain if d.is_dir()]


def _cgroup_available_bytes(root: Path = Path("/sys/fs/cgroup"),
                            proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Memory left under this process's cgroup limits (containers, batch schedulers),
    or None when there is no limit. The cgroup is this process's own (from
    ``/proc/self/cgroup``), and every limit above it counts too. Reclaimable page cache
    (inactive files) is counted as available, as the kernel would."""
    v2_own, v1_own = _own_cgroup_paths(proc_self_cgroup)
    headrooms = []
    if (root / "cgroup.controllers").exists() or (root / "memory.max").exists() or v2_own is not None and not (root / "memory").is_dir():
        for d in _cgroup_chain(root, v2_own):
            limit = _read_int(d / "memory.max")  # "max" (no limit) reads as None
            used = _read_int(d / "memory.current")
            if limit is None or used is None:
                continue
            used -= _read_stat(d / "memory.stat", "inactive_file")
            headrooms.append(max(0, limit - max(0, used)))
    else:
        for d in _cgroup_chain(root / "memory", v1_own):
            limit = _read_int(d / "memory.limit_in_bytes")
            used = _read_int(d / "memory.usage_in_bytes")
            if limit is None or used is None or limit >= 1 << 60:  # v1 says "no limit" with a huge number
                continue
            used -= _read_stat(d / "memory.stat", "total_inactive_file")
            headrooms.append(max(0, limit - max(0, used)))
    return min(headrooms) if headrooms else None


def available_memory_bytes() -> int | None:
    """Memory (bytes) available to this process now: MemAvailable from
    /proc/meminfo, lowered to the cgroup limit's headroom where one applies.
    None where neither is known (e.g. not Linux)."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        available = None
    cgroup = _cgroup_available_bytes()
    if cgroup is not None:
        available = cgroup if available is None else min(available, cgroup)
    return available


def check_memory(image: ImageOrInfo, available: int | None = None, manifest=None) -> None:
    """Raise InsufficientMemoryError when segmenting ``image`` would need more
    memory than is available.

    ``image``: a loaded ``sitk.Image`` (what must still fit is
    :func:`estimate_memory_bytes` minus the input's own size) or the ``ImageInfo`` of a
    header not yet read (the input counts too: call this before reading). ``manifest``:
    the model whose stage grids count (see :func:`estimate_memory_bytes`). ``available``
    in bytes; None -> :func:`available_memory_bytes` (no check where that is unknown).
    """
    if available is None:
        available = available_memory_bytes()
        if available is None:
            logger.debug("Available memory unknown on this system; memory check skipped")
            return
    info = _info(image)
    total = estimate_memory_bytes(info, manifest)
    loaded = isinstance(image, sitk.Image)
    input_bytes = info.voxels * info.component_bytes * info.components
    needed = total - input_bytes if loaded else total
    if needed > available:
        what = (f"more than the {input_bytes / 1e9:.1f} GB the loaded image takes" if loaded
                else f"({input_bytes / 1e9:.1f} GB of it the image itself)")
        raise InsufficientMemoryError(
            f"Not enough memory for the {_size_text(info)} {info.pixel_type} volume: "
            f"segmenting it needs about {needed / 1e9:.1f} GB {what}, {available / 1e9:.1f} GB available"
        )


#: What allocation failures say: torch's CPU allocator, ITK, the C++ runtime, CUDA.
_ALLOCATION_FAILURES = ("can't allocate memory", "defaultcpuallocator", "failed to allocate memory", "bad_alloc",
                        "out of memory", "cannot allocate memory", "memory allocation failed")


def is_allocation_failure(exc: BaseException) -> bool:
    """True for an exception that says memory could not be allocated."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(t in text for t in _ALLOCATION_FAILURES)


@contextlib.contextmanager
def allocation_failures_as_errors(what: str) -> Iterator[None]:
    """Turn an allocation failure inside (torch, ITK, numpy) into InsufficientMemoryError
    naming ``what`` needed the memory; any other exception passes unchanged."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_allocation_failure(exc):
            raise
        detail = " ".join(str(exc).split())
        amount = ""
        import re

        m = re.search(r"allocate (\d+) bytes", detail)
        if m:
            amount = f" (an allocation of {int(m.group(1)) / 1e9:.1f} GB failed)"
        raise InsufficientMemoryError(f"Not enough memory for {what}{amount}; try a smaller volume, "
                                      "a smaller model or a machine with more memory") from None
