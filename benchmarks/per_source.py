"""One model on every evaluation source issue 13 names, as one table row: what each model round reports.

    python benchmarks/per_source.py [--model NAME_OR_PATH] [--sources sample,ircad_1.1,example_ct_sm,valgen,own]
                                    [--valgen data/valgen] [--own data/phantoms_val] [--shared ../shared]
                                    [--out DIR] [--device cpu] [--tta]

Sources (full library inference; ``--tta`` adds mirroring test-time augmentation along each stage's
``tta_mirror_axes``, as ``segment --tta`` does):

* ``sample``: the bundled sample (rendered phantom of KiTS19 case 148, ``KidneyTumorSegLib/data``), one case;
* ``ircad_1.1``, ``example_ct_sm``: the real scans of ``Training/real_ct.py`` (evaluation only; needs ``../shared``);
* ``valgen``: the independent validation generator's phantoms, built by
  ``python -m Training validation-phantoms --labels ../shared/data/kits23_labels --out data/valgen
  --cases 130-139,400-409 --downsample-inplane 2 --max-slices 128``;
* ``own``: the training renderer's held-out phantoms, built by
  ``python -m Training phantoms --labels ../shared/data/kits19_labels --out data/phantoms_val --cases 130-159
  --downsample-inplane 4 --max-slices 96 --cysts`` (cases 130-159 are scored).

Prints one JSON line per source as it finishes, then the Markdown row of Training/README's per-source tables:
``| model | sample k / t | IRCAD 1.1 kidney (R / L) / false lesion | example_ct_sm kidney (R / L) / lesion | valgen k / t
| own 130-159 k / t |``. ``--out`` keeps each dataset's per-case CSV and pictures (``Training evaluate``'s); by default
they go to a temporary folder that is removed. A missing data folder is an error naming the command that builds it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the real scans of ``Training/real_ct.py`` (its ``SCANS``), in the per-source tables' column order
REAL_SCANS = ("ircad_1.1", "example_ct_sm")
SOURCES = ("sample", *REAL_SCANS, "valgen", "own")
BUILD = {
    "valgen": "python -m Training validation-phantoms --labels ../shared/data/kits23_labels --out {path} "
              "--cases 130-139,400-409 --downsample-inplane 2 --max-slices 128",
    "own": "python -m Training phantoms --labels ../shared/data/kits19_labels --out {path} --cases 130-159 "
           "--downsample-inplane 4 --max-slices 96 --cysts",
}
OWN_CASES = list(range(130, 160))


def parse_sources(text: str, known=SOURCES) -> list:
    """The comma-separated source names of ``text``, in the order of ``known``; unknown names are an error."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ValueError(f"--sources must name some of {', '.join(known)}; got {text!r}")
    return [s for s in known if s in names]


def source_folders(parser, sources, valgen: str, own: str, shared: str) -> tuple:
    """``({"valgen": Path, "own": Path}, the real scans' folder)`` for ``sources``; a folder a source needs and
    lacks is ``parser.error`` (for a phantom folder, naming the command that builds it)."""
    folders = {"valgen": Path(valgen), "own": Path(own)}
    for name in sources:
        if name in folders and not folders[name].is_dir():
            parser.error(f"source {name!r}: no folder {folders[name]}; build it with: {BUILD[name].format(path=folders[name])}")
    real_ct = Path(shared) / "data" / "real_ct"
    if any(s in REAL_SCANS for s in sources) and not real_ct.is_dir():
        parser.error(f"the real scans need {real_ct} (the project's shared folder; --shared)")
    return folders, real_ct


def markdown_row(model: str, results: dict) -> str:
    """The per-source table row of ``results`` (source name -> that source's JSON dict); "—" where not measured."""
    def pair(r):
        return f"{r['kidney_dice']:.3f} / {r['tumor_dice']:.3f}"

    def real(r):
        side = r["kidney_dice_per_side"]
        return (f"{r['kidney_dice']:.3f} ({side['right']:.2f} / {side['left']:.2f}) / "
                f"{r['tumor_ml'] + r['cyst_ml']:.0f} mL")

    cells = [model]
    for name in SOURCES:
        r = results.get(name)
        cells.append("—" if r is None else (real(r) if name in REAL_SCANS else pair(r)))
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from KidneyTumorSegLib.demo import SAMPLE_CT, SAMPLE_TRUTH
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.dataset import Case, read_case
    from Training.evaluate import evaluate
    from Training.metrics import kits_metrics
    from Training.real_ct import check_scan

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="installed model name or package folder (default: the bundled model)")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--valgen", default="data/valgen", help="the validation generator's phantom folder")
    parser.add_argument("--own", default="data/phantoms_val", help="the training renderer's held-out phantom folder")
    parser.add_argument("--shared", default=str(REPO.parent / "shared"), help="the project's shared folder")
    parser.add_argument("--out", default=None, help="keep per-case CSVs and pictures here (must not exist yet)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (as segment --tta)")
    args = parser.parse_args(argv)
    try:
        sources = parse_sources(args.sources)
    except ValueError as exc:
        parser.error(str(exc))
    folders, real_ct = source_folders(parser, sources, args.valgen, args.own, args.shared)
    if args.out and Path(args.out).exists():
        parser.error(f"--out {args.out} already exists; name a new folder")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kts-per-source-"))
    out.mkdir(parents=True, exist_ok=True)

    package = load_package(args.model)
    # a composed package keeps its base's name and version: name the folder too, or every row reads the same
    model = (f"{package.manifest.name} {package.manifest.version}" + (f" ({args.model})" if args.model else "")
             + (" + TTA" if args.tta else ""))
    segmenter = Segmenter(package, device=args.device, tta=args.tta)
    results = {}
    try:
        for name in sources:
            if name == "sample":
                ct, truth = read_case(Case(148, SAMPLE_CT, SAMPLE_TRUTH))
                metrics = kits_metrics(segmenter.segment(ct).labels, truth)
                row = {"kidney_dice": round(metrics["kidney_dice"], 4), "tumor_dice": round(metrics["tumor_dice"], 4)}
            elif name in folders:
                report = evaluate(str(package.root), folders[name], out / f"{name}.csv",
                                  cases=OWN_CASES if name == "own" else None, device=args.device, tta=args.tta)
                mean = report["mean"]
                row = {"cases": len(report["cases"]), "kidney_dice": round(mean["kidney_dice"], 4),
                       "tumor_dice": round(mean["tumor_dice"], 4)}
            else:
                row = check_scan(name, real_ct, segmenter)
            results[name] = row
            print(json.dumps({"source": name, "model": model, **row}), flush=True)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(markdown_row(model, results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
