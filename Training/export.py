"""Export training runs as a model package that ``KidneyTumorSegLib`` loads unchanged.

Weights per stage: the best ``top_k`` checkpoints of the final phase by validation score (the
recipe's ``keep_top_k`` by default; several = an ensemble the library averages), or, for a run
without validation cases, the weights at the end of training. Several runs of the same recipe
(e.g. folds) ensemble their weights. The manifest is the recipe's final stage entries; its
provenance records recipe, data, folds, commit and validation metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from KidneyTumorSegLib.errors import InputError
from KidneyTumorSegLib.models import ModelPackage, save_package

from .licences import combined_licence, dataset_licence
from .phantom_dataset import PHANTOMS_JSON
from .recipes import final_stage_manifest, manifest_dict
from .runs import git_commit, read_run
from .trainer import CHECKPOINT, FINAL

PHANTOM_USE = ("Demonstration and software testing only. Trained on synthetic phantoms built from KiTS19 label maps, "
               "NOT on patient CT: not for clinical use, and not expected to be accurate on real CT.")
RESEARCH_USE = "Research use only; not a medical device and not for clinical decisions."


def _stage_weights(run_dir: Path, stage: dict, top_k: Optional[int], allow_unfinished: bool) -> tuple[list, dict]:
    """``([(label, state dict)], summary)`` of one run's stage."""
    folder = run_dir / stage["name"]
    ckpt_path = folder / CHECKPOINT
    if not ckpt_path.is_file():
        raise InputError(f"{folder}: stage {stage['name']!r} has no checkpoint (not trained yet)")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    total = sum(int(p["epochs"]) for p in stage["phases"])
    k = top_k if top_k is not None else int(stage["phases"][-1]["training"].get("keep_top_k", 1))
    top = ckpt["top"][: max(1, k)]
    history = ckpt["history"]
    summary = {"run": str(run_dir), "epochs_done": int(ckpt["epoch"]), "total_epochs": total,
               "last": history[-1] if history else None}
    if top:
        summary["selected"] = top
        return [(f"epoch {e['epoch']}", torch.load(folder / e["file"], map_location="cpu", weights_only=True)) for e in top], summary
    if (folder / FINAL).is_file():
        summary["selected"] = "final"
        return [("final", torch.load(folder / FINAL, map_location="cpu", weights_only=True))], summary
    if not allow_unfinished:
        raise InputError(f"{folder}: stage {stage['name']!r} stopped after {ckpt['epoch']} of {total} epochs; train it to the end "
                         "(--resume) or export with --allow-unfinished")
    if int(ckpt["phase"]) != len(stage["phases"]) - 1:
        raise InputError(f"{folder}: stage {stage['name']!r} has not reached its final phase; its weights do not fit the manifest")
    summary["selected"] = f"unfinished (epoch {ckpt['epoch']} of {total})"
    return [(f"epoch {ckpt['epoch']}", ckpt["model"])], summary


def export_runs(run_dirs: Sequence[Path], out: Path, top_k: Optional[int] = None, name: Optional[str] = None,
                version: str = "0.1.0", overwrite: bool = False, allow_unfinished: bool = False,
                licence: Optional[str] = None) -> ModelPackage:
    """Write a model package from one or more runs of the same recipe; returns the loaded package. ``licence``:
    the weights' licence; by default the training data's (:func:`run_data_licence`)."""
    if not run_dirs:
        raise InputError("export needs at least one --run")
    runs = [(Path(d), read_run(Path(d))) for d in run_dirs]
    first = runs[0][1]
    for d, r in runs[1:]:
        same = [final_stage_manifest(s) for s in r["resolved"]["stages"]] == [final_stage_manifest(s) for s in first["resolved"]["stages"]]
        if r["recipe"] != first["recipe"] or not same:
            raise InputError(f"{d} is a run of another recipe or settings than {runs[0][0]}; only runs of one recipe ensemble")
    resolved = first["resolved"]
    weights, states, metrics = {}, {}, {}
    for stage in resolved["stages"]:
        weights[stage["name"]], metrics[stage["name"]] = [], []
        for r_index, (run_dir, _) in enumerate(runs):
            chosen, summary = _stage_weights(run_dir, stage, top_k, allow_unfinished)
            metrics[stage["name"]].append(summary)
            for j, (label, state) in enumerate(chosen):
                file = f"{stage['name']}.pt" if len(runs) == 1 and len(chosen) == 1 else f"{stage['name']}_run{r_index}_{j}.pt"
                weights[stage["name"]].append({"file": file})
                states[file] = state
    phantoms = all(r["phantoms"] for _, r in runs)
    data = {"dataset": first["dataset"], "phantoms": phantoms,
            "runs": [{"run": str(d), "fold": r["fold"], "folds": r["folds"], "train_cases": r["train_cases"],
                      "val_cases": r["val_cases"], "seed": r["seed"], "commit": r["commit"], "command": r.get("command"),
                      **({"init_from": r["init_from"]} if r.get("init_from") else {})} for d, r in runs]}
    record = Path(first["dataset"]) / PHANTOMS_JSON
    if phantoms and record.is_file():
        data["phantom_options"] = json.loads(record.read_text()).get("options")
    provenance = {
        "recipe": resolved["name"], "seed_paper": resolved["seed"], "smoke": resolved["smoke"], "overrides": resolved["overrides"],
        "reproduces": resolved["reproduces"], "leaves_out": resolved["leaves_out"], "choices": resolved["choices"],
        "data": data,
        "trained_on": "synthetic phantoms on real KiTS19 label maps" if phantoms else "the dataset named in data",
        "commit": git_commit(), "metrics": metrics,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest = manifest_dict(resolved, weights, name=name, version=version,
                             intended_use=PHANTOM_USE if phantoms else RESEARCH_USE, provenance=provenance,
                             licence=licence or combined_licence(run_data_licence(r) for _, r in runs))
    return save_package(Path(out), manifest, states, overwrite=overwrite)


def run_data_licence(run: dict) -> str:
    """The licence of everything a run trained on (its dataset and any mixed-in cache's), as recorded by the data."""
    sources = [run.get("dataset")] + ([run["mix"].get("dataset")] if run.get("mix") else [])
    return combined_licence(dataset_licence(s) for s in sources)
