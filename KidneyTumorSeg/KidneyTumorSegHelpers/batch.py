"""Batch mode: segment every CT in a folder with the module's logic.

``Scripts/batch_segment.py`` calls :func:`main` under
``Slicer --no-splash --no-main-window --python-script``, or under plain Python with the
``slicer-core`` wheel installed (``python batch_segment.py ...``: no Slicer application, so
:func:`prepareScene` sets up a scene with the Segmentations and Volumes logics). Both read
volumes with the Volumes logic's archetype reader and write segmentations with a
``vtkMRMLSegmentationStorageNode``, so they write the same files. The cases, and their names,
are those the library's command line finds in the folder (``imageio.discover_cases``, the one
rule: the NIfTI/NRRD/MetaImage files directly in it and every folder below it holding a DICOM
series; DICOM needs the Slicer application). Every case gets ``<case>.seg.nrrd`` in the output
folder, and ``measurements.csv`` gets one row per case (``status`` ok/failed with the reason). With
``--dicom-seg`` each DICOM case also gets ``<case>.dcm``, a DICOM SEG written by the library's
own command line (the same code as ``kidney-tumor-seg segment FOLDER -o case.dcm``). The exit
code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import slicer

from . import process, results
from .logic import KidneyTumorSegLogic, SegmentationError

logger = logging.getLogger(__name__)

#: seconds one DICOM SEG run of the library may take
DICOM_SEG_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Case:
    """One input: ``kind`` is ``file`` (a volume file) or ``dicom`` (a folder with a DICOM series)."""
    name: str
    kind: str
    path: str


def discoverCases(logic: KidneyTumorSegLogic, inputDir: str) -> List[Case]:
    """The cases in ``inputDir`` by the library's rule (``imageio.discover_cases``, which the command
    line uses too), named as the command line names them; SegmentationError when there is none."""
    imageio, errors = logic.libraryModule("imageio"), logic.libraryModule("errors")
    try:
        found = imageio.discover_cases([inputDir])
    except errors.InputError as exc:
        raise SegmentationError(str(exc))
    return [Case(case.name, "dicom" if case.is_dicom else "file", str(case.path)) for case in found]


def hasApplication() -> bool:
    """True inside Slicer (``slicer.app``); False in plain Python with slicer-core."""
    return hasattr(slicer, "app")


_logics: list = []


def prepareScene() -> None:
    """Without the Slicer application: a fresh ``slicer.mrmlScene`` with the module logics
    Slicer would have set on it (Colors for the default color tables, Segmentations for the
    segment representations, Volumes for reading)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    _logics.clear()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    _logics.append(applicationLogic)
    for moduleName, className in (("Colors", "vtkSlicerColorLogic"), ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
                                  ("Volumes", "vtkSlicerVolumesLogic")):
        logic = getattr(slicer, className)()
        logic.SetMRMLApplicationLogic(applicationLogic)
        logic.SetMRMLScene(scene)
        applicationLogic.SetModuleLogic(moduleName, logic)  # the Volumes logic finds Colors here
        _logics.append(logic)


def _volumesLogic():
    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "volumes"):
        return modules.volumes.logic()
    for logic in _logics:
        if logic.IsA("vtkSlicerVolumesLogic"):
            return logic
    raise RuntimeError("no Volumes module logic: call prepareScene() first")


def readVolume(path: str, name: str):
    """A scalar volume node read from ``path`` as Slicer's Add Data does (the Volumes logic's
    archetype reader: LPS to RAS, left-handed files made right-handed as in Slicer >= 5.8)."""
    node = _volumesLogic().AddArchetypeVolume(path, name, 0)
    if node is None:
        raise RuntimeError(f"Failed to load volume from {path}")
    return node


def writeSegmentation(segmentationNode, path: str) -> None:
    """Write ``<case>.seg.nrrd`` (segments with names, colours, terminology, on the CT's grid)."""
    storageNode = slicer.vtkMRMLSegmentationStorageNode()
    storageNode.SetFileName(path)
    if not storageNode.WriteData(segmentationNode):
        raise SegmentationError(f"could not write {path}")


def loadCase(case: Case) -> list:
    """Scalar volume nodes of a case (a DICOM folder may hold several series)."""
    if case.kind == "file":
        return [readVolume(case.path, case.name)]
    if not hasApplication():
        raise RuntimeError("DICOM folders need the Slicer application (run with Slicer --python-script)")
    from DICOMLib import DICOMUtils

    nodeIds = []
    with DICOMUtils.TemporaryDICOMDatabase() as database:
        DICOMUtils.importDicom(case.path, database)
        for patientUID in database.patients():
            nodeIds.extend(DICOMUtils.loadPatientByUID(patientUID))
    nodes = [slicer.mrmlScene.GetNodeByID(nodeId) for nodeId in nodeIds]
    volumes = [n for n in nodes if n is not None and n.IsA("vtkMRMLScalarVolumeNode")
               and not n.IsA("vtkMRMLLabelMapVolumeNode")]
    for node in nodes:
        if node is not None and node not in volumes:
            slicer.mrmlScene.RemoveNode(node)
    return volumes


writeCsv = results.writeCsv


