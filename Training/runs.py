"""A training run: a recipe resolved for a dataset, a fold, and one trainer per stage.

Run folder::

    run.json          recipe name and resolved settings, cache, dataset, fold, train / validation
                      cases, seed, command, commit
    cache/            the preprocessing cache (unless --data named an existing cache)
    <stage>/          checkpoint_last.pt, metrics.jsonl, top/, final.pt (see :mod:`Training.trainer`)

``--data`` may be a KiTS19-layout dataset (the cache is built in ``OUT/cache``) or a cache made
by ``preprocess`` (its ``cache.json`` names the dataset). Resuming reads everything from
``run.json``; only ``--max-epochs`` and the device may change.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from KidneyTumorSegLib.errors import InputError, OutputError

from .dataset import fold_split
from .distributed import barrier, init_from_env
from .phantom_dataset import is_phantom_dataset
from .preprocess import CACHE_JSON, Cache, init_cache, preprocess
from .recipes import apply_overrides, get_recipe, resolve
from .trainer import CHECKPOINT, FINAL, Hook, StageTrainer

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"


def git_commit() -> str:
    """The source tree's commit (``-dirty`` when it has uncommitted changes), or ``unknown``."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               check=True, cwd=here).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def open_cache(data: Path, out: Path) -> Cache:
    """The cache for ``data``: ``data`` itself when it is one, else ``out/cache`` (created for the dataset)."""
    data = Path(data)
    if (data / CACHE_JSON).is_file():
        return Cache(data)
    cache = Cache(Path(out) / "cache")
    init_cache(cache, data, None)
    return cache


def stage_manifests(resolved: dict) -> list[dict]:
    """Every phase's manifest entry of every stage (what the cache must hold)."""
    return [p["manifest"] for s in resolved["stages"] for p in s["phases"]]


def read_run(out: Path) -> dict:
    path = Path(out) / RUN_JSON
    if not path.is_file():
        raise InputError(f"{out} is not a training run (no {RUN_JSON})")
    return json.loads(path.read_text())


def _initial_weights(source: Path, recipe_name: Optional[str], smoke: bool, overrides: Sequence[str]) -> dict:
    """``{"run", "stages": {stage: {"file", "sha256"}}}`` for the stages of ``recipe_name`` that ``source`` (a run
    folder) has weights for: its ``final.pt``, else the model in its last checkpoint."""
    from KidneyTumorSegLib.models import sha256_file

    if not (source / RUN_JSON).is_file():
        raise InputError(f"--init-from {source}: not a training run (no {RUN_JSON})")
    names = [s["manifest"]["name"] for s in apply_overrides(get_recipe(recipe_name, smoke=smoke), list(overrides))["stages"]]
    stages = {}
    for name in names:
        for candidate in (source / name / FINAL, source / name / CHECKPOINT):
            if candidate.is_file():
                stages[name] = {"file": str(candidate.resolve()), "sha256": sha256_file(candidate)}
                break
    if not stages:
        raise InputError(f"--init-from {source}: no weights for any of the stages {', '.join(names)}")
    return {"run": str(source.resolve()), "stages": stages}


def resume_from_checkpoint(stage_dir: Path, resume: bool) -> bool:
    """True when a stage will continue from its own checkpoint (so starting weights do not matter)."""
    return bool(resume) and (Path(stage_dir) / CHECKPOINT).is_file()


def _check_unchanged(path: Path, sha256: str) -> None:
    from KidneyTumorSegLib.models import sha256_file

    if not path.is_file() or sha256_file(path) != sha256:
        raise InputError(f"the starting weights {path} recorded in run.json are missing or changed since the run began "
                         "(sha256 mismatch); restore them or start a new run")


