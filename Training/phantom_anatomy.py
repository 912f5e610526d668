"""Where things are in a kidney CT phantom, in physical LPS millimetres.

Two jobs share one body frame (the kidneys' position and an anatomy scale):

- :func:`procedural_labels` draws kidney / tumor / cyst label maps (KiTS19 label values) on any grid;
- :func:`body_tissues` lays out the background abdomen (body outline, fat, muscle, ribs, spine, aorta, IVC,
  liver, spleen, bowel, lung bases, heart) around the kidneys wherever a label map puts them, using
  :func:`estimate_frame` to read the frame back from the labels.

So procedural shapes and real KiTS19 label maps go through the same intensity synthesizer
(:mod:`Training.phantoms`). Everything is built in physical space through each grid's
index-to-physical mapping, so permuted (KiTS19) or oblique direction matrices put anatomy where the
patient has it: +x patient left, +y posterior, +z superior.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib.labels import CYST, KIDNEY, TUMOR

logger = logging.getLogger(__name__)

#: adult distance between the two kidneys' centroids (mm; KiTS19 cases: ~115-180) and volume of one kidney
#: (ml): the anatomy scale 1.0
ADULT_KIDNEY_SEPARATION_MM = 140.0
ADULT_KIDNEY_VOLUME_ML = 170.0
KIDNEY_LAYOUTS = ("both", "left", "right", "none", "horseshoe")


class Tissue(IntEnum):
    """Background tissue classes of :func:`body_tissues` (the synthesizer gives each its HU)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    LIVER = 4
    SPLEEN = 5
    HEART = 6
    AORTA = 7
    IVC = 8
    BOWEL_WALL = 9
    BOWEL_CONTENT = 10
    BOWEL_GAS = 11
    BONE = 12
    CORTICAL_BONE = 13
    DISC = 14
    CSF = 15


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``size``, ``spacing`` (mm) and ``origin`` (LPS mm) in SimpleITK (x, y, z) order and
    ``direction`` as a 3x3 matrix whose columns are the index axes' physical directions."""

    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple  # 9 numbers, row-major like SimpleITK

    @staticmethod
    def of(image: sitk.Image) -> "Grid":
        return Grid(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                    tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @staticmethod
    def aligned(lo, hi, spacing: float, margin: int = 1) -> "Grid":
        """An identity-direction grid of isotropic ``spacing`` covering the LPS box ``lo``..``hi``."""
        lo = np.asarray(lo, float) - margin * spacing
        size = np.ceil((np.asarray(hi, float) + margin * spacing - lo) / spacing).astype(int) + 1
        return Grid(tuple(int(s) for s in size), (spacing,) * 3, tuple(lo), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))

    @property
    def matrix(self) -> np.ndarray:
        """3x3 map from index offsets (x, y, z) to physical offsets (mm)."""
        return np.asarray(self.direction, float).reshape(3, 3) @ np.diag(self.spacing)

    @property
    def shape(self) -> tuple:
        """numpy array shape (z, y, x)."""
        return self.size[::-1]

    def to_physical(self, index) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(index, float) @ self.matrix.T

    def to_index(self, points) -> np.ndarray:
        return (np.asarray(points, float) - np.asarray(self.origin)) @ np.linalg.inv(self.matrix).T

    def corners(self) -> np.ndarray:
        """(8, 3) physical corners of the grid's outer voxel faces."""
        lo, hi = -0.5 * np.ones(3), np.asarray(self.size, float) - 0.5
        idx = np.array([[(lo, hi)[(c >> a) & 1][a] for a in range(3)] for c in range(8)])
        return self.to_physical(idx)

    def centre(self) -> np.ndarray:
        return self.to_physical((np.asarray(self.size, float) - 1) / 2)

    def exit_distance(self, point, unit) -> float:
        """Distance (mm) from ``point`` along the unit vector ``unit`` to where the line leaves the grid."""
        p = self.to_index(point)
        v = np.linalg.inv(self.matrix) @ np.asarray(unit, float)
        ts = []
        for i in range(3):
            if abs(v[i]) > 1e-12:
                bound = self.size[i] - 0.5 if v[i] > 0 else -0.5
                ts.append((bound - p[i]) / v[i])
        return float(min(ts))

    def width_along(self, unit) -> float:
        """Chord length (mm) of the grid through its centre along ``unit``."""
        return 2.0 * self.exit_distance(self.centre(), unit)

    def index_box(self, centre, radius: float):
        """Index range ``(start, stop)`` (x, y, z) of the voxels that may lie within ``radius`` mm of
        ``centre``, clipped to the grid; None when that range is empty."""
        c = np.asarray(centre, float)
        box = np.array([[c[a] + (-radius, radius)[(k >> a) & 1] for a in range(3)] for k in range(8)])
        idx = self.to_index(box)
        start = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, np.asarray(self.size))
        if np.any(stop <= start):
            return None
        return start, stop

    def coords(self, start=(0, 0, 0), stop=None):
        """Physical X, Y, Z (float32 arrays shaped (z, y, x)) of the voxels in the index range."""
        stop = self.size if stop is None else stop
        m = self.matrix.astype(np.float32)
        i = np.arange(start[0], stop[0], dtype=np.float32)[None, None, :]
        j = np.arange(start[1], stop[1], dtype=np.float32)[None, :, None]
        k = np.arange(start[2], stop[2], dtype=np.float32)[:, None, None]
        return tuple(np.float32(self.origin[r]) + m[r, 0] * i + m[r, 1] * j + m[r, 2] * k for r in range(3))

    def axis_coords(self):
        """For an identity-direction grid: physical x (1, 1, nx), y (1, ny, 1), z (nz, 1, 1) float32."""
        if not np.allclose(np.asarray(self.direction).reshape(3, 3), np.eye(3)):
            raise ValueError("axis_coords needs an identity-direction grid")
        x, y, z = (np.float32(self.origin[a]) + np.float32(self.spacing[a]) * np.arange(self.size[a], dtype=np.float32)
                   for a in range(3))
        return x[None, None, :], y[None, :, None], z[:, None, None]

    def image(self, array: np.ndarray) -> sitk.Image:
        """``array`` (z, y, x) as a SimpleITK image with this geometry."""
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def resample(self, image: sitk.Image, interpolator, default: float, pixel_type) -> sitk.Image:
        """``image`` resampled onto this grid (identity transform)."""
        return sitk.Resample(image, self.size, sitk.Transform(), interpolator, self.origin, self.spacing,
                             self.direction, float(default), pixel_type)


