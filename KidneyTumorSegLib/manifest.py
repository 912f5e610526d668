"""The model package manifest: typed, versioned, strict.

A model package is a folder holding ``manifest.json`` and the weights files it lists.
The manifest says everything inference needs (nothing comes from training code):
labels, and an ordered list of stages, each with its network (registry name + kwargs),
weights (one file, or several for an ensemble, each with its sha256), spacing,
intensity normalisation, patch, overlap, the region it runs on and its extra inputs;
then post-processing and provenance.

Conventions: ``spacing_mm`` and ``patch_size`` are in (x, y, z) order along the
working grid's axes (x ~ patient left, y ~ posterior, z ~ superior; see
``geometry``); a ``null`` spacing entry keeps the input's spacing on that axis.

Stage roles:
* ``localize`` - runs on the whole volume; its label map (on its own grid) only
  places the regions of later stages; it writes nothing to the output.
* ``segment`` - writes its labels into the output inside each of its regions.
* ``overlay`` - writes only its non-background labels (e.g. a tumor stage) inside each
  region, on top of what earlier stages wrote.

Regions: ``whole`` (the full volume); ``components`` (one box per connected component of
the previous result's ``labels``, grown by ``margin_mm``, at most ``max_components``,
components under ``min_volume_ml`` ignored, overlapping boxes merged); ``fixed_box`` (a
box of ``size_mm`` centred on the previous result's foreground).

Bounds of a components region, whatever the previous stage says: ``max_components`` is 1 or 2
(the two largest *plausible* components; merging overlapping boxes only lowers the count);
each component's box (margin included) is at most ``max_size_mm`` (default 300 x 250 x 300 mm;
a larger one is cut to that size around the component's centroid, with a note in the result; a
merged box is the union of at most two such boxes); ``plausibility`` (see ``anatomy``: volume,
beside the spine, below the lung bases; off unless ``enabled``) drops implausible components
of the previous result before the boxes are built, with a note.

Windows: ``overlap`` (0.5 = half a patch) with Gaussian blending, or, with ``window_margin``
(voxels per side, (x, y, z)), only each window's core is kept (the ResUNet paper's central 32
of 64 slices; Daza's discarded outer voxels).

Extra inputs: ``prior_from`` names an earlier *localize* stage whose class probabilities
are added as input channels (a cascade); ``mask_labels`` multiplies the image by the
previous result's mask of those labels (HU set to ``mask_fill_hu`` outside, after dilating
by ``mask_dilate_mm``); ``slices_as_channels`` = k feeds a 2.5D network k adjacent slices
(along z) as channels.

Context classes: ``context_classes`` (optional, e.g. ``["liver", "spleen", "bowel"]``) names surroundings the
network was taught to tell apart from the kidney (SynthSeg-style full labelling of the synthetic anatomy); the
networks have one output channel per class and then one per context class, and inference adds the context
channels' probabilities to background, so the stage's output (and every later stage) sees ``classes`` only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .errors import ModelPackageError
from .labels import LABEL_VALUES
from .normalization import IntensityNormalization
from .anatomy import PlausibilityConfig
from .postprocessing import PostprocessingConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
ROLES = ("localize", "segment", "overlay")
REGION_KINDS = ("whole", "components", "fixed_box")
RESAMPLE_BACK = ("probabilities", "labels")
#: context classes a stage may name (each is one more output channel over every region)
MAX_CONTEXT_CLASSES = 8
#: a stage refines at most this many kidney regions, whatever the previous stage found
MAX_REGIONS = 2
#: default ``max_size_mm`` of a components region (x, y, z): the largest KiTS23 kidney component (a horseshoe kidney
#: 225 mm wide; 185 mm deep, 224 mm long with tumors) plus 20 mm margins fits uncut
DEFAULT_MAX_REGION_MM = (300.0, 250.0, 300.0)
#: A package name is also its folder name in the models folder: one path component of
#: letters, digits, ".", "_" and "-", starting with a letter or digit, at most 100 long.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_package_name(name) -> str:
    """Return ``name`` when it is a safe package name (:data:`NAME_PATTERN`), else ValueError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"manifest.name must be 1-100 letters, digits, '.', '_' or '-' starting with a letter or digit "
                         f"(it names the package's folder), got {name!r}")
    return name