def _mix_entry(mix_data: Optional[Path], resolved: dict, fold: Optional[int], folds: int) -> Optional[dict]:
    """run.json's record of the second training source (``train --mix-data``): its cache and training cases."""
    mixing = [s["name"] for s in resolved["stages"] if any(p["training"].get("mix") for p in s["phases"])]
    if mix_data is None:
        if mixing:
            raise InputError(f"recipe {resolved['name']!r} mixes a second training source into stage(s) "
                             f"{', '.join(mixing)}: give its preprocess cache with --mix-data")
        return None
    if not mixing:
        raise InputError(f"--mix-data was given but no stage of recipe {resolved['name']!r} mixes in a second source "
                         "(training.mix); set one with --set STAGE.training.mix=...")
    if not (Path(mix_data) / CACHE_JSON).is_file():
        raise InputError(f"--mix-data must be a cache made by 'preprocess' (a folder with {CACHE_JSON}); got {mix_data}")
    cache = Cache(Path(mix_data))
    meta = cache.meta()
    if meta.get("synthetic"):
        raise InputError(f"--mix-data {mix_data} is a synthesis cache; the mixed-in source must hold CT images")
    train, _ = fold_split(meta["cases"], fold, folds)
    return {"cache": str(cache.root.resolve()), "dataset": meta["dataset"], "train_cases": train, "stages": mixing,
            "phantoms": is_phantom_dataset(Path(meta["dataset"]))}


