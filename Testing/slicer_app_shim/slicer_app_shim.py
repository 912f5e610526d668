"""What no wheel provides, added to the real ``slicer`` package of ``slicer-core``.

``slicer-core`` (PyPI, Kitware) brings Slicer's real MRML scene and nodes, vtkSegmentationCore,
the Segmentations / Volumes / Colors / Terminologies / SubjectHierarchy logics and the real
``slicer.util``. It has no Qt, no ``slicer.app``, no ``slicer.modules`` registry, no
``ScriptedLoadableModule`` and no dialogs. :func:`install` adds exactly those, on top of the
real package (this folder must never contain a package named ``slicer``: the real one extends
its ``__path__`` over every ``slicer`` folder on ``sys.path`` and would import it):

* ``slicer.app``: ``processEvents`` (fires the stand-in ``qt.QTimer``\\ s), ``slicerHome`` (a
  folder whose ``bin/PythonSlicer`` runs this interpreter), ``temporaryPath``,
  ``applicationLogic()`` (a real ``vtkSlicerApplicationLogic`` on the scene),
  ``layoutManager()`` (None: no main window), ``coreIOManager()`` (loads and saves through the
  real Volumes / Segmentations logics and storage nodes, as qSlicerVolumesReader,
  qSlicerSegmentationsReader and qSlicerNodeWriter do), ``testingEnabled()``;
* ``slicer.modules``: ``segmentations``, ``volumes``, ``colors``, ``subjecthierarchy`` with
  their real logics, and the module under test;
* ``slicer.ScriptedLoadableModule`` (Base/Python/slicer/ScriptedLoadableModule.py's behaviour);
* the qMRML widgets the .ui file uses (``qMRMLWidget``, ``qMRMLNodeComboBox``) over the real scene;
* the dialogs of ``slicer.util`` (answers scripted by the tests, every dialog recorded), and
  ``loadUI`` / ``childWidgetVariables`` / ``selectModule`` / ``getModuleWidget`` / ``pip_install``;
* the Subject Hierarchy plugin logic's one job the tests need: every volume, segmentation and
  table node added to the scene gets a subject-hierarchy item (Slicer's Qt plugin logic does it).

Everything else (``slicer.mrmlScene`` and every MRML class, ``slicer.util.arrayFromVolume``,
``updateSegmentBinaryLabelmapFromArray``, ...) is Slicer's own code.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
import types
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

import vtk

import ctk
import qt

import slicer  # the real package (slicer-core)

_HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------
# State the tests script and inspect (not Slicer API)
# ------------------------------------------------------------------------------------------

class ShimState:
    def __init__(self):
        self.answers: List[bool] = []      # answers to confirm dialogs, consumed in order
        self.dialogs: List[tuple] = []     # (kind, text) of every dialog shown
        self.pipInstalls: List[object] = []
        self.moduleWidgets: Dict[str, object] = {}
        self.selectedModule: Optional[str] = None
        self.mainWindow = False

    def reset(self) -> None:
        self.__init__()


state = ShimState()


# ------------------------------------------------------------------------------------------
# slicer.app
# ------------------------------------------------------------------------------------------

class _CoreIOManager:
    """qSlicerCoreIOManager's loadNodes / saveNodes / fileWriterFileType for volumes,
    segmentations and tables, done the way Slicer's readers and writers do them."""

    def fileType(self, fileName):
        return "SegmentationFile" if str(fileName).endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None):
        fileName = str(properties["fileName"])
        name = properties.get("name") or os.path.basename(fileName).split(".")[0]
        node = None
        if fileType == "VolumeFile":
            options = 1 if properties.get("labelmap") else 0
            if properties.get("center"):
                options |= 2
            node = slicer.modules.volumes.logic().AddArchetypeVolume(fileName, name, options)
        elif fileType == "SegmentationFile":
            node = slicer.modules.segmentations.logic().LoadSegmentationFromFile(fileName, True, name)
        if node is None:
            if userMessages is not None:
                userMessages.AddMessage(vtk.vtkCommand.ErrorEvent, f"could not read {fileName}")
            return False
        if loadedNodes is not None:
            loadedNodes.AddItem(node)
        return True

    def fileWriterFileType(self, node):
        return "NoFile"

    def saveNodes(self, fileType, properties, userMessages=None):
        node = slicer.mrmlScene.GetNodeByID(properties["nodeID"])
        if node is None:
            return False
        storageNode = node.GetStorageNode()
        if storageNode is None:
            node.AddDefaultStorageNode()
            storageNode = node.GetStorageNode()
        storageNode.SetFileName(str(properties["fileName"]))
        return bool(storageNode.WriteData(node))


