"""Adversarial inputs: every promise of the README's reliability paragraph, and its proof.

Read top to bottom, one section per promise (issue 17's items in brackets):

1. Nothing corrupt is ever left as an output: every writer verifies what it wrote before
   the rename, a full disk is an ``error:`` and the old output stays intact [1].
2. ``models install`` never writes outside the models folder [2].
3. No output can overwrite an input or another output, ``--overwrite`` or not [3].
4. Size, spacing and memory are checked from the header, before the voxels are read;
   the memory estimate follows the physical size and bounds what is measured [4].
5. A user-caused failure is one ``error:`` line (a ``KidneyTumorSegError``); anything else
   is a bug and shows its traceback, and in batch mode the other cases still run [5].
6. SIGINT and SIGTERM leave no temporary file; a stale one of ours is removed [6].
7. Cancel is honoured between every step, after the last network stage too [7].
8. ``Segmenter.segment`` (every entry point) validates its input [8].
9. In batch mode a refused case fails alone [9].
10. The smaller ones: writability checked first, no library noise before ``error:``, no
    unsafe advice, readable summaries, this process's own cgroup limit [10].

Segmentation here uses the tiny intensity-classifier packages of ``conftest`` (exact and fast).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, classifier_manifest, ct_from_labels, save_test_package
from KidneyTumorSegLib import imageio, validation
from KidneyTumorSegLib.cli import main
from KidneyTumorSegLib.errors import (CancelledError, InputError, InsufficientMemoryError, KidneyTumorSegError,
                                      ModelPackageError, OutputError)
from KidneyTumorSegLib.imageio import ImageInfo, write_image_atomic, write_json_atomic
from KidneyTumorSegLib.manifest import ModelManifest
from KidneyTumorSegLib.measurements import summarize
from KidneyTumorSegLib.models import install_model
from KidneyTumorSegLib.pipeline import Segmenter
from Training.phantoms import procedural_labels


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return save_test_package(tmp_path_factory.mktemp("pkg") / "pkg", classifier_manifest())


@pytest.fixture(scope="module")
def ct_image():
    labels = procedural_labels(size=(64, 56, 48), spacing=(3.0, 3.0, 3.0), rng=np.random.default_rng(0), tumors=1)
    return ct_from_labels(labels)


@pytest.fixture
def ct_file(tmp_path, ct_image):
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(ct_image, str(path))
    return path


def run_cli(*args):
    return main([str(a) for a in args])


def segment_args(ct, out, package, *more):
    return ("segment", ct, "-o", out, "--model", package.root, "--device", "cpu", "--progress", "none", *more)


def error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip()]


def assert_one_error_line(err: str, pattern: str = "") -> str:
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in err
    if pattern:
        import re

        assert re.search(pattern, lines[0], re.IGNORECASE), lines[0]
    return lines[0]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def noisy_labels(shape=(40, 80, 80), seed=0) -> sitk.Image:
    """Random labels: incompressible enough to overflow a 64 KiB disk in every format."""
    return sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 4, shape).astype(np.uint8))


# --------------------------------------------------------------------------- 1. full disk [1]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (ENOSPC). Needs root and mount permission."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not permitted'}); "
                    "the fake-writer tests below cover the same path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_full_disk_is_an_error_and_keeps_the_old_output(tiny_disk, suffix):
    out = tiny_disk / f"seg{suffix}"
    write_image_atomic(sitk.Image((4, 4, 4), sitk.sitkUInt8), out)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="Cannot write") as err:  # ITK says nothing for .nii/.nii.gz here
        write_image_atomic(noisy_labels(), out, overwrite=True)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == before and temp_files(tiny_disk) == []


def test_full_disk_json_is_an_error_and_keeps_the_old_output(tiny_disk):
    out = tiny_disk / "stats.json"
    write_json_atomic({"old": True}, out)
    with pytest.raises(OutputError):
        write_json_atomic({"big": "x" * 200_000}, out, overwrite=True)
    assert json.loads(out.read_text()) == {"old": True} and temp_files(tiny_disk) == []


def _truncating_writer(monkeypatch):
    """ITK's writer as it behaves on a full disk: it writes part of the file and reports success."""
    real = sitk.ImageFileWriter.Execute

    def execute(self, image, *args):
        real(self, image, *args)
        name = self.GetFileName()
        with open(name, "r+b") as fh:
            fh.truncate(max(1, os.path.getsize(name) // 2))

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", execute)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_writer_that_ignores_enospc_is_caught(tmp_path, monkeypatch, suffix):
    out = tmp_path / f"seg{suffix}"
    write_image_atomic(noisy_labels(seed=1), out)
    before = out.read_bytes()
    _truncating_writer(monkeypatch)
    with pytest.raises(OutputError, match="incomplete"):
        write_image_atomic(noisy_labels(seed=2), out, overwrite=True)
    assert out.read_bytes() == before and temp_files(tmp_path) == []


def test_fsync_failure_is_caught_for_json_and_through_the_cli(tmp_path, monkeypatch, ct_file, package, capsys):
    out, stats = tmp_path / "seg.nii.gz", tmp_path / "stats.json"
    stats.write_text('{"old": true}\n')

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutputError, match="No space left"):
        write_json_atomic({"new": True}, stats, overwrite=True)
    assert run_cli(*segment_args(ct_file, out, package, "--stats", stats, "--overwrite")) == 1
    assert_one_error_line(capsys.readouterr().err, "no space left")
    assert not out.exists() and stats.read_text() == '{"old": true}\n' and temp_files(tmp_path) == []


# --------------------------------------------------------------------------- 2. models install [2]


def _package_named(tmp_path, name, zipped=False):
    pkg = save_test_package(tmp_path / "source", classifier_manifest())
    manifest = json.loads((pkg.root / "manifest.json").read_text())
    manifest["name"] = name
    (pkg.root / "manifest.json").write_text(json.dumps(manifest))
    if not zipped:
        return pkg.root
    archive = tmp_path / "package.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in pkg.root.iterdir():
            z.write(f, f"pkg/{f.name}")
    return archive


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    folder = tmp_path / "home" / "models"
    monkeypatch.setenv("KIDNEY_TUMOR_SEG_MODELS_DIR", str(folder))
    return folder


@pytest.mark.parametrize("zipped", [False, True])
@pytest.mark.parametrize("name", ["../../escaped_model", "../escaped", "a/b", "", ".", "..", "-rf", "name with space",
                                  "/ABSOLUTE"])
def test_install_refuses_unsafe_names_before_touching_the_disk(tmp_path, models_dir, name, zipped, capsys):
    victim = tmp_path / "ABSOLUTE"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    name = str(victim) if name == "/ABSOLUTE" else name
    source = _package_named(tmp_path, name, zipped)
    assert run_cli("models", "install", source, "--overwrite") == 1
    assert_one_error_line(capsys.readouterr().err, "manifest.name must be")
    assert (victim / "precious.txt").read_text() == "keep me"
    outside = {p.name for p in tmp_path.iterdir()} - {"home", "source", "package.zip", "ABSOLUTE"}
    assert outside == set() and not (tmp_path / "home" / "escaped_model").exists()
    assert [p.name for p in models_dir.iterdir()] == []  # no staging folder left either


def test_install_of_a_good_name_lands_inside_the_models_folder(tmp_path, models_dir):
    info = install_model(str(_package_named(tmp_path, "good.name-1_2", zipped=True)))
    assert info.path.parent == models_dir.resolve() and (info.path / "manifest.json").is_file()


def test_unwritable_models_folder_and_empty_source(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KIDNEY_TUMOR_SEG_MODELS_DIR", str(blocker / "models"))
    assert run_cli("models", "install", _package_named(tmp_path, "fine")) == 1
    assert_one_error_line(capsys.readouterr().err, "models folder")
    assert run_cli("models", "install", "") == 1
    assert_one_error_line(capsys.readouterr().err, "no model package given")


# --------------------------------------------------------------------------- 3. outputs vs inputs [3]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("collision", ["stats_is_input", "stats_is_labels", "output_is_input", "stats_links_to_input",
                                       "output_hardlinks_input"])
