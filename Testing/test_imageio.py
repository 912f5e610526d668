"""Reading and writing volumes: geometry round trips, DICOM series, batch
expansion, atomic writing and one-line errors (KidneyTumorSegLib.imageio)."""

from __future__ import annotations

import gzip
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from case_tree import write_case_tree
from KidneyTumorSegLib import imageio
from KidneyTumorSegLib.errors import InputError, OutputError
from KidneyTumorSegLib.imageio import (
    case_name,
    discover_cases,
    image_suffix,
    list_dicom_series,
    read_image,
    write_image_atomic,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(
    not (SHARED / "data").is_dir(), reason=f"shared data folder {SHARED / 'data'} is absent"
)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    m = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


OBLIQUE = tuple((_rotation(0, 20.0) @ _rotation(2, 20.0)).ravel())

# Spacing/origin values chosen exactly representable in float32, so that even
# NIfTI (float32 header) must return them bit for bit.
GEOMETRIES = {
    "kits_permuted": dict(direction=(0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0),
                          spacing=(0.5, 0.919921875, 0.919921875), origin=(12.25, -45.5, 78.875)),
    "oblique": dict(direction=OBLIQUE, spacing=(0.75, 0.8125, 1.25), origin=(-101.25, 33.5, -7.75)),
    "anisotropic": dict(direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                        spacing=(0.5, 0.5, 5.0), origin=(-120.0, -130.5, 400.25)),
}
# Where a format cannot store an oblique direction exactly: NIfTI keeps a
# float32 quaternion/sform, NRRD stores spacing*direction products.
OBLIQUE_TOLERANCE = {".nii": 1e-6, ".nii.gz": 1e-6, ".nrrd": 1e-12, ".nhdr": 1e-12, ".mha": 0.0, ".mhd": 0.0}


def _volume(geometry: dict, dtype=np.int16, shape=(5, 6, 7), seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        arr = rng.integers(0, 4, shape).astype(np.uint8)
    else:
        arr = rng.integers(-1024, 3000, shape).astype(dtype)
    image = sitk.GetImageFromArray(arr)
    image.SetDirection(geometry["direction"])
    image.SetSpacing(geometry["spacing"])
    image.SetOrigin(geometry["origin"])
    return image


def _assert_same(read: sitk.Image, original: sitk.Image, tol: float = 0.0) -> None:
    assert read.GetSize() == original.GetSize()
    assert read.GetPixelID() == original.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(original))
    if tol == 0.0:
        assert read.GetSpacing() == original.GetSpacing()
        assert read.GetOrigin() == original.GetOrigin()
        assert read.GetDirection() == original.GetDirection()
    else:
        np.testing.assert_allclose(read.GetSpacing(), original.GetSpacing(), rtol=0, atol=tol * 10)
        np.testing.assert_allclose(read.GetOrigin(), original.GetOrigin(), rtol=0, atol=tol * 100)
        np.testing.assert_allclose(read.GetDirection(), original.GetDirection(), rtol=0, atol=tol)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("geometry_name", sorted(GEOMETRIES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_read_round_trip(tmp_path, geometry_name, suffix):
    image = _volume(GEOMETRIES[geometry_name])
    out = write_image_atomic(image, tmp_path / f"vol{suffix}")
    assert out == tmp_path / f"vol{suffix}"
    tol = OBLIQUE_TOLERANCE[suffix] if geometry_name == "oblique" else 0.0
    _assert_same(read_image(out), image, tol)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"vol{suffix}"]


@pytest.mark.parametrize("geometry_name", sorted(GEOMETRIES))
@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
def test_read_detached_header_formats(tmp_path, geometry_name, suffix):
    image = _volume(GEOMETRIES[geometry_name])
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(image, str(path))
    assert len(list(tmp_path.iterdir())) == 2  # header + separate data file
    tol = OBLIQUE_TOLERANCE[suffix] if geometry_name == "oblique" else 0.0
    _assert_same(read_image(path), image, tol)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_uint8_label_map_round_trip_is_compressed(tmp_path, suffix):
    labels = _volume(GEOMETRIES["kits_permuted"], dtype=np.uint8, shape=(20, 24, 28))
    out = write_image_atomic(labels, tmp_path / f"seg{suffix}")
    _assert_same(read_image(out), labels)
    if suffix == ".nii.gz":
        assert out.read_bytes()[:2] == b"\x1f\x8b"
    else:
        assert b"encoding: gzip" in out.read_bytes()[:1000]


@needs_shared
def test_read_real_kits_label_geometry():
    path = SHARED / "data/kits19_labels/case_00000/segmentation.nii.gz"
    image = read_image(path)
    assert image.GetSize() == (611, 512, 512)
    assert image.GetSpacing() == (0.5, 0.919921875, 0.919921875)
    assert image.GetDirection() == (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
    assert image.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(image)).tolist()) == {0, 1, 2}
    assert case_name(path) == "segmentation"


@needs_shared
def test_read_real_dicom_series_in_hu():
    folder = SHARED / "data/real_ct/example_ct_dicom"
    series = list_dicom_series(folder)
    assert len(series) == 1 and series[0].n_files == 20
    assert series[0].description == "CT Body 3.0"
    image = read_image(folder)
    assert image.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-9)
    arr = sitk.GetArrayViewFromImage(image)
    # Stored values are unsigned with RescaleIntercept -1024: only with the
    # rescale applied is air at about -1000 HU and the type signed.
    assert np.issubdtype(arr.dtype, np.signedinteger)
    assert arr.min() == -1024 and 1000 < arr.max() < 3100
    soft_tissue = np.count_nonzero((arr > -100) & (arr < 300)) / arr.size
    air = np.count_nonzero(arr < -900) / arr.size
    assert 0.1 < soft_tissue and 0.1 < air
    assert case_name(folder) == "example_ct_dicom"


