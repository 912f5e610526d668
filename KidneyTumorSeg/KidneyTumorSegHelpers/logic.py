"""KidneyTumorSegLogic: everything the module does, usable without its widget.

``KidneyTumorSegLogic().segment(volumeNode)`` runs the library's CLI in a background process
(``PythonSlicer -m KidneyTumorSegLib segment ...``) on a temporary copy of the volume, waits
for it, and turns its label map into Kidney / Tumor (/ Cyst) segments. The widget uses the
non-blocking form, :meth:`KidneyTumorSegLogic.startSegmentation`, and polls the returned
:class:`SegmentationRun` from a ``qt.QTimer``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

import slicer

try:
    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
except ImportError:  # plain Python with slicer-core (batch mode): no module framework
    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        """What the logic needs of Slicer's base class when there is no Slicer application."""

        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            raise SegmentationError("parameter nodes need the Slicer application")

from . import process, results, segments, terminology

logger = logging.getLogger(__name__)

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: torch range the library supports (pyproject.toml).
TORCH_REQUIREMENT = "torch>=2.1,<3"
#: packages Slicer ships and that installing torch must never replace.
PROTECTED_PACKAGES = ("numpy", "SimpleITK")


class SegmentationError(RuntimeError):
    """A segmentation did not produce a result. ``outOfMemory``: the process ran out of (GPU)
    memory, so a retry on the CPU may work; ``cancelled``: the user stopped it."""

    def __init__(self, message: str, outOfMemory: bool = False, cancelled: bool = False, kind: str = ""):
        super().__init__(message)
        self.outOfMemory = outOfMemory
        self.cancelled = cancelled
        #: the library's error kind (its exception class name) when it reported one
        self.kind = kind

    @property
    def notCT(self) -> bool:
        """The library refused the intensities as not CT-like: ``force=True`` would segment it."""
        return self.kind == process.NOT_CT_KIND