@dataclass(frozen=True)
class BodyFrame:
    """Where the body is: midline ``x``, the kidneys' mean A-P ``y`` and S-I ``z`` (LPS mm), and the
    anatomy ``scale`` relative to an adult (1.0)."""

    x: float
    y: float
    z: float
    scale: float


def grid_scale(grid: Grid) -> float:
    """Anatomy scale that fits two kidneys and most of a body into ``grid`` (1.0 for adult-size grids)."""
    w = [grid.width_along(e) for e in np.eye(3)]
    return float(np.clip(min(w[0] / 300.0, w[1] / 260.0, w[2] / 150.0), 0.05, 1.0))


def frame_from_grid(grid: Grid) -> BodyFrame:
    """The body frame of a grid without kidneys: body centred in the grid, adult-size if it fits."""
    s = grid_scale(grid)
    c = grid.centre()
    return BodyFrame(float(c[0]), float(c[1] + 45.0 * s), float(c[2]), s)


def estimate_frame(kidney_labels: sitk.Image, grid: Grid) -> BodyFrame:
    """Body frame read from a label map.

    ``kidney_labels``: labels (any value > 0 is kidney tissue) resampled onto an identity-direction grid;
    ``grid``: the geometry of the whole image (its centre is the fallback midline when only one kidney is
    present). Two kidneys give the midline between them and the scale from their separation; a single
    kidney gives the scale from its volume; a horseshoe (one component wider than deep) sits on the midline.
    """
    cc = sitk.RelabelComponent(sitk.ConnectedComponent(kidney_labels > 0), sortByObjectSize=True)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(cc)
    comps = list(stats.GetLabels())
    if not comps:
        return frame_from_grid(grid)
    spacing = np.asarray(cc.GetSpacing())
    vol = {c: stats.GetPhysicalSize(c) for c in comps}
    comps = [c for c in sorted(comps, key=lambda c: -vol[c])[:2] if vol[c] >= 0.1 * max(vol.values())]
    cent = {c: np.asarray(stats.GetCentroid(c)) for c in comps}
    ext = {c: np.asarray(stats.GetBoundingBox(c)[3:]) * spacing for c in comps}
    if len(comps) == 2:
        a, b = comps
        dx = abs(cent[a][0] - cent[b][0])
        if dx > 0.25 * (ext[a][0] + ext[b][0]):
            mid = (cent[a] + cent[b]) / 2
            return BodyFrame(float(mid[0]), float(mid[1]), float(mid[2]),
                             float(np.clip(dx / ADULT_KIDNEY_SEPARATION_MM, 0.05, 1.4)))
    big = comps[0]
    c, e, v_ml = cent[big], ext[big], vol[big] / 1000.0
    if e[0] > 1.8 * e[1] and e[0] > 0.9 * e[2]:  # horseshoe: one kidney mass across the midline
        s = float(np.clip((v_ml / (2 * ADULT_KIDNEY_VOLUME_ML)) ** (1 / 3), 0.05, 1.4))
        return BodyFrame(float(c[0]), float(c[1]), float(c[2]), s)
    s = float(np.clip((v_ml / ADULT_KIDNEY_VOLUME_ML) ** (1 / 3), 0.05, 1.4))
    d = c[0] - grid.centre()[0]
    side = 1.0 if d >= 0 else -1.0
    offset = 65.0 * s if abs(d) < 25.0 * s else float(np.clip(abs(d), 40.0 * s, 90.0 * s))
    return BodyFrame(float(c[0] - side * offset), float(c[1]), float(c[2]), s)


