"""Data augmentation as batched torch operations (they run on the training device, GPU included).

Takes ``x [B, C, *S]`` (normalised image channels first, then any other channels) and
``y [B, *S]`` (class indices), ``S`` = (z, y, x) for 3D or (y, x) for a 2.5D stage. Every random
number comes from the ``torch.Generator`` passed in (per-sample parameters are drawn on the CPU
in a fixed order; noise fields use a device generator seeded from it), so a batch's augmentation
is reproducible from its seed.

Recipe keys (all optional; probabilities per sample):

* spatial, in millimetres so anisotropic voxels rotate correctly: ``rotation_deg`` [about x, y, z]
  (uniform +-), ``rotation_probability``; ``scale`` [low, high] (isotropic zoom),
  ``scale_probability``; ``elastic`` {probability, magnitude_mm, sigma_mm} (a smooth random
  displacement: normal noise on control points every sigma_mm, interpolated, times magnitude_mm).
  One sampling grid per sample; the image is interpolated linearly (its padding value kept
  outside), the labels with nearest neighbour (background outside), so they stay aligned.
  A 2.5D stage rotates about z only.
* ``mirror_axes`` (0 = x / left-right, 1 = y, 2 = z; z not for 2.5D), ``mirror_probability``.
* intensity, on the image channels only, in HU where it says so (divided by the normalisation
  scale): ``intensity_gain`` [low, high], ``intensity_shift_hu`` (normal sd), ``noise_hu``
  [low, high] (sd of Gaussian noise), ``blur_sigma_voxels`` [low, high] with ``blur_probability``,
  ``gamma`` [low, high] with ``gamma_probability`` (on the sample's min-max range, nnU-Net style).
* resolution: ``low_resolution`` {probability, factor [low, high], axes, inplane_factor} simulates a
  coarser scan (thicker slices, larger pixels): the image channels are block-averaged down by a factor
  drawn per sample (the same on every listed axis; 0 = x, 1 = y, 2 = z, default all) and interpolated
  back to the patch grid; labels are untouched, so the network learns to keep the anatomy it
  knows on a blurred, partial-volumed image. ``inplane_factor`` [low, high] (optional) draws a second,
  independent factor for x and y (then ``axes`` should name z only): a scan with thick slices *and*
  large pixels, as a downsampled or low-dose reconstruction has.
* ``fov_cut`` {probability, max_fraction, axes}: a scan that ends inside the patch: a slab of a random
  0.1..``max_fraction`` of the patch at one end of one of ``axes`` (0 = x, 1 = y, 2 = z) becomes the padding
  value (what inference feeds beyond the image) and background in the labels, after everything else;
  ``slab_probability`` / ``slab_fraction`` [low, high]: that share of the cut samples keeps only a slab of that
  fraction of the patch (both ends cut: a short scan, such as a 9 cm kidney series, inside a 38 cm patch).
* ``synthesize`` {random_probability, phases, random_hu, texture_scale, bias_hu}: the image channel holds
  tissue ids of a synthesis cache (:mod:`Training.synth`), turned into normalised CT with a contrast drawn
  per sample (:class:`Training.synth.TissueSynthesizer`) before everything above; needs ``normalization``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

_KEYS = {"rotation_deg", "rotation_probability", "scale", "scale_probability", "elastic", "mirror_axes",
         "mirror_probability", "intensity_gain", "intensity_shift_hu", "noise_hu", "blur_sigma_voxels",
         "blur_probability", "gamma", "gamma_probability", "low_resolution", "synthesize", "fov_cut"}


def _rotation(angles, dims: int) -> torch.Tensor:
    """Rotation matrix in (x, y[, z]) order from angles (radians) about x, y, z; 2D uses the z angle."""
    ax, ay, az = (float(a) for a in angles)
    if dims == 2:
        c, s = math.cos(az), math.sin(az)
        return torch.tensor([[c, -s], [s, c]])
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x [C, *S]`` along every spatial axis (sigma in voxels)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    dims = x.dim() - 1
    out = x.unsqueeze(1)  # [C, 1, *S]
    conv = F.conv3d if dims == 3 else F.conv2d
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = kernel.numel()
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = radius
        pad[2 * (dims - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.squeeze(1)


def context_labels(tissues: torch.Tensor, y: torch.Tensor, context) -> torch.Tensor:
    """``y`` (labels ``[B, *S]``) with its background voxels whose tissue id (``tissues [B, *S]``, a synthesis
    tissue map) is one of a context class's ids set to that class: ``context`` = ``[(class index, ids tensor)]``.
    Kidney, tumor and cyst voxels keep their label whatever tissue they hold."""
    ids = tissues.round().long()
    out = y.clone()
    background = y == 0
    for index, members in context:
        out[background & torch.isin(ids, members.to(ids.device))] = index
    return out


class Augmenter:
    """Applies a recipe's augmentation to batches (see the module text).

    ``spacing_xyz``: the stage's working spacing (mm, (x, y, z)); ``spatial_dims``: 3, or 2 for a
    2.5D stage; ``pad_value``: normalised air; ``image_channels``: how many leading channels are
    image (k for 2.5D); ``norm_scale``: the normalisation's scale (HU per unit); ``normalization``: the stage's
    :class:`KidneyTumorSegLib.normalization.IntensityNormalization` (needed by ``synthesize``); ``context``:
    ``[(class index, tissue ids)]`` of the stage's context classes (``trainer.context_targets``): background voxels
    of those tissues in a synthesis tissue map get that class before anything else is done (needs ``synthesize``).
    """

    def __init__(self, spec: dict, spacing_xyz: Sequence[float], spatial_dims: int, pad_value: float,
                 image_channels: int = 1, norm_scale: float = 1.0, normalization=None, context=None):
        unknown = set(spec or {}) - _KEYS
        if unknown:
            raise ValueError(f"unknown augmentation key(s) {sorted(unknown)}; valid: {sorted(_KEYS)}")
        self.spec = dict(spec or {})
        self.dims = int(spatial_dims)
        # tensor order spacing: (z, y, x) or (y, x)
        self.spacing = [float(s) for s in reversed(list(spacing_xyz))][-self.dims:]
        self.pad_value = float(pad_value)
        self.k = int(image_channels)
        self.norm_scale = float(norm_scale)
        self.synthesizer = None
        if self.spec.get("synthesize") is not None:
            from .synth import TissueSynthesizer

            if normalization is None or self.k != 1:
                raise ValueError("the synthesize augmentation needs the stage's normalization and one image channel")
            n = normalization
            self.synthesizer = TissueSynthesizer(dict(self.spec["synthesize"]), (n.low, n.high, n.center, n.scale))
        self.context = [(int(c), torch.as_tensor(sorted(ids), dtype=torch.long)) for c, ids in (context or [])]
        if self.context and self.synthesizer is None:
            raise ValueError("context classes are labelled from a synthesis tissue map: the augmentation must "
                             "synthesize (augmentation.synthesize)")

    @property
    def enabled(self) -> bool:
        return bool(self.spec)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        """Augmented ``(x, y)`` (new tensors; inputs untouched)."""
        if not self.spec:
            return x, y
        b = x.shape[0]
        s = self.spec
        u = lambda: torch.rand(b, generator=generator)  # noqa: E731 - one uniform per sample, in a fixed order
        p_rot, p_scale, p_el, p_blur, p_gamma = u(), u(), u(), u(), u()
        angles = (torch.rand(b, 3, generator=generator) * 2 - 1) * torch.tensor(
            [math.radians(float(a)) for a in s.get("rotation_deg", [0, 0, 0])])
        lo, hi = s.get("scale", [1.0, 1.0])
        zoom = lo + (hi - lo) * u()
        mirror = torch.rand(b, 3, generator=generator) < float(s.get("mirror_probability", 0.5))
        glo, ghi = s.get("intensity_gain", [1.0, 1.0])
        gain = glo + (ghi - glo) * u()
        shift = torch.randn(b, generator=generator) * float(s.get("intensity_shift_hu", 0.0)) / self.norm_scale
        nlo, nhi = s.get("noise_hu", [0.0, 0.0])
        noise_sd = (nlo + (nhi - nlo) * u()) / self.norm_scale
        blo, bhi = s.get("blur_sigma_voxels", [0.0, 0.0])
        blur = blo + (bhi - blo) * u()
        gmin, gmax = s.get("gamma", [1.0, 1.0])
        gamma = gmin + (gmax - gmin) * u()
        field_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        # drawn after every older key's numbers, so adding this key left earlier recipes' draws unchanged
        low = s.get("low_resolution") or {}
        if low:
            p_low = u()
            flo, fhi = low.get("factor", [1.0, 2.0])
            low_factor = flo + (fhi - flo) * u()
        synth_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator)) if self.synthesizer else None
        cut = s.get("fov_cut") or {}
        if cut:  # per sample: on?, axis, side, fraction
            cut_draws = torch.rand(b, 4, generator=generator)
        inplane_factor = None
        if low and low.get("inplane_factor"):  # drawn last, so recipes without it keep their draws
            ilo, ihi = low["inplane_factor"]
            inplane_factor = ilo + (ihi - ilo) * u()
        slab_draws = torch.rand(b, 3, generator=generator) if cut and cut.get("slab_probability") else None

        rot_on = (p_rot < float(s.get("rotation_probability", 0.0))) & bool(s.get("rotation_deg"))
        scale_on = (p_scale < float(s.get("scale_probability", 0.0))) & bool(s.get("scale"))
        el = s.get("elastic") or {}
        el_on = p_el < float(el.get("probability", 0.0))
        spatial = rot_on | scale_on | el_on
        x, y = x.clone(), y.clone()
        if self.context:  # the surroundings' names come from the tissue ids, before they become intensities
            y = context_labels(x[:, 0], y, self.context)
        if self.synthesizer is not None:  # tissue ids -> CT first: interpolating ids would invent tissues
            x = self.synthesizer(x, torch.Generator().manual_seed(synth_seed))
        if bool(spatial.any()):
            idx = torch.nonzero(spatial).flatten()
            cpu_gen = torch.Generator().manual_seed(field_seed)
            grids = []
            for i in idx.tolist():
                r = _rotation(angles[i] if rot_on[i] else (0, 0, 0), self.dims)
                z = float(zoom[i]) if scale_on[i] else 1.0
                grids.append(self._grid(r, z, el if el_on[i] else None, cpu_gen, tuple(x.shape[2:])))
            grid = torch.stack(grids).to(x.device, x.dtype)
            pad = torch.zeros(x.shape[1], device=x.device, dtype=x.dtype)
            pad[: self.k] = self.pad_value
            pad = pad.view((1, -1) + (1,) * self.dims)
            xi = F.grid_sample(x[idx] - pad, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + pad
            yi = F.grid_sample(y[idx].unsqueeze(1).to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=True)
            x[idx] = xi
            y[idx] = yi.squeeze(1).round().to(y.dtype)
        for axis in s.get("mirror_axes", []):
            if self.dims == 2 and axis == 2:
                continue
            dim = -1 - int(axis)
            for i in torch.nonzero(mirror[:, int(axis)]).flatten().tolist():
                x[i] = x[i].flip(dim)
                y[i] = y[i].flip(dim)
        img = x[:, : self.k]
        if "intensity_gain" in s or "intensity_shift_hu" in s:
            view = (-1,) + (1,) * (img.dim() - 1)
            img = img * gain.to(img).view(view) + shift.to(img).view(view)
        if low:
            on = p_low < float(low.get("probability", 0.0))
            img = self._low_resolution(img, on, low_factor, low.get("axes", [0, 1, 2]))
            if inplane_factor is not None:
                img = self._low_resolution(img, on, inplane_factor, [0, 1])
        if "noise_hu" in s:
            dev_gen = torch.Generator(device=x.device).manual_seed(field_seed + 1)
            noise = torch.randn(img.shape, generator=dev_gen, device=x.device, dtype=img.dtype)
            img = img + noise * noise_sd.to(img).view((-1,) + (1,) * (img.dim() - 1))
        if "blur_sigma_voxels" in s:
            p = float(s.get("blur_probability", 0.0))
            for i in range(b):
                if float(p_blur[i]) < p and float(blur[i]) > 0:
                    img[i] = _gaussian_blur(img[i], float(blur[i]))
        if "gamma" in s:
            p = float(s.get("gamma_probability", 0.0))
            for i in range(b):
                if float(p_gamma[i]) < p:
                    lo_v, hi_v = img[i].min(), img[i].max()
                    rng = (hi_v - lo_v).clamp_min(1e-6)
                    img[i] = ((img[i] - lo_v) / rng).clamp(0, 1) ** float(gamma[i]) * rng + lo_v
        x[:, : self.k] = img
        if cut:
            self._fov_cut(x, y, cut, cut_draws, slab_draws)
        return x, y

    def _fov_cut(self, x: torch.Tensor, y: torch.Tensor, cut: dict, draws: torch.Tensor, slab_draws=None) -> None:
        """In place: the ``fov_cut`` slab of each selected sample becomes padding (image channels) and background;
        with ``slab_probability``, that share of the cut samples keeps only a slab of ``slab_fraction`` [low, high] of
        the patch at a random place (a short scan: both ends cut)."""
        axes = [int(a) for a in cut.get("axes", [2]) if self.dims - 1 - int(a) >= 0]
        if not axes:
            return
        top = float(cut.get("max_fraction", 0.5))
        slo, shi = cut.get("slab_fraction", [0.2, 0.5])
        for i in range(x.shape[0]):
            on, a, side, frac = (float(v) for v in draws[i])
            if on >= float(cut.get("probability", 0.0)):
                continue
            dim = self.dims - 1 - axes[min(int(a * len(axes)), len(axes) - 1)]  # x is the last tensor axis
            n = x.shape[2 + dim]
            if slab_draws is not None and float(slab_draws[i, 0]) < float(cut["slab_probability"]):
                keep = max(1, int(round(n * (slo + (shi - slo) * float(slab_draws[i, 1])))))
                start = int(round((n - keep) * float(slab_draws[i, 2])))
                slabs = [(0, start), (start + keep, n - start - keep)]
            else:
                width = max(1, int(round(n * (0.1 + (top - 0.1) * frac))))
                slabs = [(0, width) if side < 0.5 else (n - width, width)]
            for begin, width in slabs:
                if width > 0:
                    x[i, : self.k].narrow(1 + dim, begin, width).fill_(self.pad_value)
                    y[i].narrow(dim, begin, width).fill_(0)

    def _low_resolution(self, img: torch.Tensor, on: torch.Tensor, factor: torch.Tensor, axes) -> torch.Tensor:
        """Image channels ``[B, K, *S]`` of the samples where ``on``: area-downsampled by ``factor`` along
        ``axes`` (x=0, y=1, z=2) and linearly interpolated back to ``S``."""
        if not bool(on.any()):
            return img
        img = img.clone()
        mode = "trilinear" if self.dims == 3 else "bilinear"
        shape = tuple(img.shape[2:])
        for i in torch.nonzero(on).flatten().tolist():
            f = max(1.0, float(factor[i]))
            small = list(shape)
            for axis in axes:
                dim = self.dims - 1 - int(axis)  # x is the last tensor axis
                if 0 <= dim < self.dims:
                    small[dim] = max(1, int(round(shape[dim] / f)))
            if tuple(small) == shape:
                continue
            down = F.adaptive_avg_pool3d(img[i:i + 1], small) if self.dims == 3 else F.adaptive_avg_pool2d(img[i:i + 1], small)
            img[i:i + 1] = F.interpolate(down, size=shape, mode=mode, align_corners=False)
        return img

    def _grid(self, rotation: torch.Tensor, zoom: float, elastic, generator: torch.Generator, shape) -> torch.Tensor:
        """Sampling grid ``[*S, dims]`` (normalised coordinates in (x, y[, z]) order) for one sample of spatial ``shape``."""
        half = [(n - 1) / 2.0 * sp for n, sp in zip(shape, self.spacing)]  # tensor order, mm
        axes = [torch.linspace(-h, h, n) if n > 1 else torch.zeros(1) for h, n in zip(half, shape)]
        mesh = torch.meshgrid(*axes, indexing="ij")
        points = torch.stack(list(reversed(mesh)), dim=-1)  # [*S, dims] in (x, y, z) order, mm
        source = points @ rotation / zoom  # inverse of "rotate by R, zoom by s"
        if elastic:
            sigma = float(elastic.get("sigma_mm", 24.0))
            ctrl = [max(2, int(math.ceil(2 * h / sigma)) + 1) for h in half]
            coarse = torch.randn((1, self.dims, *ctrl), generator=generator)
            mode = "trilinear" if self.dims == 3 else "bilinear"
            field = F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=True)[0]
            source = source + field.movedim(0, -1) * float(elastic.get("magnitude_mm", 5.0))
        norm = torch.tensor([h if h > 0 else 1.0 for h in reversed(half)])
        return source / norm
