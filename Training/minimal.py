"""Minimal trainer of a two-stage (coarse-to-fine) VB-Net package on procedural phantoms.

This is the small, CPU-friendly recipe that produced the first bundled default model
(seed "multi-resolution VB-nets", Mu et al.): a coarse VB-Net localises the kidneys on the
whole volume at 6 mm, a fine VB-Net segments kidney / tumor / cyst inside each kidney's
volume of interest. It uses the library's own preprocessing
(:func:`KidneyTumorSegLib.pipeline.stage_input_channels`, :func:`stage_regions`), so the
networks see at training time exactly what inference feeds them, and exports a model
package the library loads unchanged.

    python -m Training.minimal --out runs/minimal --cases 24 --iterations 400

Choices (the paper is silent or the CPU forces them): fine spacing 2 mm instead of 1 mm;
patches 64^3 instead of 96^3; narrow widths (8..128 channels), instance norm; class-balanced crops; loss = cross-entropy +
the paper's generalized Dice; Adam 1e-3 with cosine decay; intensity augmentation (HU
shift/scale, noise) so the model does not learn the synthesizer's exact numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.labels import LABEL_VALUES
from KidneyTumorSegLib.manifest import ModelManifest
from KidneyTumorSegLib.models import save_package
from KidneyTumorSegLib.networks import build_network
from KidneyTumorSegLib.pipeline import AIR_HU, StageOutput, stage_input_channels, stage_regions

from .losses import generalized_dice_loss

logger = logging.getLogger(__name__)

# Instance norm: batches of 2 random crops give batch norm poor running statistics, and per-window
# normalisation is less sensitive to a scanner's (or the phantom's) overall intensity level.
VBNET_SMALL = {"features": [8, 16, 32, 64, 128], "down_blocks": [1, 1, 2, 2], "up_blocks": [2, 2, 1, 1], "norm": "instance"}


def default_manifest(name: str = "kidney-vbnet-phantom", fine_spacing: float = 2.0) -> dict:
    """The two-stage VB-Net manifest this script trains (weights sha256 filled in at export)."""
    window = {"kind": "window", "low": -200.0, "high": 500.0, "center": 150.0, "scale": 350.0}
    return {
        "schema_version": 1, "name": name, "version": "0.1.0",
        "description": "Two-stage VB-Net (Mu et al., KiTS19): 6 mm localisation, then kidney / tumor / cyst "
                       f"segmentation per kidney at {fine_spacing:g} mm. Trained on synthetic procedural phantoms.",
        "intended_use": "Demonstration and software testing only. Trained on synthetic phantoms, NOT on patient data: "
                        "not for clinical use, and not expected to be accurate on real CT.",
        "licence": "Apache-2.0",
        "labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
        "stages": [
            {"name": "coarse", "role": "localize", "classes": ["background", "kidney"],
             "network": {"name": "vbnet", "kwargs": dict(VBNET_SMALL)}, "weights": [{"file": "coarse.pt"}],
             "spacing_mm": [6.0, 6.0, 6.0], "normalization": window, "patch_size": [64, 64, 64], "overlap": 0.25,
             "batch_size": 2},
            {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor", "cyst"],
             "network": {"name": "vbnet", "kwargs": dict(VBNET_SMALL)}, "weights": [{"file": "fine.pt"}],
             "spacing_mm": [fine_spacing] * 3, "normalization": window, "patch_size": [64, 64, 64], "overlap": 0.5,
             "batch_size": 2,
             "region": {"kind": "components", "labels": ["kidney", "tumor", "cyst"], "margin_mm": 20.0,
                        "max_components": 2, "min_volume_ml": 2.0}},
        ],
        "postprocessing": {"keep_largest_kidneys": True, "max_kidney_components": 2, "min_component_fraction": 0.1,
                           "drop_detached_lesions": True, "cyst_intensity_rule": False, "fill_holes": True},
        "provenance": {},
    }


@dataclass
class Example:
    """One training volume of a stage: input channels [C, z, y, x] and class indices [z, y, x]."""

    image: np.ndarray
    target: np.ndarray


def stage_examples(manifest: ModelManifest, stage_name: str, ct: sitk.Image, labels: sitk.Image) -> list[Example]:
    """Preprocess one case for one stage exactly as inference does; regions come from the truth."""
    stage = manifest.stage(stage_name)
    spacing = geo.stage_spacing(ct, stage.spacing_mm)
    truth = StageOutput(labels)
    boxes = stage_regions(stage, ct, None if stage.region.kind == "whole" else truth, spacing)
    canonical, _, _ = geo.canonical_axes(ct.GetDirection())
    source = geo.shrink_for_spacing(ct, spacing)
    class_of_label = np.zeros(256, dtype=np.int64)
    for index, name in enumerate(stage.classes):
        class_of_label[LABEL_VALUES[name]] = index
    if "cyst" not in stage.classes:
        class_of_label[LABEL_VALUES["cyst"]] = stage.classes.index("kidney")
    if "tumor" not in stage.classes:
        class_of_label[LABEL_VALUES["tumor"]] = stage.classes.index("kidney")
    examples = []
    for box in boxes:
        grid = geo.grid_for_box(box, spacing, canonical)
        image = stage_input_channels(stage, manifest, source, grid, truth, {})
        target = sitk.GetArrayFromImage(geo.resample(labels, grid, sitk.sitkNearestNeighbor, 0))
        examples.append(Example(image, class_of_label[target]))
    return examples


def random_crop(example: Example, patch: tuple, rng: np.random.Generator, pad_value: float, foreground_bias: float = 0.67):
    """A ``patch`` (tensor order) crop, padded where the volume is smaller.

    With probability ``foreground_bias`` the crop is centred on a voxel of a foreground class
    drawn uniformly among those present (class-balanced: small tumors and cysts are seen as
    often as kidneys); otherwise anywhere.
    """
    img, tgt = example.image, example.target
    pads = [max(0, p - s) for p, s in zip(patch, tgt.shape)]
    if any(pads):
        widths = [(p // 2, p - p // 2) for p in pads]
        img = np.pad(img, [(0, 0)] + widths, constant_values=pad_value)
        tgt = np.pad(tgt, widths, constant_values=0)
    fg = np.empty((0, 3))
    if rng.random() < foreground_bias:
        present = [c for c in np.unique(tgt) if c > 0]
        if present:
            fg = np.argwhere(tgt == present[int(rng.integers(len(present)))])
    if len(fg):
        centre = fg[rng.integers(len(fg))]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, tgt.shape)]
    else:
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(patch, tgt.shape)]
    sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return img[(slice(None),) + sl], tgt[sl]


def augment_intensity(batch: torch.Tensor, rng: np.random.Generator, scale_hu: float) -> torch.Tensor:
    """Shift/scale the normalised image channel and add noise (robustness to the intensity model)."""
    b = batch.shape[0]
    shift = torch.tensor(rng.normal(0.0, 25.0 / scale_hu, b), dtype=torch.float32).view(b, 1, 1, 1, 1)
    gain = torch.tensor(rng.uniform(0.9, 1.1, b), dtype=torch.float32).view(b, 1, 1, 1, 1)
    noise = torch.randn_like(batch[:, :1]) * float(rng.uniform(0.0, 15.0 / scale_hu))
    out = batch.clone()
    out[:, :1] = batch[:, :1] * gain + shift + noise
    return out


def train_stage(manifest: ModelManifest, stage_name: str, examples: list[Example], iterations: int, seed: int,
                lr: float = 1e-3, log_every: int = 50) -> dict:
    """Train one stage's network on random crops of ``examples``; returns its state dict."""
    stage = manifest.stage(stage_name)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = build_network(stage.network.name, in_channels=manifest.network_in_channels(stage),
                        num_classes=len(stage.classes), **stage.network.kwargs)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations))
    patch = tuple(reversed(stage.patch_size))
    pad = stage.normalization.normalized_value(AIR_HU)
    batch_size = 2
    start, running = time.perf_counter(), None
    for it in range(1, iterations + 1):
        crops = [random_crop(examples[rng.integers(len(examples))], patch, rng, pad) for _ in range(batch_size)]
        x = torch.from_numpy(np.stack([c[0] for c in crops])).float()
        y = torch.from_numpy(np.stack([c[1] for c in crops])).long()
        x = augment_intensity(x, rng, stage.normalization.scale)
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + generalized_dice_loss(logits, y, include_background=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if it % log_every == 0 or it == iterations:
            logger.info("%s: iteration %d/%d loss %.4f (%.0f s)", stage_name, it, iterations, running, time.perf_counter() - start)
    net.eval()
    return copy.deepcopy(net.state_dict())


#: (size, spacing) of the training phantoms: ~400 mm fields of view at several resolutions, so the
#: networks see the texture that resampling from thin and thick slices produces.
PHANTOM_GRIDS = (((160, 160, 96), (2.5, 2.5, 3.0)), ((256, 256, 110), (1.5, 1.5, 2.5)), ((200, 200, 56), (2.0, 2.0, 5.0)))


def make_phantoms(n: int, seed: int):
    """``n`` procedural phantom cases (CT, labels) with varied kidneys, tumors, cysts and grids."""
    from .phantoms import procedural_phantom

    rng = np.random.default_rng(seed)
    layouts = ["both"] * 6 + ["left", "right", "horseshoe"]
    cases = []
    for i in range(n):
        kidneys = layouts[int(rng.integers(len(layouts)))]
        size, spacing = PHANTOM_GRIDS[i % len(PHANTOM_GRIDS)]
        cases.append(procedural_phantom(size, spacing, seed=seed * 1000 + i, kidneys=kidneys,
                                        tumors=int(rng.integers(0, 3)), cysts=int(rng.integers(0, 2)),
                                        cut_by_fov=bool(rng.random() < 0.1)))
    return cases


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Training.minimal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="model package folder to write")
    parser.add_argument("--cases", type=int, default=24, help="training phantoms (default 24)")
    parser.add_argument("--iterations", type=int, default=400, help="iterations of the fine stage (default 400)")
    parser.add_argument("--coarse-iterations", type=int, default=None,
                        help="iterations of the coarse stage (default: same as --iterations; it converges faster)")
    parser.add_argument("--fine-spacing", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    manifest_dict = default_manifest(fine_spacing=args.fine_spacing)
    manifest = ModelManifest.from_dict({**manifest_dict, "stages": [
        {**s, "weights": [{"file": w["file"], "sha256": "0" * 64} for w in s["weights"]]} for s in manifest_dict["stages"]]})
    t0 = time.perf_counter()
    cases = make_phantoms(args.cases, args.seed)
    logger.info("made %d phantoms in %.0f s", len(cases), time.perf_counter() - t0)
    states = {}
    for stage in manifest.stages:
        examples = [ex for ct, lab in cases for ex in stage_examples(manifest, stage.name, ct, lab)]
        logger.info("stage %s: %d training volumes", stage.name, len(examples))
        iterations = args.coarse_iterations if stage.role == "localize" and args.coarse_iterations else args.iterations
        states[stage.weights[0].file] = train_stage(manifest, stage.name, examples, iterations, args.seed)
    manifest_dict["provenance"] = {
        "recipe": "Training.minimal (two-stage VB-Net, CPU settings)",
        "data": f"{args.cases} procedural phantoms (Training.phantoms.procedural_phantom, seed {args.seed}, "
                f"grids {PHANTOM_GRIDS})",
        "trained_on": "synthetic procedural phantoms only",
        "commit": git_commit(),
        "command": "python -m Training.minimal " + " ".join(argv if argv is not None else sys.argv[1:]),
        "training_seconds": round(time.perf_counter() - t0, 1),
        "iterations": {"coarse": args.coarse_iterations or args.iterations, "fine": args.iterations},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    package = save_package(Path(args.out), manifest_dict, states, overwrite=args.overwrite)
    print(json.dumps({"package": str(package.root), "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