class SegmentationRun:
    """One background segmentation: start, poll, cancel. Created by ``startSegmentation``.

    ``state`` goes ``running`` -> ``succeeded`` | ``failed`` | ``cancelled``. Segments are
    created only in :meth:`poll` after the process exited with 0, so a cancelled or failed run
    never leaves partial segments; the temporary folder is removed in every outcome.
    """

    def __init__(self, logic: "KidneyTumorSegLogic", volumeNode, segmentationNode, options: dict,
                 onProgress: Optional[Callable[[float, str], None]] = None,
                 onLog: Optional[Callable[[str], None]] = None,
                 onFinished: Optional[Callable[["SegmentationRun"], None]] = None):
        self.logic = logic
        self.volumeNode = volumeNode
        self.segmentationNode = segmentationNode
        self.options = dict(options)
        self.onProgress, self.onLog, self.onFinished = onProgress, onLog, onFinished
        self.state = "new"
        self.error: Optional[SegmentationError] = None
        self.stats: dict = {}
        self.progress = 0.0
        self.message = ""
        self.logLines: List[str] = []
        self.tempDir: Optional[str] = None
        self.command: List[str] = []
        self.elapsedSeconds = 0.0
        self._handle = None
        self._startTime = 0.0
        self._errorLine = ""
        self._errorKind = ""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Write the input to a temporary NRRD file and start the library's CLI."""
        logic = self.logic
        python = logic.pythonExecutable()
        libraryRoot = logic.libraryRoot()
        self.tempDir = tempfile.mkdtemp(prefix="KidneyTumorSeg-", dir=logic.temporaryRoot())
        try:
            inputPath = os.path.join(self.tempDir, "input.nrrd")
            writeVolume(self.volumeNode, inputPath)
            self.command = process.buildSegmentCommand(
                python, inputPath, os.path.join(self.tempDir, "labels.nii.gz"),
                os.path.join(self.tempDir, "stats.json"), model=self.options.get("model"),
                device=self.options.get("device", "auto"), tta=bool(self.options.get("tta")),
                force=bool(self.options.get("force")))
            env = process.buildEnvironment(libraryRoot)
            self._startTime = time.monotonic()
            self._handle = logic.runner.start(self.command, env, self.tempDir)
        except OSError as exc:
            self._removeTempDir()
            raise SegmentationError(f"could not start {python}: {exc}")
        except Exception:
            self._removeTempDir()
            raise
        self.state = "running"
        self._report(0.0, "starting")

    def poll(self) -> bool:
        """Consume new output; on exit import the result. True once the run has finished."""
        if self.state != "running":
            return True
        exitCode = self._handle.poll()
        for line in self._handle.readLines():
            self._consume(line)
            if self.state != "running":  # a callback cancelled the run
                return True
        if exitCode is None:
            return False
        self.elapsedSeconds = time.monotonic() - self._startTime
        if exitCode == 0:
            try:
                self._importResult()
                self.state = "succeeded"
                self._report(1.0, "done")
            except Exception as exc:  # a broken result file must not crash Slicer
                logger.exception("importing the segmentation result failed")
                self._fail(SegmentationError(f"the result could not be loaded: {exc}"))
        else:
            message = self._errorLine or process.failureMessage(self.logLines, exitCode)
            self._fail(SegmentationError(message, outOfMemory=process.isOutOfMemoryMessage(message),
                                         kind=self._errorKind))
        self._finish()
        return True

    def cancel(self) -> None:
        """Kill the process tree, delete the temporary files, create nothing."""
        if self.state != "running":
            return
        self._handle.kill()
        self.elapsedSeconds = time.monotonic() - self._startTime
        self.state = "cancelled"
        self.error = SegmentationError("cancelled by the user", cancelled=True)
        self._finish()

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")

    # -- internals ---------------------------------------------------------------------

    def _consume(self, line: str) -> None:
        parsed = process.parseOutputLine(line)
        if isinstance(parsed, process.ProgressLine):
            self._report(parsed.fraction, parsed.message)
            return
        if isinstance(parsed, process.ErrorLine):
            self._errorLine = parsed.message
            if parsed.kind:  # the structured twin of the "error:" line that follows
                self._errorKind = parsed.kind
                return
        self.logLines.append(line)
        del self.logLines[:-500]
        if self.onLog:
            self.onLog(line)

    def _report(self, fraction: float, message: str) -> None:
        self.progress, self.message = fraction, message
        if self.onProgress:
            self.onProgress(fraction, message)

    def _fail(self, error: SegmentationError) -> None:
        self.state = "failed"
        self.error = error

    def _finish(self) -> None:
        self._removeTempDir()
        self.logic._runFinished(self)
        if self.onFinished:
            self.onFinished(self)

    def _removeTempDir(self) -> None:
        if self.tempDir:
            shutil.rmtree(self.tempDir, ignore_errors=True)

    def _importResult(self) -> None:
        import SimpleITK as sitk

        labelImage = sitk.ReadImage(os.path.join(self.tempDir, "labels.nii.gz"))
        segments.checkSameGrid(labelImage, self.volumeNode)
        labels = sitk.GetArrayFromImage(labelImage).astype("uint8", copy=False)
        statsPath = os.path.join(self.tempDir, "stats.json")
        if os.path.isfile(statsPath):
            with open(statsPath, encoding="utf-8") as f:
                self.stats = json.load(f)
        hasCyst = self.logic.modelHasCyst(self.options.get("model")) or bool((labels == terminology.CYST_LABEL).any())
        plan = terminology.segmentPlan(hasCyst, bool(self.options.get("cystSegment", True)))

        createdNode = None
        node = self.segmentationNode
        if node is None:
            name = slicer.mrmlScene.GenerateUniqueName(f"{self.volumeNode.GetName()} kidney segmentation")
            node = createdNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            node.CreateDefaultDisplayNodes()
        try:
            segments.importLabels(labels, self.volumeNode, node, plan)
        except Exception:
            if createdNode is not None:
                slicer.mrmlScene.RemoveNode(createdNode)
            raise
        segments.placeNextToVolume(node, self.volumeNode)
        node.SetAttribute("KidneyTumorSeg.Stats", json.dumps(self.stats))
        if self.options.get("createSurfaces", True):
            node.CreateClosedSurfaceRepresentation()
        self.segmentationNode = node


