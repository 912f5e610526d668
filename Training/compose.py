"""A model package made of another package with some of its stages retrained: ``python -m Training compose``.

Why: the stages of a cascade fail and improve separately. Domain-randomised training (``synth_default`` /
``synth_mixed``) made the localisation stage transfer to real CT long before the segmentation stage caught up, so
the useful model is "the shipped package, with its coarse stage replaced by a run's". Each replaced stage takes its
weights and its manifest entry from the run (as ``export`` would); everything else (other stages, labels,
post-processing, intended use) stays the base package's. Provenance keeps the base's record under ``base`` and
the run's record per replaced stage under ``replaced_stages``.

A replacement must keep the stage's contract with the others: same name, role and classes, same number of input
channels (later stages read its labels and probabilities), so the composed cascade runs as the base did.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from KidneyTumorSegLib.errors import InputError
from KidneyTumorSegLib.manifest import unweighted_stage
from KidneyTumorSegLib.models import ModelPackage, load_package, save_package

from .export import _stage_weights
from .recipes import final_stage_manifest
from .runs import git_commit, read_run


def _contract(stage: Mapping) -> tuple:
    """What the other stages rely on: name, role, classes and inputs (validated as the library reads them)."""
    # weights are not part of the contract (and not written yet)
    spec = unweighted_stage(stage)
    return spec.name, spec.role, tuple(spec.classes), spec.inputs.to_dict()


def compose_package(base: str, replacements: Mapping[str, Path], out: Path, name: Optional[str] = None,
                    version: Optional[str] = None, allow_unfinished: bool = False, overwrite: bool = False) -> ModelPackage:
    """Write ``out``: package ``base`` (an installed name or a folder) with the stages named in ``replacements``
    (stage name -> training run folder) taken from those runs; returns the loaded package."""
    if not replacements:
        raise InputError("compose needs at least one --stage NAME=RUN to replace")
    package = load_package(base)
    manifest = copy.deepcopy(package.manifest.to_dict())
    names = [s["name"] for s in manifest["stages"]]
    unknown = sorted(set(replacements) - set(names))
    if unknown:
        raise InputError(f"package {manifest['name']} has no stage(s) {', '.join(unknown)}; its stages: {', '.join(names)}")
    states, replaced = {}, {}
    for stage in manifest["stages"]:
        source = replacements.get(stage["name"])
        if source is None:
            files = []
            for w in stage["weights"]:
                states[w["file"]] = torch.load(package.weights_path(w["file"]), map_location="cpu", weights_only=True)
                files.append({"file": w["file"]})
            stage["weights"] = files
            continue
        run = read_run(Path(source))
        resolved = next((s for s in run["resolved"]["stages"] if s["name"] == stage["name"]), None)
        if resolved is None:
            raise InputError(f"run {source} has no stage {stage['name']!r}")
        new = final_stage_manifest(resolved)
        if _contract(new) != _contract(stage):
            raise InputError(f"stage {stage['name']!r} of run {source} does not keep the base package's contract "
                             f"(name, role, classes, inputs): {_contract(new)} vs {_contract(stage)}")
        chosen, summary = _stage_weights(Path(source), resolved, None, allow_unfinished)
        new["weights"] = []
        for j, (_, state) in enumerate(chosen):
            file = f"{stage['name']}_composed_{j}.pt"
            states[file] = state
            new["weights"].append({"file": file})
        stage.clear()
        stage.update(new)
        replaced[stage["name"]] = {"run": str(source), "recipe": run["recipe"], "dataset": run["dataset"],
                                   "mix": run.get("mix"), "init_from": run.get("init_from"), "command": run.get("command"),
                                   "commit": run.get("commit"), "training": summary}
    provenance = {"composed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
                  "base": {"name": manifest["name"], "version": manifest["version"],
                           "provenance": manifest.get("provenance", {})},
                  "replaced_stages": replaced}
    manifest["provenance"] = provenance
    manifest["name"] = name or manifest["name"]
    manifest["version"] = version or manifest["version"]
    return save_package(Path(out), manifest, states, overwrite=overwrite)