def _check_keys(where: str, d: Mapping, required: set, optional: set) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = required - set(d)
    unknown = set(d) - required - optional
    if missing:
        raise ValueError(f"{where} is missing {', '.join(sorted(missing))}")
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(required | optional))}")


def _triple(where: str, value, allow_none: bool = False) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{where} must be a list of 3 numbers (x, y, z), got {value!r}")
    out = []
    for v in value:
        if v is None and allow_none:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            out.append(v)
        else:
            raise ValueError(f"{where} entries must be positive numbers{' or null' if allow_none else ''}, got {value!r}")
    return tuple(out)


def _positive_int(where: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "NetworkSpec":
        _check_keys(where, d, {"name"}, {"kwargs"})
        kwargs = d.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"{where}.kwargs must be an object, got {kwargs!r}")
        return cls(str(d["name"]), dict(kwargs))


@dataclass(frozen=True)
class WeightsFile:
    file: str
    sha256: str

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "WeightsFile":
        _check_keys(where, d, {"file", "sha256"}, set())
        sha = str(d["sha256"]).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError(f"{where}.sha256 must be 64 hex digits, got {d['sha256']!r}")
        name = str(d["file"])
        if Path(name).name != name:
            raise ValueError(f"{where}.file must be a file name inside the package, got {name!r}")
        return cls(name, sha)


@dataclass(frozen=True)
class RegionSpec:
    kind: str = "whole"
    labels: tuple = ("kidney", "tumor", "cyst")
    margin_mm: float = 20.0
    max_components: int = 2
    min_volume_ml: float = 1.0
    size_mm: Optional[tuple] = None
    #: components regions: largest box (x, y, z) mm the stage runs on per component (cut around the component's centroid)
    max_size_mm: Optional[tuple] = None
    #: components regions: anatomical plausibility of the previous result's components (off by default)
    plausibility: PlausibilityConfig = PlausibilityConfig()

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "RegionSpec":
        _check_keys(where, d, {"kind"}, {"labels", "margin_mm", "max_components", "min_volume_ml", "size_mm",
                                         "max_size_mm", "plausibility"})
        kind = d["kind"]
        if kind not in REGION_KINDS:
            raise ValueError(f"{where}.kind must be one of {REGION_KINDS}, got {kind!r}")
        labels = tuple(d.get("labels", cls.labels))
        for name in labels:
            if name not in LABEL_VALUES or name == "background":
                raise ValueError(f"{where}.labels: unknown label {name!r}")
        size = d.get("size_mm")
        if kind == "fixed_box":
            if size is None:
                raise ValueError(f"{where}: a fixed_box region needs size_mm")
            size = _triple(f"{where}.size_mm", size)
        elif size is not None:
            raise ValueError(f"{where}.size_mm only applies to fixed_box regions")
        max_size = d.get("max_size_mm")
        plausibility = d.get("plausibility")
        if kind == "components":
            max_size = DEFAULT_MAX_REGION_MM if max_size is None else tuple(float(v) for v in _triple(f"{where}.max_size_mm", max_size))
            try:
                plausibility = PlausibilityConfig.from_dict({} if plausibility is None else plausibility, f"{where}.plausibility")
            except (ValueError, TypeError) as exc:
                raise ValueError(str(exc)) from None
        else:
            if max_size is not None:
                raise ValueError(f"{where}.max_size_mm only applies to components regions")
            if plausibility is not None:
                raise ValueError(f"{where}.plausibility only applies to components regions")
            plausibility = PlausibilityConfig()
        max_components = d.get("max_components", cls.max_components)
        if isinstance(max_components, bool) or not isinstance(max_components, int) or not 1 <= max_components <= MAX_REGIONS:
            raise ValueError(f"{where}.max_components must be 1 or {MAX_REGIONS} (a stage refines at most {MAX_REGIONS} kidney "
                             f"regions), got {max_components!r}")
        spec = cls(kind, labels, float(d.get("margin_mm", cls.margin_mm)), max_components,
                   float(d.get("min_volume_ml", cls.min_volume_ml)), size, max_size, plausibility)
        if spec.margin_mm < 0 or spec.min_volume_ml < 0:
            raise ValueError(f"{where}: margin_mm and min_volume_ml must be >= 0")
        return spec

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "labels": list(self.labels), "margin_mm": self.margin_mm,
             "max_components": self.max_components, "min_volume_ml": self.min_volume_ml}
        if self.size_mm is not None:
            d["size_mm"] = list(self.size_mm)
        if self.kind == "components":
            d["max_size_mm"] = list(self.max_size_mm)
            d["plausibility"] = self.plausibility.to_dict()
        return d


