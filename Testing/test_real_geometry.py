"""The pipeline on real geometries: a real KiTS19 label map (permuted axes) and the real DICOM series.

The CTs are made from the real label maps with the test intensities (conftest), so the
intensity classifier's answer is known; what is checked is that the whole chain - reading,
working grids, regions, paste-back, writing - puts every voxel back where it belongs.
"""

import numpy as np
import SimpleITK as sitk

from conftest import ct_from_labels
from KidneyTumorSegLib.cli import main
from KidneyTumorSegLib.imageio import read_image
from KidneyTumorSegLib.metrics import dice
from KidneyTumorSegLib.pipeline import Segmenter


def test_real_kits19_label_map_round_trip(shared_dir, classifier_package):
    labels = read_image(shared_dir / "data" / "kits19_labels" / "case_00010" / "segmentation.nii.gz")
    assert labels.GetDirection() == (-0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0) or np.allclose(
        labels.GetDirection(), (0, 0, 1, 0, 1, 0, -1, 0, 0))
    result = Segmenter(classifier_package, device="cpu").segment(ct_from_labels(labels))
    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(result.labels, getter)() == getattr(labels, getter)()
    truth = sitk.GetArrayViewFromImage(labels)
    out = sitk.GetArrayViewFromImage(result.labels)
    assert dice(out > 0, truth > 0) > 0.95
    assert dice(out == 2, truth == 2) > 0.9
    # KiTS19 case 10 has both kidneys: one each side of the midline
    assert sorted(k["side"] for k in result.stats["kidneys"]) == ["left", "right"]


def test_real_dicom_series_output_grid(shared_dir, classifier_package, tmp_path):
    folder = shared_dir / "data" / "real_ct" / "example_ct_dicom"
    out = tmp_path / "seg.nrrd"  # NRRD keeps origin and direction in double precision
    assert main(["segment", str(folder), "-o", str(out), "--model", str(classifier_package.root), "--quiet"]) == 0
    ct = read_image(folder)
    seg = sitk.ReadImage(str(out))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert seg.GetSize() == ct.GetSize() == (512, 512, 20)
    assert seg.GetSpacing() == ct.GetSpacing()
    assert seg.GetOrigin() == ct.GetOrigin()
    assert seg.GetDirection() == ct.GetDirection()