class JsonQuery:
    """A short library command (``devices --json``) running in the background.

    :meth:`poll` returns True once it has ended; then ``result`` holds the parsed JSON or
    ``error`` a :class:`SegmentationError`, and ``onDone(query)`` has been called.
    """

    def __init__(self, handle, what: str, onDone: Optional[Callable[["JsonQuery"], None]] = None):
        self._handle = handle
        self.what = what
        self.onDone = onDone
        self.lines: List[str] = []
        self.result = None
        self.error: Optional[SegmentationError] = None
        self.finished = False

    def poll(self) -> bool:
        if self.finished:
            return True
        code = self._handle.poll()
        self.lines += self._handle.readLines()
        if code is None:
            return False
        if code != 0:
            self.error = SegmentationError(f"listing {self.what} failed: {process.failureMessage(self.lines, code)}")
        else:
            try:
                self.result = process.parseJsonOutput(self.lines)
            except ValueError:
                self.error = SegmentationError(f"listing {self.what} failed: the library printed no JSON")
        self.finished = True
        if self.onDone:
            self.onDone(self)
        return True

    def cancel(self) -> None:
        if not self.finished:
            self._handle.kill()
            self.finished = True


def writeVolume(volumeNode, path: str) -> None:
    """Write ``volumeNode`` to ``path`` with a stand-alone storage node, so the volume's own
    storage node (where the user saves it) is not changed."""
    storageNode = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storageNode.SetFileName(path)
    storageNode.UseCompressionOff()
    if not storageNode.WriteData(volumeNode):
        raise SegmentationError(f"could not write the input volume to the temporary file {path}")


class KidneyTumorSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation logic: background process, results as segments, dependencies.

    ``runner``: a ``process.ProcessRunner`` (tests pass a fake); ``python``: the interpreter that
    runs the library (default: ``PythonSlicer``); ``libraryRoot``: folder that holds
    ``KidneyTumorSegLib`` (default: next to the module, or one level up in a source checkout).
    """

    def __init__(self, runner=None, python: Optional[str] = None, libraryRoot: Optional[str] = None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = runner or process.SubprocessRunner()
        self._python = python
        self._libraryRoot = libraryRoot
        self._models: Optional[List[dict]] = None
        self._devices: Optional[List[dict]] = None
        self.activeRun: Optional[SegmentationRun] = None
        self.lastRun: Optional[SegmentationRun] = None
        self.findSpec = importlib.util.find_spec
        self._ctChecks: dict = {}

    # -- parameters --------------------------------------------------------------------

    def setDefaultParameters(self, parameterNode) -> None:
        """Fill unset parameters: device auto, no TTA, cysts as their own segment."""
        defaults = {"Model": "", "Device": "auto", "TestTimeAugmentation": "false", "CystSegment": "true"}
        for name, value in defaults.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    # -- environment -------------------------------------------------------------------

    def pythonExecutable(self) -> str:
        if self._python:
            return self._python
        if not hasattr(slicer, "app"):  # plain Python with slicer-core: the library runs in this interpreter
            return sys.executable
        python = process.findPythonSlicer(slicer.app.slicerHome)
        if not python:
            raise SegmentationError("PythonSlicer, Slicer's Python interpreter, was not found in Slicer's bin folder")
        return python

    def libraryRoot(self) -> str:
        root = self._libraryRoot or process.findLibraryRoot(MODULE_DIR)
        if not root:
            raise SegmentationError(f"KidneyTumorSegLib was not found next to the module in {MODULE_DIR}; "
                                    "reinstall the KidneyTumorSeg extension")
        return root

    @staticmethod
    def temporaryRoot() -> str:
        return slicer.app.temporaryPath if hasattr(slicer, "app") else tempfile.gettempdir()

    # -- dependencies ------------------------------------------------------------------

    def torchInstalled(self) -> bool:
        """True when Slicer's Python (which PythonSlicer shares) can import torch."""
        return self.findSpec("torch") is not None

    def installTorch(self) -> None:
        """Install torch; call only after the user agreed (the widget asks).

        Uses the PyTorch Utils extension when it is installed (it picks the CUDA build that
        matches the driver); otherwise pip, with Slicer's own numpy and SimpleITK pinned by a
        constraints file so they cannot be replaced.
        """
        if self.findSpec("PyTorchUtils") is not None:
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
            if torch is None:
                raise SegmentationError("PyTorch Utils did not install torch")
        else:
            constraintsPath = self.writeConstraintsFile()
            try:
                slicer.util.pip_install([TORCH_REQUIREMENT, "--constraint", constraintsPath])
            finally:
                os.remove(constraintsPath)
        importlib.invalidate_caches()
        if not self.torchInstalled():
            raise SegmentationError("torch is still not importable after the installation")

    def writeConstraintsFile(self) -> str:
        """Temporary pip constraints file pinning :data:`PROTECTED_PACKAGES` to their installed versions."""
        from importlib import metadata

        pins = []
        for name in PROTECTED_PACKAGES:
            for candidate in (name, name.lower()):  # Python 3.9 does not normalize distribution names
                try:
                    pins.append(f"{name}=={metadata.version(candidate)}")
                    break
                except metadata.PackageNotFoundError:
                    continue
        fd, path = tempfile.mkstemp(prefix="KidneyTumorSeg-constraints-", suffix=".txt", dir=self.temporaryRoot())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(pins) + "\n")
        return path

    # -- models and devices ------------------------------------------------------------

    def _runJson(self, args: List[str], what: str, timeoutSeconds: float):
        root = self.libraryRoot()
        env = process.buildEnvironment(root)
        try:
            # cwd is on sys.path first under "python -m": run where only our library can be found.
            code, lines = process.runToCompletion(self.runner, args, env, cwd=root, timeoutSeconds=timeoutSeconds)
        except (TimeoutError, OSError) as exc:
            raise SegmentationError(f"listing {what} failed: {exc}")
        if code != 0:
            raise SegmentationError(f"listing {what} failed: {process.failureMessage(lines, code)}")
        try:
            return process.parseJsonOutput(lines)
        except ValueError:
            raise SegmentationError(f"listing {what} failed: the library printed no JSON list")

    def listModels(self, refresh: bool = False, timeoutSeconds: float = 60.0) -> List[dict]:
        """Model packages (bundled and installed) as the library's ``models list --json`` reports them."""
        if self._models is None or refresh:
            self._models = list(self._runJson(process.buildListModelsCommand(self.pythonExecutable()),
                                              "models", timeoutSeconds))
        return self._models

    def listDevices(self, refresh: bool = False, timeoutSeconds: float = 120.0) -> List[dict]:
        """Compute devices (``devices --json``): kind cpu/cuda/mps, name, memory_bytes."""
        if self._devices is None or refresh:
            self._devices = list(self._runJson(process.buildListDevicesCommand(self.pythonExecutable()),
                                               "devices", timeoutSeconds))
        return self._devices

    def startDeviceQuery(self, onDone: Optional[Callable[["JsonQuery"], None]] = None) -> "JsonQuery":
        """Start ``devices --json`` in the background (it imports torch, which takes seconds);
        poll the returned query. Its result is also cached for :meth:`listDevices`."""
        def done(query: "JsonQuery") -> None:
            if query.error is None:
                self._devices = list(query.result)
            if onDone:
                onDone(query)

        args = process.buildListDevicesCommand(self.pythonExecutable())
        root = self.libraryRoot()
        try:
            handle = self.runner.start(args, process.buildEnvironment(root), root)
        except OSError as exc:
            raise SegmentationError(f"listing devices failed: {exc}")
        return JsonQuery(handle, "devices", done)

    def modelInfo(self, model: Optional[str]) -> Optional[dict]:
        """The listed model called ``model`` (or whose path it is; None = the default model)."""
        try:
            models = self.listModels()
        except SegmentationError as exc:
            logger.warning("%s", exc)
            self._models = []  # do not block every later run on a library that cannot list
            return None
        for info in models:
            if (model is None and info.get("default")) or (model is not None and model in (info.get("name"), info.get("path"))):
                return info
        return None

    def modelHasCyst(self, model: Optional[str]) -> bool:
        info = self.modelInfo(model)
        return bool(info and info.get("has_cyst"))

    # -- input checks ------------------------------------------------------------------

    @staticmethod
    def inputProblem(volumeNode) -> str:
        """Why ``volumeNode`` cannot be segmented, or "" when it can (structure only; see
        :meth:`intensityProblem` for the CT check the user may overrule)."""
        if volumeNode is None:
            return "Select an input CT volume."
        # Vector (RGB) volumes are vtkMRMLScalarVolumeNode subclasses too.
        if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode") \
                or volumeNode.IsA("vtkMRMLVectorVolumeNode"):
            return f"'{volumeNode.GetName()}' is not a scalar (grey-level) volume."
        imageData = volumeNode.GetImageData()
        if imageData is None:
            return f"'{volumeNode.GetName()}' has no image data."
        if imageData.GetNumberOfScalarComponents() != 1:
            return (f"'{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} components per voxel; "
                    "a CT has one.")
        return ""

    def libraryModule(self, name: str):
        """``KidneyTumorSegLib.<name>`` imported in this process (validation, measurements and
        labels need only numpy and SimpleITK, never torch). In a source checkout the library
        folder is put on ``sys.path`` (after everything else) first."""
        moduleName = f"{process.LIBRARY_PACKAGE}.{name}"
        try:
            return importlib.import_module(moduleName)
        except ImportError:
            root = self.libraryRoot()
            if root not in sys.path:
                sys.path.append(root)
            importlib.invalidate_caches()
            return importlib.import_module(moduleName)

    def checkedDevice(self, device: Optional[str]) -> str:
        """``device`` as the library's ``device.parse_device`` names it (auto, cpu, cuda, cuda:N, mps):
        the library's rule, not a copy; a name it refuses raises SegmentationError with its message."""
        try:
            deviceModule, errors = self.libraryModule("device"), self.libraryModule("errors")
        except ImportError as exc:
            raise SegmentationError(f"KidneyTumorSegLib could not be imported to check the device: {exc}")
        try:
            return deviceModule.parse_device(device)
        except errors.DeviceError as exc:
            raise SegmentationError(str(exc))

    def ctCheck(self, volumeNode) -> Tuple[str, str]:
        """The library's own rule for "is this a CT" (``validation.validate_ct_image``, what the
        CLI runs before segmenting), applied to the volume's voxels: ``(refusal, notCT)``.

        ``refusal``: why the library would refuse the volume outright (2D, constant, NaN,
        several components, ...), or "". ``notCT``: why its intensities do not look like CT
        in HU (the library segments it only with ``--force``), or "". Cached per volume and
        voxel modification time, so the panel may ask on every change."""
        problem = self.inputProblem(volumeNode)
        if problem:
            return problem, ""
        key = (volumeNode.GetID(), volumeNode.GetImageData().GetMTime())
        cached = self._ctChecks.get(key)
        if cached is not None:
            return cached
        import SimpleITK as sitk

        try:
            validation = self.libraryModule("validation")
            errors = self.libraryModule("errors")
        except ImportError as exc:
            raise SegmentationError(f"KidneyTumorSegLib could not be imported to check the input: {exc}")
        image = sitk.GetImageFromArray(slicer.util.arrayFromVolume(volumeNode))
        try:
            validation.validate_ct_image(image, force=False)
            result = ("", "")
        except getattr(errors, "NotCTLikeError", ()) as exc:
            result = ("", str(exc))
        except errors.InputError as exc:
            result = (f"'{volumeNode.GetName()}': {exc}", "")
        self._ctChecks = {k: v for k, v in self._ctChecks.items() if k[0] != key[0]}
        self._ctChecks[key] = result
        return result

    @staticmethod
    def segmentsToReplace(segmentationNode) -> List[str]:
        """Names of existing segments that a run into ``segmentationNode`` replaces."""
        return segments.existingResultSegments(segmentationNode)

    # -- running -----------------------------------------------------------------------

    def startSegmentation(self, volumeNode, segmentationNode=None, model: Optional[str] = None,
                          device: str = "auto", tta: bool = False, cystSegment: bool = True,
                          force: bool = False, createSurfaces: bool = True,
                          onProgress=None, onLog=None, onFinished=None) -> SegmentationRun:
        """Start a background segmentation and return its :class:`SegmentationRun` (poll it).

        ``model``: name or package folder (None = default); ``device``: auto|cpu|cuda|cuda:N|mps
        (checked by :meth:`checkedDevice`);
        ``tta``: test-time augmentation; ``cystSegment``: cysts as their own segment when the
        model predicts them; ``force``: segment even if intensities do not look like CT.
        """
        device = self.checkedDevice(device)
        refusal, notCT = self.ctCheck(volumeNode)
        if refusal:
            raise SegmentationError(refusal)
        if notCT and not force:
            raise SegmentationError(notCT, kind=process.NOT_CT_KIND)
        if self.activeRun is not None and not self.activeRun.finished:
            raise SegmentationError("a segmentation is already running; cancel it first")
        options = dict(model=model or None, device=device, tta=tta, cystSegment=cystSegment, force=force,
                       createSurfaces=createSurfaces)
        run = SegmentationRun(self, volumeNode, segmentationNode, options, onProgress, onLog, onFinished)
        run.start()
        self.activeRun = run
        return run

    def segment(self, volumeNode, segmentationNode=None, model: Optional[str] = None, device: str = "auto",
                tta: bool = False, cystSegment: bool = True, force: bool = False, createSurfaces: bool = True,
                progressCallback=None, logCallback=None, timeoutSeconds: Optional[float] = None):
        """Segment ``volumeNode`` and return the segmentation node (blocking; for scripts and batch).

        A new segmentation node named after the volume is created unless ``segmentationNode``
        is given (its Kidney/Tumor/Cyst segments are then replaced, others kept). Raises
        :class:`SegmentationError` when the run fails, is cancelled (:meth:`cancel`, e.g. from
        ``progressCallback``) or exceeds ``timeoutSeconds``.
        """
        run = self.startSegmentation(volumeNode, segmentationNode, model, device, tta, cystSegment, force,
                                     createSurfaces, onProgress=progressCallback, onLog=logCallback)
        deadline = None if timeoutSeconds is None else time.monotonic() + timeoutSeconds
        while not run.poll():
            if deadline is not None and time.monotonic() > deadline:
                run.cancel()
                raise SegmentationError(f"the segmentation took longer than {timeoutSeconds:.0f} s and was stopped")
            if hasattr(slicer, "app"):
                slicer.app.processEvents()
            time.sleep(0.05)
        if run.state != "succeeded":
            raise run.error
        return run.segmentationNode

    def cancel(self) -> None:
        """Stop the running segmentation (if any): process tree killed, temporary files removed."""
        if self.activeRun is not None:
            self.activeRun.cancel()

    def _runFinished(self, run: SegmentationRun) -> None:
        if self.activeRun is run:
            self.activeRun = None
        self.lastRun = run

    # -- measurements after editing ----------------------------------------------------

    def measureSegmentation(self, segmentationNode, volumeNode) -> dict:
        """Measure the segments as they are now (after corrections in the Segment Editor) with
        the library's own code (``measurements.measure``): the Kidney, Tumor and Cyst segments
        become a label map (1, 2, 3; a lesion wins over kidney) on ``volumeNode``'s grid, in
        its physical (LPS) geometry. Returns the stats document the CLI writes (kidneys by
        side, tumors, cysts). Missing segments count as empty."""
        if segmentationNode is None or volumeNode is None:
            raise SegmentationError("measuring needs a segmentation and its CT volume")
        measurements = self.libraryModule("measurements")
        labels = segments.labelsFromSegments(segmentationNode, volumeNode)
        stats = measurements.measure(segments.labelImageLPS(labels, volumeNode))
        stats["source"] = "segments"  # measured from the (edited) segments, not the automatic result
        return stats

    @staticmethod
    def updateResultsTable(stats: dict, tableNode=None, name: str = "KidneyTumorSeg results"):
        """Put the results table (the panel's rows) into a ``vtkMRMLTableNode`` (created when
        None), which Slicer saves with the scene; returns it."""
        import vtk

        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(name))
        rows = results.tableRows(stats)
        table = vtk.vtkTable()
        for columnIndex, title in enumerate(results.TABLE_COLUMNS):
            column = vtk.vtkStringArray()
            column.SetName(title)
            for row in rows:
                column.InsertNextValue(row[columnIndex])
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        tableNode.SetAttribute("KidneyTumorSeg.Stats", json.dumps(stats))
        return tableNode

    @staticmethod
    def writeResultsCsv(path: str, caseName: str, stats: dict) -> None:
        """The measurements as one CSV row, in the columns of batch mode's ``measurements.csv``."""
        results.writeCsv(path, [results.csvRow(caseName, "ok", stats=stats)])
