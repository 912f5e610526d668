"""The command line: every bad input gets one clear line and a non-zero exit, nothing is lost."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from case_tree import write_case_tree
from conftest import classifier_manifest, ct_from_labels, save_test_package
from KidneyTumorSegLib.cli import _output_plan, main
from KidneyTumorSegLib.device import parse_device
from KidneyTumorSegLib.errors import DeviceError
from KidneyTumorSegLib.metrics import dice
from Training.phantoms import procedural_labels


@pytest.fixture
def package_dir(tmp_path):
    return str(save_test_package(tmp_path / "pkg", classifier_manifest()).root)


@pytest.fixture
def ct_file(tmp_path):
    labels = procedural_labels(size=(64, 56, 48), spacing=(3.0, 3.0, 3.0), rng=np.random.default_rng(0), tumors=1)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_from_labels(labels), str(path))
    sitk.WriteImage(labels, str(tmp_path / "truth.nii.gz"))
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def test_segment_writes_labels_and_stats(tmp_path, ct_file, package_dir, capsys):
    digest = hashlib.sha256(ct_file.read_bytes()).hexdigest()
    out = tmp_path / "out" / "seg.nii.gz"
    code = run_cli("segment", ct_file, "-o", out, "--model", package_dir, "--stats", tmp_path / "stats.json", "--device", "cpu")
    assert code == 0
    seg, truth = sitk.ReadImage(str(out)), sitk.ReadImage(str(tmp_path / "truth.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkUInt8 and seg.GetSize() == truth.GetSize() and seg.GetOrigin() == truth.GetOrigin()
    assert dice(sitk.GetArrayFromImage(seg) > 0, sitk.GetArrayFromImage(truth) > 0) > 0.9
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert len(stats["kidneys"]) == 2 and stats["tumors"]["count"] >= 1 and "timings_s" in stats
    assert hashlib.sha256(ct_file.read_bytes()).hexdigest() == digest, "input modified"
    assert "left kidney" in capsys.readouterr().out
    # an existing output is refused, then replaced with --overwrite
    before = out.read_bytes()
    assert run_cli("segment", ct_file, "-o", out, "--model", package_dir) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert run_cli("segment", ct_file, "-o", out, "--model", package_dir, "--overwrite", "--stats", tmp_path / "stats.json") == 0


def _write(tmp_path, name, array, spacing=None, is_vector=False):
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if spacing:
        image.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def _write_bytes(path, data):
    path.write_bytes(data)
    return path


def _ct_like(shape=(20, 30, 30)):
    rng = np.random.default_rng(0)
    return np.where(rng.random(shape) < 0.3, -1000, 40).astype(np.int16)


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.nii.gz", "does not exist|not found|no such"),
    (lambda p: _write(p, "flat.nii.gz", _ct_like((30, 30))), "3D"),
    (lambda p: _write(p, "rgb.nrrd", np.zeros((10, 10, 10, 3), np.uint8), is_vector=True), "channel|component"),
    (lambda p: _write(p, "const.nii.gz", np.full((10, 12, 14), 40, np.int16)), "constant"),
    (lambda p: _write(p, "nan.mha", np.where(_ct_like() > 0, np.nan, -1000).astype(np.float32)), "NaN"),
    (lambda p: _write(p, "mr.nii.gz", np.random.default_rng(1).integers(0, 900, (20, 30, 30)).astype(np.int16)), "--force"),
    (lambda p: _write_bytes(p / "bad.nii.gz", b"not an image"), "cannot read|not a|unreadable|read"),
])
def test_bad_inputs_get_one_line_and_exit_1(tmp_path, package_dir, capsys, make, message):
    path = make(tmp_path)
    code = run_cli("segment", path, "-o", tmp_path / "out.nii.gz", "--model", package_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err and err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    import re

    assert re.search(message, err[-1], re.IGNORECASE), err[-1]
    assert not (tmp_path / "out.nii.gz").exists()


def test_4d_image_is_refused(tmp_path, package_dir, capsys):
    image = sitk.JoinSeries([sitk.GetImageFromArray(_ct_like()) for _ in range(2)])
    sitk.WriteImage(image, str(tmp_path / "4d.nii.gz"))
    assert run_cli("segment", tmp_path / "4d.nii.gz", "-o", tmp_path / "o.nii.gz", "--model", package_dir) == 1
    assert "4D" in capsys.readouterr().err


def test_force_accepts_non_ct_intensities(tmp_path, ct_file, package_dir):
    image = sitk.ReadImage(str(ct_file)) + 1100  # shifted: no air below -300 HU any more
    sitk.WriteImage(image, str(tmp_path / "shifted.nii.gz"))
    assert run_cli("segment", tmp_path / "shifted.nii.gz", "-o", tmp_path / "a.nii.gz", "--model", package_dir) == 1
    assert run_cli("segment", tmp_path / "shifted.nii.gz", "-o", tmp_path / "a.nii.gz", "--model", package_dir, "--force") == 0


def test_not_ct_refusal_is_structured_in_the_json_progress_stream(tmp_path, ct_file, package_dir, capsys):
    """Front ends (the Slicer module) read the error's kind, to offer --force for this one."""
    image = sitk.ReadImage(str(ct_file)) + 1100
    sitk.WriteImage(image, str(tmp_path / "shifted.nii.gz"))
    assert run_cli("segment", tmp_path / "shifted.nii.gz", "-o", tmp_path / "a.nii.gz", "--model", package_dir,
                   "--progress", "json") == 1
    err = capsys.readouterr().err.splitlines()
    errors = [json.loads(line)["error"] for line in err if line.startswith('{"error"')]
    assert [e["kind"] for e in errors] == ["NotCTLikeError"] and "not CT-like" in errors[0]["message"]
    assert err[-1].startswith("error: Input is not CT-like")  # the one-line message stays last
    assert run_cli("segment", tmp_path / "shifted.nii.gz", "-o", tmp_path / "a.nii.gz", "--model", package_dir) == 1
    assert not any(line.startswith("{") for line in capsys.readouterr().err.splitlines())  # only with --progress json


