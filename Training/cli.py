"""Command line of the training package: ``python -m Training <command>`` or ``kidney-tumor-seg-train <command>``.

Commands: phantoms, validation-phantoms, fingerprint, preprocess, synth-preprocess, train, evaluate, export, compose,
recipes. Each has --help.
Errors a user can cause print one line (``error: ...``) and exit with status 2; --debug shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from KidneyTumorSegLib.errors import InputError, KidneyTumorSegError

from .progress import ProgressBar

logger = logging.getLogger(__name__)


class _Progress:
    """A progress callback ``(done, total, note)`` drawing one bar per run of ``done`` from 1 to ``total``."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled, self.bar = label, enabled, None

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if self.bar is None or done <= 1 or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            self.bar = ProgressBar(total, self.label, enabled=self.enabled)
            self.bar.done = done - 1
        self.bar.update(1, note)
        if done >= total:
            self.bar.close()
            self.bar = None


def _cases(text):
    from .dataset import parse_case_selection

    return parse_case_selection(text)


def _fold(text: str) -> Optional[int]:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be an integer or 'all', got {text!r}") from None


def cmd_phantoms(args) -> int:
    from .phantom_dataset import make_phantom_dataset

    record = make_phantom_dataset(Path(args.labels), Path(args.out), _cases(args.cases), seed=args.seed,
                                  downsample_inplane=args.downsample_inplane, max_slices=args.max_slices, cysts=args.cysts,
                                  intensity_shift_hu=args.intensity_shift, noise_scale=args.noise_scale,
                                  slice_mm=args.slice_mm, fov_fraction=args.fov_fraction, overwrite=args.overwrite,
                                  progress=_Progress("phantoms", not args.quiet))
    print(json.dumps({"out": str(args.out), "cases": len(record["cases"]), "seconds": record["seconds"]}))
    return 0


def cmd_validation_phantoms(args) -> int:
    from .validation_phantoms import make_validation_dataset

    record = make_validation_dataset(Path(args.labels), Path(args.out), _cases(args.cases), seed=args.seed,
                                     downsample_inplane=args.downsample_inplane, max_slices=args.max_slices,
                                     phase=args.phase, overwrite=args.overwrite,
                                     progress=_Progress("validation-phantoms", not args.quiet))
    print(json.dumps({"out": str(args.out), "cases": len(record["cases"]), "seconds": record["seconds"]}))
    return 0


def cmd_fingerprint(args) -> int:
    from .dataset import list_cases
    from .fingerprint import compute_fingerprint, write_fingerprint

    fp = compute_fingerprint(list_cases(Path(args.data), _cases(args.cases)), samples_per_case=args.samples_per_case,
                             progress=_Progress("fingerprint", not args.quiet))
    if args.out:
        write_fingerprint(fp, Path(args.out))
    summary = {k: fp[k] for k in ("num_cases", "median_spacing", "has_cyst", "foreground_intensity")}
    print(json.dumps(summary, indent=1))
    return 0


def cmd_preprocess(args) -> int:
    from .dataset import fold_split
    from .preprocess import Cache, add_registration_augmentation, init_cache, preprocess, worst_cases_from_csv
    from .recipes import apply_overrides, get_recipe, resolve
    from .runs import stage_manifests

    cache = Cache(Path(args.out))
    progress = _Progress("preprocess", not args.quiet)
    meta = init_cache(cache, Path(args.data), _cases(args.cases), progress=_Progress("fingerprint", not args.quiet))
    recipe = apply_overrides(get_recipe(args.recipe, smoke=args.smoke), args.set)
    resolved = resolve(recipe, meta["fingerprint"])
    counts = preprocess(cache, stage_manifests(resolved), progress=progress, seed=args.seed)
    made = 0
    if args.register_worst:
        spec = resolved.get("registration_augmentation") or {"worst_cases": 20, "partners": 10}
        worst = worst_cases_from_csv(Path(args.register_worst), args.worst or spec["worst_cases"])
        train, _ = fold_split(meta["cases"], args.fold, args.folds)
        worst = [n for n in worst if n in set(train)]
        made = add_registration_augmentation(cache, stage_manifests(resolved), worst, args.partners or spec["partners"], train,
                                             seed=args.seed, progress=_Progress("register", not args.quiet))
    print(json.dumps({"cache": str(cache.root), "volumes": counts, "registration_augmented": made}))
    return 0


