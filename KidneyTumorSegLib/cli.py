"""Command line: ``kidney-tumor-seg`` / ``python -m KidneyTumorSegLib``.

Sub-commands: ``segment``, ``pacs``, ``models list|install``, ``devices``, ``demo``. torch and the
pipeline are imported only inside the commands that need them, so ``--help`` is instant.
A user error (a ``KidneyTumorSegError``) prints one line starting with ``error:`` and
exits 1; anything else is a bug and shows its traceback (in batch mode per case, the
other cases still run). SIGINT exits 130, SIGTERM 143, leaving no temporary file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .runcontrol import ProgressPrinter

logger = logging.getLogger("KidneyTumorSegLib")

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 130, 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (what schedulers send): handled like Ctrl-C, so
    every ``finally`` and cleanup runs and no temporary file is left."""


def _output_plan(inputs: Sequence[str], output: str) -> list[tuple[Path, Path]]:
    """Pair every input case with its output file; one file for one input file, a folder otherwise."""
    from .errors import InputError
    from .dicom import DICOM_SUFFIX
    from .imageio import LABEL_OUTPUT_SUFFIXES, discover_cases, image_suffix

    found = discover_cases(inputs)
    cases = [case.path for case in found]
    out = Path(output)
    suffix = image_suffix(out)
    if suffix == DICOM_SUFFIX:
        if len(cases) != 1:
            raise InputError(f"{len(cases)} input cases but -o {output} is one DICOM SEG file; segment one DICOM series at a time")
        if not cases[0].is_dir():
            raise InputError(f"-o {output} writes a DICOM SEG, which needs a DICOM series (a folder) as input; "
                             f"{cases[0]} is not DICOM: write a label map ({', '.join(LABEL_OUTPUT_SUFFIXES)}) instead")
        return [(cases[0], out)]
    if suffix in LABEL_OUTPUT_SUFFIXES:
        if len(cases) != 1:
            raise InputError(f"{len(cases)} input cases but -o {output} is a single file; give an output folder instead")
        return [(cases[0], out)]
    if suffix and not out.is_dir():
        raise InputError(f"-o {output}: output must be a folder or a file ending in {', '.join(LABEL_OUTPUT_SUFFIXES)} "
                         f"(or {DICOM_SUFFIX}: a DICOM SEG, for a DICOM series input)")
    return [(case.path, out / f"{case.name}.nii.gz") for case in found]


def _stats_path(stats_arg: Optional[str], output: Path, batch: bool) -> Optional[Path]:
    if not stats_arg:
        return None
    if not batch:
        return Path(stats_arg)
    return Path(stats_arg) / f"{output.name[:-len('.nii.gz')] if output.name.endswith('.nii.gz') else output.stem}.json"


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are, or would be, the same file (symlinks followed, hard links too)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_paths_distinct(inputs: Sequence[Path], outputs: Sequence[tuple[Path, str]]) -> None:
    """Refuse (with or without --overwrite) an output that is an input (a DICOM folder's
    files included) or another output."""
    from .errors import OutputError

    input_files = []
    for case in inputs:
        input_files.append(case)
        if case.is_dir():
            with contextlib.suppress(OSError):
                input_files += [f for f in case.iterdir() if f.is_file()]
    for i, (out, role) in enumerate(outputs):
        for inp in input_files:
            if _same_file(out, inp):
                raise OutputError(f"{role} {out} is the input {inp}; inputs are never overwritten: choose another path")
        for other, other_role in outputs[:i]:
            if _same_file(out, other):
                raise OutputError(f"{out} is both the {other_role} and the {role}; choose distinct paths")


def _segment_image(segmenter, image, args, prefix: str = ""):
    """Segment one CT (shared by ``segment`` and ``pacs``): :meth:`Segmenter.segment` is the one
    validating entry (CT check, ``--force``, memory against the model's stage grids)."""
    progress = None if args.quiet and args.progress == "bar" else ProgressPrinter(args.progress, prefix)
    return segmenter.segment(image, progress=progress, force=args.force)


def _check_header(path, series_uid, manifest) -> None:
    """Size, spacing, extent and memory from the header, before the voxels are read."""
    from .imageio import read_image_information
    from .validation import check_memory, validate_ct_header

    info = read_image_information(path, series_uid=series_uid)
    validate_ct_header(info)
    check_memory(info, manifest=manifest)


def _dicom_source(folder, series_uid):
    """The DICOM series a SEG will reference, checked before any segmenting: (series, datasets)."""
    from .dicom import read_source_datasets, require
    from .imageio import select_dicom_series

    require("highdicom")
    series = select_dicom_series(folder, series_uid)
    return series, read_source_datasets(series.files)


