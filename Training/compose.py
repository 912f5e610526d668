"""A model package made of another package with some of its stages retrained: ``python -m Training compose``.

Why: the stages of a cascade fail and improve separately. Domain-randomised training (``synth_default`` /
``synth_mixed``) made the localisation stage transfer to real CT long before the segmentation stage caught up, so
the useful model is "the shipped package, with its coarse stage replaced by a run's". Each replaced stage takes its
weights and its manifest entry from the run (as ``export`` would); everything else (other stages, labels,
post-processing, intended use) stays the base package's. Provenance keeps the base's record under ``base`` and
the run's record per replaced stage under ``replaced_stages``.

A replacement must keep the stage's contract with the others: same name, role and classes, same number of input
channels (later stages read its labels and probabilities), so the composed cascade runs as the base did.

A run's stage can instead be *added* to the base stage's ensemble (``--add``): the library averages the members'
probabilities, which is only meaningful for networks of one stage entry, so an added member's whole manifest entry
(network, spacing, normalisation, patch, TTA axes, region, inputs) must equal the base's; the base's members stay,
except those named by ``--drop`` (a member whose training data transfers worse than the others' can be left out
of the average without retraining the rest); provenance lists the dropped files with their sha256.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from KidneyTumorSegLib.errors import InputError
from KidneyTumorSegLib.manifest import unweighted_stage
from KidneyTumorSegLib.models import ModelPackage, load_package, save_package

from .export import _stage_weights, run_data_licence
from .licences import combined_licence
from .recipes import final_stage_manifest
from .runs import git_commit, read_run


def _entry(stage: Mapping) -> dict:
    """A stage entry as the library reads it, without its weights (what an ensemble's members must share)."""
    d = unweighted_stage(stage).to_dict()
    d.pop("weights", None)
    return d


def _contract(stage: Mapping) -> tuple:
    """What the other stages rely on: name, role, classes and inputs (validated as the library reads them)."""
    e = _entry(stage)
    return e["name"], e["role"], tuple(e["classes"]), e["inputs"]


def compose_package(base: str, replacements: Mapping[str, Path], out: Path, name: Optional[str] = None,
                    version: Optional[str] = None, allow_unfinished: bool = False, overwrite: bool = False,
                    additions: Optional[Mapping[str, Path]] = None, description: Optional[str] = None,
                    removals: Optional[Mapping[str, Sequence[str]]] = None, licence: Optional[str] = None) -> ModelPackage:
    """Write ``out``: package ``base`` (an installed name or a folder) with the stages named in ``replacements``
    (stage name -> training run folder) taken from those runs, the stages named in ``additions`` given the
    run's weights as extra ensemble members, and the base members named in ``removals`` (stage name -> weight
    files of the base's manifest) left out; returns the loaded package. ``licence``: the weights' licence; by
    default the base's and every added or replacing run's training data's together (:mod:`Training.licences`)."""
    additions = dict(additions or {})
    removals = {k: list(v) for k, v in (removals or {}).items()}
    if not replacements and not additions and not removals:
        raise InputError("compose needs at least one --stage NAME=RUN to replace, --add NAME=RUN to add or "
                         "--drop NAME=FILE to leave out")
    both = sorted(set(replacements) & set(additions))
    if both:
        raise InputError(f"stage(s) {', '.join(both)} both replaced and added to; choose one")
    replaced_and_dropped = sorted(set(replacements) & set(removals))
    if replaced_and_dropped:
        raise InputError(f"stage(s) {', '.join(replaced_and_dropped)} both replaced and dropped from; a replaced "
                         "stage keeps none of the base's members anyway")
    package = load_package(base)
    manifest = copy.deepcopy(package.manifest.to_dict())
    names = [s["name"] for s in manifest["stages"]]
    unknown = sorted((set(replacements) | set(additions) | set(removals)) - set(names))
    if unknown:
        raise InputError(f"package {manifest['name']} has no stage(s) {', '.join(unknown)}; its stages: {', '.join(names)}")
    states, replaced, added, dropped = {}, {}, {}, {}
    for stage in manifest["stages"]:
        source = replacements.get(stage["name"])
        if source is None:
            files = []
            drop = removals.get(stage["name"], [])
            _check_drops(stage, drop, stage["name"] in additions)
            for w in stage["weights"]:
                if w["file"] in drop:
                    dropped.setdefault(stage["name"], []).append({"file": w["file"], "sha256": w.get("sha256")})
                    continue
                states[w["file"]] = torch.load(package.weights_path(w["file"]), map_location="cpu", weights_only=True)
                files.append({"file": w["file"]})
            stage["weights"] = files
            if stage["name"] in additions:
                added[stage["name"]] = _add_members(stage, Path(additions[stage["name"]]), states, allow_unfinished,
                                                     package)
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
        for _, state in chosen:
            file = _free_name(f"{stage['name']}_composed", states, package)
            states[file] = state
            new["weights"].append({"file": file})
        stage.clear()
        stage.update(new)
        replaced[stage["name"]] = _run_record(Path(source), run, summary)
    base_provenance = manifest.get("provenance", {}) or {}
    runs = {**{f"stage {k}": v for k, v in replaced.items()}, **{f"stage {k} (added member)": v for k, v in added.items()}}
    phantoms = bool((base_provenance.get("data") or {}).get("phantoms")) and all(v["phantoms"] for v in runs.values())
    trained_on = "; ".join([f"base {manifest['name']} {manifest['version']}: "
                            f"{base_provenance.get('trained_on', 'see base.provenance')}"]
                           + [f"{k}: recipe {v['recipe']} on {v['trained_on']}" for k, v in runs.items()])
    provenance = {"composed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit(),
                  # what the library and the Slicer module read: all synthetic only if every part is
                  "data": {"phantoms": phantoms, "dataset": (base_provenance.get("data") or {}).get("dataset"),
                           "composed": True},
                  "trained_on": trained_on,
                  "base": {"name": manifest["name"], "version": manifest["version"],
                           "provenance": manifest.get("provenance", {})},
                  "replaced_stages": replaced, "added_members": added, "dropped_members": dropped}
    manifest["provenance"] = provenance
    manifest["name"] = name or manifest["name"]
    manifest["version"] = version or manifest["version"]
    manifest["description"] = description or manifest["description"]
    manifest["licence"] = licence or combined_licence([manifest.get("licence")] + [run_data_licence(v) for v in runs.values()])
    return save_package(Path(out), manifest, states, overwrite=overwrite)


def _check_drops(stage: Mapping, drop: Sequence[str], adding: bool) -> None:
    """Every file to drop is one of the stage's members, none twice, and the stage keeps at least one network."""
    have = [w["file"] for w in stage["weights"]]
    unknown = sorted(set(drop) - set(have))
    if unknown:
        raise InputError(f"stage {stage['name']!r} has no member(s) {', '.join(unknown)}; its members: {', '.join(have)}")
    if len(set(drop)) != len(drop):
        raise InputError(f"--drop {stage['name']}: a member is named twice ({', '.join(drop)})")
    if len(set(drop)) == len(have) and not adding:
        raise InputError(f"--drop would leave stage {stage['name']!r} without a network; add one (--add) or replace "
                         f"the stage (--stage)")


def _free_name(stem: str, states: dict, package: ModelPackage) -> str:
    """``STEM_N.pt`` used neither by the package being written nor by any of the base's files: composing a
    composed package must not overwrite its members."""
    taken = set(states) | {w.file for s in package.manifest.stages for w in s.weights}
    n = 0
    while f"{stem}_{n}.pt" in taken:
        n += 1
    return f"{stem}_{n}.pt"


def _run_record(source: Path, run: dict, summary: dict) -> dict:
    phantoms = bool(run.get("phantoms"))
    kind = "synthesis tissue maps of real label maps" if run.get("synthetic") else (
        "synthetic phantoms on real label maps" if phantoms else "the dataset named here")
    mix = run.get("mix")
    return {"run": str(source), "recipe": run["recipe"], "dataset": run["dataset"], "phantoms": phantoms,
            "trained_on": kind + (f" with batches of {mix['dataset']} mixed in" if mix else ""), "mix": mix,
            "init_from": run.get("init_from"), "command": run.get("command"), "commit": run.get("commit"),
            "training": summary}


def _add_members(stage: dict, source: Path, states: dict, allow_unfinished: bool, package: ModelPackage) -> dict:
    """Append run ``source``'s weights for ``stage`` (a base manifest entry, edited in place) to its ensemble."""
    run = read_run(source)
    resolved = next((s for s in run["resolved"]["stages"] if s["name"] == stage["name"]), None)
    if resolved is None:
        raise InputError(f"run {source} has no stage {stage['name']!r}")
    new, old = _entry(final_stage_manifest(resolved)), _entry(stage)
    differ = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
    if differ:
        raise InputError(f"run {source}'s stage {stage['name']!r} cannot join the base's ensemble: its entry differs in "
                         f"{', '.join(differ)} (members are averaged, so they must share the whole entry)")
    chosen, summary = _stage_weights(source, resolved, None, allow_unfinished)
    for _, state in chosen:
        file = _free_name(f"{stage['name']}_added", states, package)
        states[file] = state
        stage["weights"].append({"file": file})
    return _run_record(source, run, summary)
