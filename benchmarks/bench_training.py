"""Training throughput of a recipe: seconds per iteration and patches per second, per stage.

    python benchmarks/bench_training.py --labels ../shared/data/kits19_labels [--recipe phantom_default]
        [--device cuda] [--cases 0-3] [--iterations 20] [--precision auto|fp32|bf16|fp16] [--work DIR]

Builds KiTS19-label phantoms of a few cases (as the default model's data: in-plane downsampled 4x,
at most 96 slices, cysts), then trains every stage of the recipe for one epoch of ``--iterations``
iterations with no validation (``--fold all``) and reads the epoch's seconds from the run's metrics.
The first epoch includes the one-off costs (CUDA context, cuDNN autotuning), so it is reported
apart from a second epoch. ``--precision`` sets every stage's ``training.precision`` (the forward pass's
arithmetic; ``Training.trainer.mixed_precision``). Prints one JSON line per stage. Everything is written under ``--work``
(a temporary folder by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from Training.dataset import parse_case_selection
    from Training.phantom_dataset import make_phantom_dataset
    from Training.recipes import get_recipe
    from Training.runs import train_run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, help="folder of KiTS19 case_XXXXX/segmentation.nii.gz")
    parser.add_argument("--recipe", default="phantom_default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cases", default="0-3")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--precision", default="auto", help="every stage's training.precision (default: auto)")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="kts-bench-train-"))
    make_phantom_dataset(Path(args.labels), work / "data", parse_case_selection(args.cases), downsample_inplane=4.0,
                         max_slices=96, cysts=True)
    recipe = get_recipe(args.recipe)
    stages = [s["manifest"]["name"] for s in recipe["stages"]]
    overrides = [f"{name}.training.{key}={value}" for name in stages
                 for key, value in (("epochs", 2), ("iterations_per_epoch", args.iterations), ("precision", args.precision))]
    train_run(args.recipe, work / "data", work / "run", fold=None, device=args.device, overrides=overrides)
    for name, stage in zip(stages, recipe["stages"]):
        history = [json.loads(line) for line in (work / "run" / name / "metrics.jsonl").read_text().splitlines()]
        batch = int(stage["training"]["batch_size"])
        steady = history[-1]["seconds"] / args.iterations
        print(json.dumps({"recipe": args.recipe, "stage": name, "device": args.device, "precision": args.precision,
                          "iterations": args.iterations,
                          "batch_size": batch, "patch_size_xyz": stage["training"]["patch_size"],
                          "first_epoch_s_per_iteration": round(history[0]["seconds"] / args.iterations, 4),
                          "s_per_iteration": round(steady, 4), "patches_per_s": round(batch / steady, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