def test_no_output_can_replace_an_input_or_another_output(tmp_path, ct_file, package, capsys, collision, overwrite):
    digest = ct_file.read_bytes()
    out, stats = tmp_path / "seg.nii.gz", tmp_path / "stats.json"
    if collision == "stats_is_input":
        stats = ct_file
    elif collision == "stats_is_labels":
        stats = out
    elif collision == "output_is_input":
        out = tmp_path / "." / "ct.nii.gz"
    elif collision == "stats_links_to_input":
        stats.symlink_to(ct_file)
    else:
        out = tmp_path / "hard.nii.gz"
        os.link(ct_file, out)
    args = segment_args(ct_file, out, package, "--stats", stats) + (("--overwrite",) if overwrite else ())
    assert run_cli(*args) == 1
    assert_one_error_line(capsys.readouterr().err, "is the input|both the")
    assert ct_file.read_bytes() == digest


# --------------------------------------------------------------------------- 4. size, spacing, memory [4]


def _mhd_header(folder: Path, size, spacing, raw_bytes: int = 0) -> Path:
    """A MetaImage header (+ a raw file of ``raw_bytes``): a large header costs nothing to make."""
    (folder / "vol.raw").write_bytes(b"\0" * raw_bytes)
    path = folder / "vol.mhd"
    path.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, size))}\n"
                    f"ElementSpacing = {' '.join(map(str, spacing))}\nElementType = MET_SHORT\n"
                    "ElementDataFile = vol.raw\n")
    return path


