"""Slicer batch mode's --dicom-seg: the real library command line writes <case>.dcm for a DICOM case.

Runs the batch module on real Slicer core (slicer-core) with the application stand-in
(``Testing/slicer_app_shim``, installed exactly as ``test_slicer_module`` does, so whichever of the
two files is imported first the module's logic sees the same ``slicer``; it has no DICOM module, so
loading the DICOM case into the scene fails there, as the module tests expect) and the real
``python -m KidneyTumorSegLib`` in a subprocess with the bundled model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

try:
    import highdicom as hd
    import slicer
    import vtk  # noqa: F401  (slicer-core needs it)
    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError(f"'slicer' at {getattr(slicer, '__file__', '?')} is not the slicer-core package")
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise
    pytest.skip("needs the [test] extra (slicer-core, vtk, highdicom)", allow_module_level=True)

from conftest import REPO
from dicom_helpers import write_ct_series

for path in (str(Path(__file__).resolve().parent / "slicer_app_shim"), str(REPO / "KidneyTumorSeg")):
    if path not in sys.path:
        sys.path.insert(0, path)

import slicer_app_shim as shim  # noqa: E402

shim.install()  # before the module's helpers are imported (test_slicer_module needs them on the stand-in)

from KidneyTumorSegHelpers import batch  # noqa: E402
from KidneyTumorSegHelpers.logic import KidneyTumorSegLogic  # noqa: E402

from KidneyTumorSegLib import dicom  # noqa: E402
from KidneyTumorSegLib.demo import SAMPLE_CT, SAMPLE_TRUTH  # noqa: E402
from KidneyTumorSegLib.metrics import dice  # noqa: E402
from KidneyTumorSegLib.models import load_package  # noqa: E402


@pytest.mark.slow
def test_batch_writes_the_librarys_dicom_seg_for_a_dicom_case(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    uids = write_ct_series(sitk.ReadImage(str(SAMPLE_CT)), inputs / "patient1" / "ct")
    logic = KidneyTumorSegLogic(python=sys.executable, libraryRoot=str(REPO))
    lines = []
    code = batch.main(["--input", str(inputs), "--output", str(outputs), "--device", "cpu", "--dicom-seg"],
                      logic=logic, log=lines.append)
    assert "  DICOM SEG: " + str(outputs / "patient1_ct.dcm") in lines, lines
    assert code == 1  # loading the series into the stand-in's scene fails (no DICOM module outside Slicer)
    rows = (outputs / "measurements.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["patient1_ct", "failed"]]
    seg = hd.seg.segread(str(outputs / "patient1_ct.dcm"))
    manifest = load_package(None).manifest
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (manifest.name, manifest.version)
    labels, truth = dicom.segmentation_labels(seg, uids), sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_TRUTH)))
    assert dice(labels > 0, truth > 0) > 0.9 and (labels == 2).any()


def test_batch_reports_a_failed_dicom_seg_as_a_failed_row(tmp_path):
    folder = tmp_path / "in" / "broken"
    folder.mkdir(parents=True)
    (folder / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # a DICOM preamble, no series
    logic = KidneyTumorSegLogic(python=sys.executable, libraryRoot=str(REPO))
    lines = []
    row = batch.writeDicomSeg(logic, batch.Case("broken", "dicom", str(folder)), str(tmp_path / "out"),
                              {"device": "cpu"}, log=lines.append)
    assert row["status"] == "failed" and row[list(row)[0]] == "broken (DICOM SEG)"
    assert lines and lines[0].startswith("  failed: DICOM SEG: ") and "No input images found" in lines[0]
    assert not (tmp_path / "out" / "broken.dcm").exists()