def _dicom_results(result, datasets, manifest, with_report: bool):
    """The SEG (and the SR referencing it) of one result, built before anything is written or stored."""
    from .dicom import build_report, build_segmentation

    seg = build_segmentation(result.labels, datasets, manifest.name, manifest.version)
    report = build_report(seg, result.stats, manifest.name, manifest.version) if with_report else None
    return seg, report


def _error_json_line(args, exc, case=None) -> None:
    """With ``--progress json``, a user error is also a structured line on stderr (before the
    ``error:`` line), so front ends (the Slicer module) can read its kind, e.g. NotCTLikeError,
    which a user may overrule with --force."""
    if getattr(args, "progress", None) != "json":
        return
    error = {"kind": type(exc).__name__, "message": str(exc)}
    if case is not None:
        error["input"] = str(case)
    print(json.dumps({"error": error}), file=sys.stderr, flush=True)


def cmd_segment(args) -> int:
    from .dicom import DICOM_SUFFIX
    from .errors import InputError, KidneyTumorSegError
    from .imageio import (check_output_writable, image_suffix, read_image, remove_stale_temp_files,
                          write_image_atomic, write_json_atomic)
    from .measurements import summarize
    from .models import load_package
    from .pipeline import Segmenter

    plan = _output_plan(args.inputs, args.output)
    as_dicom = image_suffix(plan[0][1]) == DICOM_SUFFIX  # one DICOM series -> one SEG (checked by _output_plan)
    if args.sr and not as_dicom:
        raise InputError(f"--sr writes a DICOM SR that references the DICOM SEG; it needs -o ending in {DICOM_SUFFIX}")
    if args.sr and image_suffix(args.sr) != DICOM_SUFFIX:
        raise InputError(f"--sr {args.sr}: the report's file name must end in {DICOM_SUFFIX}")
    sr_out = Path(args.sr) if args.sr else None
    batch = not as_dicom and (len(plan) > 1 or not plan[0][1].name.endswith((".nii", ".nii.gz", ".nrrd"))
                              or Path(args.output).is_dir())
    cases = [(case, out, _stats_path(args.stats, out, batch)) for case, out in plan]
    outputs = ([(out, "SEG output" if as_dicom else "output") for _, out, _ in cases]
               + ([(sr_out, "--sr report")] if sr_out is not None else [])
               + [(st, "--stats output") for _, _, st in cases if st is not None])
    _check_paths_distinct([case for case, _, _ in cases], outputs)
    # Before any work: every output must be writable; in batch mode a case whose output is
    # refused (e.g. exists without --overwrite) fails alone and the others run.
    refused = {}
    for case, out, stats_out in cases:
        try:
            for path in (out, sr_out, stats_out):
                if path is not None:
                    check_output_writable(path, args.overwrite)
                    remove_stale_temp_files(path)
        except KidneyTumorSegError as exc:
            if not batch:
                raise
            refused[case] = exc
    series_uid, datasets = args.series, None
    if as_dicom:  # refuse a series a SEG cannot reference before spending time on it
        series, datasets = _dicom_source(plan[0][0], args.series)
        series_uid = series.uid
    package = load_package(args.model)
    segmenter = Segmenter(package, device=args.device, tta=args.tta)
    logger.info("model %s %s on %s (%s)", package.manifest.name, package.manifest.version, segmenter.device, segmenter.device_reason)
    failures = []
    for i, (case, out, stats_out) in enumerate(cases):
        prefix = f"[{i + 1}/{len(cases)}] " if len(cases) > 1 else ""
        start = time.perf_counter()
        try:
            if case in refused:
                raise refused[case]
            _check_header(case, series_uid, package.manifest)  # size, spacing, memory: before reading
            image = read_image(case, series_uid=series_uid)
            result = _segment_image(segmenter, image, args, prefix)
            del image
            if as_dicom:
                from .dicom import write_dataset_atomic

                seg, report = _dicom_results(result, datasets, package.manifest, sr_out is not None)
                write_dataset_atomic(seg, out, overwrite=args.overwrite)
                if report is not None:
                    write_dataset_atomic(report, sr_out, overwrite=args.overwrite)
            else:
                write_image_atomic(result.labels, out, overwrite=args.overwrite)
            if stats_out is not None:
                write_json_atomic({"input": str(case), "output": str(out), "model": result.model_name,
                                   "device": result.device, "timings_s": result.timings, "notes": list(result.notes),
                                   **result.stats},
                                  stats_out, args.overwrite)
        except KidneyTumorSegError as exc:
            if not batch:
                raise
            _error_json_line(args, exc, case)
            print(f"error: {case}: {exc}", file=sys.stderr)
            failures.append(case)
            continue
        except Exception:  # a bug: its traceback, and the other cases still run
            if not batch:
                raise
            print(f"error: {case}: internal error (a bug; please report it with this traceback):", file=sys.stderr)
            traceback.print_exc()
            failures.append(case)
            continue
        if not args.quiet:
            notes = f" ({'; '.join(result.notes)})" if result.notes else ""
            also = f" + {sr_out}" if sr_out is not None else ""
            print(f"{prefix}{case} -> {out}{also} in {time.perf_counter() - start:.1f} s: {summarize(result.stats)}{notes}")
    if batch:
        print(f"{len(cases) - len(failures)} of {len(cases)} cases segmented" + (f"; failed: {', '.join(map(str, failures))}" if failures else ""))
    return EXIT_FAILED if failures else EXIT_OK


