"""A PACS round trip over DICOMweb (``dicomweb-client``): find and retrieve a series (QIDO-RS,
WADO-RS), and store results back (STOW-RS).

Credentials never come from the command line (it is visible to every user of the machine in
the process list and lands in shell history): from an ``--auth-file`` of ``NAME=value`` lines,
or else from the environment, with the same names:

* ``KTS_DICOMWEB_TOKEN``: a bearer token (``Authorization: Bearer ...``), or
* ``KTS_DICOMWEB_USER`` and ``KTS_DICOMWEB_PASSWORD``: HTTP basic authentication.

Every failure a user can cause (server down, wrong URL, refused credentials, unknown study or
series) raises :class:`~KidneyTumorSegLib.errors.KidneyTumorSegError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypeVar

from .errors import InputError, KidneyTumorSegError

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "KTS_DICOMWEB_TOKEN"
USER_VARIABLE = "KTS_DICOMWEB_USER"
PASSWORD_VARIABLE = "KTS_DICOMWEB_PASSWORD"
_NAMES = (TOKEN_VARIABLE, USER_VARIABLE, PASSWORD_VARIABLE)

#: seconds to wait for the server's answer to one request
TIMEOUT_S = 120.0

T = TypeVar("T")


class PacsError(KidneyTumorSegError):
    """The DICOMweb server cannot be reached, refuses the request, or lacks what was asked for."""


@dataclass(frozen=True)
class Credentials:
    token: Optional[str] = None
    user: Optional[str] = None
    password: Optional[str] = None
    source: str = "none"

    def describe(self) -> str:
        kind = "a bearer token" if self.token else ("user/password" if self.user else "no credentials")
        return f"{kind} ({self.source})" if self.token or self.user else kind


def _parse_auth_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"Cannot read the --auth-file {path}: {exc.strerror or exc}") from None
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            logger.warning("the --auth-file %s is readable by other users; chmod 600 it", path)
    except OSError:
        pass
    values = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        name = name.strip()
        if not sep or name not in _NAMES:
            raise InputError(f"{path}, line {number}: expected NAME=value with NAME one of {', '.join(_NAMES)}")
        values[name] = value.strip().strip("'\"")
    return values


def read_credentials(auth_file: Optional[str | os.PathLike] = None,
                     environ: Optional[Mapping[str, str]] = None) -> Credentials:
    """Credentials from ``auth_file`` when given, else from the environment (see module doc)."""
    if auth_file is not None:
        values, source = _parse_auth_file(Path(auth_file)), f"from {auth_file}"
    else:
        environ = os.environ if environ is None else environ
        values, source = {n: environ[n] for n in _NAMES if environ.get(n)}, "from the environment"
    token, user, password = (values.get(n) or None for n in _NAMES)
    if token and (user or password):
        raise InputError(f"Both {TOKEN_VARIABLE} and {USER_VARIABLE}/{PASSWORD_VARIABLE} are set {source}; set one")
    if bool(user) != bool(password):
        raise InputError(f"{USER_VARIABLE} and {PASSWORD_VARIABLE} go together; only one is set {source}")
    return Credentials(token, user, password, source if (token or user) else "none")


class Pacs:
    """A DICOMweb server (QIDO/WADO/STOW under one base URL, e.g. ``http://host:8042/dicom-web``)."""

    def __init__(self, url: str, credentials: Credentials = Credentials(), timeout_s: float = TIMEOUT_S):
        from .dicom import require

        require("dicomweb_client")
        import requests
        from dicomweb_client.api import DICOMwebClient

        if not url.startswith(("http://", "https://")):
            raise InputError(f"--url {url}: expected an http:// or https:// DICOMweb base URL")
        self.url = url.rstrip("/")
        session = requests.Session()
        if credentials.token:
            session.headers["Authorization"] = f"Bearer {credentials.token}"
        elif credentials.user:
            session.auth = (credentials.user, credentials.password)
        self.credentials = credentials
        self.client = DICOMwebClient(self.url, session=session, timeout=timeout_s)
        # a few quick retries (the default waits half a minute on a server that is down)
        self.client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)

    # ------------------------------------------------------------------ errors

    def _call(self, what: str, fn: Callable[[], T], not_found: Optional[str] = None) -> T:
        import requests

        try:
            return fn()
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            reason = exc.response.reason if exc.response is not None else ""
            if status in (401, 403):
                hint = (f"the credentials ({self.credentials.describe()}) were refused" if self.credentials.user or self.credentials.token
                        else f"set {TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}, or pass --auth-file")
                raise PacsError(f"The DICOMweb server {self.url} refused access while {what} (HTTP {status} {reason}): {hint}") from None
            if status == 404 and not_found:
                raise PacsError(not_found) from None
            raise PacsError(f"The DICOMweb server {self.url} answered HTTP {status} {reason} while {what}") from None
        except requests.exceptions.Timeout:
            raise PacsError(f"The DICOMweb server {self.url} did not answer in time while {what}") from None
        except requests.exceptions.ConnectionError:
            raise PacsError(f"Cannot reach the DICOMweb server {self.url} while {what} (connection failed: is it running, is the URL right?)") from None
        except requests.exceptions.RequestException as exc:
            raise PacsError(f"DICOMweb request to {self.url} failed while {what}: {exc}") from None
        except ValueError as exc:  # a body that is not DICOM / JSON: usually a URL that is not DICOMweb
            raise PacsError(f"{self.url} did not answer as a DICOMweb server while {what} ({exc})") from None

    # ------------------------------------------------------------------ QIDO / WADO / STOW

    def series_of_study(self, study_uid: str) -> list[dict]:
        """The study's series as {uid, modality, count, description}; PacsError if the study is unknown."""
        not_found = f"No study with StudyInstanceUID {study_uid} on {self.url}"
        studies = self._call(f"searching study {study_uid}", lambda: self.client.search_for_studies(
            search_filters={"StudyInstanceUID": study_uid}),
            not_found=f"{self.url} is not a DICOMweb service (HTTP 404 for a study search); give its root, "
                      "e.g. http://host:8042/dicom-web")
        if not studies:
            raise PacsError(not_found)
        found = self._call(f"searching the series of study {study_uid}", lambda: self.client.search_for_series(
            study_instance_uid=study_uid, fields=["NumberOfSeriesRelatedInstances", "SeriesDescription"]),
            not_found=not_found)
        if not found:
            raise PacsError(not_found)

        def value(item: dict, tag: str):
            v = item.get(tag, {}).get("Value")
            return v[0] if v else None

        return [{"uid": value(s, "0020000E"), "modality": value(s, "00080060") or "",
                 "count": int(value(s, "00201209") or 0), "description": value(s, "0008103E") or ""} for s in found]

    def choose_series(self, study_uid: str, series_uid: Optional[str]) -> str:
        """``series_uid`` if the study holds it, else the study's CT series with most instances."""
        series = self.series_of_study(study_uid)
        if series_uid:
            if not any(s["uid"] == series_uid for s in series):
                raise PacsError(f"Study {study_uid} on {self.url} holds no series {series_uid}; it holds "
                                + ", ".join(f"{s['uid']} ({s['modality']})" for s in series))
            return series_uid
        ct = sorted((s for s in series if s["modality"] == "CT"), key=lambda s: -s["count"])
        if not ct:
            raise PacsError(f"Study {study_uid} on {self.url} holds no CT series (modalities: "
                            f"{', '.join(sorted({s['modality'] for s in series}))}); pass --series UID")
        if len(ct) > 1:
            logger.warning("study %s holds %d CT series; using %s (%d instances), the largest; --series chooses another",
                           study_uid, len(ct), ct[0]["uid"], ct[0]["count"])
        return ct[0]["uid"]

    def retrieve_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Retrieve every instance of the series (as stored, any transfer syntax) into ``folder``."""
        datasets = self._call(f"retrieving series {series_uid}", lambda: self.client.retrieve_series(
            study_instance_uid=study_uid, series_instance_uid=series_uid, media_types=(("application/dicom", "*"),)),
            not_found=f"No series {series_uid} in study {study_uid} on {self.url}")
        if not datasets:
            raise PacsError(f"Series {series_uid} in study {study_uid} on {self.url} returned no instances")
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for i, ds in enumerate(datasets):
            path = folder / f"{i:05d}.dcm"
            ds.save_as(str(path), enforce_file_format=True)
            files.append(path)
        return files

    def store(self, datasets: Sequence, study_uid: str) -> None:
        """Store ``datasets`` in one STOW-RS request; PacsError if the server failed any of them."""
        response = self._call("storing the results", lambda: self.client.store_instances(
            datasets=list(datasets), study_instance_uid=study_uid))
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: failure reason {item.get('FailureReason', '?')}"
                                for item in failed)
            stored = len(datasets) - len(failed)
            raise PacsError(f"The DICOMweb server {self.url} refused {len(failed)} of {len(datasets)} instances "
                            f"({reasons}); {stored} stored")