@dataclass(frozen=True)
class StageInputs:
    prior_from: Optional[str] = None
    mask_labels: Optional[tuple] = None
    mask_dilate_mm: float = 0.0
    mask_fill_hu: float = 0.0
    slices_as_channels: Optional[int] = None

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "StageInputs":
        _check_keys(where, d, set(), {f.name for f in fields(cls)})
        mask = d.get("mask_labels")
        if mask is not None:
            mask = tuple(mask)
            for name in mask:
                if name not in LABEL_VALUES or name == "background":
                    raise ValueError(f"{where}.mask_labels: unknown label {name!r}")
        k = d.get("slices_as_channels")
        if k is not None and (not isinstance(k, int) or k < 1 or k % 2 == 0):
            raise ValueError(f"{where}.slices_as_channels must be an odd positive integer, got {k!r}")
        return cls(d.get("prior_from"), mask, float(d.get("mask_dilate_mm", 0.0)), float(d.get("mask_fill_hu", 0.0)), k)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.mask_labels is not None:
            d["mask_labels"] = list(self.mask_labels)
        return d


@dataclass(frozen=True)
class StageSpec:
    name: str
    role: str
    classes: tuple
    network: NetworkSpec
    weights: tuple
    spacing_mm: tuple
    normalization: IntensityNormalization
    patch_size: tuple
    overlap: float = 0.5
    batch_size: int = 1
    region: RegionSpec = RegionSpec()
    inputs: StageInputs = StageInputs()
    resample_back: str = "probabilities"
    tta_mirror_axes: tuple = (0, 1, 2)
    window_margin: tuple = (0, 0, 0)
    #: surroundings the network was taught to name (e.g. liver, bowel) besides ``classes``: extra output channels
    #: whose probabilities inference adds to background (see ``stages.predict_stage``); never labels
    context_classes: tuple = ()

    @property
    def num_outputs(self) -> int:
        """Output channels of the stage's networks: its classes, then its context classes."""
        return len(self.classes) + len(self.context_classes)

    @classmethod
    def from_dict(cls, d: Mapping, where: str) -> "StageSpec":
        _check_keys(where, d, {"name", "role", "classes", "network", "weights", "spacing_mm", "normalization", "patch_size"},
                    {"overlap", "batch_size", "region", "inputs", "resample_back", "tta_mirror_axes", "window_margin",
                     "context_classes"})
        role = d["role"]
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {ROLES}, got {role!r}")
        classes = tuple(d["classes"])
        if len(classes) < 2 or classes[0] != "background" or any(c not in LABEL_VALUES for c in classes) or len(set(classes)) != len(classes):
            raise ValueError(f"{where}.classes must start with 'background' and name distinct labels of {sorted(LABEL_VALUES)}, got {list(classes)}")
        context = d.get("context_classes", [])
        if (not isinstance(context, (list, tuple)) or len(context) > MAX_CONTEXT_CLASSES
                or any(not isinstance(c, str) or not c.isidentifier() or c in LABEL_VALUES for c in context)
                or len(set(context)) != len(context)):
            raise ValueError(f"{where}.context_classes must be at most {MAX_CONTEXT_CLASSES} distinct names (identifiers, "
                             f"none of the labels {sorted(LABEL_VALUES)}), got {context!r}")
        weights = d["weights"]
        if not isinstance(weights, list) or not weights:
            raise ValueError(f"{where}.weights must be a non-empty list (several files = an ensemble)")
        overlap = float(d.get("overlap", 0.5))
        if not 0 <= overlap < 1:
            raise ValueError(f"{where}.overlap must be in [0, 1), got {overlap}")
        patch = _triple(f"{where}.patch_size", d["patch_size"])
        if any(int(p) != p for p in patch):
            raise ValueError(f"{where}.patch_size must be integers, got {d['patch_size']!r}")
        back = d.get("resample_back", "probabilities")
        if back not in RESAMPLE_BACK:
            raise ValueError(f"{where}.resample_back must be one of {RESAMPLE_BACK}, got {back!r}")
        axes = tuple(d.get("tta_mirror_axes", (0, 1, 2)))
        if any(a not in (0, 1, 2) for a in axes):
            raise ValueError(f"{where}.tta_mirror_axes must list axes among 0, 1, 2 (x, y, z), got {list(axes)}")
        margin = d.get("window_margin", [0, 0, 0])
        if (not isinstance(margin, (list, tuple)) or len(margin) != 3
                or any(not isinstance(m, int) or isinstance(m, bool) or m < 0 or 2 * m >= p for m, p in zip(margin, patch))):
            raise ValueError(f"{where}.window_margin must be 3 integers (x, y, z) with 0 <= 2 * margin < patch_size, got {margin!r}")
        try:
            norm = IntensityNormalization.from_dict(d["normalization"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}.normalization: {exc}") from None
        return cls(
            name=str(d["name"]), role=role, classes=classes,
            network=NetworkSpec.from_dict(d["network"], f"{where}.network"),
            weights=tuple(WeightsFile.from_dict(w, f"{where}.weights[{i}]") for i, w in enumerate(weights)),
            spacing_mm=_triple(f"{where}.spacing_mm", d["spacing_mm"], allow_none=True),
            normalization=norm, patch_size=tuple(int(p) for p in patch), overlap=overlap,
            batch_size=_positive_int(f"{where}.batch_size", d.get("batch_size", 1)),
            region=RegionSpec.from_dict(d.get("region", {"kind": "whole"}), f"{where}.region"),
            inputs=StageInputs.from_dict(d.get("inputs", {}), f"{where}.inputs"),
            resample_back=back, tta_mirror_axes=axes, window_margin=tuple(margin), context_classes=tuple(context),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name, "role": self.role, "classes": list(self.classes),
            "network": {"name": self.network.name, "kwargs": dict(self.network.kwargs)},
            "weights": [{"file": w.file, "sha256": w.sha256} for w in self.weights],
            "spacing_mm": list(self.spacing_mm), "normalization": self.normalization.to_dict(),
            "patch_size": list(self.patch_size), "overlap": self.overlap, "batch_size": self.batch_size,
            "region": self.region.to_dict(), "inputs": self.inputs.to_dict(),
            "resample_back": self.resample_back, "tta_mirror_axes": list(self.tta_mirror_axes),
            "window_margin": list(self.window_margin),
            # only when set, so manifests written before context classes existed read and write back unchanged
            **({"context_classes": list(self.context_classes)} if self.context_classes else {}),
        }


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: str
    description: str
    intended_use: str
    licence: str
    labels: dict
    stages: tuple
    postprocessing: PostprocessingConfig = PostprocessingConfig()
    provenance: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelManifest":
        """Validate and build a manifest; ``ValueError`` names the offending key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"the manifest must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema_version is {version!r}; this version of kidney-tumor-seg reads schema_version {SCHEMA_VERSION}"
                             + (" (the package is newer: upgrade kidney-tumor-seg)" if isinstance(version, int) and version > SCHEMA_VERSION else ""))
        _check_keys("manifest", d, {"schema_version", "name", "version", "description", "intended_use", "licence", "labels", "stages"},
                    {"postprocessing", "provenance"})
        check_package_name(d["name"])
        labels = d["labels"]
        if not isinstance(labels, Mapping) or any(LABEL_VALUES.get(k) != v for k, v in labels.items()) or "kidney" not in labels:
            raise ValueError(f"manifest.labels must map label names to their values {LABEL_VALUES} and include kidney, got {labels!r}")
        stages_raw = d["stages"]
        if not isinstance(stages_raw, list) or not stages_raw:
            raise ValueError("manifest.stages must be a non-empty list")
        stages = tuple(StageSpec.from_dict(s, f"stages[{i}]") for i, s in enumerate(stages_raw))
        try:
            post = PostprocessingConfig.from_dict(d.get("postprocessing", {}))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"manifest.postprocessing: {exc}") from None
        provenance = d.get("provenance", {})
        if not isinstance(provenance, Mapping):
            raise ValueError("manifest.provenance must be an object")
        manifest = cls(str(d["name"]), str(d["version"]), str(d["description"]), str(d["intended_use"]), str(d["licence"]),
                       dict(labels), stages, post, dict(provenance))
        manifest._check_stage_graph()
        return manifest

    def _check_stage_graph(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.stages[0].region.kind != "whole":
            raise ValueError(f"the first stage ({names[0]!r}) must run on the whole volume (region kind 'whole')")
        if all(s.role == "localize" for s in self.stages):
            raise ValueError("at least one stage must write the output (role 'segment' or 'overlay')")
        for i, stage in enumerate(self.stages):
            for c in stage.classes[1:]:
                if c not in self.labels:
                    raise ValueError(f"stage {stage.name!r} predicts {c!r}, which manifest.labels does not list")
            if stage.role == "localize" and stage.region.kind != "whole":
                raise ValueError(f"localize stage {stage.name!r} must use region kind 'whole'")
            prior = stage.inputs.prior_from
            if prior is not None:
                earlier = {s.name: s for s in self.stages[:i]}
                if prior not in earlier or earlier[prior].role != "localize":
                    raise ValueError(f"stage {stage.name!r}: prior_from must name an earlier localize stage, got {prior!r}")
            if i == 0 and (stage.inputs.mask_labels or stage.region.kind != "whole"):
                raise ValueError("the first stage cannot use a mask or a region: there is no earlier result")

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def network_in_channels(self, stage: StageSpec) -> int:
        """Input channels of ``stage``'s network (:func:`network_in_channels`)."""
        return network_in_channels(stage, self.stages)

    @property
    def has_cyst(self) -> bool:
        return "cyst" in self.labels

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version, "name": self.name, "version": self.version,
            "description": self.description, "intended_use": self.intended_use, "licence": self.licence,
            "labels": dict(self.labels), "stages": [s.to_dict() for s in self.stages],
            "postprocessing": self.postprocessing.to_dict(), "provenance": dict(self.provenance),
        }