def cmd_pacs(args) -> int:
    import tempfile

    from .dicom import require
    from .dicomweb import Pacs, read_credentials
    from .errors import InputError
    from .imageio import read_image
    from .measurements import summarize
    from .models import load_package
    from .pipeline import Segmenter

    require("highdicom")
    pacs = Pacs(args.url, read_credentials(args.auth_file))
    series_uid = pacs.choose_series(args.study, args.series)
    package = load_package(args.model)
    segmenter = Segmenter(package, device=args.device, tta=args.tta)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kidney-tumor-seg-pacs-") as tmp:
        pacs.retrieve_series(args.study, series_uid, Path(tmp))
        series, datasets = _dicom_source(tmp, series_uid)
        if str(datasets[0].StudyInstanceUID) != args.study:
            raise InputError(f"The server returned series {series_uid} of study {datasets[0].StudyInstanceUID}, not {args.study}")
        _check_header(tmp, series.uid, package.manifest)  # size, spacing, memory: before reading
        image = read_image(tmp, series_uid=series.uid)
        result = _segment_image(segmenter, image, args)
        del image
    seg, report = _dicom_results(result, datasets, package.manifest, not args.no_sr)
    pacs.store([seg] + ([report] if report is not None else []), args.study)
    if not args.quiet:
        stored = f"SEG {seg.SOPInstanceUID}" + (f" and SR {report.SOPInstanceUID}" if report is not None else "")
        notes = f" ({'; '.join(result.notes)})" if result.notes else ""
        print(f"series {series_uid} -> stored {stored} in study {args.study} on {pacs.url} "
              f"in {time.perf_counter() - start:.1f} s: {summarize(result.stats)}{notes}")
    return EXIT_OK


def cmd_models(args) -> int:
    from .models import install_model, list_models, user_models_dir

    if args.models_command == "list":
        infos = list_models()
        if args.json:
            print(json.dumps([i.to_dict() for i in infos], indent=2))
        else:
            for i in infos:
                flag = " (default)" if i.default else ""
                print(f"{i.name} {i.version} [{i.source}]{flag}\n    {i.description}\n    intended use: {i.intended_use}\n    {i.path}")
            print(f"installed models folder: {user_models_dir()}")
        return EXIT_OK
    printer = ProgressPrinter("bar")
    info = install_model(args.source, sha256=args.sha256, overwrite=args.overwrite,
                         progress=lambda done, total: printer(done / total if total else 0.0, f"{done / 1e6:.1f} MB"))
    print(f"installed {info.name} {info.version} into {info.path}")
    return EXIT_OK