class _Application(qt.QObject):
    """``slicer.app`` (qSlicerApplication) as with ``--no-main-window``."""

    PROPERTIES = ("slicerHome", "temporaryPath")

    def __init__(self):
        super().__init__()
        home = tempfile.mkdtemp(prefix="slicer-home-")
        os.makedirs(os.path.join(home, "bin"))
        launcher = os.path.join(home, "bin", "PythonSlicer")
        with open(launcher, "w", encoding="utf-8") as f:
            f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        os.chmod(launcher, os.stat(launcher).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        object.__setattr__(self, "slicerHome", home)
        object.__setattr__(self, "temporaryPath", tempfile.mkdtemp(prefix="slicer-temp-"))
        object.__setattr__(self, "_applicationLogic", None)
        object.__setattr__(self, "_io", _CoreIOManager())

    def processEvents(self) -> None:
        qt._processEvents()

    def applicationLogic(self):
        return self._applicationLogic

    def layoutManager(self):
        return None  # no main window

    def coreIOManager(self):
        return self._io

    def testingEnabled(self) -> bool:
        return False

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass


class _Module:
    """An entry of ``slicer.modules`` (qSlicerAbstractCoreModule): ``logic()``, ``path``."""

    def __init__(self, name, logic=None, path=""):
        self.name = name
        self._logic = logic
        self.path = path

    def logic(self):
        return self._logic


# ------------------------------------------------------------------------------------------
# qMRML widgets (Libs/MRML/Widgets), over the real scene
# ------------------------------------------------------------------------------------------

class qMRMLWidget(qt.QWidget):
    SIGNALS = ("mrmlSceneChanged(vtkMRMLScene*)",)

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "_scene", None)

    def setMRMLScene(self, scene) -> None:
        object.__setattr__(self, "_scene", scene)
        self._emit("mrmlSceneChanged(vtkMRMLScene*)", scene)

    def mrmlScene(self):
        return self._scene


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """The panel Slicer gives a scripted module widget as ``parent``."""

    PROPERTIES = ("isEntered",)

    def __init__(self, parent=None):
        super().__init__(parent)
        object.__setattr__(self, "isEntered", False)
        self.setLayout(qt.QVBoxLayout(self))


class qMRMLNodeComboBox(qt.QWidget):
    """Lists the scene's nodes as qMRMLSortFilterProxyModel filters them: ``nodeTypes`` (IsA),
    only the exact classes when ``showChildNodeTypes`` is false, minus ``hideChildNodeTypes``,
    minus HideFromEditors nodes unless ``showHidden``. A node it does not list cannot become
    current; when the current node leaves the scene the current node becomes None."""

    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
               "nodeAdded(vtkMRMLNode*)", "nodeActivated(vtkMRMLNode*)", "nodeAboutToBeRemoved(vtkMRMLNode*)")
    PROPERTIES = ("nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled", "noneDisplay",
                  "renameEnabled", "editEnabled", "showHidden", "selectNodeUponCreation", "baseName",
                  "currentNodeID", "hideChildNodeTypes")

    def __init__(self, parent=None):
        super().__init__(parent)
        for name, value in (("nodeTypes", []), ("showChildNodeTypes", True), ("hideChildNodeTypes", []),
                            ("addEnabled", True), ("removeEnabled", True), ("noneEnabled", False),
                            ("noneDisplay", "None"), ("renameEnabled", False), ("editEnabled", False),
                            ("showHidden", False), ("_scene", None), ("_current", None), ("_observation", None)):
            object.__setattr__(self, name, value)

    def setMRMLScene(self, scene) -> None:
        if self._scene is not None and self._observation is not None:
            self._scene.RemoveObserver(self._observation)
        object.__setattr__(self, "_scene", scene)
        object.__setattr__(self, "_current", None)
        if scene is not None:
            object.__setattr__(self, "_observation", scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved))

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, caller, event, node):
        if node is not None and node is self._current:
            self._setCurrent(None)

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node) -> bool:
        if node is None or self._scene is None or not self._scene.IsNodePresent(node):
            return False
        if node.GetHideFromEditors() and not self.showHidden:
            return False
        if any(node.IsA(t) for t in self.hideChildNodeTypes):
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def nodes(self):
        if self._scene is None:
            return []
        return [n for n in slicer.util.getNodesByClass("vtkMRMLNode", self._scene) if self._accepts(n)]

    def nodeCount(self) -> int:
        return len(self.nodes())

    def currentNode(self):
        return self._current

    @property
    def currentNodeID(self) -> str:
        return self._current.GetID() if self._current is not None else ""

    @currentNodeID.setter
    def currentNodeID(self, nodeId: str) -> None:
        self.setCurrentNodeID(nodeId)

    def setCurrentNodeID(self, nodeId: str) -> None:
        node = self._scene.GetNodeByID(nodeId) if (self._scene is not None and nodeId) else None
        self.setCurrentNode(node)

    def setCurrentNode(self, node) -> None:
        if node is not None and not self._accepts(node):
            node = None  # Qt: a node the model does not list gives no current item
        if node is None and not self.noneEnabled and self.nodes():
            return
        self._setCurrent(node)

    def _setCurrent(self, node) -> None:
        if node is not self._current:
            object.__setattr__(self, "_current", node)
            self._emit("currentNodeChanged(vtkMRMLNode*)", node)
            self._emit("currentNodeChanged(bool)", node is not None)
            self._emit("currentNodeIDChanged(QString)", node.GetID() if node is not None else "")


