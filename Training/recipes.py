"""Training recipes: one per seed paper, as data, plus ``phantom_fast`` for this CPU.

A recipe lists stages in inference order. Each stage has

* ``manifest``: the model-manifest stage entry it exports (without weights). Two entries may be
  left for the dataset to decide: a ``spacing_mm`` axis given as ``"median"`` or
  ``{"median_times": f}`` (the fingerprint's median spacing, times f), ``normalization`` given as
  ``"fingerprint"`` (nnU-Net's CT z-score from the fingerprint), and a fixed-box region's
  ``size_mm`` given as ``"patch"`` (patch_size x spacing);
* ``training``: patch (``(x, y, z)`` like the manifest; a 2.5D stage's z is 1), batch, epochs and
  iterations per epoch (an int, or ``"dataset"``: one pass over the training cases), sampler,
  augmentation, loss, optimizer, learning-rate schedule, checkpoints kept for ensembles;
  ``cyst_class: "if_present"`` adds a cyst class when the dataset has label 3;
* optional ``phases``: consecutive trainings of the same network (e.g. pre-training on 48^3
  patches, fine-tuning on 44^3 at another spacing), each overriding ``manifest`` / ``training``
  entries; the exported stage is the last phase's.

``smoke`` overrides (tiny patches and widths, coarse spacings, 2 epochs of 2 iterations) make
every recipe run end to end on this CPU; :func:`get_recipe` applies them with ``smoke=True``;
:func:`apply_overrides` applies ``--set stage.section.key=JSON`` overrides from the command line.
:func:`resolve` turns a recipe and a dataset fingerprint into concrete numbers, and
:func:`manifest_dict` into a model manifest.

Choices where a paper is silent are listed in each recipe's ``choices`` (and in
``Training/README.md``).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Mapping, Optional

from KidneyTumorSegLib.labels import LABEL_VALUES
from KidneyTumorSegLib.normalization import IntensityNormalization

from .licences import UNSPECIFIED


def _window(low, high, center=None, scale=None) -> dict:
    return IntensityNormalization.window(low, high, center, scale).to_dict()


_ADAM = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}


def _training(**kw) -> dict:
    base = {
        "patch_size": None, "batch_size": 2, "patches_per_case": 1, "epochs": 100, "iterations_per_epoch": 250,
        "sampler": {"kind": "foreground", "foreground_fraction": 0.33},
        "case_weights": None,
        "augmentation": {},
        "loss": {"terms": [{"name": "ce"}], "outputs": {"kind": "single"}},
        "optimizer": dict(_ADAM),
        "scheduler": {"name": "constant"},
        "keep_top_k": 1,
        "validation": {"every_epochs": 1, "max_cases": None},
        "cyst_class": "never",
        # a second training source mixed in by batch (train --mix-data CACHE): {"fraction", "augmentation"}
        "mix": None,
        # the forward pass's arithmetic: auto (fp16 on CUDA, fp32 elsewhere), fp32, bf16, fp16 (trainer.mixed_precision)
        "precision": "auto",
    }
    for k, v in kw.items():
        if k not in base:
            raise KeyError(f"unknown training key {k!r}")
        base[k] = v
    return base


_SMOKE_TRAIN = {"batch_size": 2, "patches_per_case": 1, "epochs": 2, "iterations_per_epoch": 2,
                "validation": {"every_epochs": 1, "max_cases": 1}}
_POST_TOP2 = {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.0,
              "drop_detached_lesions": False, "cyst_intensity_rule": False, "fill_holes": False}

#: smoke overrides shared by the two two-stage VB-Net recipes (vbnet_multires, phantom_fast);
#: get_recipe deep-copies, so sharing the dict is safe
_VBNET_SMOKE = {"stages": {
    stage: {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32, 64], "down_blocks": [1, 1, 1, 1],
                                                "up_blocks": [1, 1, 1, 1]}},
                         "spacing_mm": [spacing] * 3, "patch_size": [32, 32, 32]},
            "training": dict(_SMOKE_TRAIN, patch_size=[32, 32, 32])}
    for stage, spacing in (("coarse", 8.0), ("fine", 4.0))}}


RECIPES: dict[str, dict] = {}


def _register(recipe: dict) -> None:
    RECIPES[recipe["name"]] = recipe


# --- seed 000: Liu, coarse to fine -------------------------------------------------------------
_LIU_WINDOW = _window(-90, 310, 110, 200)
_LIU_TRAIN = dict(
    batch_size=2, epochs=700, iterations_per_epoch=250,
    sampler={"kind": "foreground", "foreground_fraction": 0.33},
    augmentation={"rotation_deg": [15, 15, 15], "rotation_probability": 0.2, "scale": [0.85, 1.25], "scale_probability": 0.2,
                  "elastic": {"probability": 0.2, "magnitude_mm": 6.0, "sigma_mm": 24.0},
                  "gamma": [0.7, 1.5], "gamma_probability": 0.3},
    loss={"terms": [{"name": "ce"}, {"name": "dice"}], "outputs": {"kind": "single"}},
    optimizer={"name": "adam", "lr": 3e-4, "weight_decay": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8},
    scheduler={"name": "ema_plateau", "factor": 0.2, "patience": 30, "ema_alpha": 0.93, "min_delta": 5e-4, "min_lr": 1e-6},
)
_register({
    "name": "liu_c2f",
    "seed": "000: S. Liu, Coarse to Fine Framework for Kidney Tumor Segmentation",
    "summary": "3D U-Net with SE-HDC and dual attention, coarse (1.62x1.62x3.21 mm) then per-kidney fine (0.78x0.78x3 mm) stage.",
    "stages": [
        {"manifest": {"name": "coarse", "role": "localize", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "unet3d_se_hdc_da", "kwargs": {}}, "spacing_mm": [1.62, 1.62, 3.21],
                      "normalization": _LIU_WINDOW, "patch_size": [160, 160, 80], "overlap": 0.5, "batch_size": 2},
         "training": _training(patch_size=[160, 160, 80], **_LIU_TRAIN)},
        {"manifest": {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "unet3d_se_hdc_da", "kwargs": {}}, "spacing_mm": [0.78, 0.78, 3.0],
                      "normalization": _LIU_WINDOW, "patch_size": [144, 144, 48], "overlap": 0.5, "batch_size": 2,
                      "region": {"kind": "components", "labels": ["kidney", "tumor"], "margin_mm": 20.0,
                                 "max_components": 2, "min_volume_ml": 1.0}},
         "training": _training(patch_size=[144, 144, 48], **_LIU_TRAIN)},
    ],
    "postprocessing": dict(_POST_TOP2),
    "reproduces": [
        "two resolutions: coarse 1.62x1.62x3.21 mm patch 160x160x80, fine per kidney VOI dilated 20 mm at 0.78x0.78x3.0 mm, patch 144x144x48",
        "network unet3d_se_hdc_da (SE-HDC dilations 1,2,5,1,2, dual attention), clip [-90, 310], (x-110)/200",
        "loss CE + Dice; augmentation elastic, scaling, rotation, gamma",
        "Adam lr 3e-4, weight decay 1e-5, batch 2; lr x0.2 when the EMA of the training loss has not improved for 30 epochs; "
        "stop below 1e-6 or after 700 epochs",
        "sliding window with half-patch overlap; keep the top-2 connected components",
    ],
    "leaves_out": [],
    "choices": [
        "250 iterations per epoch and foreground oversampling of 1/3 of the patches (nnU-Net 2019, which Liu builds on)",
        "EMA factor 0.93 and improvement threshold 5e-4 (nnU-Net 2019's values); Dice over foreground classes, batch Dice",
        "augmentation probabilities 0.2 (spatial) and 0.3 (gamma), rotation +-15 deg, scale 0.85-1.25, elastic 6 mm at 24 mm smoothness",
    ],
    "smoke": {"stages": {
        "coarse": {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32]}}, "spacing_mm": [8.0, 8.0, 8.0],
                                "patch_size": [32, 32, 16]},
                   "training": dict(_SMOKE_TRAIN, patch_size=[32, 32, 16])},
        "fine": {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32]}}, "spacing_mm": [4.0, 4.0, 4.0],
                              "patch_size": [32, 32, 16]},
                 "training": dict(_SMOKE_TRAIN, patch_size=[32, 32, 16])}}},
})


# --- seed 001: 3D ResUNet + 2.5D VNet ------------------------------------------------------------
_RV_WINDOW = _window(-100, 400)
_register({
    "name": "resunet_vnet25d",
    "seed": "001: 3D ResUNet + 2.5D VNet (KiTS19 submission)",
    "summary": "Deep-supervised 3D ResUNet for the kidneys at 2 mm slices / ~256^2 in-plane, then a 2.5D V-Net for tumors on the "
               "kidney-masked CT at 1 mm slices.",
    "stages": [
        {"manifest": {"name": "kidney", "role": "segment", "classes": ["background", "kidney"],
                      "network": {"name": "resunet3d_ds", "kwargs": {}},
                      "spacing_mm": [{"median_times": 2.0}, {"median_times": 2.0}, 2.0],
                      "normalization": _RV_WINDOW, "patch_size": [256, 256, 64], "overlap": 0.5, "batch_size": 1,
                      "window_margin": [0, 0, 16]},
         "training": _training(
             patch_size=[256, 256, 64], batch_size=2, epochs=500, iterations_per_epoch="dataset",
             sampler={"kind": "slab", "foreground_fraction": 0.8},
             augmentation={"mirror_axes": [0], "mirror_probability": 0.5},
             loss={"terms": [{"name": "dice"}],
                   "outputs": {"kind": "deep_supervision", "initial": 0.33, "factor": 0.8, "every_epochs": 15}},
             optimizer=dict(_ADAM, lr=1e-4), scheduler={"name": "constant"})},
        {"manifest": {"name": "tumor", "role": "overlay", "classes": ["background", "tumor"],
                      "network": {"name": "vnet25d_ms_se_ag", "kwargs": {}}, "spacing_mm": [None, None, 1.0],
                      "normalization": _RV_WINDOW, "patch_size": [256, 256, 8], "overlap": 0.25, "batch_size": 1,
                      "region": {"kind": "components", "labels": ["kidney", "tumor", "cyst"], "margin_mm": 10.0,
                                 "max_components": 2, "min_volume_ml": 1.0},
                      "inputs": {"mask_labels": ["kidney", "tumor", "cyst"], "mask_dilate_mm": 5.0, "mask_fill_hu": 0.0,
                                 "slices_as_channels": 5}},
         "training": _training(
             patch_size=[256, 256, 1], batch_size=16, epochs=200, iterations_per_epoch=250,
             sampler={"kind": "slice2d", "foreground_fraction": 1.0},
             case_weights={"hard_case_weight": 3.0, "low_contrast_hu": 30.0},
             augmentation={"rotation_deg": [0, 0, 15], "rotation_probability": 0.3, "scale": [0.9, 1.1], "scale_probability": 0.2,
                           "blur_sigma_voxels": [0.5, 1.0], "blur_probability": 0.2},
             loss={"terms": [{"name": "focal", "gamma": 2.0},
                             {"name": "weighted_dice", "class_weights": {"background": 0.2, "tumor": 1.0}}],
                   "outputs": {"kind": "single"}},
             optimizer=dict(_ADAM, lr=1e-4), scheduler={"name": "constant"})},
    ],
    "postprocessing": {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.1,
                       "drop_detached_lesions": True, "cyst_intensity_rule": False, "largest_tumor_only": True,
                       "fill_holes": False},
    "reproduces": [
        "kidney stage: resunet3d_ds at 2 mm slices and ~256^2 in-plane (2x the median in-plane spacing), 64-slice windows with "
        "stride 32, Dice loss with deep-supervision weight 0.33 x0.8 every 15 epochs, kidney-slice oversampling, "
        "left-right mirroring, 500 epochs",
        "tumor stage: vnet25d_ms_se_ag on the kidney-masked CT (outside the mask set to 0 HU, as multiplying by the mask does) "
        "at 1 mm slices and native in-plane spacing, only kidney slices, focal + weighted Dice, "
        "oversampling of hard cases (cysts or low-contrast tumors)",
        "rotation, translation (random crops), scaling and Gaussian blur augmentation of the tumor stage",
    ],
    "leaves_out": [
        "histogram equalisation augmentation",
        "full 512x512 slices for the tumor stage: it runs on the kidney regions (10 mm margin), 256x256 windows",
    ],
    "choices": [
        "intensity window [-100, 400] HU -> [-1, 1] for both stages (the paper gives no kidney-stage window; its '(40-50)' "
        "tumor normalisation is not reproducible as written)",
        "loss = L(main) + p * sum of the 3 auxiliary losses (the formula is missing from the paper's text)",
        "Adam 1e-4, constant; kidney batch 2 windows; kidney windows hold a kidney slice with probability 0.8 (paper: kidney "
        "slices repeated 50x); 5 slices as channels; mask dilated 5 mm; tumor stage 200 epochs x 250 iterations of 16 slices",
        "weighted Dice weights background 0.2, tumor 1.0; hard case = a cyst present or |kidney - tumor| mean HU < 30, drawn 3x as often",
    ],
    "smoke": {"stages": {
        "kidney": {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32]}}, "spacing_mm": [8.0, 8.0, 8.0],
                                "patch_size": [32, 32, 16], "window_margin": [0, 0, 4]},
                   "training": dict(_SMOKE_TRAIN, patch_size=[32, 32, 16])},
        "tumor": {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32, 64]}}, "spacing_mm": [4.0, 4.0, 4.0],
                               "patch_size": [32, 32, 4]},
                  "training": dict(_SMOKE_TRAIN, patch_size=[32, 32, 1], batch_size=4)}}},
})


# --- seed 002: Mu et al., multi-resolution VB-Nets ------------------------------------------------
_VB_WINDOW = _window(-200, 500)
_VB_TRAIN = dict(batch_size=2, epochs=300, iterations_per_epoch=250,
                 loss={"terms": [{"name": "generalized_dice"}], "outputs": {"kind": "single"}},
                 optimizer=dict(_ADAM, lr=1e-3), scheduler={"name": "cosine", "min_lr": 1e-6})
_register({
    "name": "vbnet_multires",
    "seed": "002: G. Mu et al., Segmentation of kidney tumor by multi-resolution VB-nets",
    "summary": "VB-Net at 6 mm localises the kidney VOI, a second VB-Net at 1 mm segments kidney, tumor (and cyst) in it.",
    "stages": [
        {"manifest": {"name": "coarse", "role": "localize", "classes": ["background", "kidney"],
                      "network": {"name": "vbnet", "kwargs": {}}, "spacing_mm": [6.0, 6.0, 6.0],
                      "normalization": _VB_WINDOW, "patch_size": [96, 96, 96], "overlap": 0.5, "batch_size": 2},
         "training": _training(patch_size=[96, 96, 96], sampler={"kind": "uniform"}, **_VB_TRAIN)},
        {"manifest": {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "vbnet", "kwargs": {}}, "spacing_mm": [1.0, 1.0, 1.0],
                      "normalization": _VB_WINDOW, "patch_size": [96, 96, 96], "overlap": 0.5, "batch_size": 2,
                      "region": {"kind": "components", "labels": ["kidney", "tumor", "cyst"], "margin_mm": 20.0,
                                 "max_components": 2, "min_volume_ml": 1.0}},
         "training": _training(patch_size=[96, 96, 96], sampler={"kind": "foreground", "foreground_fraction": 1.0},
                               cyst_class="if_present", **_VB_TRAIN)},
    ],
    "postprocessing": {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.1,
                       "drop_detached_lesions": True, "cyst_intensity_rule": False, "fill_holes": False},
    "reproduces": [
        "coarse VB-Net at 6 mm isotropic over the whole image, fine VB-Net at 1 mm isotropic in the kidney VOI",
        "clip [-200, 500] HU mapped to [-1, 1]; random 96^3 crops, coarse anywhere, fine centred inside the mask",
        "generalized Dice loss exactly as the paper's formula (foreground classes); cyst as an extra class when the labels have it",
        "largest connected components (per kidney)",
    ],
    "leaves_out": ["the doctor-annotated cyst labels of the paper (KiTS19 has none; phantoms with --cysts provide label 3)"],
    "choices": [
        "Adam 1e-3 with cosine decay to 1e-6 over 300 epochs of 250 iterations, batch 2, no augmentation (paper silent)",
        "VOI margin 20 mm around each kidney component",
        "CPU runs may coarsen the fine spacing: --set fine.manifest.spacing_mm=[2,2,2]",
    ],
    "smoke": _VBNET_SMOKE,
})


# --- seed 003: Wei et al., two-phase framework ------------------------------------------------------
_TP_WINDOW = _window(-250, 250)
_TP_OPT = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}
_register({
    "name": "two_phase_vnet",
    "seed": "003: H. Wei et al., Two-phase Framework for Automatic Kidney and Kidney Tumor Segmentation",
    "summary": "Coarse V-Net localises a fixed 384x240x80 ROI (3 mm slices); an enhanced two-stage V-Net segments it.",
    "stages": [
        {"manifest": {"name": "coarse", "role": "localize", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "vnet", "kwargs": {}}, "spacing_mm": [3.0, 3.0, 3.0],
                      "normalization": _TP_WINDOW, "patch_size": [128, 128, 64], "overlap": 0.5, "batch_size": 2},
         "training": _training(patch_size=[128, 128, 64], batch_size=2, epochs=600, iterations_per_epoch="dataset",
                               sampler={"kind": "foreground", "foreground_fraction": 0.5},
                               loss={"terms": [{"name": "ce"}], "outputs": {"kind": "single"}},
                               optimizer=dict(_TP_OPT), scheduler={"name": "step", "step_epochs": 200, "gamma": 0.5})},
        {"manifest": {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "vnet_two_stage", "kwargs": {}},
                      "spacing_mm": [{"median_times": 1.0}, {"median_times": 1.0}, 3.0],
                      "normalization": _TP_WINDOW, "patch_size": [384, 240, 80], "overlap": 0.5, "batch_size": 1,
                      "region": {"kind": "fixed_box", "labels": ["kidney", "tumor", "cyst"], "size_mm": "patch"}},
         "training": _training(patch_size=[384, 240, 80], batch_size=1, epochs=600, iterations_per_epoch="dataset",
                               sampler={"kind": "uniform"},
                               loss={"terms": [{"name": "ce"}], "outputs": {"kind": "sum", "weights": [1.0, 1.0]}},
                               optimizer=dict(_TP_OPT), scheduler={"name": "step", "step_epochs": 200, "gamma": 0.5},
                               keep_top_k=5)},
    ],
    "postprocessing": {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.1,
                       "drop_detached_lesions": False, "cyst_intensity_rule": True, "cyst_threshold_hu": 10.0,
                       "cyst_relabel_to": "kidney", "fill_holes": False},
    "registration_augmentation": {"worst_cases": 20, "partners": 10},
    "reproduces": [
        "3 mm slices, clip [-250, 250]; coarse V-Net, then a fixed 384x240x80 ROI (voxels at the median in-plane spacing "
        "and 3 mm) around the coarse kidney/tumor foreground",
        "vnet_two_stage (V-Net 2 gets the image and V-Net 1's softmax; decoder feature maps added), CE on both outputs",
        "Adam 1e-4 (betas 0.9/0.999, eps 1e-8), halved every 200 epochs, 600 epochs",
        "ensembles: the top-5 checkpoints by validation Dice (export --top-k 5) and folds (export --run A --run B ...)",
        "post-processing: top-2 components, tumor regions with mean HU < 10 relabelled as kidney (cyst rule)",
        "registration-based augmentation (optional): the worst training cases by Dice get 10 partners each deformed onto "
        "them with a SimpleITK B-spline registration (preprocess --register-worst CSV)",
    ],
    "leaves_out": ["NiftyReg (SimpleITK's B-spline registration stands in)",
                   "ensembles of different model types (only checkpoints and folds of this recipe)"],
    "choices": [
        "coarse stage at 3x3x3 mm with 128x128x64 patches, half of them centred on foreground (the paper says only 'down-sampled')",
        "an epoch = one pass over the training cases; the ROI stage trains on whole ROIs, batch 1",
    ],
    "smoke": {"stages": {
        "coarse": {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32, 64], "down_convs": [1, 1, 1, 1],
                                                       "up_convs": [1, 1, 1, 1], "kernel_size": 3}},
                                "spacing_mm": [8.0, 8.0, 8.0], "patch_size": [32, 32, 32]},
                   "training": dict(_SMOKE_TRAIN, patch_size=[32, 32, 32])},
        "fine": {"manifest": {"network": {"kwargs": {"features": [4, 8, 16, 32, 64], "down_convs": [1, 1, 1, 1],
                                                     "up_convs": [1, 1, 1, 1], "kernel_size": 3}},
                              "spacing_mm": [9.375, 11.71875, 7.5], "patch_size": [32, 16, 32],
                              "region": {"size_mm": [300.0, 187.5, 240.0]}},
                 "training": dict(_SMOKE_TRAIN, patch_size=[32, 16, 32], batch_size=1)}}},
})


# --- seed 004: Daza et al., 3D DeepLab v3+ ---------------------------------------------------------
_register({
    "name": "daza_deeplab",
    "seed": "004: L. Daza et al., Semantic Segmentation of Kidney Tumor using Convolutional Neural Networks",
    "summary": "One 3D DeepLab v3+ (< 560k parameters): pre-trained on 48^3 patches at the median spacing, fine-tuned on 44^3 "
               "patches at KiTS19's interpolated spacing.",
    "stages": [
        {"manifest": {"name": "segment", "role": "segment", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "deeplabv3plus3d", "kwargs": {}},
                      "spacing_mm": ["median", "median", "median"], "normalization": "fingerprint",
                      "patch_size": [48, 48, 48], "overlap": 0.5, "batch_size": 8, "window_margin": [4, 4, 4]},
         "training": _training(
             patch_size=[48, 48, 48], batch_size=39, patches_per_case=3, epochs=300, iterations_per_epoch="dataset",
             sampler={"kind": "class_balanced"},
             loss={"terms": [{"name": "tversky", "alpha": 0.3, "beta": 0.7}, {"name": "focal", "gamma": 2.0, "weight": 0.5}],
                   "outputs": {"kind": "single"}},
             optimizer=dict(_ADAM, lr=1e-3),
             scheduler={"name": "plateau", "factor": 0.1, "patience": 20, "min_lr": 1e-8, "min_delta": 0.0}),
         "phases": [
             {"epochs": 300},
             {"epochs": 100, "manifest": {"spacing_mm": [1.62, 1.62, 3.22], "patch_size": [44, 44, 44]},
              "training": {"patch_size": [44, 44, 44], "optimizer": dict(_ADAM, lr=1e-4)}},
         ]},
    ],
    "postprocessing": {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.1,
                       "drop_detached_lesions": True, "cyst_intensity_rule": False, "min_lesion_volume_ml": 0.1,
                       "fill_holes": True},
    "reproduces": [
        "median-spacing resampling; nnU-Net CT normalisation from the fingerprint (clip to the foreground 0.5/99.5 percentiles, "
        "z-score with the foreground mean and std)",
        "48^3 patches whose centre voxel is equally likely to be each class, batch 39 = 3 patches from each of 13 cases, "
        "then fine-tuning on 44^3 patches at KiTS19's interpolated spacing (1.62x1.62x3.22 mm)",
        "Tversky + 0.5 x focal (gamma 2); Adam 1e-3 x0.1 after 20 epochs without improvement of the training loss, "
        "stop below 1e-8 or after 300 epochs",
    ],
    "leaves_out": [
        "splitting scans of more than 200 slices: patches are read from memory-mapped volumes, so no split is needed",
    ],
    "choices": [
        "Tversky alpha 0.3 (false positives), beta 0.7 (false negatives) over kidney and tumor (the paper says it favours recall)",
        "the paper's 0.05 percentile read as nnU-Net's 0.5; fine-tuning 100 epochs with a fresh Adam at 1e-4",
        "the paper's unnamed component threshold: tumor/cyst components under 0.1 mL (a ~6 mm sphere) become kidney",
        "'outer voxels are discarded': 4 voxels per side of each 48^3 / 44^3 window (window_margin), cores averaged",
    ],
    "smoke": {"stages": {
        "segment": {"manifest": {"network": {"kwargs": {"aspp_width": 8, "decoder_width": 8}}, "patch_size": [16, 16, 16],
                                 "spacing_mm": [8.0, 8.0, 8.0], "window_margin": [2, 2, 2]},
                    "training": dict(_SMOKE_TRAIN, patch_size=[16, 16, 16], batch_size=4, patches_per_case=2),
                    "phases": [{"epochs": 1},
                               {"epochs": 1, "manifest": {"spacing_mm": [6.0, 6.0, 6.0], "patch_size": [12, 12, 12]},
                                "training": {"patch_size": [12, 12, 12], "optimizer": dict(_ADAM, lr=1e-4)}}]}}},
})


# --- phantom_fast: this CPU ------------------------------------------------------------------------------
_PF_NET = {"features": [8, 16, 32, 64, 128], "down_blocks": [1, 1, 2, 2], "up_blocks": [2, 2, 1, 1], "norm": "batch"}
_PF_TRAIN = dict(batch_size=2, epochs=20, iterations_per_epoch=40,
                 augmentation={"intensity_shift_hu": 25.0, "intensity_gain": [0.9, 1.1], "noise_hu": [0.0, 15.0],
                               "mirror_axes": [0], "mirror_probability": 0.5},
                 loss={"terms": [{"name": "ce"}, {"name": "generalized_dice", "include_background": True}],
                       "outputs": {"kind": "single"}},
                 optimizer=dict(_ADAM, lr=1e-3), scheduler={"name": "cosine", "min_lr": 1e-5},
                 validation={"every_epochs": 2, "max_cases": 4})
_register({
    "name": "phantom_fast",
    "seed": "002 (VB-Net two-stage), sized for a CPU",
    "summary": "Two-stage VB-Net (6 mm localisation, 2 mm per-kidney segmentation), narrow widths, 64^3 patches: a useful "
               "model on the KiTS19-label phantom dataset in well under an hour of CPU.",
    "stages": [
        {"manifest": {"name": "coarse", "role": "localize", "classes": ["background", "kidney"],
                      "network": {"name": "vbnet", "kwargs": dict(_PF_NET)}, "spacing_mm": [6.0, 6.0, 6.0],
                      "normalization": _VB_WINDOW, "patch_size": [64, 64, 64], "overlap": 0.25, "batch_size": 2},
         "training": _training(patch_size=[64, 64, 64], sampler={"kind": "foreground", "foreground_fraction": 0.5}, **_PF_TRAIN)},
        {"manifest": {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor"],
                      "network": {"name": "vbnet", "kwargs": dict(_PF_NET)}, "spacing_mm": [2.0, 2.0, 2.0],
                      "normalization": _VB_WINDOW, "patch_size": [64, 64, 64], "overlap": 0.5, "batch_size": 2,
                      "region": {"kind": "components", "labels": ["kidney", "tumor", "cyst"], "margin_mm": 20.0,
                                 "max_components": 2, "min_volume_ml": 2.0}},
         "training": _training(patch_size=[64, 64, 64], sampler={"kind": "foreground", "foreground_fraction": 0.7},
                               cyst_class="if_present", **_PF_TRAIN)},
    ],
    "postprocessing": {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.1,
                       "drop_detached_lesions": True, "cyst_intensity_rule": False, "fill_holes": True},
    "reproduces": ["the two-resolution VB-Net scheme of seed 002 at CPU size"],
    "leaves_out": ["1 mm fine spacing, 96^3 crops and full widths (CPU budget)"],
    "choices": ["CE + generalized Dice (with background), Adam 1e-3 cosine, intensity and mirror augmentation, 20 epochs x 40 "
                "iterations per stage; data: phantoms --downsample-inplane 4 --max-slices 96"],
    "smoke": _VBNET_SMOKE,
})

# --- phantom_default: the shipped default model ---------------------------------------------------------
#: robustness augmentation: other scanners' contrast timing and calibration (shift, gain), noisier
#: low-dose scans, thicker slices (low_resolution along z), smoother kernels (blur), small pose changes
_PD_AUGMENTATION = {"intensity_shift_hu": 40.0, "intensity_gain": [0.85, 1.15], "noise_hu": [0.0, 30.0],
                    "mirror_axes": [0], "mirror_probability": 0.5,
                    "low_resolution": {"probability": 0.3, "factor": [1.0, 2.5], "axes": [2]},
                    "blur_sigma_voxels": [0.3, 1.0], "blur_probability": 0.15,
                    "rotation_deg": [0, 0, 15], "rotation_probability": 0.2, "scale": [0.9, 1.1], "scale_probability": 0.2}
_PD_VALIDATION = {"every_epochs": 5, "max_cases": 6}
_register({
    "name": "phantom_default",
    "seed": "002 (VB-Net two-stage), sized for a CPU; the bundled default model",
    "summary": "phantom_fast's two-stage VB-Net trained longer, with tumor-centred (class-balanced) fine patches and "
               "intensity / noise / slice-thickness / pose augmentation for robustness.",
    "stages": [
        {"manifest": copy.deepcopy(RECIPES["phantom_fast"]["stages"][0]["manifest"]),
         "training": dict(copy.deepcopy(RECIPES["phantom_fast"]["stages"][0]["training"]), epochs=60,
                          augmentation=_PD_AUGMENTATION, validation=_PD_VALIDATION)},
        {"manifest": copy.deepcopy(RECIPES["phantom_fast"]["stages"][1]["manifest"]),
         "training": dict(copy.deepcopy(RECIPES["phantom_fast"]["stages"][1]["training"]), epochs=180,
                          sampler={"kind": "class_balanced"}, augmentation=_PD_AUGMENTATION, validation=_PD_VALIDATION)},
    ],
    "postprocessing": copy.deepcopy(RECIPES["phantom_fast"]["postprocessing"]),
    "reproduces": ["the two-resolution VB-Net scheme of seed 002 at CPU size"],
    "leaves_out": ["1 mm fine spacing, 96^3 crops and full widths (CPU budget)"],
    "choices": ["phantom_fast's networks and spacings; fine patches centred on background / kidney / tumor / cyst with equal "
                "probability (tumors are a few percent of the kidney box, so foreground sampling rarely centres one)",
                "augmentation for robustness: HU shift (sd 40) and gain 0.85-1.15, noise up to 30 HU, slices up to 2.5x "
                "thicker, blur, rotation about z +-15 deg, scale 0.9-1.1",
                "the shipped model continues a phantom_fast run (--init-from) with a shorter schedule; see Training/README.md"],
    "smoke": _VBNET_SMOKE,
})

# --- synth_default: domain-randomised training (SynthSeg style) ------------------------------------------
def _with_plausible_regions(manifest: dict) -> dict:
    m = copy.deepcopy(manifest)
    m["region"] = dict(m["region"], plausibility={"enabled": True})
    return m


#: the contrast is drawn per patch by the synthesizer (Training.synth); then pose, resolution, blur and noise
_SD_AUGMENTATION = {"synthesize": {"random_probability": 0.35, "texture_scale": 1.0, "bias_hu": 30.0,
                                   "lesion_contrast_hu": 25.0},
                    "noise_hu": [3.0, 40.0], "mirror_axes": [0], "mirror_probability": 0.5,
                    "low_resolution": {"probability": 0.35, "factor": [1.0, 3.0], "axes": [2]},
                    "blur_sigma_voxels": [0.3, 1.2], "blur_probability": 0.7,
                    "rotation_deg": [8, 8, 20], "rotation_probability": 0.4, "scale": [0.85, 1.2], "scale_probability": 0.4,
                    "elastic": {"probability": 0.2, "magnitude_mm": 6.0, "sigma_mm": 30.0},
                    "fov_cut": {"probability": 0.2, "max_fraction": 0.5, "axes": [2], "slab_probability": 0.4,
                                "slab_fraction": [0.2, 0.5]}}
#: the fine stage (2 mm) also sees large pixels: scans reconstructed or stored at 3-4 mm in-plane (the ds4 phantoms
#: and the bundled sample are 3.6 mm) were sharper than anything it had been shown
_SD_FINE_AUGMENTATION = dict(copy.deepcopy(_SD_AUGMENTATION), blur_sigma_voxels=[0.3, 1.5],
                             low_resolution={"probability": 0.45, "factor": [1.0, 3.0], "axes": [2],
                                             "inplane_factor": [1.0, 2.2]})
_register({
    "name": "synth_default",
    # a model for scans it has never seen: its kidney regions and final kidneys are checked for anatomical
    # plausibility (KidneyTumorSegLib/anatomy.py) whatever the network says
    "seed": "002 (VB-Net two-stage), sized for a CPU, trained on domain-randomised synthesis (SynthSeg style)",
    "summary": "phantom_default's two-stage VB-Net trained on tissue maps of real KiTS23 label maps whose contrast, texture, "
               "resolution and noise are drawn anew for every patch (Training/synth.py), so that it must rely on shape and "
               "context rather than on one synthesizer's intensities.",
    "stages": [
        {"manifest": copy.deepcopy(RECIPES["phantom_fast"]["stages"][0]["manifest"]),
         "training": dict(copy.deepcopy(RECIPES["phantom_fast"]["stages"][0]["training"]), epochs=120,
                          augmentation=_SD_AUGMENTATION, validation=None)},
        {"manifest": _with_plausible_regions(RECIPES["phantom_fast"]["stages"][1]["manifest"]),
         "training": dict(copy.deepcopy(RECIPES["phantom_fast"]["stages"][1]["training"]), epochs=240,
                          sampler={"kind": "class_balanced"}, augmentation=_SD_FINE_AUGMENTATION, validation=None)},
    ],
    # implausible fragments go by the plausibility rules, so no relative-size rule is needed (0.1 of a 1.5 L tumor
    # kidney would drop a normal contralateral kidney: KiTS23 cases 30 and 430)
    "postprocessing": dict(copy.deepcopy(RECIPES["phantom_fast"]["postprocessing"]), min_component_fraction=0.0,
                           plausibility={"enabled": True}),
    "reproduces": ["the two-resolution VB-Net scheme of seed 002 at CPU size"],
    "leaves_out": ["1 mm fine spacing, 96^3 crops and full widths (CPU budget)",
                   "validation during training (a tissue map has no fixed image; evaluate on the validation generator)"],
    "choices": ["data: `python -m Training synth-preprocess` tissue maps of KiTS23 label maps (2 random bodies per case); "
                "medulla as 7-13 pyramids from the sinus in 3/4 of maps, irregular blobs in the rest",
                "per patch: 35 % fully random tissue means in [-150, 450] HU (air, lung and gas stay dark), else one of four "
                "contrast phases' priors; tumors and cysts at least 25 HU from each parenchyma mean (visible); texture and a "
                "30 HU bias field; then noise 3-40 HU, slices up to 3x thicker (fine stage: and pixels up to 2.2x larger), "
                "blur, "
                "rotation, scale, elastic deformation, left-right mirroring, and in 20 % of patches a scan that ends "
                "inside the patch (fov_cut along z; 2 in 5 of them a short scan, both ends cut, 20-50 % of the patch left)",
                "final weights exported (no validation during training)",
                "plausibility rules on for the fine stage's regions and the final kidneys; no relative-size rule"],
    "smoke": _VBNET_SMOKE,
})

# --- synth_mixed: domain randomisation with rendered phantoms mixed in -------------------------------------
#: the mixed-in phantom batches get the shipped phantom model's robustness augmentation, and short scans too
_SM_PHANTOM_AUGMENTATION = dict(_PD_AUGMENTATION, fov_cut={"probability": 0.15, "max_fraction": 0.5, "axes": [2]})


def _mixed(stage: dict, fraction: float) -> dict:
    s = copy.deepcopy(stage)
    s["training"]["mix"] = {"fraction": fraction, "augmentation": copy.deepcopy(_SM_PHANTOM_AUGMENTATION)}
    return s


_register({
    "name": "synth_mixed",
    "seed": "002 (VB-Net two-stage), sized for a CPU, trained on domain-randomised synthesis with rendered phantoms mixed in",
    "summary": "synth_default with a share of each stage's batches drawn from rendered phantom CT (train --mix-data): "
               "randomised contrast keeps the network off any one intensity model, while the rendered batches show it "
               "complete, textured scans in which a tumor can look like medulla and must be told apart by its shape.",
    "stages": [_mixed(RECIPES["synth_default"]["stages"][0], 0.25), _mixed(RECIPES["synth_default"]["stages"][1], 0.4)],
    "postprocessing": copy.deepcopy(RECIPES["synth_default"]["postprocessing"]),
    "reproduces": ["the two-resolution VB-Net scheme of seed 002 at CPU size"],
    "leaves_out": list(RECIPES["synth_default"]["leaves_out"]),
    "choices": list(RECIPES["synth_default"]["choices"]) + [
        "--mix-data: a preprocess cache of rendered phantoms (python -m Training phantoms, KiTS19 label maps of the "
        "training patients); 25 % of coarse and 40 % of fine batches come from it, with phantom_default's intensity, "
        "noise, resolution and pose augmentation plus short scans (fov_cut)",
        "why: with lesions always >= 25 HU from the parenchyma (synthesis), the network over-called darker "
        "parenchyma as tumor on rendered phantoms, where tumor and medulla can share intensities"],
    "smoke": _VBNET_SMOKE,
})

# --- synth_context: domain randomisation that names the surroundings --------------------------------------
#: what the real scans' false kidneys and lesions were: the liver over the right kidney, the colon beside the left,
#: the spleen's mirror image of the liver
SYNTH_CONTEXT_CLASSES = ["liver", "spleen", "bowel"]


def _with_context(stage: dict) -> dict:
    s = copy.deepcopy(stage)
    s["manifest"]["context_classes"] = list(SYNTH_CONTEXT_CLASSES)
    return s


_register({
    "name": "synth_context",
    "seed": "002 (VB-Net two-stage), sized for a CPU, trained on domain-randomised synthesis that labels the "
            "surrounding organs too (SynthSeg style)",
    "summary": "synth_default whose networks are also taught to name the liver, spleen and bowel of the synthetic "
               "anatomy (context classes, added to background at inference): with one background class, a "
               "network only learns 'kidney or not', and on real CT it took the liver beside the right kidney for "
               "tumor and the colon for kidney; naming them makes it learn what they look like.",
    "stages": [_with_context(RECIPES["synth_default"]["stages"][0]), _with_context(RECIPES["synth_default"]["stages"][1])],
    "postprocessing": copy.deepcopy(RECIPES["synth_default"]["postprocessing"]),
    "reproduces": ["the two-resolution VB-Net scheme of seed 002 at CPU size",
                   "SynthSeg's (Billot et al., MedIA 2023) segmentation of every synthetic structure, reduced to the "
                   "organs that were mistaken for kidney"],
    "leaves_out": list(RECIPES["synth_default"]["leaves_out"]),
    "choices": list(RECIPES["synth_default"]["choices"]) + [
        "context classes liver, spleen, bowel (wall, content and gas) from the tissue map; focal liver / spleen "
        "masses stay background; loss (CE + generalized Dice) over all classes",
        "--init-from a network without context classes: its output rows for background are copied to the context "
        "classes with the log-share bias correction, so training starts from exactly the old predictions"],
    "smoke": _VBNET_SMOKE,
})

#: the issue's name for the Daza recipe
ALIASES = {"deeplab3d": "daza_deeplab"}
SEED_RECIPES = ("liu_c2f", "resunet_vnet25d", "vbnet_multires", "two_phase_vnet", "daza_deeplab")


def names() -> list[str]:
    """Recipe names, seeds first."""
    return list(SEED_RECIPES) + [n for n in RECIPES if n not in SEED_RECIPES]


def deep_merge(base: Any, override: Any) -> Any:
    """``override`` merged into a copy of ``base``: dicts merge key by key, anything else replaces."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        out = {k: copy.deepcopy(v) for k, v in base.items()}
        for k, v in override.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def _apply_stage_overrides(recipe: dict, per_stage: Mapping) -> dict:
    known = [s["manifest"]["name"] for s in recipe["stages"]]
    for name in per_stage:
        if name not in known:
            raise ValueError(f"recipe {recipe['name']!r} has no stage {name!r}; stages: {', '.join(known)}")
    for stage in recipe["stages"]:
        o = per_stage.get(stage["manifest"]["name"])
        if not o:
            continue
        for section in ("manifest", "training"):
            if section in o:
                stage[section] = deep_merge(stage[section], o[section])
        if "phases" in o:
            stage["phases"] = copy.deepcopy(o["phases"])
    return recipe