def network_in_channels(stage: StageSpec, stages: Sequence[StageSpec] = ()) -> int:
    """Input channels of ``stage``'s network: k slices (or 1) plus the classes of its ``prior_from`` stage,
    looked up by name in ``stages`` (a manifest's stages; a ValueError when it is not there)."""
    channels = stage.inputs.slices_as_channels or 1
    prior = stage.inputs.prior_from
    if prior is not None:
        found = [s for s in stages if s.name == prior]
        if not found:
            raise ValueError(f"stage {stage.name!r} takes the probabilities of stage {prior!r} (prior_from), "
                             f"which is not among the stages given ({', '.join(s.name for s in stages) or 'none'})")
        channels += len(found[0].classes)
    return channels


#: what an entry's weights stand in for before training has written them (see :func:`unweighted_stage`)
PLACEHOLDER_WEIGHTS = ({"file": "unwritten.pt", "sha256": "0" * 64},)


def unweighted_stage(entry: Mapping, where: Optional[str] = None) -> StageSpec:
    """A stage entry without weights yet (a training recipe's, a replacement checked before its weights
    exist) validated and typed exactly as a package's stage; its ``weights`` are a placeholder
    (:data:`PLACEHOLDER_WEIGHTS`) whatever the entry holds, so never load them."""
    d = dict(entry, weights=[dict(w) for w in PLACEHOLDER_WEIGHTS])
    return StageSpec.from_dict(d, where or f"stage {d.get('name')!r}")


def read_manifest(path: Path) -> ModelManifest:
    """Read and validate ``manifest.json``; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ModelPackageError(f"model package manifest not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"{path}: not a readable JSON manifest ({exc})") from None
    try:
        return ModelManifest.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise ModelPackageError(f"{path}: {exc}") from None


def write_manifest(manifest: ModelManifest, path: Path) -> None:
    """Write ``manifest`` as indented JSON (atomically and verified: ``imageio.write_json_atomic``)."""
    from .imageio import write_json_atomic

    write_json_atomic(manifest.to_dict(), Path(path), overwrite=True)