# --------------------------------------------------------------------------- DICOM


def _write_dicom_series(folder: Path, arr: np.ndarray, uid: str, description: str,
                        spacing=(0.75, 0.75, 2.5), origin=(-10.0, -20.0, 30.0), direction=None,
                        prefix: str = "img") -> None:
    """Write ``arr`` (z, y, x), in HU, as one DICOM CT series of 2D slices."""
    folder.mkdir(parents=True, exist_ok=True)
    d = np.eye(3) if direction is None else np.asarray(direction).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[z])
        sl.SetSpacing(spacing[:2])
        pos = np.asarray(origin) + z * spacing[2] * d[:, 2]
        tags = {
            "0008|0060": "CT",
            "0008|0018": f"{uid}.{z + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.99",
            "0020|000e": uid,
            "0008|103e": description,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
            "0020|0037": "\\".join(f"{v:.9f}" for v in (*d[:, 0], *d[:, 1])),
            "0028|0030": f"{spacing[1]}\\{spacing[0]}",
            "0018|0050": str(spacing[2]),
            "0028|1052": "-1024",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(sl)


UID_A = "1.2.826.0.1.3680043.2.1125.99.1"
UID_B = "1.2.826.0.1.3680043.2.1125.99.2"


@pytest.fixture
def two_series(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(-1024, 2000, (6, 8, 10)).astype(np.int16)
    b = rng.integers(-1024, 2000, (3, 8, 10)).astype(np.int16)
    folder = tmp_path / "patient"
    _write_dicom_series(folder, a, UID_A, "big series", direction=OBLIQUE, prefix="a")
    _write_dicom_series(folder, b, UID_B, "small series", spacing=(0.5, 0.5, 3.0), prefix="b")
    return folder, a, b


def test_list_dicom_series_sorted_by_size(two_series):
    folder, a, b = two_series
    series = list_dicom_series(folder)
    assert [(s.uid, s.n_files, s.description) for s in series] == [
        (UID_A, 6, "big series"), (UID_B, 3, "small series")]
    assert all(Path(f).name.startswith("a") for f in series[0].files)


def test_dicom_folder_with_two_series_reads_largest_and_warns(two_series, caplog):
    folder, a, b = two_series
    with caplog.at_level(logging.WARNING, logger="KidneyTumorSegLib.imageio"):
        image = read_image(folder)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), a)  # HU kept through rescale
    assert image.GetSize() == (10, 8, 6)
    np.testing.assert_allclose(image.GetSpacing(), (0.75, 0.75, 2.5), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), (-10.0, -20.0, 30.0), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), OBLIQUE, atol=1e-6)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert UID_A in warning and UID_B in warning and "6 files" in warning and "3 files" in warning
    assert "--series" in warning


def test_dicom_series_uid_picks_one(two_series):
    folder, a, b = two_series
    image = read_image(folder, series_uid=UID_B)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), b)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.5, 3.0), atol=1e-6)


def test_unknown_series_uid_lists_available(two_series):
    folder, _, _ = two_series
    with pytest.raises(InputError) as err:
        read_image(folder, series_uid="1.2.3.4")
    msg = str(err.value)
    assert "1.2.3.4" in msg and UID_A in msg and UID_B in msg and "\n" not in msg


def test_irregular_dicom_slices_warn(tmp_path, caplog):
    arr = np.zeros((4, 6, 6), np.int16)
    folder = tmp_path / "gappy"
    _write_dicom_series(folder, arr, UID_A, "gappy")
    (folder / "img002.dcm").unlink()  # a missing slice: gaps 2.5, 5.0
    with caplog.at_level(logging.WARNING, logger="KidneyTumorSegLib.imageio"):
        read_image(folder)
    assert any("irregular slice spacing" in r.getMessage() for r in caplog.records)


