"""DICOM SEG and SR output: read back with highdicom/pydicom and compared voxel for voxel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import highdicom as hd
    import pydicom
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise
    pytest.skip("DICOM output needs the [dicom] extra: pip install \".[dicom]\"", allow_module_level=True)

from conftest import REPO, classifier_manifest, ct_from_labels, save_test_package, shared_path
from dicom_helpers import repaired_copy, tree_digest, write_ct_series
from KidneyTumorSegLib import dicom
from KidneyTumorSegLib.cli import main
from KidneyTumorSegLib.metrics import dice
from Training.phantoms import procedural_labels

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    return str(save_test_package(tmp_path_factory.mktemp("pkg") / "pkg", classifier_manifest(classes=("background", "kidney", "tumor", "cyst"))).root)


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    """An oblique, anisotropic multi-slice CT series with kidneys, tumors and a cyst."""
    root = tmp_path_factory.mktemp("phantom")
    labels = procedural_labels(size=(56, 48, 36), spacing=(3.0, 2.5, 3.5), rng=np.random.default_rng(3), tumors=1, cysts=1)
    labels.SetDirection(_rotation(0.12, 0.2).ravel().tolist())
    labels.SetOrigin((-80.0, -60.0, -40.0))
    ct = ct_from_labels(labels)
    uids = write_ct_series(ct, root / "series")
    return root / "series", uids


@pytest.fixture(scope="module")
def real_series(tmp_path_factory):
    source = shared_path("data", "real_ct", "example_ct_dicom")
    folder = tmp_path_factory.mktemp("real") / "example_ct_dicom"
    return folder, repaired_copy(source, folder), source


def _sources_in_order(folder: Path):
    from KidneyTumorSegLib.imageio import select_dicom_series

    return [pydicom.dcmread(f, stop_before_pixels=True) for f in select_dicom_series(folder).files]


def _check_seg_against(seg_path: Path, labels_path: Path, folder: Path, model=("test-c2f", "0.0.1")):
    """The SEG equals the label map voxel for voxel, on the source slices, with the right references."""
    seg = hd.seg.segread(str(seg_path))
    sources = _sources_in_order(folder)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.SegmentationType == "BINARY"
    back = dicom.segmentation_labels(seg, [ds.SOPInstanceUID for ds in sources])
    assert back.shape == labels.shape and np.array_equal(back, labels)
    # references and geometry: same study, frame of reference, source series; every frame on its source slice
    first = sources[0]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.PatientID == first.PatientID
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [first.SeriesInstanceUID]
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == \
        [float(v) for v in first.ImageOrientationPatient]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [float(v) for v in first.PixelSpacing]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = by_uid[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient] == \
            [float(v) for v in source.ImagePositionPatient]
    # one segment per label present, with the Slicer module's codes and the model as algorithm
    present = [int(v) for v in np.unique(labels) if v]
    names = {1: "Kidney", 2: "Tumor", 3: "Cyst"}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [names[v] for v in present]
    for number, segment in enumerate(seg.SegmentSequence, start=1):
        coding = dicom._CODING_BY_NAME[segment.SegmentLabel]
        assert segment.SegmentNumber == number and segment.SegmentAlgorithmType == "AUTOMATIC"
        category, kind = segment.SegmentedPropertyCategoryCodeSequence[0], segment.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == coding.category[:2]
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == coding.type[:2]
        if coding.region:
            assert segment.AnatomicRegionSequence[0].CodeValue == "64033007"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == model
    return seg, labels


def test_seg_of_a_phantom_series_equals_the_label_map(tmp_path, phantom_series, package_dir, capsys):
    folder, _ = phantom_series
    before = tree_digest(folder)
    assert run_cli("segment", folder, "-o", tmp_path / "labels.nrrd", "--model", package_dir, "--device", "cpu") == 0
    assert run_cli("segment", folder, "-o", tmp_path / "out" / "result.dcm", "--model", package_dir, "--device", "cpu",
                   "--stats", tmp_path / "stats.json") == 0
    seg, labels = _check_seg_against(tmp_path / "out" / "result.dcm", tmp_path / "labels.nrrd", folder)
    assert {int(v) for v in np.unique(labels)} == {0, 1, 2, 3}, "the phantom should give all three segments"
    assert tree_digest(folder) == before, "input modified"
    assert sorted(os.listdir(tmp_path / "out")) == ["result.dcm"], "temporary files left behind"
    assert json.loads((tmp_path / "stats.json").read_text())["output"].endswith("result.dcm")


def test_seg_of_the_real_series_equals_the_label_map(tmp_path, real_series, package_dir):
    folder, uids, _ = real_series
    assert run_cli("segment", folder, "-o", tmp_path / "labels.nrrd", "--model", package_dir, "--device", "cpu", "--force") == 0
    assert run_cli("segment", folder, "-o", tmp_path / "result.dcm", "--model", package_dir, "--device", "cpu", "--force") == 0
    seg, labels = _check_seg_against(tmp_path / "result.dcm", tmp_path / "labels.nrrd", folder)
    assert labels.any() and len(uids) == 20
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian  # the source is JPEG 2000: SEG is not


def test_the_real_series_as_anonymized_is_refused_with_the_reason(tmp_path, shared_dir, package_dir, capsys):
    source = shared_dir / "data" / "real_ct" / "example_ct_dicom"
    assert run_cli("segment", source, "-o", tmp_path / "result.dcm", "--model", package_dir) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Cannot make a DICOM SEG") and "StudyInstanceUID" in err and "SOPInstanceUID" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "result.dcm").exists()


def test_sr_reports_each_kidney_and_lesion_and_references_the_seg(tmp_path, phantom_series, package_dir):
    folder, _ = phantom_series
    assert run_cli("segment", folder, "-o", tmp_path / "result.dcm", "--sr", tmp_path / "report.dcm", "--model", package_dir,
                   "--device", "cpu", "--stats", tmp_path / "stats.json") == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    seg = hd.seg.segread(str(tmp_path / "result.dcm"))
    sr = hd.sr.srread(str(tmp_path / "report.dcm"))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    groups = sr.content.get_volumetric_roi_measurement_groups()
    segment_number = {s.SegmentLabel: s.SegmentNumber for s in seg.SegmentSequence}
    expected = [(f"{k['side']} kidney", "Kidney", {"Volume": round(k["volume_ml"], 3)}) for k in stats["kidneys"]]
    for key, name in (("tumors", "Tumor"), ("cysts", "Cyst")):
        expected += [(f"{name.lower()} {i}, {t['side']} kidney", name,
                      {"Volume": round(t["volume_ml"], 3), "Diameter": round(t["max_diameter_mm"], 2)})
                     for i, t in enumerate(stats[key]["items"], start=1)]
    assert len(groups) == len(expected) >= 4
    for group, (identifier, segment, values) in zip(groups, expected):
        assert group.tracking_identifier == identifier
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID and ref.referenced_segment_numbers == [segment_number[segment]]
        got = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        assert got == {name: (value, "mL" if name == "Volume" else "mm") for name, value in values.items()}


def test_bad_dicom_requests_get_one_clear_line(tmp_path, phantom_series, package_dir, capsys):
    folder, _ = phantom_series
    nifti = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(next(folder.iterdir()))), str(nifti))
    cases = [
        (("segment", nifti, "-o", tmp_path / "r.dcm"), "writes a DICOM SEG, which needs a DICOM series"),
        (("segment", nifti, "-o", tmp_path / "r.nii.gz", "--sr", tmp_path / "s.dcm"), "--sr writes a DICOM SR"),
        (("segment", folder, "-o", tmp_path / "r.dcm", "--sr", tmp_path / "s.txt"), "must end in .dcm"),
        (("segment", folder, "-o", tmp_path / "r.dcm", "--sr", tmp_path / "r.dcm"), "is both the SEG output and the --sr report"),
        (("segment", folder, "-o", tmp_path / "r.dcm", "--series", "1.2.3"), "No DICOM series with UID 1.2.3"),
        # a SEG or SR path that is one of the series' own files: refused even with --overwrite
        (("segment", folder, "-o", sorted(folder.iterdir())[0], "--overwrite"), "is the input"),
        (("segment", folder, "-o", tmp_path / "r.dcm", "--sr", sorted(folder.iterdir())[1], "--overwrite"), "is the input"),
    ]
    for args, message in cases:
        assert run_cli(*args, "--model", package_dir) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, (args, err)
    assert not list(tmp_path.glob("*.dcm")), "nothing written for a refused request"
    # an existing SEG is not overwritten unasked; --overwrite replaces it (atomically: no leftovers)
    out = tmp_path / "r.dcm"
    out.write_bytes(b"keep me")
    assert run_cli("segment", folder, "-o", out, "--model", package_dir) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert run_cli("segment", folder, "-o", out, "--model", package_dir, "--overwrite") == 0
    assert hd.seg.segread(str(out)).SOPClassUID == SEG_SOP_CLASS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "r.dcm"]


def _check_no_finding(report):
    [group] = report.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == "kidney (none found)" and group.referenced_segment.referenced_segment_numbers == [1]
    assert [(m.name.meaning, m.value) for m in group.get_measurements()] == [("Volume", 0.0)]


def test_an_empty_result_is_an_empty_kidney_segment_and_a_wrong_grid_is_refused(tmp_path, phantom_series):
    from KidneyTumorSegLib.imageio import read_image

    folder, uids = phantom_series
    sources, ct = _sources_in_order(folder), read_image(folder)
    empty = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ct)
    seg = dicom.build_segmentation(empty, sources, "m", "1")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Kidney"]
    assert not dicom.segmentation_labels(seg, uids).any()
    report = dicom.build_report(seg, {"kidneys": [], "tumors": {"items": []}, "cysts": {"items": []}}, "m", "1")
    _check_no_finding(hd.sr.Comprehensive3DSR.from_dataset(report))
    shifted = sitk.Image(empty)
    shifted.SetOrigin([v + 1.0 for v in empty.GetOrigin()])
    with pytest.raises(dicom.InputError, match="origin is not the first slice"):
        dicom.build_segmentation(shifted, sources, "m", "1")
    with pytest.raises(dicom.InputError, match="not the DICOM series"):
        dicom.build_segmentation(empty[:, :, 1:], sources[1:] + sources[:1], "m", "1")
    with pytest.raises(dicom.InputError, match="not in slice order"):
        dicom.build_segmentation(empty, sources[:1] + sources[1:][::-1], "m", "1")
    # a missing slice: frame k still goes on source slice k (what label slice k was computed from)
    gappy = sources[:5] + sources[6:]
    labels = np.zeros((len(gappy),) + sitk.GetArrayViewFromImage(ct).shape[1:], np.uint8)
    labels[3:9, 10:20, 10:20] = 1
    image = sitk.GetImageFromArray(labels)
    image.SetOrigin(ct.GetOrigin()), image.SetSpacing(ct.GetSpacing()), image.SetDirection(ct.GetDirection())
    seg = dicom.build_segmentation(image, gappy, "m", "1")
    assert np.array_equal(dicom.segmentation_labels(seg, [ds.SOPInstanceUID for ds in gappy]), labels)


def test_a_dicom_file_is_verified_by_reading_it_back_before_the_rename(tmp_path, phantom_series, monkeypatch):
    """DICOM SEG/SR go through the one atomic write (imageio.atomic_write) with a pydicom read-back:
    a writer that silently stops short (a full disk) leaves the old file and no temporary file."""
    import pydicom

    from KidneyTumorSegLib.imageio import read_image

    folder, _ = phantom_series
    sources, ct = _sources_in_order(folder), read_image(folder)
    labels = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    labels.CopyInformation(ct)
    seg = dicom.build_segmentation(labels, sources, "m", "1")
    out = tmp_path / "seg.dcm"
    assert dicom.write_dataset_atomic(seg, out) == out
    assert pydicom.dcmread(out).SOPInstanceUID == seg.SOPInstanceUID
    good = out.read_bytes()
    real_save_as = type(seg).save_as

    def truncated_save_as(self, filename, *args, **kwargs):
        real_save_as(self, filename, *args, **kwargs)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)

    monkeypatch.setattr(type(seg), "save_as", truncated_save_as)
    with pytest.raises(dicom.OutputError, match="incomplete or wrong"):
        dicom.write_dataset_atomic(seg, out, overwrite=True)
    assert out.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]


def test_segment_codes_are_the_slicer_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "KidneyTumorSeg"))
    from KidneyTumorSegHelpers import terminology

    for spec in terminology.ALL_SEGMENTS:
        parts = terminology.parseTerminologyEntry(spec.terminology)
        coding = dicom._CODING_BY_LABEL[spec.label]
        assert coding.name == spec.name
        assert tuple(parts["category"].split("^")) == coding.category
        assert tuple(parts["type"].split("^")) == coding.type
        region = tuple(parts["region"].split("^")) if parts["region"] != terminology.EMPTY_CODE else None
        assert region == coding.region


def test_the_library_works_without_the_dicom_extra(tmp_path, phantom_series):
    """Core import and NIfTI output need neither highdicom nor pydicom; asking for DICOM says what to install."""
    folder, _ = phantom_series
    code = (
        "import sys\n"
        "for name in ('highdicom', 'pydicom', 'dicomweb_client'): sys.modules[name] = None\n"
        "import KidneyTumorSegLib, KidneyTumorSegLib.pipeline, KidneyTumorSegLib.dicom, KidneyTumorSegLib.dicomweb\n"
        "from KidneyTumorSegLib.cli import main\n"
        f"sys.exit(main(['segment', {str(folder)!r}, '-o', {str(tmp_path / 'r.dcm')!r}]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: DICOM output needs the optional package highdicom: pip install \"kidney-tumor-seg[dicom]\"")


@pytest.mark.slow
def test_bundled_model_writes_a_seg_of_the_sample_as_a_dicom_series(tmp_path):
    """The bundled sample CT written as a DICOM series of sagittal slices: the SEG's kidneys match the truth."""
    from KidneyTumorSegLib.demo import SAMPLE_CT, SAMPLE_TRUTH
    from KidneyTumorSegLib.models import load_package

    manifest = load_package(None).manifest
    sample = tmp_path / "sample_dicom"
    uids = write_ct_series(sitk.ReadImage(str(SAMPLE_CT)), sample)
    assert run_cli("segment", sample, "-o", tmp_path / "sample.dcm", "--sr", tmp_path / "sample_sr.dcm", "--device", "cpu") == 0
    seg = hd.seg.segread(str(tmp_path / "sample.dcm"))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (manifest.name, manifest.version)
    labels = dicom.segmentation_labels(seg, uids)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_TRUTH)))
    assert labels.shape == truth.shape and dice(labels > 0, truth > 0) > 0.9 and (labels == 2).any()
    assert len(hd.sr.srread(str(tmp_path / "sample_sr.dcm")).content.get_volumetric_roi_measurement_groups()) >= 3