@pytest.mark.parametrize("spacing", [(60.0, 60.0, 60.0), (10_000.0, 10_000.0, 10_000.0), (0.8, 0.8, 40.0),
                                     (0.001, 0.001, 0.001), (0.8, 0.8, 0.0)])
def test_implausible_spacing_is_refused_from_the_header(tmp_path, package, capsys, monkeypatch, spacing):
    path = _mhd_header(tmp_path, (128, 128, 36), spacing, raw_bytes=128 * 128 * 36 * 2)
    monkeypatch.setattr(imageio, "read_image", lambda *a, **k: pytest.fail("voxels read before the header was checked"))
    assert run_cli(*segment_args(path, tmp_path / "seg.nii.gz", package)) == 1
    assert_one_error_line(capsys.readouterr().err, "spacing|extent")


def test_a_huge_header_is_refused_before_reading_with_the_amount(tmp_path, package, capsys, monkeypatch):
    path = _mhd_header(tmp_path, (5000, 5000, 5000), (0.3, 0.3, 0.3))
    monkeypatch.setattr(imageio, "read_image", lambda *a, **k: pytest.fail("voxels read before memory was checked"))
    assert run_cli(*segment_args(path, tmp_path / "seg.nii.gz", package)) == 1
    line = assert_one_error_line(capsys.readouterr().err, "not enough memory")
    assert "GB" in line and "5000x5000x5000" in line


def test_the_estimate_follows_physical_size_and_the_model(package):
    manifest = package.manifest

    def estimate(spacing):
        info = ImageInfo(3, (128, 128, 36), spacing, (1, 0, 0, 0, 1, 0, 0, 0, 1), sitk.sitkInt16, "16-bit signed integer", 1, 2)
        return validation.estimate_memory_bytes(info, manifest)

    fine, coarse = estimate((0.8, 0.8, 1.0)), estimate((3.0, 3.0, 5.0))
    assert coarse > 5 * (fine - validation.FIXED_MEMORY_BYTES)  # same voxels, 20x the volume: the stages' grids grow


