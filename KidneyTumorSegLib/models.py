"""Model packages: finding, verifying, loading and installing them.

A package is a folder with ``manifest.json`` (see :mod:`manifest`) and its weights files
(``torch.save`` of a plain state dict). Loading verifies every file's sha256 against the
manifest and reads weights with ``torch.load(weights_only=True)``: nothing is unpickled.

Where packages live: the bundled ones inside this library (``bundled_models/``), and the user's
installed ones in ``$KIDNEY_TUMOR_SEG_MODELS_DIR`` or, when unset,
``$XDG_DATA_HOME/kidney-tumor-seg/models`` (``~/.local/share/...``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import ModelPackageError, OutputError
from .manifest import (MANIFEST_NAME, ModelManifest, StageSpec, check_package_name, read_manifest,
                       write_manifest)

logger = logging.getLogger(__name__)

BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "bundled_models"
DEFAULT_MODEL_NAME = "kidney-vbnet-phantom"
MODELS_DIR_ENV = "KIDNEY_TUMOR_SEG_MODELS_DIR"


def user_models_dir() -> Path:
    """Folder of installed (non-bundled) model packages."""
    env = os.environ.get(MODELS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kidney-tumor-seg" / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    """What a user needs to choose a model: ``source`` is "bundled" or "installed"."""

    name: str
    version: str
    description: str
    intended_use: str
    path: Path
    labels: dict
    has_cyst: bool
    default: bool
    source: str
    #: the manifest's ``provenance.data`` reduced to its plain values (e.g. ``phantoms``:
    #: true for a model trained on synthetic phantoms, ``dataset``); {} when it declares none
    data_provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "description": self.description,
                "intended_use": self.intended_use, "path": str(self.path), "labels": dict(self.labels),
                "has_cyst": self.has_cyst, "default": self.default, "source": self.source,
                "data_provenance": dict(self.data_provenance)}


def data_provenance(provenance) -> dict:
    """The plain (str, number, bool, None) values of a manifest's ``provenance.data``."""
    data = provenance.get("data") if isinstance(provenance, dict) else None
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if v is None or isinstance(v, (str, int, float, bool))}


def _package_dirs() -> list[tuple[Path, str]]:
    found = []
    for base, source in ((BUNDLED_MODELS_DIR, "bundled"), (user_models_dir(), "installed")):
        if base.is_dir():
            found += [(p, source) for p in sorted(base.iterdir()) if (p / MANIFEST_NAME).is_file()]
    return found


def list_models() -> list[ModelInfo]:
    """All bundled and installed packages whose manifests are valid (invalid ones are logged and skipped)."""
    infos = []
    for path, source in _package_dirs():
        try:
            m = read_manifest(path / MANIFEST_NAME)
        except ModelPackageError as exc:
            logger.warning("skipping model package %s: %s", path, exc)
            continue
        infos.append(ModelInfo(m.name, m.version, m.description, m.intended_use, path, dict(m.labels), m.has_cyst,
                               m.name == DEFAULT_MODEL_NAME and source == "bundled", source,
                               data_provenance(m.provenance)))
    return infos


def find_model(name_or_path: Optional[str] = None) -> Path:
    """Folder of a package given by name (installed ones win over bundled ones), by path, or the default."""
    if name_or_path is None or name_or_path == "":
        name_or_path = DEFAULT_MODEL_NAME
    candidate = Path(str(name_or_path)).expanduser()
    if candidate.is_dir():
        if not (candidate / MANIFEST_NAME).is_file():
            raise ModelPackageError(f"{candidate} is not a model package: it has no {MANIFEST_NAME}")
        return candidate
    if candidate.is_file() and candidate.name == MANIFEST_NAME:
        return candidate.parent
    matches = {}
    for info in list_models():
        if info.name == name_or_path:
            matches.setdefault(info.source, info.path)
    if "installed" in matches:
        return matches["installed"]
    if "bundled" in matches:
        return matches["bundled"]
    names = sorted({i.name for i in list_models()})
    raise ModelPackageError(f"no model package named or at {str(name_or_path)!r}; available: {', '.join(names) or 'none'}"
                            f" (install one with 'kidney-tumor-seg models install PATH')")


