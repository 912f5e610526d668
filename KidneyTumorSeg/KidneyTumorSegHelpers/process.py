"""Running the library's command line in a background process (no Slicer imports here).

The Slicer module never runs the segmentation inside Slicer's own interpreter: it starts
``PythonSlicer -m KidneyTumorSegLib segment ...`` and reads its output line by line, so the
GUI stays responsive, a crash cannot take Slicer down, Cancel can kill the whole process tree,
and GPU memory is returned to the system when the process ends.

Everything that touches the operating system goes through a :class:`ProcessRunner`, which
tests replace with a fake (the way SlicerNNUnet injects its process runner as a Protocol).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Union

logger = logging.getLogger(__name__)

LIBRARY_PACKAGE = "KidneyTumorSegLib"


# --------------------------------------------------------------------------------------
# Finding the interpreter and the library
# --------------------------------------------------------------------------------------

def findLibraryRoot(moduleDir: str) -> Optional[str]:
    """Folder that contains the ``KidneyTumorSegLib`` package, or None.

    Installed extension: the library is installed beside the module (same folder).
    Source checkout: the module folder is ``<repo>/KidneyTumorSeg`` and the library is
    ``<repo>/KidneyTumorSegLib``, one level up.
    """
    for candidate in (moduleDir, os.path.dirname(moduleDir)):
        if os.path.isfile(os.path.join(candidate, LIBRARY_PACKAGE, "__init__.py")):
            return os.path.abspath(candidate)
    return None


def findPythonSlicer(slicerHome: Optional[str] = None) -> Optional[str]:
    """Path of the ``PythonSlicer`` executable (Slicer's interpreter with Slicer's packages).

    Looks on PATH first (Slicer's launcher puts its ``bin`` folder there), then in
    ``<slicerHome>/bin``. Returns None when neither exists (e.g. outside Slicer).
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    if slicerHome:
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            path = os.path.join(slicerHome, "bin", name)
            if os.path.isfile(path):
                return path
    return None


def buildEnvironment(libraryRoot: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the background process: ``base`` (default: this process's) with the
    library folder first on PYTHONPATH and unbuffered UTF-8 output so progress lines arrive
    as they are written."""
    env = dict(os.environ if base is None else base)
    existing = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = libraryRoot + (os.pathsep + existing if existing else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


# --------------------------------------------------------------------------------------
# Command lines (the library's CLI contract)
# --------------------------------------------------------------------------------------

def buildSegmentCommand(python: str, inputPath: str, outputPath: str, statsPath: str,
                        model: Optional[str] = None, device: str = "auto", tta: bool = False,
                        force: bool = False) -> List[str]:
    """Argument list of ``python -m KidneyTumorSegLib segment``.

    ``model`` is a model name or package folder (None: the library's default); ``device`` is
    passed as given (the library's ``device.parse_device`` judges names: the logic checks them
    with it before a run). Progress is requested as JSON lines; ``--overwrite`` because the
    output lives in a fresh temporary folder owned by this run.
    """
    args = [python, "-m", LIBRARY_PACKAGE, "segment", inputPath, "-o", outputPath,
            "--device", device, "--stats", statsPath, "--progress", "json", "--overwrite"]
    if model:
        args += ["--model", model]
    if tta:
        args.append("--tta")
    if force:
        args.append("--force")
    return args


def buildListModelsCommand(python: str) -> List[str]:
    """Argument list of ``python -m KidneyTumorSegLib models list --json``."""
    return [python, "-m", LIBRARY_PACKAGE, "models", "list", "--json"]


def buildListDevicesCommand(python: str) -> List[str]:
    """Argument list of ``python -m KidneyTumorSegLib devices --json``."""
    return [python, "-m", LIBRARY_PACKAGE, "devices", "--json"]


# --------------------------------------------------------------------------------------
# Output lines
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProgressLine:
    """``{"progress": fraction, "message": text}`` from the library (fraction in 0..1)."""
    fraction: float
    message: str


@dataclass(frozen=True)
class ErrorLine:
    """The library's failure report: ``error: ...`` (without the prefix), or the structured
    ``{"error": {"kind": ..., "message": ...}}`` of ``--progress json`` (``kind`` is the
    library's exception class, e.g. ``NotCTLikeError``; "" for the plain line)."""
    message: str
    kind: str = ""


#: the library's error kind for intensities that do not look like CT (``--force`` overrules it)
NOT_CT_KIND = "NotCTLikeError"


@dataclass(frozen=True)
class LogLine:
    """Any other output line (plain log text)."""
    text: str


OutputLine = Union[ProgressLine, ErrorLine, LogLine]


def parseOutputLine(line: str) -> OutputLine:
    """Classify one output line of the library's CLI (trailing newline already removed or not).

    A JSON object with a numeric ``progress`` is progress (clamped to 0..1); a JSON object with
    an ``error`` object, or a line starting with ``error: ``, is the failure; everything else is
    log text.
    """
    text = line.rstrip("\r\n")
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("progress"), (int, float)) \
                and not isinstance(obj.get("progress"), bool):
            fraction = min(1.0, max(0.0, float(obj["progress"])))
            return ProgressLine(fraction, str(obj.get("message", "")))
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            error = obj["error"]
            return ErrorLine(str(error.get("message", "")), str(error.get("kind", "")))
    if stripped.startswith("error:"):
        return ErrorLine(stripped[len("error:"):].strip())
    return LogLine(text)


def isOutOfMemoryMessage(message: str) -> bool:
    """True when a failure message reports that memory (GPU or CPU) ran out."""
    lowered = message.lower()
    return "out of memory" in lowered or "insufficientmemory" in lowered or "not enough memory" in lowered


# --------------------------------------------------------------------------------------
# Process runners
# --------------------------------------------------------------------------------------

class ProcessHandle(Protocol):
    """A started process whose merged stdout/stderr is read as lines."""

    def readLines(self) -> List[str]:
        """Lines written since the last call (never blocks)."""

    def poll(self) -> Optional[int]:
        """Exit code, or None while running. After it returns a code, all lines are readable."""

    def kill(self) -> None:
        """Stop the process and every process it started; returns when they are gone."""


class ProcessRunner(Protocol):
    """Starts processes; the logic holds one so tests can inject a fake."""

    def start(self, args: Sequence[str], env: Dict[str, str], cwd: Optional[str]) -> ProcessHandle:
        """Start ``args`` with environment ``env`` in folder ``cwd``."""


class SubprocessHandle:
    """:class:`ProcessHandle` over ``subprocess.Popen`` with a reader thread.

    The process gets its own process group (POSIX) / process group flag (Windows) so that
    :meth:`kill` reaches the children too: ``PythonSlicer`` is a launcher that starts the
    real interpreter as a child, and killing only the launcher would leave it running.
    """

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="KidneyTumorSeg-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _read(self) -> None:
        stream = self._popen.stdout
        for line in iter(stream.readline, ""):
            self._lines.put(line.rstrip("\r\n"))
        stream.close()

    def readLines(self) -> List[str]:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def poll(self) -> Optional[int]:
        code = self._popen.poll()
        if code is None:
            return None
        # The exit code can be seen before the reader has drained the pipe.
        self._reader.join(timeout=5.0)
        return code

    def kill(self) -> None:
        if self._popen.poll() is None:
            killProcessTree(self._popen)
        try:
            self._popen.wait(timeout=10.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if the OS refuses
            logger.error("process %d did not stop", self._popen.pid)
        self._reader.join(timeout=5.0)


def killProcessTree(popen: subprocess.Popen, graceSeconds: float = 2.0) -> None:
    """Terminate ``popen`` and its descendants: politely first, then by force."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(popen.pid)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        return
    try:
        group = os.getpgid(popen.pid)
    except ProcessLookupError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return
        try:
            popen.wait(timeout=graceSeconds)
            # The leader is gone; children in the group may still run: make sure.
            os.killpg(group, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


class SubprocessRunner:
    """The real :class:`ProcessRunner`: ``subprocess.Popen`` with merged, line-read output."""

    def start(self, args: Sequence[str], env: Dict[str, str], cwd: Optional[str]) -> SubprocessHandle:
        kwargs = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                      env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1)
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True
        logger.info("starting: %s", subprocess.list2cmdline(list(args)))
        return SubprocessHandle(subprocess.Popen(list(args), **kwargs))


def runToCompletion(runner: ProcessRunner, args: Sequence[str], env: Dict[str, str],
                    cwd: Optional[str] = None, timeoutSeconds: float = 120.0,
                    sleep=None) -> tuple:
    """Run a short command to its end; returns ``(exitCode, lines)``.

    Used for ``models list`` and ``devices``. Kills the process and raises ``TimeoutError``
    after ``timeoutSeconds``.
    """
    import time

    sleep = sleep or time.sleep
    handle = runner.start(args, env, cwd)
    lines: List[str] = []
    deadline = time.monotonic() + timeoutSeconds
    while True:
        code = handle.poll()
        lines += handle.readLines()
        if code is not None:
            lines += handle.readLines()
            return code, lines
        if time.monotonic() > deadline:
            handle.kill()
            raise TimeoutError(f"{' '.join(args[1:4])} did not finish within {timeoutSeconds:.0f} s")
        sleep(0.02)


def parseJsonOutput(lines: Sequence[str]):
    """The JSON document in a command's output: the first line that starts a JSON array or
    object and parses, together with the lines after it (log lines before it are skipped)."""
    for start, line in enumerate(lines):
        if line.lstrip().startswith(("[", "{")):
            for end in range(len(lines), start, -1):
                try:
                    return json.loads("\n".join(lines[start:end]))
                except ValueError:
                    continue
    raise ValueError("no JSON document in the command output")


def failureMessage(lines: Sequence[str], exitCode: int) -> str:
    """One-line reason for a failed run: the library's ``error:`` line when it printed one,
    else the last non-empty output line, else the exit code."""
    for line in reversed(lines):
        parsed = parseOutputLine(line)
        if isinstance(parsed, ErrorLine):
            return parsed.message
    for line in reversed(lines):
        if line.strip() and not isinstance(parseOutputLine(line), ProgressLine):
            return line.strip()
    return f"the segmentation process exited with code {exitCode}"
