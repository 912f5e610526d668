"""Registration-based augmentation ("Two-phase framework", seed 003, section 2.3).

The paper deforms training cases onto its hardest cases with NiftyReg; here SimpleITK does it:
a moments-based translation, then a B-spline transform (control points every ``mesh_mm``)
optimised with L-BFGS-B on the mean squared HU difference (HU clipped to [-200, 300] so bone and
air do not dominate), at two resolution levels. The moving CT and labels are resampled onto the
fixed (hard) case's grid: a new training case with the hard case's layout and the moving case's
anatomy details. Deterministic: metric sampling uses a fixed seed.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def _prepared(ct: sitk.Image) -> sitk.Image:
    return sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, -200.0, 300.0)


def deform_onto(moving_ct: sitk.Image, moving_labels: sitk.Image, fixed_ct: sitk.Image, mesh_mm: float = 80.0,
                iterations: int = 30, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """``(ct, labels)``: the moving case deformed onto ``fixed_ct``'s grid (ct with the moving CT's pixel
    type, air -1024 outside; labels uint8, nearest neighbour)."""
    fixed, moving = _prepared(fixed_ct), _prepared(moving_ct)
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    physical = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(p / mesh_mm))) for p in physical]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=int(iterations),
                             maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(iterations))
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetMovingInitialTransform(initial)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    transform = sitk.CompositeTransform([initial, bspline])
    ct = sitk.Resample(moving_ct, fixed_ct, transform, sitk.sitkLinear, -1024.0, moving_ct.GetPixelID())
    labels = sitk.Resample(moving_labels, fixed_ct, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return ct, labels