class qSlicerScriptedLoadableModule:
    """The ``parent`` a ScriptedLoadableModule receives (module metadata holder)."""

    _FIELDS = ("title", "categories", "dependencies", "contributors", "helpText", "acknowledgementText",
               "icon", "path", "hidden", "index")

    def __init__(self, path: str):
        object.__setattr__(self, "path", path)
        for name in self._FIELDS:
            if name != "path":
                object.__setattr__(self, name, None)

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(f"qSlicerScriptedLoadableModule has no property {name!r}")
        object.__setattr__(self, name, value)


DESIGNER_CLASSES = {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox}


# ------------------------------------------------------------------------------------------
# slicer.util: UI loading, dialogs, modules (the parts that need Qt or the application)
# ------------------------------------------------------------------------------------------

def _designerClass(name: str):
    for namespace in (qt.DESIGNER_CLASSES, ctk.DESIGNER_CLASSES, DESIGNER_CLASSES):
        if name in namespace:
            return namespace[name]
    raise RuntimeError(f"Could not load UI file: unknown widget class {name!r}")


def _propertyValue(element):
    child = list(element)[0]
    tag, text = child.tag, (child.text or "")
    if tag in ("string", "cstring"):
        return text
    if tag == "bool":
        return text.strip() == "true"
    if tag == "number":
        return int(text) if text.strip().lstrip("-").isdigit() else float(text)
    if tag == "double":
        return float(text)
    if tag == "stringlist":
        return [s.text or "" for s in child.findall("string")]
    if tag in ("enum", "set"):
        return text
    if tag == "rect":
        return tuple(int(child.find(k).text) for k in ("x", "y", "width", "height"))
    raise RuntimeError(f"Could not load UI file: unsupported property type {tag!r}")


def _buildWidget(element, parent):
    widget = _designerClass(element.get("class"))(parent=parent)
    widget.setObjectName(element.get("name"))
    for prop in element.findall("property"):
        setattr(widget, prop.get("name"), _propertyValue(prop))
    for layout in element.findall("layout"):
        _buildLayout(layout, widget)
    for child in element.findall("widget"):
        _buildWidget(child, widget)
    return widget


def _buildLayout(element, ownerWidget):
    if element.get("class") not in qt.LAYOUT_CLASSES:
        raise RuntimeError(f"Could not load UI file: unknown layout class {element.get('class')!r}")
    for item in element.findall("item"):
        for child in item:
            if child.tag == "widget":
                _buildWidget(child, ownerWidget)
            elif child.tag == "layout":
                _buildLayout(child, ownerWidget)


def _descendants(widget):
    for child in widget.children():
        yield child
        yield from _descendants(child)


def loadUI(path):
    """Load UI file ``path`` and return the corresponding widget (RuntimeError if it fails)."""
    if not os.path.isfile(path):
        raise RuntimeError(f"Could not load UI file: file not found {path}\n\n")
    root = ET.parse(path).getroot()
    widget = _buildWidget(root.find("widget"), None)
    byName = {w.objectName: w for w in _descendants(widget)}
    byName[widget.objectName] = widget
    for connection in root.findall("connections/connection"):
        sender = byName[connection.findtext("sender")]
        receiver = byName[connection.findtext("receiver")]
        sender.connect(connection.findtext("signal"), getattr(receiver, connection.findtext("slot").split("(")[0]))
    return widget


def childWidgetVariables(widget):
    ui = type("", (), {})()
    for child in _descendants(widget):
        if child.objectName:
            setattr(ui, child.objectName, child)
    return ui


def _answer(kind, text):
    state.dialogs.append((kind, text))
    if not state.answers:
        raise AssertionError(f"unexpected {kind} dialog (no scripted answer): {text}")
    return state.answers.pop(0)


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    return bool(_answer("confirmOkCancel", text))


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    return bool(_answer("confirmYesNo", text))


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    state.dialogs.append(("error", text))
    logging.error(text)


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    state.dialogs.append(("warning", text))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    state.dialogs.append(("info", text))


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    logging.info(message)


def mainWindow(verbose=True):
    return None


