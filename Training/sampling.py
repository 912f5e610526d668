"""Training patches from the preprocessing cache, reproducibly.

A batch is a pure function of ``(seed, phase, epoch, iteration, rank)``: its generator is
``numpy.random.default_rng([seed, phase, epoch, iteration, rank])``. So data-loading worker
processes can build any batch independently, and a resumed run sees exactly the batches an
uninterrupted run would have seen, without saving sampler state.

Sampling units are cases (a case's kidney regions are drawn uniformly within it; every
registration-augmented volume is a unit of its own). ``patches_per_case`` patches come from each
drawn case (Daza: 3 from each of 13 cases). Hard cases (a cyst, or a tumor whose mean HU is
within ``low_contrast_hu`` of the kidney's) are drawn ``hard_case_weight`` times as often.

Patch centres (``sampler.kind``):

* ``uniform`` - anywhere;
* ``foreground`` - with probability ``foreground_fraction`` on a voxel of a random foreground
  class present in the volume (nnU-Net's oversampling; 1.0 = "inside the mask area"), else anywhere;
* ``class_balanced`` - the centre voxel's class is drawn uniformly among the classes present
  (Daza); background centres are drawn by rejection;
* ``slab`` - whole slices (in-plane centred), the slab's centre slice holding foreground with
  probability ``foreground_fraction`` (kidney-slice oversampling of the ResUNet);
* ``slice2d`` - one slice for a 2.5D network (its k neighbours are already the channels), on a
  foreground voxel with probability ``foreground_fraction``, in-plane jitter of a quarter patch.

A patch centred on a chosen voxel (foreground, class-balanced, 2.5D) has that voxel exactly at its
centre, padded where it reaches outside the volume (nnU-Net's way); uniform and slab crops stay
inside the volume where it is larger than the patch and centre it where it is smaller. Padding:
the normalised air value for the image, background for the target.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .preprocess import load_volume

KINDS = ("uniform", "foreground", "class_balanced", "slab", "slice2d")


def crop(volume: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """``volume[..., start:start+size]`` over its last ``len(size)`` axes; parts outside are ``pad_value``."""
    lead = volume.ndim - len(size)
    out = np.full(volume.shape[:lead] + tuple(size), pad_value, dtype=volume.dtype)
    src, dst = [slice(None)] * lead, [slice(None)] * lead
    for s, n, dim in zip(start, size, volume.shape[lead:]):
        a, b = max(0, s), min(dim, s + n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def start_for_centre(centre: Sequence[int], patch: Sequence[int], shape: Sequence[int], exact: bool = False) -> list[int]:
    """Crop start putting ``centre`` at index ``p // 2`` of the patch. ``exact``: always (the crop may reach
    outside the volume and is padded); otherwise the crop is kept inside the volume along axes where it is
    larger than the patch, and the volume is centred in the patch along the others."""
    out = []
    for c, p, s in zip(centre, patch, shape):
        if exact:
            out.append(int(c) - p // 2)
        else:
            out.append(int(np.clip(c - p // 2, 0, s - p)) if s >= p else -((p - s) // 2))
    return out


class PatchSampler:
    """Builds training batches ``(x float32 [B, C, *patch], y uint8 [B, *patch])`` from cached volumes.

    ``folder``: the spec folder; ``records``: its volume records for the training cases;
    ``patch``: tensor order (z, y, x) for 3D, (y, x) for a 2.5D stage; ``training``: the recipe
    stage's training settings; ``pad_value``: normalised air.
    """

    def __init__(self, folder: Path, records: Sequence[dict], patch: Sequence[int], training: dict, pad_value: float,
                 num_classes: int, seed: int, phase: int = 0):
        if not records:
            raise ValueError("no training volumes to sample from")
        self.folder = Path(folder)
        self.records = list(records)
        self.patch = tuple(int(p) for p in patch)
        self.spatial_dims = len(self.patch)
        self.training = training
        self.sampler = dict(training.get("sampler") or {"kind": "uniform"})
        if self.sampler.get("kind") not in KINDS:
            raise ValueError(f"sampler kind must be one of {KINDS}, got {self.sampler.get('kind')!r}")
        if (self.sampler["kind"] == "slice2d") != (self.spatial_dims == 2):
            raise ValueError("a 2.5D (2D) stage needs the slice2d sampler, and slice2d needs a 2.5D stage")
        self.pad_value = float(pad_value)
        self.num_classes = int(num_classes)
        self.seed, self.phase = int(seed), int(phase)
        self.batch_size = int(training["batch_size"])
        self.per_case = max(1, min(int(training.get("patches_per_case", 1)), self.batch_size))
        units: dict = {}
        for i, r in enumerate(self.records):
            key = (r["case"], tuple(r["augmented_from"]) if r.get("augmented_from") else None)
            units.setdefault(key, []).append(i)
        self.units = list(units.values())
        self.unit_weights = self._weights([self.records[u[0]] for u in self.units], training.get("case_weights"))
        self._volumes: dict = {}
        self._where: dict = {}

    @staticmethod
    def _weights(records: list[dict], spec: Optional[dict]) -> np.ndarray:
        w = np.ones(len(records))
        if spec:
            for i, r in enumerate(records):
                if is_hard_case(r.get("info", {}), spec.get("low_contrast_hu", 30.0)):
                    w[i] = float(spec.get("hard_case_weight", 1.0))
        return w / w.sum()

    def iterations_per_epoch(self) -> int:
        """The recipe's iterations per epoch; ``"dataset"`` = one pass over the sampling units."""
        n = self.training.get("iterations_per_epoch", 250)
        if n == "dataset":
            cases_per_batch = max(1, self.batch_size // self.per_case)
            return max(1, math.ceil(len(self.units) / cases_per_batch))
        return int(n)

    def _volume(self, i: int):
        if i not in self._volumes:
            self._volumes[i] = load_volume(self.folder, self.records[i]["stem"])
        return self._volumes[i]

    def _locations(self, i: int) -> dict:
        if i not in self._where:
            with np.load(self.folder / f"{self.records[i]['stem']}_where.npz") as z:
                self._where[i] = {k: z[k] for k in z.files}
        return self._where[i]

    def batch(self, epoch: int, iteration: int, rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The batch of ``(epoch, iteration)`` on ``rank`` (deterministic)."""
        rng = np.random.default_rng([self.seed, self.phase, int(epoch), int(iteration), int(rank)])
        xs, ys = [], []
        while len(xs) < self.batch_size:
            unit = self.units[int(rng.choice(len(self.units), p=self.unit_weights))]
            for _ in range(min(self.per_case, self.batch_size - len(xs))):
                i = unit[int(rng.integers(len(unit)))]
                x, y = self._patch(i, rng)
                xs.append(x)
                ys.append(y)
        return np.stack(xs).astype(np.float32, copy=False), np.stack(ys)

    def _fg_location(self, i: int, rng: np.random.Generator, cls: Optional[int] = None) -> Optional[np.ndarray]:
        where = self._locations(i)
        present = [c for c in range(1, self.num_classes) if len(where.get(f"class{c}", ())) > 0]
        if cls is None:
            if not present:
                return None
            cls = present[int(rng.integers(len(present)))]
        loc = where.get(f"class{cls}")
        if loc is None or len(loc) == 0:
            return None
        return loc[int(rng.integers(len(loc)))]

    def _patch(self, i: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, target = self._volume(i)
        shape = target.shape
        kind = self.sampler["kind"]
        f = float(self.sampler.get("foreground_fraction", 0.0))
        uniform = np.array([int(rng.integers(0, s)) for s in shape])
        centre, exact = uniform, False
        if kind == "foreground" and rng.random() < f:
            loc = self._fg_location(i, rng)
            centre, exact = (uniform, False) if loc is None else (loc, True)
        elif kind == "class_balanced":
            present = [c for c in range(self.num_classes)
                       if c == 0 or len(self._locations(i).get(f"class{c}", ())) > 0]
            cls = present[int(rng.integers(len(present)))]
            if cls == 0:
                for _ in range(50):  # background dominates: a few draws find it
                    cand = np.array([int(rng.integers(0, s)) for s in shape])
                    if target[tuple(cand)] == 0:
                        break
                centre = cand
            else:
                centre = self._fg_location(i, rng, cls)
            exact = True
        elif kind == "slab":
            slices = self._locations(i)["slices"]
            z = int(slices[int(rng.integers(len(slices)))]) if len(slices) and rng.random() < f else int(uniform[0])
            centre = np.array([z, shape[1] // 2, shape[2] // 2])
        elif kind == "slice2d":
            loc = self._fg_location(i, rng) if rng.random() < f else None
            centre, exact = (uniform, False) if loc is None else (loc, True)
            jitter = [int(rng.integers(-(p // 4), p // 4 + 1)) for p in self.patch]
            centre = np.array([centre[0], centre[1] + jitter[0], centre[2] + jitter[1]])
        if self.spatial_dims == 2:
            z = int(np.clip(centre[0], 0, shape[0] - 1))
            start = start_for_centre(centre[1:], self.patch, shape[1:], exact)
            return (crop(np.asarray(image[:, z]), start, self.patch, self.pad_value),
                    crop(np.asarray(target[z]), start, self.patch, 0))
        start = start_for_centre(centre, self.patch, shape, exact)
        return crop(image, start, self.patch, self.pad_value), crop(target, start, self.patch, 0)


def is_hard_case(info: dict, low_contrast_hu: float = 30.0) -> bool:
    """Hard case of the ResUNet + 2.5D V-Net recipe: a cyst, or a tumor within ``low_contrast_hu`` of the kidney's mean HU."""
    if info.get("has_cyst"):
        return True
    k, t = info.get("kidney_mean_hu"), info.get("tumor_mean_hu")
    return k is not None and t is not None and abs(k - t) < low_contrast_hu


class BatchDataset:
    """Map-style dataset over ``keys`` = [(epoch, iteration)] for ``torch.utils.data.DataLoader(batch_size=None)``;
    item i is ``(x, y, iteration, source)``: the batch for ``keys[i]`` as tensors and which sampler made it.

    ``mix``: an optional second sampler whose batch replaces the first's with probability ``mix_fraction``
    (drawn per key from ``seed``, so the choice is reproducible and the same on every rank); ``source`` is 0 for
    ``sampler``, 1 for ``mix``."""

    def __init__(self, sampler: PatchSampler, keys: Sequence[tuple[int, int]], rank: int = 0,
                 mix: Optional[PatchSampler] = None, mix_fraction: float = 0.0, seed: int = 0):
        if mix is not None and not 0.0 < float(mix_fraction) < 1.0:
            raise ValueError(f"a mixed-in training source needs a fraction in (0, 1), got {mix_fraction}")
        self.sampler, self.keys, self.rank = sampler, list(keys), int(rank)
        self.mix, self.mix_fraction, self.seed = mix, float(mix_fraction), int(seed)

    def __len__(self) -> int:
        return len(self.keys)

    def source_of(self, epoch: int, iteration: int) -> int:
        """0 (the main sampler) or 1 (the mixed-in one) for the batch of ``(epoch, iteration)``."""
        if self.mix is None:
            return 0
        u = np.random.default_rng([self.seed, 7, int(epoch), int(iteration)]).random()
        return int(u < self.mix_fraction)

    def __getitem__(self, i: int):
        import torch

        epoch, iteration = self.keys[i]
        source = self.source_of(epoch, iteration)
        x, y = (self.mix if source else self.sampler).batch(epoch, iteration, self.rank)
        return torch.from_numpy(x), torch.from_numpy(y), int(iteration), source