def _create_run(recipe_name: str, data: Path, out: Path, fold: Optional[int], folds: int, smoke: bool,
                overrides: Sequence[str], seed: int, progress, init_from: Optional[dict] = None,
                mix_data: Optional[Path] = None) -> dict:
    recipe = apply_overrides(get_recipe(recipe_name, smoke=smoke), list(overrides))
    cache = open_cache(data, out)
    meta = cache.meta()
    resolved = resolve(recipe, meta["fingerprint"])
    mix = _mix_entry(mix_data, resolved, fold, folds)
    if not meta.get("synthetic"):  # a synthesis cache is made by synth-preprocess, stage by stage
        preprocess(cache, stage_manifests(resolved), progress=progress, seed=seed)
    train, val = fold_split(meta["cases"], fold, folds)
    run = {
        "recipe": recipe["name"], "resolved": resolved, "cache": str(cache.root.resolve()), "dataset": meta["dataset"],
        # synthetic only when every source is: real CT mixed in makes it a model trained on patients
        "phantoms": (is_phantom_dataset(Path(meta["dataset"])) or bool(meta.get("synthetic")))
                    and (mix is None or bool(mix["phantoms"])),
        "synthetic": meta.get("synthetic"), "fold": fold, "folds": folds,
        "train_cases": train, "val_cases": val, "seed": int(seed),
        "command": "python -m Training " + " ".join(sys.argv[1:]), "commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if init_from:
        run["init_from"] = init_from
    if mix:
        run["mix"] = mix
    tmp = out / f".{RUN_JSON}.tmp"
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(out / RUN_JSON)
    return run


def _mix_source(mix_cache: Optional[Cache], mix: Optional[dict], stage_name: str, phase: dict,
                earlier: Sequence[dict] = ()) -> Optional[tuple]:
    """``(folder, training records)`` of the mixed-in cache for a phase that mixes, else None (``earlier``: the
    manifest entries before the phase's, for a cascade's spec folder)."""
    if mix_cache is None or not phase["training"].get("mix"):
        return None
    records = [r for r in mix_cache.records(phase["manifest"], earlier) if r["case"] in set(mix["train_cases"])]
    if not records:
        raise InputError(f"stage {stage_name!r}: the --mix-data cache {mix_cache.root} holds no volumes for this stage "
                         "(preprocess it with the same recipe)")
    return mix_cache.folder(phase["manifest"], earlier).path, records


def split_records(records: list[dict], train_cases, val_cases) -> tuple[list[dict], list[dict]]:
    """Volume records of the training and validation cases; registration-augmented volumes train only,
    and only when both of their cases are training cases."""
    train_set, val_set = set(train_cases), set(val_cases)
    train = [r for r in records if (r.get("augmented_from") and set(r["augmented_from"]) <= train_set)
             or (not r.get("augmented_from") and r["case"] in train_set)]
    val = [r for r in records if not r.get("augmented_from") and r["case"] in val_set]
    return train, val


def train_run(recipe_name: Optional[str], data: Optional[Path], out: Path, fold: Optional[int] = 0, folds: int = 5,
              resume: bool = False, max_epochs: Optional[int] = None, device: str = "auto", smoke: bool = False,
              overrides: Sequence[str] = (), seed: int = 0, workers: int = 0, stages: Optional[Sequence[str]] = None,
              hooks: Sequence[Hook] = (), progress: Optional[Callable[[int, int, str], None]] = None,
              init_from: Optional[Path] = None, max_minutes: Optional[float] = None,
              mix_data: Optional[Path] = None) -> dict:
    """Train (or resume) a run; returns ``{stage: summary}`` (see :meth:`StageTrainer.fit`).

    ``max_minutes``: each stage stops after the epoch during which this many minutes of its training
    passed (equal time budgets; resume later for more). ``init_from``: another run folder whose stages
    (same names and architectures) give the starting weights (fine-tuning); recorded in ``run.json``
    with the weights' sha256 for provenance, and checked against it when a stage starts. ``mix_data``: a
    preprocess cache of CT images that stages with ``training.mix`` mix in by batch (recorded in ``run.json``)."""
    from KidneyTumorSegLib.device import resolve_device

    try:
        dev, _ = resolve_device(device)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    dist = init_from_env(dev)
    if dist is not None and dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(dev)
    out = Path(out)
    exists = (out / RUN_JSON).is_file()
    if dist is None or dist.is_main:
        if exists and not resume:
            raise OutputError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if exists and init_from:
            raise InputError("--init-from starts a new run; a resumed run keeps the weights it started from")
        if exists and mix_data:
            raise InputError("--mix-data starts a new run; a resumed run keeps the sources recorded in its run.json")
        if not exists:
            if resume:
                raise InputError(f"nothing to resume: {out} holds no {RUN_JSON}")
            if recipe_name is None or data is None:
                raise InputError("a new run needs --recipe and --data")
            init = _initial_weights(Path(init_from), recipe_name, smoke, overrides) if init_from else None
            out.mkdir(parents=True, exist_ok=True)
            _create_run(recipe_name, Path(data), out, fold, folds, smoke, overrides, seed, progress, init,
                        Path(mix_data) if mix_data else None)
    barrier(dist)
    run = read_run(out)
    if recipe_name is not None and get_recipe(recipe_name)["name"] != run["recipe"]:
        raise InputError(f"{out} is a run of recipe {run['recipe']!r}, not {recipe_name!r}")
    cache = Cache(Path(run["cache"]))
    mix = run.get("mix")
    mix_cache = Cache(Path(mix["cache"])) if mix else None
    names = [s["name"] for s in run["resolved"]["stages"]]
    for name in stages or []:
        if name not in names:
            raise InputError(f"recipe {run['recipe']!r} has no stage {name!r}; stages: {', '.join(names)}")
    summaries = {}
    for i, stage in enumerate(run["resolved"]["stages"]):
        if stages and stage["name"] not in stages:
            continue
        folders, train_records, val_records = [], [], []
        # the entries before this stage's, as preprocess saw them: a cascade's spec folder depends on its prior stage
        earlier = stage_manifests({"stages": run["resolved"]["stages"][:i]})
        for phase in stage["phases"]:
            folders.append(cache.folder(phase["manifest"], earlier).path)
            t, v = split_records(cache.records(phase["manifest"], earlier), run["train_cases"], run["val_cases"])
            if not t:
                raise InputError(f"stage {stage['name']!r}: no training volumes (do the training cases hold kidneys? for a "
                                 "synthesis cache: did synth-preprocess make this stage's volumes?)")
            train_records.append(t)
            val_records.append(v)
        mix_sources = [_mix_source(mix_cache, mix, stage["name"], phase, earlier) for phase in stage["phases"]]
        init = (run.get("init_from") or {}).get("stages", {}).get(stage["name"])
        if init and not resume_from_checkpoint(out / stage["name"], resume):
            _check_unchanged(Path(init["file"]), init["sha256"])
        trainer = StageTrainer(out / stage["name"], stage, folders, train_records, val_records, dev,
                               seed=run["seed"] * 1000 + i, workers=workers, hooks=hooks, progress=progress, dist=dist,
                               init_weights=Path(init["file"]) if init else None, mix_sources=mix_sources,
                               earlier_stages=run["resolved"]["stages"][:i])
        summaries[stage["name"]] = trainer.fit(max_epochs=max_epochs, resume=resume, max_minutes=max_minutes)
    if dist is not None:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    return summaries
