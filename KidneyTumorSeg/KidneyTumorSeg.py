"""KidneyTumorSeg: "Segment kidney & tumor" in 3D Slicer.

Module, widget and self-test. The work is done by ``KidneyTumorSegLogic`` (in
``KidneyTumorSegHelpers/logic.py``), which runs the KidneyTumorSegLib command line in a
background process and turns its label map into Kidney / Tumor (/ Cyst) segments.
"""

import json
import logging

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from KidneyTumorSegHelpers import results as resultsHelpers
from KidneyTumorSegHelpers.logic import KidneyTumorSegLogic, SegmentationError  # noqa: F401 (public API)


class KidneyTumorSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Kidney Tumor Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["KidneyTumorSeg contributors"]
        self.parent.helpText = """
Segments the kidneys, kidney tumors and (with models that predict them) renal cysts in a
contrast-enhanced abdominal CT, with the coarse-to-fine networks of KidneyTumorSegLib.
Select the CT, click <b>Segment kidney &amp; tumor</b>, then check and correct the result with
<b>Edit in Segment Editor</b>. The segmentation runs in a background process; Slicer stays
usable and <b>Cancel</b> stops it. Results are for research use: a model trained on phantoms
is not fit for patient images.
"""
        self.parent.acknowledgementText = """
Methods from the KiTS19 challenge papers. KiTS19 data: Heller et al., arXiv:1904.00445
(CC BY-NC-SA 4.0).
"""


class KidneyTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Its state lives in the module's parameter node (saved with the scene)."""

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._run = None
        self._deviceQuery = None
        self._modelsLoaded = False
        self._models = {}
        self._timer = None

    # -- setup -------------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KidneyTumorSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = KidneyTumorSegLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.ttaCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.cystCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3DToggled)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.updateMeasurementsButton.connect("clicked(bool)", self.onUpdateMeasurementsButton)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsvButton)

        self.ui.resultsTable.setColumnCount(len(resultsHelpers.TABLE_COLUMNS))
        self.ui.resultsTable.setHorizontalHeaderLabels(list(resultsHelpers.TABLE_COLUMNS))
        self._setRunning(False)
        self.initializeParameterNode()

    def cleanup(self):
        # Never leave a segmentation process running when the module goes away.
        if self._run is not None and not self._run.finished:
            self._run.cancel()
        if self._deviceQuery is not None:
            self._deviceQuery.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()
        if not self._modelsLoaded:
            self.loadModelsAndDevices()

    def exit(self):
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onReload(self):
        # Slicer reloads only this file; reload the helpers first so edits to them take effect.
        import importlib
        import KidneyTumorSegHelpers.logic
        import KidneyTumorSegHelpers.process
        import KidneyTumorSegHelpers.results
        import KidneyTumorSegHelpers.segments
        import KidneyTumorSegHelpers.terminology

        for module in (KidneyTumorSegHelpers.process, KidneyTumorSegHelpers.terminology,
                       KidneyTumorSegHelpers.results, KidneyTumorSegHelpers.segments, KidneyTumorSegHelpers.logic):
            importlib.reload(module)
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        if self._run is not None and not self._run.finished:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node ----------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            volume = self._defaultInputVolume()
            if volume:
                self._parameterNode.SetNodeReferenceID("InputVolume", volume.GetID())

    @staticmethod
    def _defaultInputVolume():
        """The volume shown as background in the slice views, else the first grey-level volume
        (never a label map or an RGB/vector volume: both are vtkMRMLScalarVolumeNode subclasses)."""
        applicationLogic = slicer.app.applicationLogic()
        selectionNode = applicationLogic.GetSelectionNode() if applicationLogic else None
        activeId = selectionNode.GetActiveVolumeID() if selectionNode else None
        # GetNodeByID(None) raises TypeError in real MRML: a fresh scene has no active volume.
        volume = slicer.mrmlScene.GetNodeByID(activeId) if activeId else None
        if volume is not None and not KidneyTumorSegLogic.inputProblem(volume):
            return volume
        for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if not KidneyTumorSegLogic.inputProblem(volume):
                return volume
        return None

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            node = self._parameterNode
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(node.GetNodeReference("OutputSegmentation"))
            self._selectData(self.ui.modelComboBox, node.GetParameter("Model"))
            self._selectData(self.ui.deviceComboBox, node.GetParameter("Device"))
            self.ui.ttaCheckBox.checked = node.GetParameter("TestTimeAugmentation") == "true"
            self.ui.cystCheckBox.checked = node.GetParameter("CystSegment") == "true"
            self._updateModelDescription()
            self._updateApplyButton()
            self._showResults()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        wasModified = node.StartModify()
        node.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
        node.SetNodeReferenceID("OutputSegmentation", self.ui.outputSegmentationSelector.currentNodeID)
        if self.ui.modelComboBox.count:
            node.SetParameter("Model", self.ui.modelComboBox.currentData or "")
        if self.ui.deviceComboBox.count:
            node.SetParameter("Device", self.ui.deviceComboBox.currentData or "auto")
        node.SetParameter("TestTimeAugmentation", "true" if self.ui.ttaCheckBox.checked else "false")
        node.SetParameter("CystSegment", "true" if self.ui.cystCheckBox.checked else "false")
        node.EndModify(wasModified)

    @staticmethod
    def _selectData(comboBox, value):
        index = comboBox.findData(value)
        if index >= 0:
            comboBox.setCurrentIndex(index)

    def onInputVolumeChanged(self, node=None):
        # A segmentation made for another volume should not be overwritten by accident:
        # a new input goes to a new segmentation unless the user picks one again.
        output = self.ui.outputSegmentationSelector.currentNode()
        volume = self.ui.inputVolumeSelector.currentNode()
        if output is not None and volume is not None and not self._updatingGUIFromParameterNode:
            reference = output.GetNodeReference(output.GetReferenceImageGeometryReferenceRole())
            if reference is not None and reference is not volume:
                self.ui.outputSegmentationSelector.setCurrentNode(None)
        self.updateParameterNodeFromGUI()

    def onModelChanged(self, index=None):
        self.updateParameterNodeFromGUI()
        self._updateModelDescription()

    # -- models and devices ------------------------------------------------------------

    def loadModelsAndDevices(self):
        """List models now (fast: no torch import) and devices in the background."""
        self._modelsLoaded = True
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self._models = {}
        try:
            models = self.logic.listModels()
        except SegmentationError as exc:
            models = []
            self.setStatus(f"Could not list the models: {exc}", error=True)
        for info in models:
            label = f"{info.get('name')} {info.get('version', '')}".strip()
            if info.get("default"):
                label += " (default)"
            combo.addItem(label, info.get("name"))
            self._models[info.get("name")] = info
        if not models:
            combo.addItem("Default model", "")
        combo.blockSignals(wasBlocked)
        self._selectData(combo, self._parameterNode.GetParameter("Model") if self._parameterNode else "")
        if self._parameterNode is not None and not self._parameterNode.GetParameter("Model"):
            defaults = [name for name, info in self._models.items() if info.get("default")]
            if defaults:
                self._selectData(combo, defaults[0])
        self._populateDevices([])
        try:
            self._deviceQuery = self.logic.startDeviceQuery(self.onDevicesListed)
            self.ui.deviceInfoLabel.text = "Looking for GPUs..."
            self._timer.start()
        except SegmentationError as exc:
            self.ui.deviceInfoLabel.text = str(exc)
        self.updateParameterNodeFromGUI()
        self._updateModelDescription()

    def onDevicesListed(self, query):
        self._deviceQuery = None
        if query.error is not None:
            self.ui.deviceInfoLabel.text = ("GPU detection failed, so the CPU will be used "
                                            f"({query.error}).")
            return
        self._populateDevices(query.result)

    def _populateDevices(self, devices):
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem("Automatic (GPU when available)", "auto")
        combo.addItem("CPU", "cpu")
        gpus = [d for d in devices if d.get("kind") in ("cuda", "mps")]
        for kind in ("cuda", "mps"):
            ofKind = [d for d in gpus if d.get("kind") == kind]
            if len(ofKind) == 1:  # by kind, so a scene saved with "cuda" still selects it
                combo.addItem(f"GPU: {_deviceText(ofKind[0])}", kind)
            else:  # several: each by the name the library's listing gives it (cuda:0, cuda:1, ...)
                for device in ofKind:
                    combo.addItem(f"GPU: {_deviceText(device)}", device.get("device") or kind)
        combo.blockSignals(wasBlocked)
        self._selectData(combo, self._parameterNode.GetParameter("Device") if self._parameterNode else "auto")
        if gpus:
            self.ui.deviceInfoLabel.text = "GPU found: " + "; ".join(_deviceText(d) for d in gpus)
        elif devices:
            self.ui.deviceInfoLabel.text = "No GPU found: the segmentation runs on the CPU (several minutes)."

    def _updateModelDescription(self):
        name = self.ui.modelComboBox.currentData if self.ui.modelComboBox.count else ""
        info = self._models.get(name)
        if info is None:
            self.ui.modelDescriptionLabel.text = "The library's default model." if not name else ""
            self.ui.cystCheckBox.enabled = True
            return
        text = f"{info.get('description', '')}<br><i>Intended use:</i> {info.get('intended_use', '')}"
        phantom = _trainedOnPhantoms(info)
        if phantom:
            text += ("<br><b style='color:#b35900'>Trained on synthetic phantoms only: it demonstrates the "
                     "pipeline and is not fit for patient images.</b>")
        elif phantom is None:
            text += "<br><i>The model's manifest does not say what data it was trained on.</i>"
        self.ui.modelDescriptionLabel.text = text
        hasCyst = bool(info.get("has_cyst"))
        self.ui.cystCheckBox.enabled = hasCyst
        self.ui.cystCheckBox.toolTip = ("Put cysts in their own Cyst segment (otherwise they stay part of Kidney)."
                                        if hasCyst else "This model does not predict cysts.")

    # -- running -----------------------------------------------------------------------

    def _inputCheck(self, volume):
        """(refusal, notCT) by the library's own rule (see ``KidneyTumorSegLogic.ctCheck``)."""
        try:
            return self.logic.ctCheck(volume)
        except SegmentationError as exc:  # the library is missing or cannot be imported
            return str(exc), ""

    def _updateApplyButton(self):
        volume = self._parameterNode.GetNodeReference("InputVolume") if self._parameterNode else None
        problem, notCT = self._inputCheck(volume) if volume is not None else (KidneyTumorSegLogic.inputProblem(None), "")
        running = self._run is not None and not self._run.finished
        self.ui.applyButton.enabled = not problem and not running
        if running:
            self.ui.applyButton.toolTip = "A segmentation is running; wait for it or cancel it."
        elif problem:
            self.ui.applyButton.toolTip = problem
        elif notCT:
            self.ui.applyButton.toolTip = f"{notCT}. You will be asked whether to segment it anyway."
        else:
            self.ui.applyButton.toolTip = "Segment the kidneys, tumors (and cysts) in the selected CT."

    def _setRunning(self, running):
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.modelComboBox,
                       self.ui.deviceComboBox, self.ui.ttaCheckBox):
            widget.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.visible = running
        self._updateApplyButton()

    def setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = "color: #c00000;" if error else ""

    def ensureTorch(self):
        """True when torch is importable, after offering to install it (never without asking)."""
        if self.logic.torchInstalled():
            return True
        via = ("the PyTorch Utils extension" if self.logic.findSpec("PyTorchUtils") is not None
               else "pip (Slicer's own numpy and SimpleITK are kept)")
        if not slicer.util.confirmOkCancelDisplay(
                "Kidney tumor segmentation needs PyTorch, which is not installed in Slicer's Python.\n\n"
                f"Install it now with {via}? This downloads up to a few GB and may take several minutes.",
                "Install PyTorch?"):
            self.setStatus("PyTorch is required: nothing was installed and nothing was segmented.", error=True)
            return False
        try:
            with slicer.util.tryWithErrorDisplay("PyTorch could not be installed.", waitCursor=True):
                self.logic.installTorch()
        except Exception as exc:
            self.setStatus(f"PyTorch could not be installed: {exc}", error=True)
            return False
        return True

    def onApplyButton(self, checked=False):
        node = self._parameterNode
        volume = node.GetNodeReference("InputVolume")
        segmentation = node.GetNodeReference("OutputSegmentation")
        if volume is None:
            return
        refusal, notCT = self._inputCheck(volume)
        if refusal:
            self.setStatus(f"Not segmented: {refusal}", error=True)
            return
        if not self.ensureTorch():
            return
        force = False
        if notCT:
            if not self._confirmNotCT(volume, notCT):
                return
            force = True
        replaced = self.logic.segmentsToReplace(segmentation)
        if replaced and not slicer.util.confirmOkCancelDisplay(
                f"'{segmentation.GetName()}' already has the segments {', '.join(replaced)}. "
                "Replace them with the new result? Its other segments are kept.", "Replace segments?"):
            self.setStatus("Not segmented: the existing segments were kept.")
            return
        self.startRun(volume, segmentation, device=node.GetParameter("Device") or "auto", force=force)

    def _confirmNotCT(self, volume, reason):
        """Ask "Segment anyway?" when the library says the intensities do not look like CT."""
        if slicer.util.confirmYesNoDisplay(
                f"'{volume.GetName()}' does not look like a CT in Hounsfield units:\n{reason}\n\n"
                "The models were trained on contrast-enhanced CT. Segment anyway?", "Not a CT?"):
            return True
        self.setStatus("Not segmented: the volume does not look like a CT.", error=True)
        return False

    def startRun(self, volume, segmentation, device, force=False):
        node = self._parameterNode
        self.ui.logTextEdit.setPlainText("")
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "%p%"
        self.setStatus(f"Segmenting '{volume.GetName()}' on {device}...")
        try:
            self._run = self.logic.startSegmentation(
                volume, segmentation, model=node.GetParameter("Model") or None, device=device,
                tta=node.GetParameter("TestTimeAugmentation") == "true",
                cystSegment=node.GetParameter("CystSegment") == "true", force=force,
                onProgress=self.onRunProgress, onLog=self.onRunLog, onFinished=self.onRunFinished)
        except SegmentationError as exc:
            self.setStatus(f"Could not start the segmentation: {exc}", error=True)
            return
        self._setRunning(True)
        self._timer.start()

    def onTimer(self):
        if self._run is not None and not self._run.finished:
            self._run.poll()
        if self._deviceQuery is not None:
            self._deviceQuery.poll()
        if (self._run is None or self._run.finished) and self._deviceQuery is None:
            self._timer.stop()

    def onCancelButton(self, checked=False):
        if self._run is not None and not self._run.finished:
            self._run.cancel()

    def onRunProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"%p%  {message}" if message else "%p%"

    def onRunLog(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def onRunFinished(self, run):
        self._setRunning(False)
        node = self._parameterNode
        if run.state == "succeeded":
            wasModified = node.StartModify()
            node.SetNodeReferenceID("OutputSegmentation", run.segmentationNode.GetID())
            node.SetNodeReferenceID("ResultSegmentation", run.segmentationNode.GetID())
            node.SetNodeReferenceID("ResultVolume", run.volumeNode.GetID())
            node.SetParameter("Results", json.dumps(run.stats))
            self._updateResultsTableNode(run.stats, run.segmentationNode)
            node.EndModify(wasModified)
            notes = resultsHelpers.notesText(run.stats)
            self.setStatus(f"Done in {run.elapsedSeconds:.0f} s: {resultsHelpers.summaryText(run.stats)}. "
                           f"Check the result and correct it in the Segment Editor.{notes}", error=bool(notes))
            if notes:
                self.ui.logTextEdit.appendPlainText(notes.strip())
            self.ui.show3DButton.checked = True
            self.onShow3DToggled(True)
        elif run.state == "cancelled":
            self.setStatus("Cancelled: nothing was added and the temporary files were removed.")
        else:
            self.setStatus(f"Segmentation failed: {run.error}", error=True)
            device = run.options.get("device")
            if run.error.notCT and not run.options.get("force"):
                # The library refused the intensities (its structured error): same question, then --force.
                if self._confirmNotCT(run.volumeNode, str(run.error)):
                    self.startRun(run.volumeNode, run.segmentationNode, device=device or "auto", force=True)
                return
            if run.error.outOfMemory and device != "cpu" and slicer.util.confirmYesNoDisplay(
                    "The segmentation ran out of GPU memory. Retry on the CPU? It is slower but has more memory.",
                    "Out of memory"):
                self.startRun(run.volumeNode, run.segmentationNode, device="cpu", force=run.options.get("force"))

    # -- results -----------------------------------------------------------------------

    def _showResults(self):
        node = self._parameterNode
        segmentation = node.GetNodeReference("ResultSegmentation") if node else None
        text = node.GetParameter("Results") if node else ""
        try:
            stats = json.loads(text) if text else None
        except ValueError:
            stats = None
        table = self.ui.resultsTable
        rows = resultsHelpers.tableRows(stats) if stats is not None and segmentation is not None else []
        table.setRowCount(len(rows))
        for rowIndex, row in enumerate(rows):
            for columnIndex, value in enumerate(row):
                table.setItem(rowIndex, columnIndex, qt.QTableWidgetItem(value))
        self.ui.show3DButton.enabled = segmentation is not None
        self.ui.editButton.enabled = segmentation is not None
        self.ui.updateMeasurementsButton.enabled = segmentation is not None and \
            node.GetNodeReference("ResultVolume") is not None
        self.ui.exportCsvButton.enabled = bool(rows)
        self.ui.resultsCollapsibleButton.collapsed = not rows

    def _updateResultsTableNode(self, stats, segmentationNode):
        """The results as a table node (saved with the scene), referenced by the parameter node."""
        node = self._parameterNode
        tableNode = node.GetNodeReference("ResultTable")
        name = f"{segmentationNode.GetName()} measurements" if segmentationNode is not None else "KidneyTumorSeg results"
        tableNode = self.logic.updateResultsTable(stats, tableNode, name)
        node.SetNodeReferenceID("ResultTable", tableNode.GetID())
        return tableNode

    def onUpdateMeasurementsButton(self, checked=False):
        """Recompute the results from the segments as they are now (after Segment Editor corrections)."""
        node = self._parameterNode
        segmentation = node.GetNodeReference("ResultSegmentation")
        volume = node.GetNodeReference("ResultVolume")
        try:
            stats = self.logic.measureSegmentation(segmentation, volume)
        except Exception as exc:
            logging.exception("KidneyTumorSeg: measuring the segments failed")
            self.setStatus(f"Could not measure the segments: {exc}", error=True)
            return
        wasModified = node.StartModify()
        node.SetParameter("Results", json.dumps(stats))
        self._updateResultsTableNode(stats, segmentation)
        node.EndModify(wasModified)
        segmentation.SetAttribute("KidneyTumorSeg.Stats", json.dumps(stats))
        self.setStatus(f"Measured the current segments: {resultsHelpers.summaryText(stats)}.")

    def onExportCsvButton(self, checked=False):
        node = self._parameterNode
        text = node.GetParameter("Results") if node else ""
        if not text:
            return
        volume = node.GetNodeReference("ResultVolume")
        caseName = volume.GetName() if volume is not None else "case"
        path = qt.QFileDialog.getSaveFileName(None, "Export measurements", f"{caseName}_measurements.csv",
                                              "CSV files (*.csv)")
        if not path:
            return
        try:
            self.logic.writeResultsCsv(path, caseName, json.loads(text))
        except (OSError, ValueError) as exc:
            self.setStatus(f"Could not write {path}: {exc}", error=True)
            return
        self.setStatus(f"Measurements written to {path}.")

    def onShow3DToggled(self, checked):
        segmentation = self._parameterNode.GetNodeReference("ResultSegmentation") if self._parameterNode else None
        if segmentation is None:
            return
        if checked:
            segmentation.CreateClosedSurfaceRepresentation()
        displayNode = segmentation.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility3D(bool(checked))
        layoutManager = slicer.app.layoutManager()
        if checked and layoutManager is not None:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def onEditButton(self, checked=False):
        segmentation = self._parameterNode.GetNodeReference("ResultSegmentation")
        volume = self._parameterNode.GetNodeReference("ResultVolume")
        if segmentation is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not open the Segment Editor."):
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.util.getModuleWidget("SegmentEditor").editor
            editor.setSegmentationNode(segmentation)
            if volume is not None:
                if hasattr(editor, "setSourceVolumeNode"):
                    editor.setSourceVolumeNode(volume)
                else:  # Slicer < 5.2
                    editor.setMasterVolumeNode(volume)


def _deviceText(device):
    text = device.get("name") or device.get("kind", "")
    memory = device.get("memory_bytes")
    if memory:
        text += f" ({memory / 1024 ** 3:.1f} GB)"
    return text


def _trainedOnPhantoms(info):
    """From the manifest's ``provenance.data`` (``models list --json``: ``data_provenance``):
    True when it declares synthetic phantoms, False when it declares other data, None when
    it declares nothing."""
    data = info.get("data_provenance")
    if not isinstance(data, dict) or not data:
        return None
    return bool(data.get("phantoms"))


#
# Self-test: really segments a small phantom with the bundled model.
#

class KidneyTumorSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload & Test, or ctest) and in CI on real Slicer core (slicer-core):
    segments the library's bundled sample CT (``KidneyTumorSegLib.demo.SAMPLE_CT``, a phantom
    installed with the library) with the bundled default model through the library's real
    background process, and checks the segments, their names, colours, terminology, geometry,
    the library's KiTS19 kidney Dice against the sample's truth, and the measurements of the segments.
    The result stays in ``self.segmentationNode``, ``self.volumeNode``, ``self.stats`` and ``self.kidneyDice``."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_SegmentPhantom()

    def test_SegmentPhantom(self):
        import numpy as np

        from KidneyTumorSegHelpers import terminology

        logic = KidneyTumorSegLogic()
        # The sample and the Dice are the library's own (numpy and SimpleITK only, no torch), so the
        # self-test scores exactly what ``kidney-tumor-seg demo`` scores.
        demo, metrics = logic.libraryModule("demo"), logic.libraryModule("metrics")
        for path in (demo.SAMPLE_CT, demo.SAMPLE_TRUTH):
            self.assertTrue(path.is_file(), f"the library's bundled sample {path} is missing (reinstall the extension)")
        self.delayDisplay("Loading the library's sample phantom CT")
        volume = slicer.util.loadVolume(str(demo.SAMPLE_CT))
        truthNode = slicer.util.loadLabelVolume(str(demo.SAMPLE_TRUTH))
        truth = slicer.util.arrayFromVolume(truthNode).copy()
        slicer.mrmlScene.RemoveNode(truthNode)
        ctArray = slicer.util.arrayFromVolume(volume)
        before = ctArray.copy()

        if not logic.torchInstalled():
            # Running the self-test is a developer's explicit request; it needs torch.
            self.delayDisplay("Installing PyTorch for the self-test (may take several minutes)")
            logic.installTorch()

        self.delayDisplay("Segmenting (background process)")
        progress = []
        segmentationNode = logic.segment(volume, device="cpu", progressCallback=lambda f, m: progress.append(f))
        self.assertIsNotNone(segmentationNode)
        self.volumeNode, self.segmentationNode = volume, segmentationNode
        self.assertTrue(progress and progress[-1] == 1.0)

        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertIn("Kidney", names)
        self.assertIn("Tumor", names)
        for spec in (terminology.KIDNEY_SEGMENT, terminology.TUMOR_SEGMENT):
            segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(spec.name))
            tag = vtk.reference("")
            self.assertTrue(segment.GetTag(segment.GetTerminologyEntryTagName(), tag))
            self.assertEqual(str(tag), spec.terminology)
            self.assertEqual(tuple(round(c, 4) for c in segment.GetColor()), tuple(round(c, 4) for c in spec.color))

        # Geometry: the segmentation references the input and its labelmaps are on its grid.
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(segmentationNode.GetNodeReferenceID(role), volume.GetID())
        kidneyId = segmentation.GetSegmentIdBySegmentName("Kidney")
        kidney = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, kidneyId, volume)
        self.assertEqual(kidney.shape, ctArray.shape)
        self.assertGreater(int(kidney.sum()), 0, "the bundled model found no kidney in the phantom")
        # KiTS19 "kidney" (kidney with its masses): the union of the result segments against the truth's.
        region = np.zeros(ctArray.shape, dtype=bool)
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            region |= slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volume) > 0
        self.kidneyDice = dice = metrics.dice(region, metrics.kits_masks(truth)["kidney"])
        logging.info(f"KidneyTumorSeg self-test: kidney+masses Dice on the sample = {dice:.3f}")
        self.assertGreater(dice, 0.5, f"kidney+masses Dice {dice:.3f} on the sample is too low")

        # Measurements of the segments (what "Update measurements" computes) agree with the run's.
        self.stats = logic.lastRun.stats
        measured = logic.measureSegmentation(segmentationNode, volume)
        self.assertEqual(len(measured["kidneys"]), len(self.stats["kidneys"]))
        self.assertEqual(measured["tumors"]["count"], self.stats["tumors"]["count"])
        for kidney, reported in zip(measured["kidneys"], self.stats["kidneys"]):
            self.assertAlmostEqual(kidney["volume_ml"], reported["volume_ml"], delta=0.01 * reported["volume_ml"] + 0.1)

        # The input volume is untouched.
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before))
        self.delayDisplay("KidneyTumorSeg self-test passed")