_MEASURE_CHILD = r"""
import json, sys
import numpy as np, SimpleITK as sitk
sys.path.insert(0, sys.argv[1])
import conftest  # registers the test network
from KidneyTumorSegLib.models import load_package
from KidneyTumorSegLib.pipeline import Segmenter
from KidneyTumorSegLib.validation import estimate_memory_bytes, FIXED_MEMORY_BYTES
package = load_package(sys.argv[2])
rng = np.random.default_rng(0)
hu = (150 + rng.integers(-20, 20, (64, 128, 128))).astype(np.int16)   # kidney-like everywhere
hu[:, :4] = -1000                                                      # some air: CT-like
image = sitk.GetImageFromArray(hu)
image.SetSpacing((1.5, 1.5, 1.5))
def high_water():  # VmHWM: peak resident memory of this process image (ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
segmenter = Segmenter(package, device="cpu")
baseline = high_water()
result = segmenter.segment(image)
peak = high_water()
print(json.dumps({"baseline": baseline, "peak": peak, "estimate": estimate_memory_bytes(image, package.manifest),
                  "fixed": FIXED_MEMORY_BYTES, "kidneys": len(result.stats["kidneys"])}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures the peak memory through /proc (Linux)")
def test_the_estimate_bounds_what_is_measured_when_the_coarse_stage_fires_everywhere(tmp_path):
    manifest = classifier_manifest()
    for stage in manifest["stages"]:
        stage.update(patch_size=[64, 64, 64], overlap=0.0)
    package = save_test_package(tmp_path / "big_windows", manifest)
    done = subprocess.run([sys.executable, "-c", _MEASURE_CHILD, str(REPO / "Testing"), str(package.root)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    variable_measured = m["peak"] - m["baseline"]
    variable_estimated = m["estimate"] - m["fixed"]
    assert m["peak"] <= m["estimate"], m
    assert variable_measured <= variable_estimated <= 4 * variable_measured, m


# --------------------------------------------------------------------------- 5. errors vs bugs [5]


def _manifest_package(tmp_path, change):
    manifest = classifier_manifest()
    change(manifest)
    return save_test_package(tmp_path / "crafted", manifest)


@pytest.mark.parametrize("change,pattern", [
    (lambda m: m["stages"][0].update(spacing_mm=[0.01, 0.01, 0.01]), "not enough memory"),
    (lambda m: m["stages"][1].update(patch_size=[4096, 4096, 4096]), "not enough memory"),
    (lambda m: m["stages"][1].update(network={"name": "vbnet", "kwargs": {"features": [10**9, 10**9, 10**9, 10**9, 10**9]}},
                                     patch_size=[32, 32, 32]), "not enough memory"),
])
def test_manifests_that_validate_but_cannot_fit_are_one_line(tmp_path, ct_file, capsys, change, pattern):
    pkg = _manifest_package(tmp_path, change)
    assert run_cli(*segment_args(ct_file, tmp_path / "seg.nii.gz", pkg)) == 1
    assert_one_error_line(capsys.readouterr().err, pattern)


def _batch_folder(tmp_path, ct_file, n=3):
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in "abc"[:n]:
        (folder / f"{name}.nii.gz").write_bytes(ct_file.read_bytes())
    return folder


def _fail_on_first_case(monkeypatch, exc):
    import KidneyTumorSegLib.postprocessing as post

    real, calls = post.postprocess, []

    def postprocess(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(post, "postprocess", postprocess)


def test_itk_allocation_failure_in_batch_is_that_case_only(tmp_path, ct_file, package, capsys, monkeypatch):
    _fail_on_first_case(monkeypatch, RuntimeError("Exception thrown in SimpleITK: itk::ERROR: Failed to allocate memory for image."))
    code = run_cli(*segment_args(_batch_folder(tmp_path, ct_file, n=2), tmp_path / "out", package))
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert "a.nii.gz: Not enough memory" in captured.err and "1 of 2 cases segmented" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.nii.gz"]


def test_a_bug_shows_its_traceback_and_the_batch_goes_on(tmp_path, ct_file, package, capsys, monkeypatch):
    _fail_on_first_case(monkeypatch, ValueError("a bug, not the user's fault"))
    code = run_cli(*segment_args(_batch_folder(tmp_path, ct_file, n=2), tmp_path / "out", package))
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" in captured.err and "ValueError: a bug" in captured.err
    assert "1 of 2 cases segmented" in captured.out
    # ... and outside batch mode a bug is not disguised as a user error: it propagates
    import KidneyTumorSegLib.postprocessing as post

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(post, "postprocess", bug)
    with pytest.raises(ValueError, match="a bug"):
        run_cli(*segment_args(ct_file, tmp_path / "single.nii.gz", package))


# --------------------------------------------------------------------------- 6. signals, leftovers [6]


_SLOW_WRITE_CHILD = r"""
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)   # even when started with SIGINT ignored
sys.path.insert(0, "Testing")
import conftest  # registers the test network
import KidneyTumorSegLib.imageio as io
real = io._verify_image_file
def slow(tmp, image, final):
    Path(sys.argv[1]).write_text(str(tmp))    # the temporary file exists now: tell the parent
    time.sleep(120)
