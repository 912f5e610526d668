"""Model packages: manifest validation, checksums, safe loading, registry and install."""

import json
import zipfile

import pytest
import torch

from conftest import classifier_manifest, save_test_package
from KidneyTumorSegLib.errors import ModelPackageError
from KidneyTumorSegLib.manifest import MANIFEST_NAME, ModelManifest, read_manifest
from KidneyTumorSegLib.models import (DEFAULT_MODEL_NAME, MODELS_DIR_ENV, find_model, install_model, list_models,
                                      load_package, save_package)


@pytest.fixture(autouse=True)
def user_models(tmp_path, monkeypatch):
    folder = tmp_path / "user-models"
    monkeypatch.setenv(MODELS_DIR_ENV, str(folder))
    return folder


def _rewrite_manifest(root, change):
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def test_round_trip_and_checksums(tmp_path):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    loaded = load_package(str(pkg.root))
    assert loaded.manifest == pkg.manifest
    assert loaded.manifest.to_dict() == ModelManifest.from_dict(loaded.manifest.to_dict()).to_dict()
    assert len(loaded.build_networks(loaded.manifest.stages[0])) == 1


def test_corrupt_weights_file_is_named(tmp_path):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    (pkg.root / "fine.pt").write_bytes(b"garbage")
    with pytest.raises(ModelPackageError, match=r"fine\.pt: sha256 .* does not match"):
        load_package(str(pkg.root))


def test_missing_weights_file_is_named(tmp_path):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    (pkg.root / "coarse.pt").unlink()
    with pytest.raises(ModelPackageError, match=r"coarse\.pt: weights file .* is missing"):
        load_package(str(pkg.root))


def test_newer_schema_version_asks_for_an_upgrade(tmp_path):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    _rewrite_manifest(pkg.root, lambda d: d.update(schema_version=99))
    with pytest.raises(ModelPackageError, match="schema_version is 99.*upgrade"):
        load_package(str(pkg.root))


@pytest.mark.parametrize("change,message", [
    (lambda d: d["stages"][0].update(role="guess"), r"stages\[0\]\.role must be one of"),
    (lambda d: d["stages"][1].update(patch_size=[32, 32]), r"patch_size must be a list of 3"),
    (lambda d: d["stages"][1]["region"].update(kind="sphere"), r"region\.kind must be one of"),
    (lambda d: d.update(colour="red"), r"unknown key\(s\) colour"),
    (lambda d: d["stages"][1].update(classes=["background", "liver"]), r"classes must start with 'background'"),
    (lambda d: d["postprocessing"].update(fill_hole=True), r"postprocessing: .*fill_hole"),
    (lambda d: d["stages"][1].setdefault("inputs", {}).update(prior_from="fine"), r"prior_from must name an earlier localize"),
    (lambda d: d["stages"][0]["network"].update(name="vbnett"), r"unknown network 'vbnett'.*Did you mean 'vbnet'"),
    (lambda d: d["stages"][1].update(window_margin=[0, 0, 16]), r"window_margin must be 3 integers"),
])
def test_invalid_manifests_are_refused_with_the_reason(tmp_path, change, message):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    _rewrite_manifest(pkg.root, change)
    with pytest.raises(ModelPackageError, match=message):
        p = load_package(str(pkg.root), verify=False)
        for stage in p.manifest.stages:
            p.build_networks(stage)


def test_mismatched_weights_are_refused(tmp_path):
    manifest = classifier_manifest()
    manifest["stages"][1]["network"] = {"name": "vbnet", "kwargs": {"features": [4, 8, 16, 32, 64]}}
    manifest["stages"][1]["classes"] = ["background", "kidney", "tumor"]
    net = torch.nn.Conv3d(1, 3, 1)  # a state dict of the wrong network
    pkg = save_package(tmp_path / "pkg", manifest, {"coarse.pt": {}, "fine.pt": net.state_dict()})
    with pytest.raises(ModelPackageError, match=r"fine\.pt: weights do not match network 'vbnet'"):
        pkg.build_networks(pkg.manifest.stage("fine"))