def test_series_uid_with_a_file_is_refused(tmp_path):
    path = write_image_atomic(_volume(GEOMETRIES["anisotropic"]), tmp_path / "x.nii")
    with pytest.raises(InputError, match="is a file"):
        read_image(path, series_uid=UID_A)


# --------------------------------------------------------------------------- read errors


def _one_line_input_error(path, match: str) -> str:
    with pytest.raises(InputError, match=match) as err:
        read_image(path)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_file(tmp_path):
    _one_line_input_error(tmp_path / "nope.nii.gz", "not found")


@pytest.mark.parametrize("name", ["scan.png", "slice.dcm", "noext"])
def test_unsupported_suffix(tmp_path, name):
    (tmp_path / name).write_bytes(b"x" * 100)
    msg = _one_line_input_error(tmp_path / name, "Unsupported input")
    assert ".nii.gz" in msg and ".mhd" in msg
    if name != "scan.png":
        assert "folder holding the series" in msg


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_input_error(tmp_path, "no DICOM series")


def test_corrupt_files_give_one_line_errors(tmp_path):
    (tmp_path / "garbage.nii.gz").write_bytes(b"garbage" * 20)
    _one_line_input_error(tmp_path / "garbage.nii.gz", "Cannot read")
    (tmp_path / "bad.nrrd").write_text("NRRD0004\ntype: short\n")
    msg = _one_line_input_error(tmp_path / "bad.nrrd", "Cannot read")
    assert "ITK" not in msg and "0x" not in msg


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused(tmp_path, suffix):
    # ITK itself reads a truncated NIfTI silently, filling missing voxels with 0.
    image = _volume(GEOMETRIES["anisotropic"], shape=(32, 32, 32))
    good = write_image_atomic(image, tmp_path / f"good{suffix}")
    data = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(data[: len(data) * 2 // 3])
    sitk.ReadImage(str(bad))  # documents why the check exists: no error from ITK
    _one_line_input_error(bad, "truncated")
    read_image(good)


def test_multi_member_gzip_nifti_is_accepted(tmp_path):
    # A valid file whose gzip trailer does not hold the total size must pass
    # (the full decompression decides), not be called truncated.
    image = _volume(GEOMETRIES["anisotropic"], shape=(16, 16, 16))
    raw = write_image_atomic(image, tmp_path / "vol.nii").read_bytes()
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    _assert_same(read_image(path), image)


# --------------------------------------------------------------------------- names and batch inputs


def test_image_suffix_and_case_name(tmp_path):
    assert image_suffix("a/b/Case.NII.GZ") == ".nii.gz"
    assert image_suffix("x.nrrd") == ".nrrd"
    assert image_suffix("x.tar.gz") == ".gz"
    assert image_suffix("noext") == ""
    assert case_name("dir/case_00001.nii.gz") == "case_00001"
    assert case_name("dir/my.scan.mha") == "my.scan"
    (tmp_path / "series_7").mkdir()
    assert case_name(tmp_path / "series_7") == "series_7"


def test_discover_cases_in_a_folder(tmp_path, caplog):
    """Image files directly in the folder, DICOM series folders at any depth (not inside a series)."""
    root = tmp_path / "batch"
    expected = write_case_tree(root)
    with caplog.at_level(logging.WARNING, logger="KidneyTumorSegLib"):
        found = discover_cases([root])
    assert [(c.path.relative_to(root).as_posix(), c.name) for c in found] == expected
    assert [c.is_dicom for c in found] == [False, False, True, True, True]
    # The KiTS-style case folder's files are said to be skipped, not silently lost.
    assert "2 image file(s) in sub-folders of" in caplog.text and "imaging.nii.gz" in caplog.text


def test_discover_cases_given_paths_order_duplicates_and_names(tmp_path):
    root = tmp_path / "batch"
    write_case_tree(root)
    series = root / "export" / "PAT1" / "STUDY1" / "CT"
    # A DICOM folder given directly is one case (its nested series is not searched).
    assert [(c.path, c.name) for c in discover_cases([series])] == [(series, "CT")]
    single = root / "kits" / "case_00000" / "imaging.nii.gz"
    found = discover_cases([single, root, str(root / "a.nii.gz")])
    assert [c.path for c in found][:2] == [single, root / "a.nii.gz"] and len(found) == 6  # a.nii.gz once
    missing = tmp_path / "missing.nii.gz"
    assert [(c.path, c.name) for c in discover_cases([missing])] == [(missing, "missing")]  # fails later, alone
    # Names are unique: the parent folder's name first, then a number.
    others = []
    for i, parent in enumerate(("case_1", "case_2", "x/case_1")):
        (tmp_path / parent).mkdir(parents=True)
        others.append(tmp_path / parent / "imaging.nii.gz")
        others[-1].write_bytes((root / "a.nii.gz").read_bytes())
    assert [c.name for c in discover_cases(others)] == ["imaging", "case_2_imaging", "case_1_imaging"]
    assert [c.name for c in discover_cases(others + [tmp_path / "y" / "case_1" / "imaging.nii.gz"])][-1] \
        == "case_1_imaging_2"


def test_discover_cases_follows_a_symlink_loop_once(tmp_path):
    root = tmp_path / "batch"
    write_case_tree(root)
    (root / "export" / "loop").symlink_to(root, target_is_directory=True)
    assert [c.name for c in discover_cases([root])] == [n for _, n in write_case_tree(tmp_path / "again")]


def test_discover_cases_nothing_found(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="No input images found"):
        discover_cases([tmp_path])
    with pytest.raises(InputError):
        discover_cases([])


# --------------------------------------------------------------------------- atomic writing


def test_existing_output_refused_then_overwritten(tmp_path):
    out = tmp_path / "seg.nii.gz"
    first = _volume(GEOMETRIES["anisotropic"], dtype=np.uint8, seed=1)
    second = _volume(GEOMETRIES["anisotropic"], dtype=np.uint8, seed=2)
    write_image_atomic(first, out)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        write_image_atomic(second, out)
    assert out.read_bytes() == before
    write_image_atomic(second, out, overwrite=True)
    _assert_same(read_image(out), second)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_output_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = write_image_atomic(_volume(GEOMETRIES["anisotropic"]), tmp_path / "seg.nrrd")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "seg.nrrd"
    write_image_atomic(_volume(GEOMETRIES["anisotropic"]), out)
    assert out.is_file()


@pytest.mark.parametrize("name", ["seg.nhdr", "seg.mhd", "seg.png", "seg"])
def test_unwritable_suffix_refused(tmp_path, name):
    with pytest.raises(OutputError) as err:
        write_image_atomic(_volume(GEOMETRIES["anisotropic"]), tmp_path / name)
    assert ".nii.gz" in str(err.value) and ".nrrd" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path):
    # Tests run as root, which ignores permission bits: make the parent a file.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OutputError, match="Cannot create the output folder") as err:
        write_image_atomic(_volume(GEOMETRIES["anisotropic"]), blocker / "seg.nii.gz")
    assert "\n" not in str(err.value)
    (tmp_path / "taken.nii.gz").mkdir()
    with pytest.raises(OutputError, match="existing folder"):
        write_image_atomic(_volume(GEOMETRIES["anisotropic"]), tmp_path / "taken.nii.gz", overwrite=True)


@pytest.mark.parametrize("failure", [RuntimeError("ITK ERROR: NiftiImageIO(0x1): disk full\nmore"), KeyboardInterrupt()])
def test_failed_write_leaves_nothing_and_keeps_existing_file(tmp_path, monkeypatch, failure):
    out = tmp_path / "seg.nii.gz"
    write_image_atomic(_volume(GEOMETRIES["anisotropic"], seed=1), out)
    before = out.read_bytes()
    used = []

    def interrupted_execute(self, image, *args):
        name = self.GetFileName()
        used.append(Path(name).name)
        Path(name).write_bytes(b"\x1f\x8b partial")  # half-written file, then the failure
        raise failure

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", interrupted_execute)
    expected = OutputError if isinstance(failure, RuntimeError) else KeyboardInterrupt
    with pytest.raises(expected) as err:
        write_image_atomic(_volume(GEOMETRIES["anisotropic"], seed=2), out, overwrite=True)
    if expected is OutputError:
        assert str(err.value) == f"Cannot write {out}: disk full"
    # The temporary file had the output's suffix (ITK picks the format from it) and is gone.
    assert used[0].startswith(".seg.tmp-") and used[0].endswith(".nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]
    assert out.read_bytes() == before


def test_condense_itk_error():
    exc = RuntimeError(
        "Exception thrown in SimpleITK ImageFileReader_Execute: /x/itkNrrdImageIO.cxx:410:\n"
        "itk::ERROR: NrrdImageIO(0x5599069564e0): ReadImageInformation: Error reading bad.nrrd:\n"
        "[nrrd] nrrdLoad: trouble reading \"bad.nrrd\"\n[nrrd] _nrrdFormatNRRD_read: hit end of header\n")
    assert imageio._condense_itk_error(exc) == (
        "ReadImageInformation: Error reading bad.nrrd: (hit end of header)")