io._verify_image_file = slow
from KidneyTumorSegLib.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_write_leaves_nothing(tmp_path, package, sig, code):
    ct_file = tmp_path / "small_ct.nii.gz"
    labels = procedural_labels(size=(48, 40, 32), spacing=(3.0, 3.0, 3.0), rng=np.random.default_rng(1), tumors=0)
    sitk.WriteImage(ct_from_labels(labels), str(ct_file))
    out = tmp_path / "results" / "seg.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"the previous result")
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE_CHILD, str(marker),
                              *map(str, segment_args(ct_file, out, package, "--overwrite"))],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), child.communicate(timeout=5)
        assert Path(marker.read_text()).exists()
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.nii.gz"] and out.read_bytes() == b"the previous result"


def test_stale_temp_files_of_ours_are_removed_on_the_next_run(tmp_path, ct_file, package):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [".seg.tmp-999999999-abcd.nii.gz", ".seg.tmp-x7Yq_2.nii.gz", ".stats.tmp-999999999-zz.json",
                 ".stats.json.tmp"]
        live = f".seg.tmp-{sleeper.pid}-live.nii.gz"
        unrelated = [".other.tmp-999999999-x.nii.gz", "seg.tmp-1-x.nii.gz", ".seg.tmp-999999999-x.nrrd"]
        for name in stale + [live] + unrelated:
            (out_dir / name).write_bytes(b"x")
        assert run_cli(*segment_args(ct_file, out_dir / "seg.nii.gz", package, "--stats", out_dir / "stats.json")) == 0
        left = {p.name for p in out_dir.iterdir()}
        assert left == {"seg.nii.gz", "stats.json", live, *unrelated}
    finally:
        sleeper.kill()


# --------------------------------------------------------------------------- 7. cancel [7]


@pytest.mark.parametrize("step", ["postprocess", "measure", "enhancement_note"])
def test_cancel_after_the_last_network_stage_is_honoured(package, ct_image, monkeypatch, step):
    import KidneyTumorSegLib.measurements as measurements
    import KidneyTumorSegLib.pipeline as pipeline
    import KidneyTumorSegLib.postprocessing as post

    module = {"postprocess": post, "measure": measurements, "enhancement_note": pipeline}[step]
    real = getattr(module, step)
    cancel = threading.Event()

    def cancelled_during(*args, **kwargs):
        cancel.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, step, cancelled_during)
    with pytest.raises(CancelledError):
        Segmenter(package, device="cpu").segment(ct_image, cancel=cancel)


# --------------------------------------------------------------------------- 8. one validation for all [8]


def _image(array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    return image


@pytest.mark.parametrize("make,pattern", [
    (lambda: _image(np.full((20, 30, 30), np.nan, np.float32)), "NaN"),
    (lambda: _image(np.where(np.arange(900).reshape(30, 30) % 3, 40, -1000).astype(np.int16)), "3D"),
    (lambda: _image(np.where(np.arange(18000).reshape(20, 30, 30) % 3, 40, -1000).astype(np.int16), (60.0, 60.0, 60.0)), "spacing"),
    (lambda: "ct.nii.gz", "SimpleITK.Image"),
])
def test_segmenter_segment_validates_its_input(package, make, pattern):
    with pytest.raises(InputError, match=pattern):
        Segmenter(package, device="cpu").segment(make())


# --------------------------------------------------------------------------- 9. batch: a refused case fails alone [9]


def test_an_existing_output_refuses_only_its_case(tmp_path, ct_file, package, capsys):
    folder = _batch_folder(tmp_path, ct_file, n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.nii.gz").write_bytes(b"keep")
    assert run_cli(*segment_args(folder, out, package)) == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err and "1 of 2 cases segmented; failed:" in captured.out and "a.nii.gz" in captured.out
    assert (out / "a.nii.gz").read_bytes() == b"keep" and (out / "b.nii.gz").is_file()


# --------------------------------------------------------------------------- 10. the smaller ones [10]


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.decode().strip() or 'not permitted'})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def _no_segmentation(monkeypatch):
    monkeypatch.setattr(Segmenter, "segment", lambda *a, **k: pytest.fail("segmented before checking the output folder"))