def test_weights_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pkg = save_test_package(tmp_path / "pkg", classifier_manifest())
    torch.save({"x": Evil()}, pkg.root / "fine.pt")
    from KidneyTumorSegLib.models import sha256_file

    _rewrite_manifest(pkg.root, lambda d: d["stages"][1]["weights"][0].update(sha256=sha256_file(pkg.root / "fine.pt")))
    with pytest.raises(ModelPackageError, match="cannot load weights safely"):
        load_package(str(pkg.root)).build_networks(read_manifest(pkg.root / MANIFEST_NAME).stage("fine"))


def test_patch_must_fit_the_network_multiple(tmp_path):
    manifest = classifier_manifest()
    manifest["stages"][1]["network"] = {"name": "vbnet", "kwargs": {"features": [4, 8, 16, 32, 64]}}
    manifest["stages"][1]["patch_size"] = [40, 40, 40]
    from KidneyTumorSegLib.networks import build_network

    net = build_network("vbnet", in_channels=1, num_classes=3, features=[4, 8, 16, 32, 64])
    pkg = save_package(tmp_path / "pkg", manifest, {"coarse.pt": {}, "fine.pt": net.state_dict()})
    with pytest.raises(ModelPackageError, match="must be a multiple of the network's min_input_multiple"):
        pkg.build_networks(pkg.manifest.stage("fine"))


def test_install_from_folder_and_zip_then_find_by_name(tmp_path, user_models):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest(name="my-model"))
    info = install_model(str(pkg.root))
    assert info.path == user_models / "my-model" and find_model("my-model") == info.path
    assert any(i.name == "my-model" and i.source == "installed" for i in list_models())
    with pytest.raises(ModelPackageError, match="already installed.*--overwrite"):
        install_model(str(pkg.root))
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in pkg.root.iterdir():
            z.write(f, f"my-model/{f.name}")
    from KidneyTumorSegLib.models import sha256_file

    with pytest.raises(ModelPackageError, match="does not match the expected"):
        install_model(str(archive), sha256="0" * 64, overwrite=True)
    info = install_model(str(archive), sha256=sha256_file(archive), overwrite=True)
    assert load_package("my-model").manifest.name == "my-model"


def test_install_refuses_broken_packages_and_urls_without_checksum(tmp_path, user_models):
    pkg = save_test_package(tmp_path / "pkg", classifier_manifest(name="broken"))
    (pkg.root / "fine.pt").write_bytes(b"x")
    with pytest.raises(ModelPackageError, match="sha256"):
        install_model(str(pkg.root))
    assert not (user_models / "broken").exists()
    with pytest.raises(ModelPackageError, match="needs the package's sha256"):
        install_model("https://example.invalid/model.zip")
    with pytest.raises(ModelPackageError, match="no model package named"):
        find_model("does-not-exist")


def test_bundled_default_model_is_listed_and_valid():
    infos = [i for i in list_models() if i.default]
    assert len(infos) == 1 and infos[0].name == DEFAULT_MODEL_NAME
    pkg = load_package(None)  # verifies every checksum
    assert "not for clinical use" in pkg.manifest.intended_use.lower()
    assert pkg.manifest.provenance.get("trained_on")


def test_install_from_a_url_checks_the_sha256(tmp_path, user_models):
    """Download over a loopback HTTP server (no outside network): wrong checksum refused, right one installed."""
    import functools
    import http.server
    import threading

    from KidneyTumorSegLib.models import sha256_file

    pkg = save_test_package(tmp_path / "pkg", classifier_manifest(name="url-model"))
    serve = tmp_path / "serve"
    serve.mkdir()
    archive = serve / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in pkg.root.iterdir():
            z.write(f, f.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/model.zip"
        with pytest.raises(ModelPackageError, match="does not match the expected"):
            install_model(url, sha256="f" * 64)
        assert not (user_models / "url-model").exists()
        seen = []
        info = install_model(url, sha256=sha256_file(archive), progress=lambda done, total: seen.append((done, total)))
        assert info.path == user_models / "url-model"
        assert seen and seen[-1][0] == archive.stat().st_size
        with pytest.raises(ModelPackageError, match="download of .* failed"):
            install_model(url.replace("model.zip", "missing.zip"), sha256="0" * 64)
    finally:
        server.shutdown()
    # no stray temporary folders left behind
    assert sorted(p.name for p in user_models.iterdir()) == ["url-model"]
