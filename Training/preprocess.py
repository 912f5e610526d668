"""Preprocessing cache: every case resampled to each stage's working grid, as memory-mapped .npy files.

A stage's training volumes are made by the library's own inference preprocessing
(:func:`KidneyTumorSegLib.stages.stage_regions` and :func:`stage_input_channels`), with the
regions taken from the truth instead of a previous stage's prediction: a ``whole`` stage gets the
full volume, a ``components`` stage one volume per kidney box (grown by the manifest's margin),
a ``fixed_box`` stage the box centred on the truth's foreground, and a masked stage
(``mask_labels``) the CT masked with the truth. So networks see exactly what inference feeds them.

A cascade stage (``inputs.prior_from``) also gets its localize stage's class probabilities as channels; training
has no trained localize network, so they are made from the truth too (:func:`truth_prior`): the one-hot of the
truth over the *prior* stage's classes on the prior stage's own grid (whole image at its spacing, where inference
computes them), smoothed by a Gaussian of :data:`PRIOR_SIGMA_VOXELS` of its voxels, then resampled onto the stage's
grid by :func:`stage_input_channels` as inference resamples the real probabilities.

Layout of a cache folder::

    cache.json                    dataset path, fingerprint, cases, one entry per input spec
    <stage>-<hash>/index.json     the spec and one record per volume (case, region, shape, class voxels)
    <stage>-<hash>/case_00012_r0_image.npy    float32 [C, z, y, x] (normalised network input)
    <stage>-<hash>/case_00012_r0_target.npy   uint8 [z, y, x] class indices of the stage's classes
    <stage>-<hash>/case_00012_r0_where.npz    foreground voxel coordinates per class (<= 20 000 each) and
                                              the indices of slices holding foreground

The spec hash covers everything that changes the volumes (spacing, normalisation, region,
inputs, classes, patch; for a cascade stage also its prior stage's classes and spacing and the
smoothing), so recipes and phases share folders when they can and a changed recipe
never reads stale data. Labels the stage does not predict fold into the next class it has
(cyst -> kidney -> background, tumor -> kidney -> background).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from KidneyTumorSegLib import geometry as geo
from KidneyTumorSegLib.errors import InputError, OutputError
from KidneyTumorSegLib.labels import LABEL_VALUES
from KidneyTumorSegLib.manifest import PLACEHOLDER_WEIGHTS, ModelManifest, StageSpec
from KidneyTumorSegLib.stages import StageOutput, stage_input_channels, stage_regions

from .dataset import Case, case_name, list_cases, read_case, refuse_validation_only
from .fingerprint import compute_fingerprint

logger = logging.getLogger(__name__)

CACHE_JSON = "cache.json"
INDEX_JSON = "index.json"
MAX_LOCATIONS = 20_000
_FALLBACK = {"cyst": "kidney", "tumor": "kidney", "kidney": "background"}
_SPEC_KEYS = ("classes", "spacing_mm", "normalization", "patch_size", "region", "inputs")
#: sigma (in voxels of the prior stage's grid, per axis) of the Gaussian that softens the truth's one-hot prior channels.
#: Inference feeds a localize network's softmax, which ramps over about a voxel at every edge; a hard one-hot would teach
#: the cascade a step it never sees. One voxel is that ramp; it does not imitate the localize stage's mistakes.
PRIOR_SIGMA_VOXELS = 1.0


def class_lookup(classes: Sequence[str]) -> np.ndarray:
    """uint8 lookup label value -> class index of ``classes`` (unknown labels fold as the module says)."""
    table = np.zeros(256, dtype=np.uint8)
    for name, value in LABEL_VALUES.items():
        target = name
        while target not in classes:
            target = _FALLBACK.get(target, "background")
        table[value] = classes.index(target)
    return table


def prior_manifest(stage_manifest: dict, earlier: Sequence[dict] = ()) -> Optional[dict]:
    """The manifest entry of the stage whose probabilities ``stage_manifest`` takes (``inputs.prior_from``): the last
    entry of that name in ``earlier`` (the entries before it, in recipe order: its last phase); None for no cascade."""
    name = (stage_manifest.get("inputs") or {}).get("prior_from")
    if not name:
        return None
    found = [m for m in earlier if m.get("name") == name]
    if not found:
        raise InputError(f"stage {stage_manifest['name']!r} takes the probabilities of stage {name!r} (prior_from), which is "
                         f"not among the stages before it ({', '.join(dict.fromkeys(m['name'] for m in earlier)) or 'none'})")
    return found[-1]


def input_spec(stage_manifest: dict, earlier: Sequence[dict] = ()) -> dict:
    """The part of a manifest stage entry that determines its training volumes; ``earlier``: the entries before it
    (only a cascade stage reads them: its prior channels depend on the prior stage's classes and spacing)."""
    spec = {k: stage_manifest.get(k) for k in _SPEC_KEYS}
    spec["region"] = _training_region(spec["region"])
    prior = prior_manifest(stage_manifest, earlier)
    if prior is not None:  # only then: the keys of every other stage's folders stay what they were
        spec["prior"] = {"classes": prior.get("classes"), "spacing_mm": prior.get("spacing_mm"),
                         "sigma_voxels": PRIOR_SIGMA_VOXELS}
    return spec


def spec_key(stage_manifest: dict, earlier: Sequence[dict] = ()) -> str:
    """Folder name ``<stage>-<10 hex digits of the spec's sha1>`` (``earlier``: see :func:`input_spec`)."""
    text = json.dumps(input_spec(stage_manifest, earlier), sort_keys=True)
    return f"{stage_manifest['name']}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


#: region keys that only judge a model's output at inference; training regions come from the truth, so they neither
#: apply there nor change a cache's volumes
_INFERENCE_ONLY_REGION_KEYS = ("plausibility",)


def _training_region(region: Optional[dict]) -> Optional[dict]:
    if not region:
        return region
    return {k: v for k, v in region.items() if k not in _INFERENCE_ONLY_REGION_KEYS}


def _stage_and_manifest(stage_manifest: dict, prior: Optional[dict] = None) -> tuple[StageSpec, ModelManifest]:
    """The stage as the library reads it, in a manifest where it may use a region and a mask: after ``prior`` (its
    prior_from stage's entry) for a cascade, else after a stand-in whole-volume stage."""
    entry = dict(stage_manifest)
    if entry.get("region"):
        entry["region"] = _training_region(entry["region"])  # the truth's kidneys are never judged implausible
    entry["weights"] = [dict(w) for w in PLACEHOLDER_WEIGHTS]
    if entry.get("inputs", {}).get("prior_from"):
        if prior is None or prior.get("name") != entry["inputs"]["prior_from"]:
            raise InputError(f"stage {entry['name']!r} takes the probabilities of stage {entry['inputs']['prior_from']!r} "
                             f"(prior_from): give that stage's manifest entry, got {prior and prior.get('name')!r}")
        first = dict(prior, weights=[dict(w) for w in PLACEHOLDER_WEIGHTS])
    else:
        first = dict(entry, region={"kind": "whole"}, name="_first", role="segment",
                     inputs={k: v for k, v in entry.get("inputs", {}).items() if k == "slices_as_channels"})
    labels = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    manifest = ModelManifest.from_dict({"schema_version": 1, "name": "cache", "version": "0", "description": "", "intended_use": "",
                                        "licence": "", "labels": labels, "stages": [first, entry]})
    return manifest.stage(entry["name"]), manifest


def truth_prior(prior: StageSpec, ct: sitk.Image, labels: sitk.Image,
                sigma_voxels: float = PRIOR_SIGMA_VOXELS) -> StageOutput:
    """What localize stage ``prior`` would hand a cascade, made from the truth: on the prior stage's whole-image grid
    (its spacing, canonical axes, as inference runs it) the truth resampled by nearest neighbour (as that stage's
    training targets are), as the one-hot over ``prior.classes`` (labels it lacks fold as :func:`class_lookup` says:
    kidney = every non-background label for [background, kidney]), each channel smoothed by a Gaussian of
    ``sigma_voxels`` voxels per axis (zero-flux borders, so the channels still sum to 1). Probabilities: a vector
    image float32 (K components); labels: their argmax as label values."""
    spacing = geo.stage_spacing(ct, prior.spacing_mm)
    box, = stage_regions(prior, ct, None, spacing)
    canonical, _, _ = geo.canonical_axes(ct.GetDirection())
    grid = geo.grid_for_box(box, spacing, canonical)
    classes = class_lookup(list(prior.classes))[
        sitk.GetArrayFromImage(geo.resample(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))]
    channels = []
    for c in range(len(prior.classes)):
        one = geo.array_to_image((classes == c).astype(np.float32), grid)
        if sigma_voxels > 0:
            # variance in mm^2 (image spacing on); kernel tails cut below 1e-4 of its mass, at most 32 voxels wide
            one = sitk.DiscreteGaussian(one, [(sigma_voxels * s) ** 2 for s in spacing], 32, 1e-4, True)
        channels.append(sitk.GetArrayFromImage(one))
    probs = np.stack(channels, axis=-1).astype(np.float32)
    values = np.asarray([LABEL_VALUES[c] for c in prior.classes], dtype=np.uint8)
    return StageOutput(geo.array_to_image(values[np.argmax(probs, axis=-1)], grid),
                       geo.array_to_image(probs, grid, is_vector=True))


def stage_volumes(stage_manifest: dict, ct: sitk.Image, labels: sitk.Image,
                  earlier: Sequence[dict] = ()) -> list[tuple[np.ndarray, np.ndarray]]:
    """Training volumes of one case for one stage: ``[(image float32 [C, z, y, x], target uint8 [z, y, x])]``,
    one per region, computed exactly as inference computes its input (regions from the truth). ``earlier``: the
    manifest entries before this one (a cascade stage's prior stage is found there; its channels: :func:`truth_prior`)."""
    prior = prior_manifest(stage_manifest, earlier)
    stage, manifest = _stage_and_manifest(stage_manifest, prior)
    outputs = {} if prior is None else {prior["name"]: truth_prior(manifest.stage(prior["name"]), ct, labels)}
    spacing = geo.stage_spacing(ct, stage.spacing_mm)
    truth = StageOutput(labels)
    boxes = stage_regions(stage, ct, truth if stage.region.kind != "whole" else None, spacing)
    canonical, _, _ = geo.canonical_axes(ct.GetDirection())
    source = geo.shrink_for_spacing(ct, spacing)
    lookup = class_lookup(list(stage.classes))
    out = []
    for box in boxes:
        grid = geo.grid_for_box(box, spacing, canonical)
        image = stage_input_channels(stage, manifest, source, grid, truth, outputs)
        target = sitk.GetArrayFromImage(geo.resample(labels, grid, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
        out.append((image, lookup[target]))
    return out


def _where(target: np.ndarray, num_classes: int, rng: np.random.Generator) -> dict:
    arrays = {"slices": np.nonzero(np.any(target > 0, axis=(1, 2)))[0].astype(np.int32)}
    for c in range(1, num_classes):
        loc = np.argwhere(target == c).astype(np.int32)
        if len(loc) > MAX_LOCATIONS:
            loc = loc[np.sort(rng.choice(len(loc), MAX_LOCATIONS, replace=False))]
        arrays[f"class{c}"] = loc
    return arrays


def _case_info(ct: sitk.Image, labels: sitk.Image) -> dict:
    hu = sitk.GetArrayViewFromImage(ct)
    lab = sitk.GetArrayViewFromImage(labels)
    info = {"has_cyst": bool((lab == 3).any())}
    for name, value in (("kidney", 1), ("tumor", 2)):
        m = lab == value
        info[f"{name}_mean_hu"] = float(hu[m].mean()) if m.any() else None
    return info


@dataclass
class SpecFolder:
    """One input spec's folder: its index (spec + volume records), read and written as JSON."""

    path: Path

    def index(self) -> dict:
        p = self.path / INDEX_JSON
        return json.loads(p.read_text()) if p.is_file() else {}

    def write_index(self, index: dict) -> None:
        tmp = self.path / f".{INDEX_JSON}.tmp"
        tmp.write_text(json.dumps(index, indent=1) + "\n")
        tmp.replace(self.path / INDEX_JSON)


class Cache:
    """A preprocessing cache folder (see the module text)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def meta_path(self) -> Path:
        return self.root / CACHE_JSON

    def exists(self) -> bool:
        return self.meta_path.is_file()

    def meta(self) -> dict:
        if not self.exists():
            raise InputError(f"{self.root} is not a preprocessing cache (no {CACHE_JSON}); run 'python -m Training preprocess' first")
        return json.loads(self.meta_path.read_text())

    def write_meta(self, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{CACHE_JSON}.tmp"
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        tmp.replace(self.meta_path)

    def folder(self, stage_manifest: dict, earlier: Sequence[dict] = ()) -> SpecFolder:
        """The folder of a stage entry's spec (``earlier``: the entries before it, see :func:`input_spec`)."""
        return SpecFolder(self.root / spec_key(stage_manifest, earlier))

    def has(self, stage_manifest: dict, cases: Iterable[int], earlier: Sequence[dict] = ()) -> bool:
        done = set(self.folder(stage_manifest, earlier).index().get("cases", {}))
        return all(case_name(c) in done for c in cases)

    def records(self, stage_manifest: dict, earlier: Sequence[dict] = ()) -> list[dict]:
        """Volume records of a spec (case, region, file names, shape, class voxels, case info, augmented)."""
        index = self.folder(stage_manifest, earlier).index()
        return [r for name in sorted(index.get("cases", {})) for r in index["cases"][name]] + list(index.get("augmented", []))


def init_cache(cache: Cache, data_dir: Path, cases: Optional[Sequence[int]], fingerprint: Optional[dict] = None,
               progress: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Create (or reuse) the cache's ``cache.json`` for ``data_dir``: dataset path, case numbers and fingerprint.
    A validation-only dataset is refused (:func:`Training.dataset.refuse_validation_only`)."""
    refuse_validation_only(Path(data_dir))
    listed = list_cases(Path(data_dir), cases)
    numbers = [c.number for c in listed]
    if cache.exists():
        meta = cache.meta()
        if Path(meta["dataset"]).resolve() != Path(data_dir).resolve() or meta["cases"] != numbers:
            raise OutputError(f"{cache.root} caches {meta['dataset']} (cases {len(meta['cases'])}); use another --out for "
                              f"{data_dir} with {len(numbers)} cases")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            meta["fingerprint"] = fingerprint
            cache.write_meta(meta)
        return meta
    fp = fingerprint if fingerprint is not None else compute_fingerprint(listed, progress=progress)
    meta = {"dataset": str(Path(data_dir).resolve()), "cases": numbers, "fingerprint": fp, "specs": {}}
    cache.write_meta(meta)
    return meta


def distinct_specs(stage_manifests: Sequence[dict]) -> dict:
    """``{spec folder: (entry, the entries before it)}`` of stage entries in recipe order (the first of each spec)."""
    specs = {}
    for j, m in enumerate(stage_manifests):
        earlier = list(stage_manifests[:j])
        specs.setdefault(spec_key(m, earlier), (m, earlier))
    return specs


def preprocess(cache: Cache, stage_manifests: Sequence[dict], cases: Optional[Sequence[int]] = None,
               progress: Optional[Callable[[int, int, str], None]] = None, seed: int = 0) -> dict:
    """Write the training volumes of every ``stage_manifests`` entry (recipe order: a cascade stage's prior stage
    comes before it) for ``cases`` (default: all cases of the cache) into ``cache``; cases already there are kept.
    Returns ``{spec folder: number of volumes}``."""
    meta = cache.meta()
    numbers = meta["cases"] if cases is None else list(cases)
    listed = {c.number: c for c in list_cases(Path(meta["dataset"]), numbers)}
    specs = distinct_specs(stage_manifests)
    todo = {key: [n for n in numbers if case_name(n) not in SpecFolder(cache.root / key).index().get("cases", {})]
            for key in specs}
    wanted = sorted({n for missing in todo.values() for n in missing})
    t0 = time.perf_counter()
    for i, number in enumerate(wanted):
        ct, labels = read_case(listed[number])
        info = _case_info(ct, labels)
        for key, (m, earlier) in specs.items():
            if number in todo[key]:
                _write_case(SpecFolder(cache.root / key), m, number, ct, labels, info, seed, earlier=earlier)
        if progress is not None:
            progress(i + 1, len(wanted), case_name(number))
    meta = cache.meta()
    for key, (m, earlier) in specs.items():
        meta["specs"][key] = input_spec(m, earlier)
    cache.write_meta(meta)
    logger.info("preprocessed %d case(s) for %d spec(s) in %.1f s", len(wanted), len(specs), time.perf_counter() - t0)
    return {key: len(cache.records(m, earlier)) for key, (m, earlier) in specs.items()}


def _write_case(folder: SpecFolder, stage_manifest: dict, number: int, ct, labels, info: dict, seed: int,
                augmented_from: Optional[list] = None, earlier: Sequence[dict] = ()) -> list[dict]:
    folder.path.mkdir(parents=True, exist_ok=True)
    index = folder.index() or {"spec": input_spec(stage_manifest, earlier), "cases": {}, "augmented": []}
    rng = np.random.default_rng([int(seed), int(number)] + [int(v) for v in (augmented_from or [])])
    prefix = case_name(number) if augmented_from is None else f"aug_{augmented_from[0]:05d}_onto_{augmented_from[1]:05d}"
    records = []
    num_classes = len(stage_manifest["classes"])
    for r, (image, target) in enumerate(stage_volumes(stage_manifest, ct, labels, earlier)):
        stem = f"{prefix}_r{r}"
        np.save(folder.path / f"{stem}_image.npy", image)
        np.save(folder.path / f"{stem}_target.npy", target)
        np.savez(folder.path / f"{stem}_where.npz", **_where(target, num_classes, rng))
        records.append({"case": int(number), "region": r, "stem": stem, "shape": list(target.shape),
                        "channels": int(image.shape[0]),
                        "class_voxels": [int(v) for v in np.bincount(target.ravel(), minlength=num_classes)],
                        "info": info, "augmented_from": augmented_from})
    if augmented_from is None:
        index["cases"][case_name(number)] = records
    else:
        index["augmented"] = [a for a in index["augmented"] if a["stem"].rsplit("_r", 1)[0] != prefix] + records
    folder.write_index(index)
    return records


def add_registration_augmentation(cache: Cache, stage_manifests: Sequence[dict], worst_cases: Sequence[int],
                                  partners: int, train_cases: Sequence[int], seed: int = 0,
                                  progress: Optional[Callable[[int, int, str], None]] = None) -> int:
    """Deform ``partners`` random training cases onto each of ``worst_cases`` (registration augmentation of
    seed 003) and add the results to each spec folder as extra training volumes. Returns how many were made."""
    from .registration import deform_onto

    meta = cache.meta()
    listed = {c.number: c for c in list_cases(Path(meta["dataset"]), meta["cases"])}
    rng = np.random.default_rng(seed)
    pairs = []
    for hard in worst_cases:
        others = [n for n in train_cases if n != hard]
        chosen = rng.choice(others, size=min(partners, len(others)), replace=False) if others else []
        pairs += [(int(p), int(hard)) for p in chosen]
    for i, (moving, fixed) in enumerate(pairs):
        fixed_ct, _ = read_case(listed[fixed])
        moving_ct, moving_labels = read_case(listed[moving])
        ct, labels = deform_onto(moving_ct, moving_labels, fixed_ct, seed=seed)
        info = _case_info(ct, labels)
        for key, (m, earlier) in distinct_specs(stage_manifests).items():
            _write_case(SpecFolder(cache.root / key), m, fixed, ct, labels, info, seed, augmented_from=[moving, fixed],
                        earlier=earlier)
        if progress is not None:
            progress(i + 1, len(pairs), f"{case_name(moving)} onto {case_name(fixed)}")
    return len(pairs)


def worst_cases_from_csv(path: Path, count: int) -> list[int]:
    """The ``count`` cases with the lowest ``mean_dice`` in a ``Training evaluate`` CSV."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("case", "").startswith("case_")]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows or "mean_dice" not in rows[0]:
        raise InputError(f"{path}: expected an evaluate CSV with case and mean_dice columns")
    rows.sort(key=lambda r: float(r["mean_dice"]))
    return [int(r["case"].split("_")[1]) for r in rows[:count]]


def load_volume(folder: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped ``(image [C, z, y, x], target [z, y, x])`` of a cached volume."""
    return (np.load(folder / f"{stem}_image.npy", mmap_mode="r"), np.load(folder / f"{stem}_target.npy", mmap_mode="r"))


__all__ = ["Cache", "init_cache", "preprocess", "stage_volumes", "truth_prior", "prior_manifest", "distinct_specs",
           "PRIOR_SIGMA_VOXELS", "class_lookup", "spec_key", "input_spec",
           "add_registration_augmentation", "worst_cases_from_csv", "load_volume", "Case"]