def get_recipe(name: str, smoke: bool = False) -> dict:
    """A deep copy of recipe ``name`` (with its smoke overrides applied when ``smoke``)."""
    from KidneyTumorSegLib.errors import InputError

    name = ALIASES.get(name, name)
    if name not in RECIPES:
        raise InputError(f"unknown recipe {name!r}; available: {', '.join(names())}")
    recipe = copy.deepcopy(RECIPES[name])
    recipe["smoke_applied"] = bool(smoke)
    if smoke:
        _apply_stage_overrides(recipe, recipe["smoke"]["stages"])
    return recipe


def apply_overrides(recipe: dict, assignments: list[str]) -> dict:
    """Apply ``STAGE.SECTION.KEY[.KEY...]=JSON`` assignments (e.g. ``fine.manifest.spacing_mm=[2,2,2]``,
    ``coarse.training.epochs=5``); SECTION is manifest or training. ``STAGE.phases=JSON`` replaces the
    stage's list of phases (``[]``: one phase of ``training.epochs``). Returns the recipe."""
    from KidneyTumorSegLib.errors import InputError

    for text in assignments or []:
        path, sep, value = text.partition("=")
        keys = path.strip().split(".")
        phases = sep and len(keys) == 2 and keys[1] == "phases"
        if not phases and (not sep or len(keys) < 3 or keys[1] not in ("manifest", "training")):
            raise InputError(f"--set expects STAGE.manifest|training.KEY=JSON or STAGE.phases=JSON, got {text!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if phases:
            if not isinstance(parsed, list) or not all(isinstance(p, dict) and "epochs" in p for p in parsed):
                raise InputError(f"{keys[0]}.phases must be a JSON list of {{\"epochs\": N, ...}} objects, got {value!r}")
            try:
                _apply_stage_overrides(recipe, {keys[0]: {"phases": parsed}})
            except ValueError as exc:
                raise InputError(str(exc)) from None
            recipe.setdefault("overrides", []).append(text)
            continue
        nested: Any = parsed
        for key in reversed(keys[2:]):
            nested = {key: nested}
        try:
            _apply_stage_overrides(recipe, {keys[0]: {keys[1]: nested}})
        except ValueError as exc:
            raise InputError(str(exc)) from None
        recipe.setdefault("overrides", []).append(text)
    return recipe


# --- resolution against a dataset ------------------------------------------------------------------------
def _resolve_spacing(spacing, fingerprint: Optional[Mapping]) -> list:
    out = []
    for axis, entry in enumerate(spacing):
        if entry is None or isinstance(entry, (int, float)):
            out.append(None if entry is None else float(entry))
            continue
        factor = 1.0 if entry == "median" else float(entry.get("median_times", 0)) if isinstance(entry, Mapping) else 0
        if factor <= 0:
            raise ValueError(f"spacing entry must be a number, null, 'median' or {{'median_times': f}}, got {entry!r}")
        if fingerprint is None:
            raise ValueError("this recipe's spacing depends on the dataset: compute a fingerprint first")
        out.append(round(float(fingerprint["median_spacing"][axis]) * factor, 4))
    return out


def _resolve_normalization(norm, fingerprint: Optional[Mapping]) -> dict:
    if norm != "fingerprint":
        return IntensityNormalization.from_dict(norm).to_dict()
    if fingerprint is None or not fingerprint.get("foreground_intensity"):
        raise ValueError("this recipe normalises with the dataset's foreground statistics: compute a fingerprint first")
    fi = fingerprint["foreground_intensity"]
    return IntensityNormalization.ct_zscore(fi["percentile_00_5"], fi["percentile_99_5"], fi["mean"], max(fi["std"], 1e-3)).to_dict()


def _resolve_manifest(stage: dict, fingerprint, has_cyst: bool, cyst_class: str) -> dict:
    m = copy.deepcopy(stage)
    m["spacing_mm"] = _resolve_spacing(m["spacing_mm"], fingerprint)
    m["normalization"] = _resolve_normalization(m["normalization"], fingerprint)
    if cyst_class == "if_present" and has_cyst and "cyst" not in m["classes"]:
        m["classes"] = list(m["classes"]) + ["cyst"]
    region = m.get("region")
    if region and region.get("size_mm") == "patch":
        if any(s is None for s in m["spacing_mm"]):
            raise ValueError(f"stage {m['name']!r}: a fixed box sized by the patch needs a fixed spacing")
        region["size_mm"] = [float(p) * float(s) for p, s in zip(m["patch_size"], m["spacing_mm"])]
    return m


def resolve(recipe: dict, fingerprint: Optional[Mapping]) -> dict:
    """Concrete recipe for a dataset: every stage as a list of phases, each with a full manifest stage
    entry (numbers resolved from ``fingerprint``) and full training settings."""
    has_cyst = bool(fingerprint and fingerprint.get("has_cyst"))
    stages = []
    for stage in recipe["stages"]:
        training = stage["training"]
        cyst_class = training.get("cyst_class", "never")
        phases_spec = stage.get("phases") or [{"epochs": training["epochs"]}]
        phases = []
        for spec in phases_spec:
            manifest = deep_merge(stage["manifest"], spec.get("manifest", {}))
            train = deep_merge(training, spec.get("training", {}))
            train["epochs"] = int(spec.get("epochs", train["epochs"]))
            phases.append({"epochs": train["epochs"], "manifest": _resolve_manifest(manifest, fingerprint, has_cyst, cyst_class),
                           "training": train})
        stages.append({"name": stage["manifest"]["name"], "phases": phases})
    classes = {c for s in stages for p in s["phases"] for c in p["manifest"]["classes"]}
    labels = {"background": 0, "kidney": 1, "tumor": 2}
    if "cyst" in classes:
        labels["cyst"] = LABEL_VALUES["cyst"]
    return {
        "name": recipe["name"], "seed": recipe["seed"], "summary": recipe["summary"], "smoke": recipe.get("smoke_applied", False),
        "overrides": list(recipe.get("overrides", [])), "labels": labels, "postprocessing": copy.deepcopy(recipe["postprocessing"]),
        "registration_augmentation": copy.deepcopy(recipe.get("registration_augmentation")),
        "stages": stages, "reproduces": list(recipe["reproduces"]), "leaves_out": list(recipe["leaves_out"]),
        "choices": list(recipe.get("choices", [])),
    }


def final_stage_manifest(resolved_stage: dict) -> dict:
    """The manifest entry a resolved stage exports: its last phase's. Unless the recipe sets them,
    test-time mirroring uses only the axes the network was trained mirrored on (a network that never
    saw a head-foot flip must not be asked to segment one)."""
    last = resolved_stage["phases"][-1]
    m = copy.deepcopy(last["manifest"])
    if "tta_mirror_axes" not in m:
        aug = last["training"].get("augmentation") or {}
        mirrored = float(aug.get("mirror_probability", 0.5)) > 0
        m["tta_mirror_axes"] = sorted(int(a) for a in aug.get("mirror_axes", [])) if mirrored else []
    return m


def manifest_dict(resolved: dict, weights: Mapping[str, list], name: Optional[str] = None, version: str = "0.1.0",
                  description: Optional[str] = None, intended_use: Optional[str] = None, provenance: Optional[dict] = None,
                  licence: Optional[str] = None) -> dict:
    """A model manifest (dict) for a resolved recipe; ``weights[stage name]`` lists the stage's weights files
    (``{"file": ..., "sha256": ...}``, sha256 optional before :func:`KidneyTumorSegLib.models.save_package`);
    ``licence`` is the weights' licence (:mod:`Training.licences`; unspecified when not given)."""
    stages = []
    for stage in resolved["stages"]:
        m = final_stage_manifest(stage)
        m["weights"] = [dict(w) for w in weights[stage["name"]]]
        stages.append(m)
    return {
        "schema_version": 1,
        "name": name or f"kidney-{resolved['name'].replace('_', '-')}",
        "version": version,
        "description": description or f"{resolved['summary']} Recipe {resolved['name']} (seed {resolved['seed']}).",
        "intended_use": intended_use or "Research use only; not a medical device.",
        "licence": licence or UNSPECIFIED,
        "labels": dict(resolved["labels"]),
        "stages": stages,
        "postprocessing": dict(resolved["postprocessing"]),
        "provenance": dict(provenance or {}),
    }