def test_a_read_only_output_folder_is_reported_first(read_only_dir, ct_file, package, capsys, monkeypatch):
    _no_segmentation(monkeypatch)
    assert run_cli(*segment_args(ct_file, read_only_dir / "seg.nii.gz", package)) == 1
    assert_one_error_line(capsys.readouterr().err, "not writable")


def test_an_unwritable_output_folder_is_reported_first(tmp_path, ct_file, package, capsys, monkeypatch):
    _no_segmentation(monkeypatch)
    real = imageio.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path / "locked":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real(*args, dir=dir, **kwargs)

    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(imageio.tempfile, "mkstemp", refuse)
    assert run_cli(*segment_args(ct_file, tmp_path / "locked" / "seg.nii.gz", package)) == 1
    assert_one_error_line(capsys.readouterr().err, "not writable")


def test_no_library_noise_before_the_error_line(tmp_path, package, capfd, monkeypatch):
    path = _mhd_header(tmp_path, (32, 32, 16), (1.0, 1.0, 1.0), raw_bytes=100)  # truncated raw data: MetaIO complains
    assert run_cli(*segment_args(path, tmp_path / "seg.nii.gz", package)) == 1
    assert_one_error_line(capfd.readouterr().err, "cannot read")

    import warnings

    import torch

    def noisy_load(*args, **kwargs):
        warnings.warn("torch noise", UserWarning)
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    monkeypatch.setattr(torch, "load", noisy_load)
    ct = tmp_path / "ct.nii.gz"
    labels = procedural_labels(size=(48, 40, 32), spacing=(3.0, 3.0, 3.0), rng=np.random.default_rng(1), tumors=0)
    sitk.WriteImage(ct_from_labels(labels), str(ct))
    assert run_cli(*segment_args(ct, tmp_path / "seg.nii.gz", package)) == 1
    assert_one_error_line(capfd.readouterr().err, "cannot load weights")


def test_the_unsafe_pickle_error_never_advises_weights_only_false(tmp_path):
    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    torch.save({"x": Evil()}, pkg.root / "fine.pt")
    manifest = json.loads((pkg.root / "manifest.json").read_text())
    from KidneyTumorSegLib.models import ModelPackage, sha256_file

    manifest["stages"][1]["weights"][0]["sha256"] = sha256_file(pkg.root / "fine.pt")
    package = ModelPackage(pkg.root, ModelManifest.from_dict(manifest))
    with pytest.raises(ModelPackageError) as err:
        package.build_networks(package.manifest.stages[1])
    assert "weights_only" not in str(err.value) and "never" in str(err.value)


def test_the_summary_tells_same_side_components_apart():
    kidney = {"side": "right", "volume_ml": 0.004, "tumor_volume_ml": 0.0, "cyst_volume_ml": 0.0}
    text = summarize({"kidneys": [kidney, dict(kidney, volume_ml=0.0031)], "tumors": {"count": 0}, "cysts": {"count": 0}})
    parts = text.split("; ")
    assert len(set(parts)) == 2 and "0.0 mL" not in text, text


def test_the_cgroup_limit_is_this_process_own(tmp_path):
    root = tmp_path / "cgroup"
    own = root / "batch.slice" / "job-7"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    (root / "memory.max").write_text("max\n")
    (own / "memory.max").write_text("1000000000\n")
    (own / "memory.current").write_text("400000000\n")
    (own / "memory.stat").write_text("inactive_file 0\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/batch.slice/job-7\n")
    assert validation._cgroup_available_bytes(root, proc) == 600_000_000
    (root / "batch.slice" / "memory.max").write_text("500000000\n")   # a tighter limit above counts too
    (root / "batch.slice" / "memory.current").write_text("400000000\n")
    assert validation._cgroup_available_bytes(root, proc) == 100_000_000
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory" / "job" / "memory.usage_in_bytes").write_text("500000000\n")
    proc.write_text("4:memory:/job\n0::/\n")
    assert validation._cgroup_available_bytes(v1, proc) == 1_500_000_000


def test_every_user_error_is_a_kidney_tumor_seg_error():
    from KidneyTumorSegLib.errors import DeviceError

    for exc in (InputError, OutputError, ModelPackageError, InsufficientMemoryError, CancelledError, DeviceError):
        assert issubclass(exc, KidneyTumorSegError)