def smooth_noise(grid: Grid, sigma_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``sigma_mm`` on an identity-direction
    ``grid``, float32 (z, y, x). Drawn on a grid of spacing ~sigma and interpolated, so cost does not
    grow with the target resolution."""
    h = max(float(sigma_mm), min(grid.spacing))
    if h <= 1.05 * min(grid.spacing) and max(grid.spacing) <= 1.05 * min(grid.spacing):
        low = grid
    else:
        lo = np.asarray(grid.origin)
        hi = lo + (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
        low = Grid.aligned(lo, hi, h, margin=2)
    white = rng.standard_normal(low.shape, dtype=np.float32)
    field = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(low.image(white), float(sigma_mm)))
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    if low is grid:
        return field
    return sitk.GetArrayFromImage(grid.resample(low.image(field), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def hilum_quadrics(tissue: np.ndarray, x, y, z, midline_x: float, voxel_ml: float, min_ml: float, floor_mm: float) -> list:
    """Each kidney's renal hilum, one per side of the midline (a horseshoe has two), from the moments of its tissue.

    ``tissue``: bool (z, y, x) kidney mask on an identity-direction grid whose physical axes are ``x``, ``y``, ``z``
    (:meth:`Grid.axis_coords`), each voxel ``voxel_ml``; sides holding less than ``min_ml`` are skipped; ``floor_mm``
    is the smallest semi-axis.
    Returns ``[(side, hilum point (x, y, z) LPS mm, semi-axes (x, y, z) mm, q)]`` with side +1 patient left, -1 right,
    the hilum medial and slightly anterior of the kidney's centroid, and ``q`` the hilum ellipsoid's quadratic form
    (float32 array, < 1 inside)."""
    out = []
    for side in (1.0, -1.0):
        m = tissue & ((x - midline_x) * side > 0)
        n = int(m.sum())
        if n * voxel_ml < min_ml:
            continue
        mean, semi = [], []
        for axis, coord in ((2, x.ravel()), (1, y.ravel()), (0, z.ravel())):
            proj = m.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
            mu = float(proj @ coord / n)
            mean.append(mu)
            semi.append(math.sqrt(max(5.0 * float(proj @ (coord - mu) ** 2 / n), floor_mm ** 2)))
        hx, hy, hz = mean[0] - side * 0.5 * semi[0], mean[1] - 0.15 * semi[1], mean[2]
        q = ((x - hx) / (0.45 * semi[0])) ** 2 + ((y - hy) / (0.5 * semi[1])) ** 2 + ((z - hz) / (0.45 * semi[2])) ** 2
        out.append((side, (hx, hy, hz), tuple(semi), q))
    return out


# ----------------------------------------------------------------------------------------------------------
# Procedural kidney / tumor / cyst shapes


def _unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


@dataclass(frozen=True)
class _Kidney:
    """A bean: an ellipsoid with semi-axes ``semi`` (long, medial, thickness) along the rows of ``axes``,
    bent so both poles curve medially, with a hilum notch on the medial side."""

    centre: np.ndarray
    axes: np.ndarray
    semi: np.ndarray
    bend: float

    def radius(self) -> float:
        return float(self.semi.max() * 1.05 + self.bend * self.semi[1])

    def _local(self, X, Y, Z):
        dx, dy, dz = X - np.float32(self.centre[0]), Y - np.float32(self.centre[1]), Z - np.float32(self.centre[2])
        a = self.axes.astype(np.float32)
        return tuple(a[r, 0] * dx + a[r, 1] * dy + a[r, 2] * dz for r in range(3))

    def inside(self, X, Y, Z):
        aL, aW, aT = (np.float32(v) for v in self.semi)
        l, w, t = self._local(X, Y, Z)
        lr2 = (l / aL) ** 2
        wb = w - np.float32(self.bend) * aW * lr2
        body = lr2 + (wb / aW) ** 2 + (t / aT) ** 2 <= 1.0
        notch = (l / (0.3 * aL)) ** 2 + ((wb - aW) / (0.45 * aW)) ** 2 + (t / (0.6 * aT)) ** 2 <= 1.0
        return body & ~notch

    def surface_point(self, rng: np.random.Generator):
        """A random surface point away from the hilum and the outward normal there."""
        for _ in range(50):
            d = _unit(rng.standard_normal(3))
            if d[1] < 0.5:
                break
        aL, aW, aT = self.semi
        q = np.array([aL * d[0], aW * d[1] + self.bend * aW * d[0] ** 2, aT * d[2]])
        n = _unit(self.axes.T @ np.array([d[0] / aL, d[1] / aW, d[2] / aT]))
        return self.centre + self.axes.T @ q, n


def _kidney(centre, side: int, coronal_tilt_deg: float, sagittal_tilt_deg: float, hilum_deg: float, semi, bend):
    """Kidney on ``side`` (+1 patient left, -1 right): long axis tilted so the upper pole is medial by
    ``coronal_tilt_deg`` (negative: lower pole medial, as in a horseshoe) and posterior by
    ``sagittal_tilt_deg``; the hilum faces medially and ``hilum_deg`` anteriorly."""
    long_axis = _unit([-side * math.tan(math.radians(coronal_tilt_deg)), math.tan(math.radians(sagittal_tilt_deg)),
                       1.0])
    h = math.radians(hilum_deg)
    medial = np.array([-side * math.cos(h), -math.sin(h), 0.0])
    medial = _unit(medial - medial.dot(long_axis) * long_axis)
    axes = np.stack([long_axis, medial, np.cross(long_axis, medial)])
    return _Kidney(np.asarray(centre, float), axes, np.asarray(semi, float), float(bend))


def _paint(lab: np.ndarray, grid: Grid, centre, radius: float, inside, value: int, protect=None) -> None:
    box = grid.index_box(centre, radius)
    if box is None:
        return
    (x0, y0, z0), (x1, y1, z1) = box
    X, Y, Z = grid.coords((x0, y0, z0), (x1, y1, z1))
    m = inside(X, Y, Z)
    sub = lab[z0:z1, y0:y1, x0:x1]
    if protect is not None:
        m &= sub != protect
    sub[m] = value


def _ellipsoid(centre, rotation, semi):
    c = np.asarray(centre, np.float32)
    rot = np.asarray(rotation, np.float32)
    inv = (1.0 / np.asarray(semi, np.float32)) ** 2

    def inside(X, Y, Z):
        d = (X - c[0], Y - c[1], Z - c[2])
        return sum(inv[r] * (rot[r, 0] * d[0] + rot[r, 1] * d[1] + rot[r, 2] * d[2]) ** 2 for r in range(3)) <= 1.0

    return inside


def _ball(centre, radius):
    return _ellipsoid(centre, np.eye(3), (radius,) * 3)


def _kidney_layout(kidneys: str, frame: BodyFrame, rng: np.random.Generator):
    """Kidney beans and extra balls (a horseshoe isthmus) for a layout, in physical LPS mm."""
    s = frame.scale
    base = np.array([frame.x, frame.y, frame.z])
    sides = {"both": (1, -1), "left": (1,), "right": (-1,), "none": (), "horseshoe": (1, -1)}[kidneys]
    beans = []
    for side in sides:
        semi = np.array([rng.uniform(50, 60), rng.uniform(27, 33), rng.uniform(22, 27)]) * s
        if kidneys == "horseshoe":
            offset, tilt, dz = rng.uniform(35, 48), -rng.uniform(15, 30), -rng.uniform(0, 15)
        else:  # the left kidney usually sits a little higher (the liver pushes the right one down)
            offset, tilt, dz = rng.uniform(60, 80), rng.uniform(8, 20), side * rng.uniform(3, 10)
        centre = base + np.array([side * offset, rng.normal(0, 4), dz]) * s
        beans.append(_kidney(centre, side, tilt, rng.uniform(5, 20), rng.uniform(20, 45), semi, rng.uniform(0.15, 0.3)))
    balls = []
    if kidneys == "horseshoe":
        poles = [b.centre - b.axes[0] * b.semi[0] * 0.75 for b in beans]
        mid = (poles[0] + poles[1]) / 2 + np.array([0.0, -rng.uniform(15, 30) * s, 0.0])  # in front of the spine
        r = float(np.mean([b.semi[2] for b in beans]) * rng.uniform(0.55, 0.8))
        for t in np.linspace(0, 1, 15):
            balls.append(((1 - t) ** 2 * poles[0] + 2 * t * (1 - t) * mid + t ** 2 * poles[1], r))
    return beans, balls


def procedural_labels(size=(96, 96, 64), spacing=(2.0, 2.0, 2.5), *, rng: np.random.Generator, direction=None,
                      origin=None, kidneys: str = "both", tumors: int = 1, cysts: int = 0,
                      cut_by_fov: bool = False) -> sitk.Image:
    """Random kidney/tumor/cyst label map (uint8: 0 background, 1 kidney, 2 tumor, 3 cyst).

    ``size`` (voxels) and ``spacing`` (mm) in SimpleITK (x, y, z) order; ``direction`` 9 numbers
    (row-major, default identity); ``origin`` LPS mm (default: the grid centred at (0, 0, 0)).
    Shapes are built in physical LPS space: bean-shaped kidneys (~11 x 6 x 5 cm) 6-8 cm either side
    of the midline, posterior, left one slightly higher, with a medial hilum notch; ``kidneys`` is
    "both", "left", "right", "none" or "horseshoe" (two kidneys joined across the midline at the lower
    poles). ``tumors`` ellipsoids of 1.5-5 cm diameter sit on kidney surfaces, partly outside; ``cysts``
    small spheres (label 3) likewise; tumors and cysts need a kidney, so none are drawn when
    ``kidneys == "none"``. On grids too small for an adult the whole anatomy is scaled down to fit.
    ``cut_by_fov`` shifts the anatomy sideways so one kidney runs out of the grid.
    """
    if kidneys not in KIDNEY_LAYOUTS:
        raise ValueError(f"kidneys must be one of {KIDNEY_LAYOUTS}, got {kidneys!r}")
    size = tuple(int(v) for v in size)
    spacing = tuple(float(v) for v in spacing)
    if len(size) != 3 or len(spacing) != 3 or min(size) < 1 or min(spacing) <= 0:
        raise ValueError(f"size and spacing must be 3 positive values (x, y, z), got {size} and {spacing}")
    if tumors < 0 or cysts < 0:
        raise ValueError(f"tumors and cysts must be >= 0, got {tumors} and {cysts}")
    dmat = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    if origin is None:
        origin = -(dmat @ np.diag(spacing) @ ((np.asarray(size, float) - 1) / 2))
    grid = Grid(size, spacing, tuple(float(o) for o in origin), tuple(float(d) for d in dmat.ravel()))

    s = grid_scale(grid)
    c = grid.centre()
    frame = BodyFrame(c[0] + rng.normal(0, 4) * s, c[1] + (45 + rng.normal(0, 5)) * s, c[2] + rng.normal(0, 6) * s, s)
    beans, balls = _kidney_layout(kidneys, frame, rng)

    if cut_by_fov and beans:
        k = beans[int(rng.integers(len(beans)))]
        side = 1.0 if k.centre[0] >= frame.x else -1.0
        lateral = np.array([side, 0.0, 0.0])
        half_width = float(np.sqrt(np.sum((k.axes[:, 0] * k.semi) ** 2)))
        shift = lateral * (grid.exit_distance(k.centre, lateral) - half_width * rng.uniform(-0.2, 0.5))
        beans = [replace(b, centre=b.centre + shift) for b in beans]
        balls = [(p + shift, r) for p, r in balls]

    lab = np.zeros(grid.shape, np.uint8)
    for b in beans:
        _paint(lab, grid, b.centre, b.radius(), b.inside, KIDNEY)
    for p, r in balls:
        _paint(lab, grid, p, r, _ball(p, r), KIDNEY)

    min_r = 1.5 * max(spacing)
    for _ in range(tumors if beans else 0):
        k = beans[int(rng.integers(len(beans)))]
        p, n = k.surface_point(rng)
        r = max((7.5 + 17.5 * rng.beta(1.2, 2.0)) * s, min_r)
        centre = p + n * r * rng.uniform(-0.6, 0.5)
        rot = _random_rotation(rng)
        semi = r * rng.uniform(0.8, 1.2, 3)
        _paint(lab, grid, centre, float(semi.max()), _ellipsoid(centre, rot, semi), TUMOR)
        if r > 12 * s and rng.random() < 0.4:  # lobulated: a satellite lobe
            lobe_r = r * rng.uniform(0.45, 0.7)
            lobe_c = centre + _unit(rng.standard_normal(3)) * r * rng.uniform(0.4, 0.7)
            _paint(lab, grid, lobe_c, lobe_r, _ball(lobe_c, lobe_r), TUMOR)
    for _ in range(cysts if beans else 0):
        k = beans[int(rng.integers(len(beans)))]
        p, n = k.surface_point(rng)
        r = max(rng.uniform(3, 12) * s, 1.2 * max(spacing))
        centre = p + n * r * rng.uniform(-0.7, 0.3)
        _paint(lab, grid, centre, r, _ball(centre, r), CYST, protect=TUMOR)

    return grid.image(lab)


# ----------------------------------------------------------------------------------------------------------
# Background body layout


def _smooth_1d(x: np.ndarray, sigma: float) -> np.ndarray:
    """``x`` smoothed with a Gaussian of ``sigma`` samples and rescaled to unit standard deviation."""
    r = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / max(sigma, 1e-3)) ** 2)
    y = np.convolve(np.pad(x, r, mode="wrap"), k / k.sum(), "valid")
    return (y - y.mean()) / max(float(y.std()), 1e-6)


def _ell(X, Y, cx, cy, a, b, e=2.0):
    if e == 2.0:
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1.0
    return (np.abs(X - cx) / a) ** e + (np.abs(Y - cy) / b) ** e <= 1.0


def body_tissues(grid: Grid, frame: BodyFrame, rng: np.random.Generator) -> np.ndarray:
    """Background tissue map (uint8 :class:`Tissue`, array (z, y, x)) on an identity-direction ``grid``,
    laid out around the kidneys of ``frame``: body outline (superellipse, slowly varying along z) with
    subcutaneous fat, a muscle wall holding sloped ribs above the kidneys' lower half, fat-filled
    cavity; vertebrae (cancellous bone, cortical shell, discs) with the spinal canal and neural arch
    posterior between the kidneys, paraspinal and psoas muscles; aorta
    left-anterior of the spine (bifurcating below the kidneys) and IVC to its right; liver on the
    patient's right (-x) above/in front of the right kidney, spleen left-posterior-superior, heart and
    lung bases above, bowel loops with gas in front of and below the kidneys. Sizes and positions are
    randomised from ``rng`` and scaled by ``frame.scale``."""
    s = frame.scale
    x, y, z = grid.axis_coords()
    X, Y, Z = (x - np.float32(frame.x)) / s, (y - np.float32(frame.y)) / s, (z - np.float32(frame.z)) / s
    X2, Y2 = X[0], Y[0]  # (1, nx), (ny, 1) -> 2D (ny, nx) masks, constant along z
    u = rng.uniform
    T = np.full(grid.shape, Tissue.AIR, np.uint8)

    A, B, P, e = u(150, 185), u(105, 135), u(60, 90), u(2.0, 2.6)
    Yc = P - B
    fat, wall = u(8, 40), u(6, 14)
    # the outline's width and depth drift slowly along z, so the body is not a perfect cylinder
    wobble = _smooth_1d(rng.standard_normal(Z.shape[0]), 60.0 / (s * grid.spacing[2]))[:, None, None]
    Az = (A * (1.0 + 0.06 * wobble)).astype(np.float32)
    Bz = (B * (1.0 + 0.04 * wobble)).astype(np.float32)
    body = _ell(X, Y, 0, Yc, Az, Bz, e)
    in_fat = _ell(X, Y, 0, Yc, Az - fat, Bz - fat, e)
    cavity = _ell(X, Y, 0, Yc, np.maximum(Az - fat - wall, 10), np.maximum(Bz - fat - wall, 10), e)
    T[body] = Tissue.FAT
    wall_mask = in_fat & ~cavity
    T[wall_mask] = Tissue.MUSCLE
    # ribs in the body wall above the kidneys' lower half, sloping down anteriorly; marrow inside a cortex
    rib_period, rib_thick, rib_phase, rib_low = u(24, 30), u(7, 10), u(0, 30), u(-30, 0)
    rib_level = Z - u(0.5, 0.9) * (Y - P)
    phase = np.mod(rib_level - rib_phase, rib_period)
    ribs = wall_mask & (phase < rib_thick) & (rib_level > rib_low)
    T[ribs] = Tissue.CORTICAL_BONE
    T[ribs & (phase > 1.5) & (phase < rib_thick - 1.5)] = Tissue.BONE
    del phase
    del wall_mask, ribs, rib_level

    # organ geometry (adult mm relative to the kidneys' mean position)
    Xl, Yl, Zl, Al, Bl, Cl = -u(50, 70), -u(20, 50), u(45, 75), u(80, 100), u(65, 85), u(70, 95)
    Xs, Ys, Zs, As, Bs, Cs = u(75, 95), u(0, 25), u(35, 65), u(25, 35), u(40, 55), u(40, 55)
    Xh, Yh, Zh, Ah, Bh, Ch = u(5, 25), Yc + u(-10, 15), Zl + Cl + u(10, 35), u(55, 70), u(45, 55), u(45, 60)
    z_lung = Zl + u(0.2, 0.4) * Cl
    Yv, Rx, Ry = u(-15, 5), u(18, 24), u(15, 19)
    canal_y, canal_r = Yv + Ry + u(7, 10), u(7, 10)
    arch_r = canal_r + u(5, 7)
    Z_bif = -u(70, 110)
    ao_x, ao_r = u(4, 14), u(9, 13)
    ao_y = Yv - Ry - ao_r - u(1, 4)
    ivc_x, ivc_a, ivc_b = -u(18, 28), u(10, 14), u(7, 10)
    ivc_y = Yv - Ry - u(6, 12)
    ps_x, ps_y = Rx + u(8, 14), Yv + u(-2, 6)
    pa_x, pa_y, pa_a, pa_b = u(28, 34), canal_y + u(8, 14), u(20, 27), u(20, 26)
    period, disc_h, phase = u(30, 36), u(7, 10), u(0, 36)
    bowel_y, bowel_thr, lumen_thr, gas_thr = u(-25, -10), u(-0.3, 0.2), u(0.35, 0.5), u(1.0, 1.6)

    cav3 = cavity
    nb = smooth_noise(grid, max(7.0 * s, grid.spacing[0]), rng)
    ng = smooth_noise(grid, max(4.0 * s, grid.spacing[0]), rng)
    below_chest = Z < z_lung
    lung = cav3 & ~below_chest
    T[lung] = Tissue.LUNG
    bowel = cav3 & below_chest & (Y < bowel_y + np.maximum(0.0, -(Z + 60.0)) * 0.6) & (nb > bowel_thr)
    T[bowel] = Tissue.BOWEL_WALL
    lumen = bowel & (nb > bowel_thr + lumen_thr)
    T[lumen] = Tissue.BOWEL_CONTENT
    T[lumen & (ng > gas_thr + 0.01 * (Y - Yc))] = Tissue.BOWEL_GAS  # gas rises anteriorly (patient supine)
    del nb, ng, bowel, lumen, lung

    def ellipsoid(cx, cy, cz, a, b, c):
        return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 + ((Z - cz) / c) ** 2 <= 1.0

    T[cav3 & ellipsoid(Xl, Yl, Zl, Al, Bl, Cl)] = Tissue.LIVER
    T[cav3 & ellipsoid(Xs, Ys, Zs, As, Bs, Cs)] = Tissue.SPLEEN
    T[cav3 & ellipsoid(Xh, Yh, Zh, Ah, Bh, Ch)] = Tissue.HEART

    psoas_r = np.clip(8.0 + 0.15 * (20.0 - Z), 6.0, 26.0)  # psoas thickens caudally
    psoas = ((np.abs(X) - ps_x) ** 2 + (Y - ps_y) ** 2 <= psoas_r ** 2) & (Z < 35.0)
    T[cav3 & psoas] = Tissue.MUSCLE
    T[in_fat & (_ell(X2, Y2, pa_x, pa_y, pa_a, pa_b) | _ell(X2, Y2, -pa_x, pa_y, pa_a, pa_b))[None]] = Tissue.MUSCLE

    above_bif = Z >= Z_bif
    T[(Z > Z_bif - 15.0) & _ell(X2, Y2, ivc_x, ivc_y, ivc_a, ivc_b)[None]] = Tissue.IVC
    T[above_bif & _ell(X2, Y2, ao_x, ao_y, ao_r, ao_r)[None]] = Tissue.AORTA
    drop = np.maximum(Z_bif - Z, 0.0)
    iliac = ~above_bif & ((np.abs(X - ao_x * 0.3) - (6.0 + 0.35 * drop)) ** 2 + (Y - ao_y - 0.2 * drop) ** 2
                          <= (0.65 * ao_r) ** 2)
    T[body & iliac] = Tissue.AORTA

    level = np.mod(Z - phase, period)  # (nz, 1, 1)
    disc = (level < disc_h)[:, 0, 0]
    vert = ~disc
    vb = _ell(X2, Y2, 0, Yv, Rx, Ry)
    vb_in = _ell(X2, Y2, 0, Yv, max(Rx - 2.5, 1), max(Ry - 2.5, 1))
    canal = _ell(X2, Y2, 0, canal_y, canal_r, canal_r)
    arch = (_ell(X2, Y2, 0, canal_y, arch_r, arch_r) | _ell(X2, Y2, 0, canal_y + canal_r + 15, 4, 15)) & ~canal
    for k in np.flatnonzero(vert):
        sl = T[k]
        sl[vb] = Tissue.CORTICAL_BONE
        sl[vb_in] = Tissue.BONE
        sl[arch & body[k]] = Tissue.CORTICAL_BONE
    for k in np.flatnonzero(disc):
        T[k][vb] = Tissue.DISC
    T[canal[None] & body] = Tissue.CSF
    return T