def selectModule(module):
    moduleName = module if isinstance(module, str) else module.name
    if not state.mainWindow:
        raise RuntimeError("Could not find moduleSelector in the main window")
    state.selectedModule = moduleName


def getModuleWidget(module):
    moduleName = module if isinstance(module, str) else module.name
    if moduleName not in state.moduleWidgets:
        raise RuntimeError(f"Could not find module widget representation with name '{moduleName}'")
    return state.moduleWidgets[moduleName]


def pip_install(requirements):
    """Recorded, never executed: a test must not install packages."""
    state.pipInstalls.append(requirements)


_UTIL_OVERRIDES = (loadUI, childWidgetVariables, confirmOkCancelDisplay, confirmYesNoDisplay, errorDisplay,
                   warningDisplay, infoDisplay, delayDisplay, mainWindow, selectModule, getModuleWidget, pip_install)


# ------------------------------------------------------------------------------------------
# Scenes
# ------------------------------------------------------------------------------------------

_SH_DATA_CLASSES = ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLModelNode")


def _emulateSubjectHierarchyPlugins(scene):
    """qSlicerSubjectHierarchyPluginLogic::onNodeAdded: a data node added to the scene gets an
    item under the scene item (unless it has one or is hidden from editors)."""

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(caller, event, node):
        if node is None or node.GetHideFromEditors() or not any(node.IsA(c) for c in _SH_DATA_CLASSES):
            return
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
        if shNode is not None and not shNode.GetItemByDataNode(node):
            shNode.CreateItem(shNode.GetSceneItemID(), node)

    scene.AddObserver(scene.NodeAddedEvent, onNodeAdded)
    scene._kts_onNodeAdded = onNodeAdded  # keep the callback alive with the scene


def newScene(subjectHierarchyPlugins: bool = True):
    """A fresh real ``vtkMRMLScene`` as Slicer sets one up: the module logics (Colors first, for
    the default color tables; Segmentations, for the representation converters and closed
    surfaces) and the application logic (selection node) on it. Sets ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    logics = {}
    # (Terminologies: the wheel ships no terminology files, so its logic would load nothing.)
    for name, className in (("colors", "vtkSlicerColorLogic"), ("volumes", "vtkSlicerVolumesLogic"),
                            ("segmentations", "vtkSlicerSegmentationsModuleLogic"),
                            ("subjecthierarchy", "vtkSlicerSubjectHierarchyModuleLogic")):
        logic = getattr(slicer, className)()
        logic.SetMRMLApplicationLogic(applicationLogic)
        logic.SetMRMLScene(scene)
        logics[name] = logic
        # qSlicerCoreApplication registers each module's logic; the Volumes logic finds Colors there.
        applicationLogic.SetModuleLogic({"colors": "Colors", "volumes": "Volumes", "segmentations": "Segmentations",
                                         "subjecthierarchy": "SubjectHierarchy"}[name], logic)
    object.__setattr__(slicer.app, "_applicationLogic", applicationLogic)
    for name, logic in logics.items():
        setattr(slicer.modules, name, _Module(name, logic))
    if subjectHierarchyPlugins:
        _emulateSubjectHierarchyPlugins(scene)
    return scene


def registerModule(name: str, path: str) -> None:
    setattr(slicer.modules, name.lower(), _Module(name, None, path))


def _loadScriptedLoadableModule():
    import importlib.util

    spec = importlib.util.spec_from_file_location("slicer.ScriptedLoadableModule",
                                                  os.path.join(_HERE, "scripted_loadable_module.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["slicer.ScriptedLoadableModule"] = module
    spec.loader.exec_module(module)
    return module


_installed = False
#: names of the real ``slicer.util`` (slicer-core), recorded before :func:`install` overrides any
REAL_UTIL_NAMES: set = set()


def install():
    """Add the application-level pieces to the real ``slicer`` package (idempotent)."""
    global _installed
    if _installed:
        return slicer
    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError(f"the 'slicer' package at {getattr(slicer, '__file__', '?')} is not slicer-core's")
    REAL_UTIL_NAMES.update(dir(slicer.util))  # before the overrides: what Slicer's util really has
    slicer.app = _Application()
    slicer.modules = types.SimpleNamespace()
    slicer.qMRMLWidget = qMRMLWidget
    slicer.qMRMLNodeComboBox = qMRMLNodeComboBox
    slicer.qSlicerScriptedLoadableModuleWidget = qSlicerScriptedLoadableModuleWidget
    slicer.qSlicerScriptedLoadableModule = qSlicerScriptedLoadableModule
    for function in _UTIL_OVERRIDES:
        setattr(slicer.util, function.__name__, function)
    slicer.ScriptedLoadableModule = _loadScriptedLoadableModule()
    newScene()
    _installed = True
    return slicer
