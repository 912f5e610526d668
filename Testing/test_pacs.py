"""The PACS round trip against a real Orthanc with its DICOMweb plugin (Debian: orthanc, orthanc-dicomweb).

Orthanc runs on a free loopback port with a throw-away storage folder and requires a registered
user. The test installs nothing: ``.ci/run`` installs the packages. Without Orthanc the module
skips, with the reason, on a user's machine, and fails in CI (``CI`` set).
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import dicomweb_client  # noqa: F401
    import highdicom as hd
    import pydicom
except ImportError:  # pragma: no cover - depends on the machine
    if os.environ.get("CI"):
        raise
    pytest.skip("the PACS round trip needs the [dicom] extra: pip install \".[dicom]\"", allow_module_level=True)

from conftest import classifier_manifest, save_test_package, shared_path
from dicom_helpers import repaired_copy, write_ct_series
from KidneyTumorSegLib import dicom, dicomweb
from KidneyTumorSegLib.cli import main
from KidneyTumorSegLib.imageio import select_dicom_series

USER, PASSWORD = "kts-test", "not-a-secret-7f3a"


def _find_orthanc():
    binary = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None)
    plugin = None
    try:  # where the Debian package put it
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=30).stdout
        plugin = next((line for line in listed.splitlines() if line.endswith("libOrthancDicomWeb.so")), None)
    except (OSError, subprocess.SubprocessError):
        pass
    if plugin is None:
        found = sorted(glob.glob("/usr/share/orthanc/plugins/libOrthancDicomWeb.so*") + glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*"))
        plugin = found[0] if found else None
    return binary, plugin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, root: Path):
        binary, plugin = _find_orthanc()
        if not binary or not plugin:
            missing = "Orthanc" if not binary else "its DICOMweb plugin"
            reason = f"{missing} is not installed (apt-get install orthanc orthanc-dicomweb)"
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the PACS round trip: {reason}")
            pytest.skip(reason)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        storage = root / "storage"
        storage.mkdir()
        config = {"Name": "kts-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
                  "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}, "HttpServerThreads": 4,
                  "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = root / "orthanc.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/system")["Name"] == "kts-test":
                    break
            except (OSError, ValueError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"Orthanc did not start on port {self.port}: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)

    def request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.read()

    def get(self, path: str):
        return json.loads(self.request(path))

    def upload(self, folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            self.request("/instances", data=path.read_bytes(), method="POST")

    def count(self) -> int:
        return self.get("/statistics")["CountInstances"]

    def instances_of_modality(self, modality: str) -> list:
        body = json.dumps({"Level": "Instance", "Query": {"Modality": modality}}).encode()
        return json.loads(self.request("/tools/find", data=body, method="POST"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    # kidney only, at a 3 mm fine stage: on the real CT the stub finds one big "kidney" and no tumors,
    # which keeps the round trip quick (the SR's per-lesion groups are tested in test_dicom_seg)
    manifest = classifier_manifest(classes=("background", "kidney"), fine_spacing=(3.0, 3.0, 3.0))
    return str(save_test_package(tmp_path_factory.mktemp("pkg") / "pkg", manifest).root)


@pytest.fixture(scope="module")
def stored_real_series(orthanc, tmp_path_factory):
    """The real series (UIDs repaired: its anonymizer blanked them, and no PACS takes that) in Orthanc."""
    source = shared_path("data", "real_ct", "example_ct_dicom")
    folder = tmp_path_factory.mktemp("real") / "series"
    uids = repaired_copy(source, folder)
    orthanc.upload(folder)
    first = pydicom.dcmread(str(next(folder.iterdir())), stop_before_pixels=True)
    return folder, uids, str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


@pytest.fixture
def no_credentials(monkeypatch):
    for name in (dicomweb.TOKEN_VARIABLE, dicomweb.USER_VARIABLE, dicomweb.PASSWORD_VARIABLE):
        monkeypatch.delenv(name, raising=False)


def _auth_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs.env"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_round_trip_stores_a_seg_of_the_series_equal_to_the_local_result(tmp_path, orthanc, stored_real_series,
                                                                         package_dir, no_credentials, capsys):
    folder, uids, study, series = stored_real_series
    n_before = orthanc.count()
    auth = _auth_file(tmp_path, f"# Orthanc test user\n{dicomweb.USER_VARIABLE}={USER}\nexport {dicomweb.PASSWORD_VARIABLE}='{PASSWORD}'\n")
    assert main(["pacs", "--url", orthanc.dicomweb, "--study", study, "--auth-file", str(auth), "--model", package_dir,
                 "--device", "cpu", "--force", "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert f"series {series} -> stored SEG" in out and PASSWORD not in out
    assert orthanc.count() == n_before + 2
    [seg_id] = orthanc.instances_of_modality("SEG")
    [sr_id] = orthanc.instances_of_modality("SR")
    seg_path = tmp_path / "from_pacs_seg.dcm"
    seg_path.write_bytes(orthanc.request(f"/instances/{seg_id}/file"))
    seg = hd.seg.segread(str(seg_path))
    assert seg.StudyInstanceUID == study and [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series]
    # the local result of the same series, segmented here from the files
    assert main(["segment", str(folder), "-o", str(tmp_path / "local.nrrd"), "--model", package_dir, "--device", "cpu",
                 "--force", "-q"]) == 0
    local = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local.nrrd")))
    in_slice_order = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in select_dicom_series(folder).files]
    assert sorted(in_slice_order) == sorted(uids)
    assert local.any() and np.array_equal(dicom.segmentation_labels(seg, in_slice_order), local)
    sr = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.request(f"/instances/{sr_id}/file")))
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert sr.StudyInstanceUID == study and evidence.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    # asking for a series that is not CT now that the study holds a SEG: the CT is still chosen by default
    assert dicomweb.Pacs(orthanc.dicomweb, dicomweb.read_credentials(auth)).choose_series(study, None) == series


@pytest.mark.parametrize("case", ["wrong study", "wrong series", "wrong url", "server down", "no credentials", "wrong password"])
def test_failures_are_one_line_and_store_nothing(case, tmp_path, orthanc, stored_real_series, package_dir,
                                                  no_credentials, monkeypatch, capsys):
    _, _, study, _ = stored_real_series
    url, extra = orthanc.dicomweb, []
    if case != "no credentials":
        monkeypatch.setenv(dicomweb.USER_VARIABLE, USER)
        monkeypatch.setenv(dicomweb.PASSWORD_VARIABLE, "wrong" if case == "wrong password" else PASSWORD)
    if case == "wrong study":
        study = "1.2.826.0.1.3680043.8.498.1"
    elif case == "wrong series":
        extra = ["--series", "1.2.826.0.1.3680043.8.498.2"]
    elif case == "wrong url":
        url = orthanc.url + "/not-dicom-web"
    elif case == "server down":
        url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    expected = {
        "wrong study": f"error: No study with StudyInstanceUID {study} on {url}",
        "wrong series": f"error: Study {study} on {url} holds no series 1.2.826.0.1.3680043.8.498.2",
        "wrong url": f"error: {url} is not a DICOMweb service (HTTP 404 for a study search)",
        "server down": f"error: Cannot reach the DICOMweb server {url}",
        "no credentials": f"error: The DICOMweb server {url} refused access while searching study {study} (HTTP 401",
        "wrong password": f"error: The DICOMweb server {url} refused access while searching study {study} (HTTP 401",
    }[case]
    n_before = orthanc.count()
    assert main(["pacs", "--url", url, "--study", study, *extra, "--model", package_dir, "--device", "cpu", "--force"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    if case == "no credentials":
        assert "set KTS_DICOMWEB_TOKEN, or KTS_DICOMWEB_USER and KTS_DICOMWEB_PASSWORD" in err[0]
    if case == "wrong password":
        assert "credentials (user/password (from the environment)) were refused" in err[0] and "wrong" not in err[0]
    assert orthanc.count() == n_before, "something was stored"


def test_a_series_a_seg_cannot_reference_stores_nothing(tmp_path, orthanc, package_dir, no_credentials, monkeypatch, capsys):
    """A series the server holds but whose result cannot be built (here: a non-CT-like image, no --force)."""
    from conftest import ct_from_labels
    from Training.phantoms import procedural_labels

    labels = procedural_labels(size=(40, 36, 12), spacing=(3.0, 3.0, 4.0), rng=np.random.default_rng(1), tumors=1)
    ct = sitk.Cast(ct_from_labels(labels), sitk.sitkInt16) * 0 + 7  # constant: refused by validation
    study = pydicom.uid.generate_uid()
    write_ct_series(ct, tmp_path / "series", study_uid=study)
    orthanc.upload(tmp_path / "series")
    monkeypatch.setenv(dicomweb.USER_VARIABLE, USER)
    monkeypatch.setenv(dicomweb.PASSWORD_VARIABLE, PASSWORD)
    n_before = orthanc.count()
    assert main(["pacs", "--url", orthanc.dicomweb, "--study", study, "--model", package_dir, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "constant" in err[0], err
    assert orthanc.count() == n_before


def test_credentials_come_from_a_file_or_the_environment_never_the_command_line(tmp_path, no_credentials, monkeypatch, capsys):
    assert dicomweb.read_credentials(environ={}).describe() == "no credentials"
    token = dicomweb.read_credentials(environ={dicomweb.TOKEN_VARIABLE: "abc"})
    assert token.token == "abc"
    pacs = dicomweb.Pacs("http://127.0.0.1:1/dicom-web", token)
    assert pacs.client._session.headers["Authorization"] == "Bearer abc"
    basic = dicomweb.read_credentials(_auth_file(tmp_path, f"{dicomweb.USER_VARIABLE}=u\n{dicomweb.PASSWORD_VARIABLE}=p\n"))
    assert dicomweb.Pacs("http://127.0.0.1:1/dicom-web", basic).client._session.auth == ("u", "p")
    bad = [
        ({dicomweb.TOKEN_VARIABLE: "t", dicomweb.USER_VARIABLE: "u", dicomweb.PASSWORD_VARIABLE: "p"}, "set one"),
        ({dicomweb.USER_VARIABLE: "u"}, "go together"),
    ]
    for environ, message in bad:
        with pytest.raises(dicomweb.InputError, match=message):
            dicomweb.read_credentials(environ=environ)
    with pytest.raises(dicomweb.InputError, match="line 1: expected NAME=value"):
        dicomweb.read_credentials(_auth_file(tmp_path, "password=p\n"))
    with pytest.raises(dicomweb.InputError, match="Cannot read the --auth-file"):
        dicomweb.read_credentials(tmp_path / "missing.env")
    # the command line has no option that takes a secret
    from KidneyTumorSegLib.cli import build_parser

    pacs_parser = build_parser()._subparsers._group_actions[0].choices["pacs"]
    options = {o for a in pacs_parser._actions for o in a.option_strings}
    assert not {o for o in options if any(w in o for w in ("token", "password", "user"))}
    assert main(["pacs", "--url", "ftp://x", "--study", "1.2"]) == 1
    assert capsys.readouterr().err.strip() == "error: --url ftp://x: expected an http:// or https:// DICOMweb base URL"


def test_ci_installs_orthanc_then_runs_exactly_the_readme_test_command():
    from conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    marker = "Install what the tests need and run the whole test suite"
    block = readme[readme.index(marker):].split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    lines = [ln for ln in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    assert lines[-1] == block
    install = next(i for i, ln in enumerate(lines) if "apt-get install" in ln)
    assert "orthanc orthanc-dicomweb" in lines[install] and "apt-get update" in lines[install - 1]