def writeDicomSeg(logic: KidneyTumorSegLogic, case: Case, outputDir: str, options: dict,
                  log: Callable[[str], None] = logger.info) -> Optional[dict]:
    """``<case>.dcm``, the DICOM SEG of a DICOM case (its largest series), written by the library's
    command line; returns a failed CSV row, or None when it was written."""
    outputPath = os.path.join(outputDir, f"{case.name}.dcm")
    root = logic.libraryRoot()
    with tempfile.TemporaryDirectory(prefix="KidneyTumorSeg-dicomseg-") as tmp:
        args = process.buildSegmentCommand(logic.pythonExecutable(), case.path, outputPath, os.path.join(tmp, "stats.json"),
                                           model=options.get("model"), device=options.get("device", "auto"),
                                           tta=options.get("tta", False), force=options.get("force", False))
        try:
            code, lines = process.runToCompletion(logic.runner, args, process.buildEnvironment(root), cwd=root,
                                                  timeoutSeconds=DICOM_SEG_TIMEOUT_S)
        except (TimeoutError, OSError) as exc:
            code, lines = -1, [str(exc)]
    if code != 0:
        reason = process.failureMessage(lines, code)
        log(f"  failed: DICOM SEG: {reason}")
        return results.csvRow(f"{case.name} (DICOM SEG)", "failed", f"DICOM SEG: {reason}")
    log(f"  DICOM SEG: {outputPath}")
    return None


def runBatch(logic: KidneyTumorSegLogic, cases: Sequence[Case], outputDir: str, options: dict,
             load: Callable[[Case], list] = loadCase, log: Callable[[str], None] = logger.info,
             dicomSeg: bool = False) -> List[dict]:
    """Segment every case; returns the CSV rows (one per volume, or one per case that failed to load;
    with ``dicomSeg`` also one per DICOM case whose DICOM SEG failed)."""
    os.makedirs(outputDir, exist_ok=True)
    rows = []
    for index, case in enumerate(cases, start=1):
        log(f"[{index}/{len(cases)}] {case.name}")
        if dicomSeg and case.kind == "dicom":
            failed = writeDicomSeg(logic, case, outputDir, options, log)
            if failed is not None:
                rows.append(failed)
        try:
            volumes = load(case)
            if not volumes:
                raise SegmentationError("no CT volume could be loaded")
        except Exception as exc:
            rows.append(results.csvRow(case.name, "failed", f"loading failed: {exc}"))
            log(f"  failed: loading: {exc}")
            continue
        for volumeIndex, volume in enumerate(volumes):
            name = case.name if len(volumes) == 1 else f"{case.name}_{volumeIndex + 1}"
            start = time.monotonic()
            segmentation = None
            try:
                segmentation = logic.segment(volume, createSurfaces=False, **options)
                outputPath = os.path.join(outputDir, f"{name}.seg.nrrd")
                writeSegmentation(segmentation, outputPath)
                stats = logic.lastRun.stats if logic.lastRun is not None else {}
                rows.append(results.csvRow(name, "ok", stats=stats, seconds=time.monotonic() - start,
                                           segmentationFile=os.path.basename(outputPath)))
                log(f"  ok: {results.summaryText(stats)}")
            except Exception as exc:
                rows.append(results.csvRow(name, "failed", str(exc), seconds=time.monotonic() - start))
                log(f"  failed: {exc}")
            finally:
                if segmentation is not None:
                    if segmentation.GetDisplayNode() is not None:
                        slicer.mrmlScene.RemoveNode(segmentation.GetDisplayNode())
                    slicer.mrmlScene.RemoveNode(segmentation)
                if volume.GetDisplayNode() is not None:
                    slicer.mrmlScene.RemoveNode(volume.GetDisplayNode())
                slicer.mrmlScene.RemoveNode(volume)
    return rows


def parseArguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="batch_segment.py",
        description="Segment kidneys, tumors and cysts in every CT of a folder (NIfTI/NRRD files or DICOM "
                    "series) with 3D Slicer's KidneyTumorSeg module. Run with: Slicer --no-splash "
                    "--no-main-window --python-script batch_segment.py --input IN --output OUT, or with "
                    "plain Python and the slicer-core package: python batch_segment.py --input IN --output OUT")
    parser.add_argument("--input", required=True, help="folder of CT files and/or DICOM series folders")
    parser.add_argument("--output", required=True, help="folder for <case>.seg.nrrd and measurements.csv")
    parser.add_argument("--model", default=None, help="model name or package folder (default: the bundled default)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (slower)")
    parser.add_argument("--no-cyst-segment", action="store_true", help="keep cysts inside the Kidney segment")
    parser.add_argument("--force", action="store_true", help="segment volumes that do not look like CT in HU")
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write <case>.dcm, a DICOM SEG, for each DICOM case (segmented by the library once more)")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str], logic: Optional[KidneyTumorSegLogic] = None,
         log: Callable[[str], None] = print) -> int:
    """Batch entry point; returns the process exit code (0 all ok, 1 any case failed, 2 bad usage)."""
    try:
        args = parseArguments(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    if not os.path.isdir(args.input):
        log(f"error: --input must be a folder; {args.input} is not one")
        return 2
    if not hasApplication() and logic is None:
        prepareScene()
    logic = logic or KidneyTumorSegLogic()
    try:
        device = logic.checkedDevice(args.device)  # a bad name is a usage error, before any case runs
        cases = discoverCases(logic, args.input)
    except SegmentationError as exc:
        log(f"error: {exc}")
        return 2
    options = dict(model=args.model, device=device, tta=args.tta,
                   cystSegment=not args.no_cyst_segment, force=args.force)
    rows = runBatch(logic, cases, args.output, options, log=log, dicomSeg=args.dicom_seg)
    csvPath = os.path.join(args.output, "measurements.csv")
    writeCsv(csvPath, rows)
    failed = sum(row["status"] != "ok" for row in rows)
    log(f"{len(rows) - failed} segmented, {failed} failed; measurements in {csvPath}")
    return 1 if failed else 0
