"""Intensity normalisation of CT in Hounsfield units, as the seed papers describe.

All of them are "clip to [low, high], then (x - center) / scale":

* Liu (coarse to fine): window [-90, 310], center 110, scale 200.
* Mu (VB-Nets): [-200, 500] mapped to [-1, 1]: center 150, scale 350.
* Wei (two-phase): [-250, 250] (scaled to [-1, 1]: center 0, scale 250).
* Daza / nnU-Net CT: clip to the 0.5 / 99.5 percentiles of the training foreground,
  z-score with the foreground mean and standard deviation (the fingerprint's numbers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

KINDS = ("window", "ct_zscore")


@dataclass(frozen=True)
class IntensityNormalization:
    """Clip to [low, high] HU, then (x - center) / scale. ``kind`` records where the numbers come from."""

    kind: str
    low: float
    high: float
    center: float
    scale: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"normalization kind must be one of {KINDS}, got {self.kind!r}")
        if not self.high > self.low:
            raise ValueError(f"normalization needs high > low, got low={self.low}, high={self.high}")
        if not self.scale > 0:
            raise ValueError(f"normalization scale must be > 0, got {self.scale}")

    @classmethod
    def window(cls, low: float, high: float, center: float | None = None, scale: float | None = None):
        """A window; without center/scale it maps [low, high] to [-1, 1]."""
        c = (low + high) / 2.0 if center is None else center
        s = (high - low) / 2.0 if scale is None else scale
        return cls("window", float(low), float(high), float(c), float(s))

    @classmethod
    def ct_zscore(cls, p005: float, p995: float, mean: float, std: float):
        """nnU-Net's CT scheme from dataset foreground statistics (HU)."""
        return cls("ct_zscore", float(p005), float(p995), float(mean), float(std))

    @classmethod
    def from_dict(cls, d: dict) -> "IntensityNormalization":
        expected = {"kind", "low", "high", "center", "scale"}
        if set(d) != expected:
            raise ValueError(f"normalization needs exactly the keys {sorted(expected)}, got {sorted(d)}")
        return cls(str(d["kind"]), float(d["low"]), float(d["high"]), float(d["center"]), float(d["scale"]))

    def to_dict(self) -> dict:
        return asdict(self)

    def apply(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise an array of HU values; returns float32 (in ``out`` when given)."""
        if out is None:
            out = np.asarray(hu, dtype=np.float32).copy() if np.asarray(hu).dtype == np.float32 else np.asarray(hu, dtype=np.float32)
        else:
            out[...] = hu
        result = np.clip(out, self.low, self.high, out=out)
        result -= np.float32(self.center)
        result /= np.float32(self.scale)
        return result

    def normalized_value(self, hu: float) -> float:
        """The value one HU number maps to (e.g. the padding value for air)."""
        return (min(max(hu, self.low), self.high) - self.center) / self.scale