def test_batch_case_errors_are_structured_in_the_json_progress_stream(tmp_path, ct_file, package_dir, capsys):
    """In batch mode the refused case gets its structured line (naming the input) and the others still run."""
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(ct_file)), str(cases / "good.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(ct_file)) + 1100, str(cases / "shifted.nii.gz"))
    assert run_cli("segment", cases, "-o", tmp_path / "out", "--model", package_dir, "--progress", "json") == 1
    captured = capsys.readouterr()
    errors = [json.loads(line)["error"] for line in captured.err.splitlines() if line.startswith('{"error"')]
    assert [(e["kind"], e["input"]) for e in errors] == [("NotCTLikeError", str(cases / "shifted.nii.gz"))]
    assert (tmp_path / "out" / "good.nii.gz").exists() and not (tmp_path / "out" / "shifted.nii.gz").exists()
    assert "1 of 2 cases segmented" in captured.out


def test_unwritable_output_folder(tmp_path, ct_file, package_dir, capsys):
    (tmp_path / "a_file").write_text("x")
    assert run_cli("segment", ct_file, "-o", tmp_path / "a_file" / "seg.nii.gz", "--model", package_dir) == 1
    assert "cannot write" in capsys.readouterr().err


def test_volume_too_large_for_memory(tmp_path, ct_file, package_dir, capsys, monkeypatch):
    import KidneyTumorSegLib.validation as validation

    monkeypatch.setattr(validation, "available_memory_bytes", lambda: 1000)
    assert run_cli("segment", ct_file, "-o", tmp_path / "o.nii.gz", "--model", package_dir) == 1
    err = capsys.readouterr().err
    assert "GB" in err and "error:" in err


def test_batch_continues_after_a_failed_case(tmp_path, ct_file, package_dir, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(ct_file.read_bytes())
    (folder / "b.nii.gz").write_bytes(b"broken")
    (folder / "c.nii.gz").write_bytes(ct_file.read_bytes())
    code = run_cli("segment", folder, "-o", tmp_path / "results", "--model", package_dir, "--stats", tmp_path / "stats")
    captured = capsys.readouterr()
    assert code == 1
    assert (tmp_path / "results" / "a.nii.gz").exists() and (tmp_path / "results" / "c.nii.gz").exists()
    assert not (tmp_path / "results" / "b.nii.gz").exists()
    assert (tmp_path / "stats" / "a.json").exists()
    assert "2 of 3 cases segmented" in captured.out and "b.nii.gz" in captured.out


def test_models_list_and_devices_json(capsys):
    assert run_cli("models", "list", "--json") == 0
    models = json.loads(capsys.readouterr().out)
    assert any(m["default"] for m in models)
    default = next(m for m in models if m["default"])
    assert default["data_provenance"]["phantoms"] is True  # the manifest's provenance.data, plain values only
    assert all(not isinstance(v, (list, dict)) for m in models for v in m["data_provenance"].values())
    assert run_cli("devices", "--json") == 0
    devices = json.loads(capsys.readouterr().out)
    assert devices[-1]["kind"] == "cpu" and devices[-1]["device"] == "cpu"
    assert all(parse_device(d["device"]) == d["device"] for d in devices)  # listed names are accepted names


def test_unknown_model_and_device(tmp_path, ct_file, capsys):
    assert run_cli("segment", ct_file, "-o", tmp_path / "o.nii.gz", "--model", "no-such-model") == 1
    assert "no model package named" in capsys.readouterr().err
    assert run_cli("segment", ct_file, "-o", tmp_path / "o.nii.gz", "--device", "tpu") == 1
    assert "device must be one of" in capsys.readouterr().err


@pytest.mark.parametrize("name, canonical", [("auto", "auto"), (None, "auto"), ("CPU", "cpu"), ("cuda", "cuda"),
                                             ("cuda:1", "cuda:1"), ("cuda:01", "cuda:1"), ("mps", "mps")])
def test_device_names_the_library_accepts(name, canonical):
    assert parse_device(name) == canonical


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:", "cuda:-1", "cuda:x", "cuda:1.5", "cpu:0", "mps:0", "cuda 1"])
def test_device_names_the_library_refuses(name):
    with pytest.raises(DeviceError, match=r"device must be one of auto, cuda, mps, cpu or cuda:N .*got " + repr(name)):
        parse_device(name)


def test_batch_cases_and_output_names_follow_case_discovery(tmp_path):
    """The command line's batch plan is the library's case discovery, names included."""
    root, out = tmp_path / "in", tmp_path / "out"
    expected = write_case_tree(root)
    plan = _output_plan([str(root)], str(out))
    assert [(case.relative_to(root).as_posix(), output) for case, output in plan] == \
        [(path, out / f"{name}.nii.gz") for path, name in expected]


def test_help_does_not_import_torch():
    code = ("import sys; from KidneyTumorSegLib.cli import main\n"
            "try:\n    main(['segment', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_progress_json_lines(tmp_path, ct_file, package_dir, capsys):
    assert run_cli("segment", ct_file, "-o", tmp_path / "o.nii.gz", "--model", package_dir, "--progress", "json") == 0
    lines = [json.loads(l) for l in capsys.readouterr().err.splitlines() if l.startswith("{")]
    assert lines and lines[-1]["progress"] == 1.0 and all("message" in l for l in lines)