class ModelPackage:
    """A verified model package: its manifest and the means to build its networks."""

    def __init__(self, root: Path, manifest: ModelManifest):
        self.root = Path(root)
        self.manifest = manifest

    def weights_path(self, file: str) -> Path:
        return self.root / file

    def verify(self) -> None:
        """Check that every weights file exists and matches its sha256."""
        for stage in self.manifest.stages:
            for w in stage.weights:
                path = self.weights_path(w.file)
                if not path.is_file():
                    raise ModelPackageError(f"{path}: weights file listed by stage {stage.name!r} is missing")
                actual = sha256_file(path)
                if actual != w.sha256:
                    raise ModelPackageError(f"{path}: sha256 {actual} does not match the manifest's {w.sha256} "
                                            "(corrupt or replaced file; reinstall the package)")

    def build_networks(self, stage: StageSpec, device=None) -> list:
        """The stage's networks (one per weights file: an ensemble), weights loaded, in eval mode."""
        import torch

        from .networks import build_network

        kwargs = dict(stage.network.kwargs)
        for reserved in ("in_channels", "num_classes"):
            if reserved in kwargs:
                raise ModelPackageError(f"{self.root / MANIFEST_NAME}: stage {stage.name!r} network kwargs must not set "
                                        f"{reserved!r} (it follows from the stage's inputs and classes)")
        nets = []
        for w in stage.weights:
            try:
                net = build_network(stage.network.name, in_channels=self.manifest.network_in_channels(stage),
                                    num_classes=stage.num_outputs, **kwargs)
            except (ValueError, TypeError) as exc:
                raise ModelPackageError(f"{self.root / MANIFEST_NAME}: stage {stage.name!r}: {exc}") from None
            _check_patch_fits(net, stage, self.root / MANIFEST_NAME)
            path = self.weights_path(w.file)
            state = _load_state_dict(path)
            if not isinstance(state, dict):
                raise ModelPackageError(f"{path}: expected a state dict, found {type(state).__name__}")
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                first = str(exc).splitlines()[0] if str(exc) else "mismatch"
                raise ModelPackageError(f"{path}: weights do not match network {stage.network.name!r} of stage {stage.name!r} ({first})") from None
            net.eval()
            if device is not None:
                net.to(device)
            nets.append(net)
        return nets


def _load_state_dict(path: Path):
    """``torch.load(weights_only=True)`` of a weights file, with one line of our own on failure.

    torch's own message for a file that needs unpickling advises ``weights_only=False``,
    which would execute whatever the file holds: that advice is never passed on. torch's
    warnings are sent to the debug log (they would print before the ``error:`` line)."""
    import pickle
    import re
    import warnings

    import torch

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise ModelPackageError(f"{path}: cannot load weights safely: the file is not a plain state dict of tensors{what}; "
                                "loading it would unpickle Python objects, which can run code, and that is never done; "
                                "re-export the weights as a state dict (torch.save(model.state_dict(), ...))") from None
    except Exception as exc:  # torch raises several types for corrupt files
        first = next((ln for ln in str(exc).splitlines() if ln.strip() and "weights_only" not in ln), "")
        raise ModelPackageError(f"{path}: cannot load weights safely ({type(exc).__name__}{': ' + first if first else ''}; "
                                "a corrupt or truncated file?)") from None
    for w in caught:
        logger.debug("torch, loading %s: %s", path, w.message)
    return state


def _check_patch_fits(net, stage: StageSpec, where: Path) -> None:
    multiple = getattr(net, "min_input_multiple", None)
    if multiple is None:
        return
    dims = getattr(net, "spatial_dims", 3)
    # patch_size is (x, y, z); tensors are (D=z, H=y, W=x); a 2.5D network sees (y, x) only.
    tensor_patch = tuple(reversed(stage.patch_size))[-dims:]
    for p, m in zip(tensor_patch, tuple(multiple)[-dims:]):
        if p % m:
            raise ModelPackageError(f"{where}: stage {stage.name!r} patch_size {list(stage.patch_size)} (x, y, z) must be a multiple of "
                                    f"the network's min_input_multiple {tuple(reversed(tuple(multiple)))} (x, y, z)")


def load_package(name_or_path: Optional[str] = None, verify: bool = True) -> ModelPackage:
    """Find, read and (by default) checksum-verify a model package."""
    root = find_model(name_or_path)
    package = ModelPackage(root, read_manifest(root / MANIFEST_NAME))
    if verify:
        package.verify()
    return package