def cmd_devices(args) -> int:
    from .device import describe_devices, resolve_device

    devices = describe_devices()
    if args.json:
        print(json.dumps(devices))
    else:
        for d in devices:
            mem = f", {d['memory_bytes'] / 2**30:.1f} GiB" if d["memory_bytes"] else ""
            print(f"{d['kind']}: {d['name']}{mem}")
        dev, reason = resolve_device("auto")
        print(f"auto selects: {dev} ({reason})")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.output), device=args.device, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kidney-tumor-seg",
        description="Coarse-to-fine kidney, kidney tumor and cyst segmentation in contrast-enhanced CT. "
                    "Output label maps: 0 background, 1 kidney, 2 tumor, 3 cyst (when the model predicts cysts), "
                    "on exactly the input's grid.")
    parser.add_argument("--debug", action="store_true", help="show debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment one or more CT volumes",
                         description="Segment CTs: a file (NIfTI, NRRD, MetaImage), a DICOM series folder, several of them, "
                                     "or a folder of them (batch: one output per case in the output folder).")
    seg.add_argument("inputs", nargs="+", metavar="INPUT")
    seg.add_argument("-o", "--output", required=True,
                     help="output label map (.nii.gz, .nii, .nrrd) for one input, a DICOM SEG (.dcm) for one DICOM "
                          "series, or a folder for several inputs")
    seg.add_argument("--model", default=None, help="model package name or folder (default: the bundled default model)")
    seg.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    seg.add_argument("--tta", action="store_true", help="mirror test-time augmentation (slower)")
    seg.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    seg.add_argument("--force", action="store_true", help="accept images whose intensities do not look like CT in HU")
    seg.add_argument("--stats", metavar="PATH", help="write measurements as JSON (a file; a folder in batch mode)")
    seg.add_argument("--series", metavar="UID", help="DICOM SeriesInstanceUID to read when a folder holds several series")
    seg.add_argument("--sr", metavar="REPORT.dcm",
                     help="with -o RESULT.dcm: also write the measurements as a DICOM SR (TID 1500) referencing the SEG")
    seg.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help="progress on stderr (default: bar)")
    seg.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    seg.set_defaults(func=cmd_segment)

    pacs = sub.add_parser(
        "pacs", help="segment a series from a DICOMweb server (PACS) and store the DICOM SEG and SR back",
        description="Retrieve a CT series over DICOMweb (WADO-RS), segment it, store a DICOM SEG and a measurement "
                    "SR (TID 1500) back in its study (STOW-RS). Credentials: --auth-file, or the environment "
                    "variables KTS_DICOMWEB_TOKEN (bearer token) or KTS_DICOMWEB_USER and KTS_DICOMWEB_PASSWORD "
                    "(never on the command line). Needs pip install \"kidney-tumor-seg[dicom]\".")
    pacs.add_argument("--url", required=True, help="DICOMweb base URL, e.g. http://host:8042/dicom-web")
    pacs.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    pacs.add_argument("--series", metavar="UID", help="SeriesInstanceUID (default: the study's largest CT series)")
    pacs.add_argument("--auth-file", metavar="FILE",
                      help="file of NAME=value lines (KTS_DICOMWEB_TOKEN, or KTS_DICOMWEB_USER and KTS_DICOMWEB_PASSWORD)")
    pacs.add_argument("--no-sr", action="store_true", help="store only the SEG, not the measurement SR")
    pacs.add_argument("--model", default=None, help="model package name or folder (default: the bundled default model)")
    pacs.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    pacs.add_argument("--tta", action="store_true", help="mirror test-time augmentation (slower)")
    pacs.add_argument("--force", action="store_true", help="accept images whose intensities do not look like CT in HU")
    pacs.add_argument("--progress", choices=("bar", "json", "none"), default="bar", help="progress on stderr (default: bar)")
    pacs.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    pacs.set_defaults(func=cmd_pacs)

    models = sub.add_parser("models", help="list or install model packages")
    msub = models.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="list bundled and installed model packages")
    ml.add_argument("--json", action="store_true")
    mi = msub.add_parser("install", help="install a model package from a folder, a .zip or a URL")
    mi.add_argument("source", metavar="PATH_OR_URL")
    mi.add_argument("--sha256", help="expected sha256 of the zip (required for URLs)")
    mi.add_argument("--overwrite", action="store_true", help="replace an installed package of the same name")
    models.set_defaults(func=cmd_models)

    dev = sub.add_parser("devices", help="list the devices torch can use")
    dev.add_argument("--json", action="store_true")
    dev.set_defaults(func=cmd_devices)

    demo = sub.add_parser("demo", help="segment the bundled sample CT with the default model and write an overview")
    demo.add_argument("-o", "--output", default="demo-output", help="output folder (default: demo-output)")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--overwrite", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failed, 130 interrupted, 143 terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.DEBUG if args.debug else (logging.WARNING if quiet else logging.INFO),
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    if not args.debug:  # their step-by-step INFO lines are noise on a command line
        for name in ("highdicom", "dicomweb_client"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from .errors import KidneyTumorSegError

    with _sigterm_as_interrupt(), _python_warnings_to_debug_log():
        try:
            return args.func(args)
        except KidneyTumorSegError as exc:
            if args.debug:
                raise
            _error_json_line(args, exc)
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except Terminated:
            print("error: terminated (SIGTERM); no output was written or replaced", file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except MemoryError:
            print("error: out of memory; try a smaller volume or a machine with more memory", file=sys.stderr)
            return EXIT_FAILED


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread while the
    command runs, so it is cleaned up like Ctrl-C; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _python_warnings_to_debug_log():
    """Python warnings (torch's, numpy's) go to the debug log, not before an ``error:`` line."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        logger.debug("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