def cmd_synth_preprocess(args) -> int:
    from .recipes import apply_overrides, get_recipe, resolve
    from .runs import stage_manifests
    from .synth import preprocess_synth

    recipe = apply_overrides(get_recipe(args.recipe, smoke=args.smoke), args.set)
    manifests = stage_manifests(resolve(recipe, {"has_cyst": True}))
    if args.stage:
        names = {m["name"] for m in manifests}
        unknown = sorted(set(args.stage) - names)
        if unknown:
            raise InputError(f"recipe {recipe['name']!r} has no stage {', '.join(unknown)}; stages: {', '.join(sorted(names))}")
        manifests = [m for m in manifests if m["name"] in args.stage]
    counts = preprocess_synth(Path(args.out), manifests, Path(args.labels), _cases(args.cases), variants=args.variants,
                              seed=args.seed, progress=_Progress("synth-preprocess", not args.quiet), workers=args.workers)
    print(json.dumps({"cache": str(args.out), "volumes": counts}))
    return 0


def cmd_train(args) -> int:
    from .runs import train_run

    summaries = train_run(args.recipe, Path(args.data) if args.data else None, Path(args.out), fold=args.fold, folds=args.folds,
                          resume=args.resume, max_epochs=args.max_epochs, device=args.device, smoke=args.smoke,
                          overrides=args.set, seed=args.seed, workers=args.workers, stages=args.stage,
                          progress=_Progress("train", not args.quiet),
                          init_from=Path(args.init_from) if args.init_from else None, max_minutes=args.max_minutes,
                          mix_data=Path(args.mix_data) if args.mix_data else None)
    print(json.dumps({name: {k: s[k] for k in ("epochs_done", "total_epochs", "finished", "best")} for name, s in summaries.items()}))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.model, Path(args.data), Path(args.out), cases=_cases(args.cases),
                      png_dir=Path(args.png_dir) if args.png_dir else None, device=args.device, tta=args.tta,
                      overwrite=args.overwrite, progress=_Progress("evaluate", not args.quiet))
    mean = result["mean"]
    print(json.dumps({"csv": result["csv"], "png_dir": result["png_dir"], "cases": len(result["cases"]),
                      "kidney_dice": mean["kidney_dice"], "tumor_dice": mean["tumor_dice"], "mean_dice": mean["mean_dice"]}))
    return 0


def cmd_export(args) -> int:
    from .export import export_runs

    package = export_runs([Path(r) for r in args.run], Path(args.out), top_k=args.top_k, name=args.name, version=args.version,
                          overwrite=args.overwrite, allow_unfinished=args.allow_unfinished, licence=args.licence)
    m = package.manifest
    print(json.dumps({"package": str(package.root), "name": m.name,
                      "weights": {s.name: [w.file for w in s.weights] for s in m.stages}}))
    return 0


def cmd_compose(args) -> int:
    from .compose import compose_package

    def split(items, option, example):
        for item in items or []:
            stage, sep, value = item.partition("=")
            if not sep or not stage or not value:
                raise InputError(f"{option} takes {example}, got {item!r}")
            yield stage, value

    def pairs(items, option):
        out = {}
        for stage, run in split(items, option, "NAME=RUN (e.g. coarse=runs/s4)"):
            if stage in out:
                raise InputError(f"{option} {stage} given twice")
            out[stage] = Path(run)
        return out

    drops: dict = {}  # several members of one stage may go
    for stage, file in split(args.drop, "--drop", "NAME=FILE (e.g. coarse=coarse_run0_0.pt)"):
        drops.setdefault(stage, []).append(file)
    package = compose_package(args.base, pairs(args.stage, "--stage"), Path(args.out), name=args.name,
                              version=args.version, allow_unfinished=args.allow_unfinished, overwrite=args.overwrite,
                              additions=pairs(args.add, "--add"), description=args.description, removals=drops,
                              licence=args.licence)
    m = package.manifest
    print(json.dumps({"package": str(package.root), "name": m.name, "version": m.version,
                      "weights": {s.name: [w.file for w in s.weights] for s in m.stages}}))
    return 0


def cmd_recipes(args) -> int:
    from .recipes import get_recipe, names

    if not args.name:
        for n in names():
            r = get_recipe(n)
            print(f"{n:18s} {r['summary']}")
        return 0
    recipe = get_recipe(args.name, smoke=args.smoke)
    recipe.pop("smoke", None)
    print(json.dumps(recipe, indent=1))
    return 0