def install_model(source: str, sha256: Optional[str] = None, overwrite: bool = False,
                  progress: Optional[Callable[[int, Optional[int]], None]] = None) -> ModelInfo:
    """Install a package from a local folder, a local ``.zip`` or an http(s) URL of a zip.

    A URL requires ``sha256`` of the downloaded file. The package is verified before it is
    moved (atomically) into :func:`user_models_dir`; an installed package of the same
    name is replaced only with ``overwrite``.
    """
    if not str(source).strip():
        raise ModelPackageError("no model package given: expected a folder, a .zip or an http(s) URL")
    dest_root = user_models_dir()
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
        tmp_root = tempfile.mkdtemp(dir=dest_root, prefix=f".install-{os.getpid()}-")
    except OSError as exc:
        raise OutputError(f"cannot write in the models folder {dest_root}: {exc.strerror or exc} "
                          f"(set {MODELS_DIR_ENV} to a writable folder)") from None
    _remove_stale_installs(dest_root)
    try:
        manifest, target = _install_into(Path(tmp_root), dest_root, source, sha256, overwrite, progress)
    except OSError as exc:
        raise OutputError(f"cannot install into the models folder {dest_root}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    logger.info("installed model %s %s into %s", manifest.name, manifest.version, target)
    return ModelInfo(manifest.name, manifest.version, manifest.description, manifest.intended_use, target,
                     dict(manifest.labels), manifest.has_cyst, False, "installed")


def _remove_stale_installs(dest_root: Path) -> None:
    """Remove ``.install-PID-*`` folders left by a killed install whose process is gone."""
    for entry in dest_root.glob(".install-*"):
        pid = entry.name[len(".install-"):].split("-", 1)[0]
        alive = True
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                alive = False
            except OSError:
                pass
        elif not pid.isdigit():
            alive = False  # an older version's TemporaryDirectory: no owner to ask
        if not alive and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _install_into(tmp: Path, dest_root: Path, source: str, sha256, overwrite: bool, progress):
    """Stage, verify and move a package into ``dest_root``; returns (manifest, target)."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        if not sha256:
            raise ModelPackageError(f"installing from a URL needs the package's sha256 (--sha256); got none for {source}")
        archive = tmp / "download.zip"
        _download(source, archive, progress)
        _check_sha(archive, sha256, source)
        staged = _extract(archive, tmp / "unpacked")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelPackageError(f"{path}: no such model package folder or zip")
        if sha256:
            if not path.is_file():
                raise ModelPackageError(f"--sha256 checks an archive file, but {path} is a folder")
            _check_sha(path, sha256, str(path))
        if path.is_dir():
            if not (path / MANIFEST_NAME).is_file():
                raise ModelPackageError(f"{path} is not a model package: it has no {MANIFEST_NAME}")
            staged = tmp / "unpacked"
            shutil.copytree(path, staged)
        elif zipfile.is_zipfile(path):
            staged = _extract(path, tmp / "unpacked")
        else:
            raise ModelPackageError(f"{path}: expected a model package folder or a .zip of one")
    # The name comes from the package: it is validated (one safe path component) by
    # read_manifest before anything outside the staging folder is touched.
    manifest = read_manifest(staged / MANIFEST_NAME)
    ModelPackage(staged, manifest).verify()
    target = _target_inside(dest_root, manifest.name)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise ModelPackageError(f"a model named {manifest.name!r} is already installed at {target}; pass --overwrite to replace it")
        target.rename(tmp / "previous")
    staged.rename(target)
    return manifest, target


def _target_inside(dest_root: Path, name: str) -> Path:
    """``dest_root / name``, proven to be a direct child of the models folder."""
    try:
        check_package_name(name)
    except ValueError as exc:
        raise ModelPackageError(str(exc)) from None
    root = dest_root.resolve()
    target = root / name
    if target.parent != root:
        raise ModelPackageError(f"model name {name!r} would install outside the models folder {root}")
    return target


def _check_sha(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ModelPackageError(f"{what}: sha256 {actual} does not match the expected {expected}")


def _extract(archive: Path, dest: Path) -> Path:
    """Unpack a zip safely (no paths outside ``dest``); returns the folder holding manifest.json."""
    try:
        with zipfile.ZipFile(archive) as z:
            root = dest.resolve()
            for member in z.namelist():
                target = (dest / member).resolve()
                if target != root and root not in target.parents:
                    raise ModelPackageError(f"{archive}: unsafe path {member!r} in the archive")
            z.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise ModelPackageError(f"{archive}: not a valid zip ({exc})") from None
    if (dest / MANIFEST_NAME).is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir() and (p / MANIFEST_NAME).is_file()]
    if len(subdirs) == 1:
        return subdirs[0]
    raise ModelPackageError(f"{archive}: the archive holds no {MANIFEST_NAME} at its top level or in one folder")


def _download(url: str, dest: Path, progress) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
    except OSError as exc:
        raise ModelPackageError(f"download of {url} failed: {exc}") from None


def save_package(root: Path, manifest_dict: dict, state_dicts: dict, overwrite: bool = False) -> ModelPackage:
    """Write a model package: each ``state_dicts[file]`` saved with ``torch.save``, then the manifest.

    ``manifest_dict`` is a manifest as a dict whose weights entries may omit ``sha256``;
    the checksums are filled in from the written files. The package is validated by
    reading it back. Written into a temporary folder and renamed, so no half package remains.
    """
    import copy

    import torch

    root = Path(root)
    if root.exists() and not overwrite:
        raise ModelPackageError(f"{root} already exists; pass overwrite=True to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    manifest_dict = copy.deepcopy(manifest_dict)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}-"))
    try:
        for file, state in state_dicts.items():
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp / file)
        for stage in manifest_dict["stages"]:
            for w in stage["weights"]:
                if w["file"] not in state_dicts:
                    raise ModelPackageError(f"stage {stage['name']!r} lists weights {w['file']!r} that were not given")
                w["sha256"] = sha256_file(tmp / w["file"])
        try:
            manifest = ModelManifest.from_dict(manifest_dict)
        except (ValueError, TypeError) as exc:
            raise ModelPackageError(f"invalid manifest for {root}: {exc}") from None
        write_manifest(manifest, tmp / MANIFEST_NAME)
        ModelPackage(tmp, manifest).verify()
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelPackage(root, manifest)
