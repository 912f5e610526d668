"""Checks that an input volume is a CT the library can segment, and that it
fits in memory.

The checks never copy the whole volume: they read it through
``sitk.GetArrayViewFromImage`` in slabs of at most :data:`CHUNK_VOXELS`
voxels, and compute percentiles on a strided subsample of about
:data:`SAMPLE_VOXELS` voxels.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError, InsufficientMemoryError, NotCTLikeError

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

#: Fixed memory cost of a run (torch runtime, model weights, crops, network activations).
FIXED_MEMORY_BYTES = 600 * 10**6
#: Bytes per input voxel besides the input itself: uint8 label map (1) + working masks/buffers (2).
EXTRA_BYTES_PER_VOXEL = 1 + 2

_SCALAR_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
    sitk.sitkUInt64, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64,
}


def _size_text(image: sitk.Image) -> str:
    return "x".join(str(s) for s in image.GetSize())


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


def validate_ct_image(image: sitk.Image, force: bool = False) -> None:
    """Check that ``image`` is a 3D single-channel CT volume in HU.

    Raises InputError (one-line message) for: an image that is not 3D, a
    single-slice 3D image (any axis of size < 2), more than one component per
    voxel or a non-scalar pixel type, NaN or infinite voxels, a constant
    image, and intensities that are not CT-like (see the ``CT_*`` rule
    constants). With ``force=True`` the CT-likeness failure is logged as a
    warning instead; the other checks still raise. Returns None.
    """
    dim = image.GetDimension()
    size = image.GetSize()
    if dim != 3:
        raise InputError(f"Expected a 3D CT volume, got a {dim}D image of size {_size_text(image)}")
    n_comp = image.GetNumberOfComponentsPerPixel()
    if n_comp > 1:
        raise InputError(
            f"Expected one intensity per voxel (a CT), got {n_comp} components per voxel "
            f"({image.GetPixelIDTypeAsString()}; a vector, RGB or multi-channel image)"
        )
    if image.GetPixelID() not in _SCALAR_TYPES:
        raise InputError(f"Expected a scalar integer or float CT image, got pixel type {image.GetPixelIDTypeAsString()}")
    if min(size) < 2:
        raise InputError(
            f"Expected a 3D CT volume with at least 2 voxels along each axis, got size {_size_text(image)} "
            "(a single 2D slice)"
        )

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


def estimate_memory_bytes(image: sitk.Image) -> int:
    """Peak memory (bytes) a segmentation of ``image`` needs, input included.

    Model: ``voxels * (input bytes per voxel + 1 + 2) + 600 MB`` -- the input
    itself, the uint8 label map on the input grid, 2 bytes/voxel of working
    masks and buffers on the input grid, and a fixed cost for the torch
    runtime, the model and the (small, resampled) stage crops.
    """
    voxels = 1
    for s in image.GetSize():
        voxels *= s
    input_bytes = image.GetSizeOfPixelComponent() * image.GetNumberOfComponentsPerPixel()
    return voxels * (input_bytes + EXTRA_BYTES_PER_VOXEL) + FIXED_MEMORY_BYTES


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


def _cgroup_available_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Memory left under this process's cgroup limit (containers, batch
    schedulers), or None when there is no limit. Reclaimable page cache
    (inactive files) is counted as available, as the kernel would."""
    v2 = root / "memory.max"
    if v2.exists():
        limit = _read_int(v2)  # "max" (no limit) reads as None
        used = _read_int(root / "memory.current")
        if limit is None or used is None:
            return None
        used -= _read_stat(root / "memory.stat", "inactive_file")
        return max(0, limit - max(0, used))
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    used = _read_int(v1 / "memory.usage_in_bytes")
    if limit is None or used is None or limit >= 1 << 60:  # v1 says "no limit" with a huge number
        return None
    used -= _read_stat(v1 / "memory.stat", "total_inactive_file")
    return max(0, limit - max(0, used))


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


def check_memory(image: sitk.Image, available: int | None = None) -> None:
    """Raise InsufficientMemoryError when segmenting ``image`` would need more
    memory than is available.

    ``image`` is already loaded, so what must still fit is
    :func:`estimate_memory_bytes` minus the input's own size. ``available``
    in bytes; None -> :func:`available_memory_bytes` (no check where that is
    unknown).
    """
    if available is None:
        available = available_memory_bytes()
        if available is None:
            logger.debug("Available memory unknown on this system; memory check skipped")
            return
    total = estimate_memory_bytes(image)
    input_bytes = total - FIXED_MEMORY_BYTES - math.prod(image.GetSize()) * EXTRA_BYTES_PER_VOXEL
    needed = total - input_bytes
    if needed > available:
        raise InsufficientMemoryError(
            f"Not enough memory for the {_size_text(image)} {image.GetPixelIDTypeAsString()} volume: "
            f"segmenting it needs about {needed / 1e9:.1f} GB more than the {input_bytes / 1e9:.1f} GB "
            f"the loaded image takes, {available / 1e9:.1f} GB available"
        )