def _phantom_dataset_args(s: argparse.ArgumentParser, labels_example: str, cases_example: str) -> None:
    """The arguments both phantom generators take: source label maps, output, cases, seed and grid reduction."""
    s.add_argument("--labels", required=True, help=f"folder of case_XXXXX/segmentation.nii.gz (e.g. {labels_example})")
    s.add_argument("--out", required=True, help="dataset folder to write")
    s.add_argument("--cases", help=f"case numbers, e.g. {cases_example} (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--downsample-inplane", type=float, default=1.0, metavar="F", help="in-plane voxels / F (physical extent kept)")
    s.add_argument("--max-slices", type=int, metavar="N", help="at most N slices (crop around the kidneys, else thicker slices)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m Training",
                                description="Train, evaluate and export the seed papers' kidney / tumor segmentation models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("phantoms", help="synthetic CT on real KiTS19 label maps (KiTS19 layout)")
    _phantom_dataset_args(s, "../shared/data/kits19_labels", "0-129")
    s.add_argument("--cysts", action="store_true", help="add cyst-like lesions (label 3) to 60%% of the cases")
    s.add_argument("--intensity-shift", type=float, default=0.0, metavar="HU", help="added to contrast-enhanced tissues")
    s.add_argument("--noise-scale", type=float, default=1.0, metavar="F", help="multiplies the 10-25 HU noise")
    s.add_argument("--slice-mm", type=float, metavar="MM", help="slices at least MM apart (thicker slices)")
    s.add_argument("--fov-fraction", type=float, default=1.0, metavar="F",
                   help="keep the central F of each in-plane axis (a smaller field of view)")
    s.add_argument("--overwrite", action="store_true", help="rewrite existing cases")
    s.set_defaults(func=cmd_phantoms)

    s = sub.add_parser("validation-phantoms", help="independent validation phantoms on real label maps (never train on them)")
    _phantom_dataset_args(s, "../shared/data/kits23_labels", "130-159,400-429")
    s.add_argument("--phase", choices=["unenhanced", "arterial", "portal", "delayed"],
                   help="one contrast phase for every case (default: drawn per case)")
    s.add_argument("--overwrite", action="store_true", help="rewrite existing cases")
    s.set_defaults(func=cmd_validation_phantoms)

    s = sub.add_parser("fingerprint", help="dataset fingerprint: spacings, foreground intensity statistics")
    s.add_argument("--data", required=True, help="KiTS19-layout dataset")
    s.add_argument("--cases")
    s.add_argument("--out", help="write the full fingerprint JSON here")
    s.add_argument("--samples-per-case", type=int, default=10_000)
    s.set_defaults(func=cmd_fingerprint)

    s = sub.add_parser("preprocess", help="cache every case resampled for a recipe's stages (memory-mapped .npy)")
    s.add_argument("--data", required=True, help="KiTS19-layout dataset")
    s.add_argument("--recipe", required=True, help="recipe name (see 'recipes')")
    s.add_argument("--out", required=True, help="cache folder (give it to train --data)")
    s.add_argument("--cases")
    s.add_argument("--smoke", action="store_true", help="the recipe's tiny CPU variant")
    s.add_argument("--set", action="append", default=[], metavar="STAGE.SECTION.KEY=JSON", help="override a recipe value")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--register-worst", metavar="CSV", help="registration augmentation: deform partners onto the worst cases of "
                                                           "this evaluate CSV (two_phase_vnet)")
    s.add_argument("--worst", type=int, help="how many worst cases (default: the recipe's, 20)")
    s.add_argument("--partners", type=int, help="cases deformed onto each (default: the recipe's, 10)")
    s.add_argument("--fold", type=_fold, default=0, help="fold whose training cases may be used (default 0)")
    s.add_argument("--folds", type=int, default=5)
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("synth-preprocess", help="cache of synthesis tissue maps from label maps (domain-randomised "
                                                "training, Training/synth.py)")
    s.add_argument("--labels", required=True, help="folder of case_XXXXX/segmentation.nii.gz (e.g. ../shared/data/kits23_labels)")
    s.add_argument("--recipe", required=True, help="a recipe whose stages synthesize (e.g. synth_default)")
    s.add_argument("--out", required=True, help="cache folder (give it to train --data)")
    s.add_argument("--cases", help="case numbers (default: all)")
    s.add_argument("--stage", action="append", metavar="NAME", help="only these stages' volumes (repeatable; default all)")
    s.add_argument("--variants", type=int, default=2, help="random bodies per case (default 2)")
    s.add_argument("--smoke", action="store_true", help="the recipe's tiny CPU variant")
    s.add_argument("--set", action="append", default=[], metavar="STAGE.SECTION.KEY=JSON", help="override a recipe value")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="cases synthesized at once in separate processes (default: "
                                                          "one at a time here); the cache is the same either way")
    s.set_defaults(func=cmd_synth_preprocess)

    s = sub.add_parser("train", help="train (or resume) a recipe")
    s.add_argument("--recipe", help="recipe name (not needed with --resume)")
    s.add_argument("--data", help="KiTS19-layout dataset or a preprocess cache")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--fold", type=_fold, default=0, help="validation fold 0..folds-1, or 'all' (no validation); default 0")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    s.add_argument("--max-epochs", type=int, help="stop each stage after this many epochs (resume later for more)")
    s.add_argument("--max-minutes", type=float, metavar="M", help="stop each stage after the epoch during which M minutes "
                                                               "of its training passed (equal budgets; resume for more)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    s.add_argument("--smoke", action="store_true", help="the recipe's tiny CPU variant")
    s.add_argument("--set", action="append", default=[], metavar="STAGE.SECTION.KEY=JSON", help="override a recipe value")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    s.add_argument("--stage", action="append", help="train only this stage (repeatable)")
    s.add_argument("--init-from", metavar="RUN", help="start each stage from this run's weights (fine-tuning; same "
                                                     "stage names and architectures); recorded in run.json")
    s.add_argument("--mix-data", metavar="CACHE", help="a preprocess cache of CT images that stages with training.mix "
                                                       "mix in by batch (e.g. rendered phantoms beside a synthesis cache)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="KiTS19 metrics of a model package on a labelled dataset")
    s.add_argument("--model", required=True, help="model package folder or installed name")
    s.add_argument("--data", required=True, help="KiTS19-layout dataset with labels")
    s.add_argument("--cases")
    s.add_argument("--out", required=True, help="metrics CSV to write")
    s.add_argument("--png-dir", help="overview PNGs (default: <csv stem>_png next to the CSV)")
    s.add_argument("--device", default="auto")
    s.add_argument("--tta", action="store_true", help="mirroring test-time augmentation")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("export", help="model package from training runs")
    s.add_argument("--run", action="append", required=True, help="run folder (repeat for a fold ensemble)")
    s.add_argument("--out", required=True, help="package folder to write")
    s.add_argument("--top-k", type=int, help="checkpoints per run and stage (default: the recipe's keep_top_k)")
    s.add_argument("--name", help="package name (default kidney-<recipe>)")
    s.add_argument("--version", default="0.1.0")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--allow-unfinished", action="store_true", help="export a stage stopped early by --max-epochs")
    s.add_argument("--licence", help="the weights' licence (default: the training data's recorded licence, "
                                   "e.g. CC-BY-NC-SA-4.0 for the KiTS label maps)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("compose", help="a package with some stages retrained: the base package's other stages, "
                                       "labels and post-processing, the named stages from training runs")
    s.add_argument("--base", required=True, help="installed model name or package folder")
    s.add_argument("--stage", action="append", metavar="NAME=RUN", help="replace stage NAME by run RUN's (repeatable)")
    s.add_argument("--add", action="append", metavar="NAME=RUN",
                   help="add run RUN's weights for stage NAME to the base's ensemble (same stage entry; repeatable)")
    s.add_argument("--drop", action="append", metavar="NAME=FILE",
                   help="leave the base's member FILE (a weights file of its manifest) out of stage NAME's ensemble "
                        "(repeatable)")
    s.add_argument("--out", required=True, help="package folder to write")
    s.add_argument("--name", help="package name (default: the base's)")
    s.add_argument("--version", help="package version (default: the base's)")
    s.add_argument("--description", help="package description (default: the base's)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--allow-unfinished", action="store_true", help="take a stage stopped before its last epoch")
    s.add_argument("--licence", help="the weights' licence (default: the base's and the runs' training data's, "
                                   "e.g. CC-BY-NC-SA-4.0 for the KiTS label maps)")
    s.set_defaults(func=cmd_compose)

    s = sub.add_parser("recipes", help="list recipes, or show one as JSON")
    s.add_argument("name", nargs="?")
    s.add_argument("--smoke", action="store_true")
    s.set_defaults(func=cmd_recipes)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted (a training run resumes with --resume)", file=sys.stderr)
        return 130
    except (KidneyTumorSegError, ValueError, OSError) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
