"""A small, honest stand-in for 3D Slicer's ``slicer`` Python package, for tests outside Slicer.

It has only the names the KidneyTumorSeg module uses, each with the name and arguments it has
in Slicer 5.6+ (Base/Python/slicer/util.py, ScriptedLoadableModule.py, Libs/MRML/Core,
Libs/vtkSegmentationCore, qMRMLWidgets). Anything else raises ``AttributeError``, so a test
fails when the module calls something real Slicer does not have. Side effects that must not
happen in a test (installing packages, dialogs) are recorded instead, and dialogs need a
scripted answer (``slicer._shim.answers``) or the test fails.
"""

from __future__ import annotations

import itertools
import tempfile
from types import SimpleNamespace
from typing import Dict, List, Optional

import qt
import vtk

from ._mrml import (vtkMRMLDisplayNode, vtkMRMLLabelMapVolumeNode, vtkMRMLNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLScriptedModuleNode, vtkMRMLSegmentationDisplayNode, vtkMRMLSegmentationNode,
                    vtkMRMLSelectionNode, vtkMRMLStorageNode, vtkMRMLSubjectHierarchyNode,
                    vtkMRMLVectorVolumeNode, vtkMRMLVolumeArchetypeStorageNode, vtkMRMLVolumeNode, vtkSegment,
                    vtkSegmentation)

_NODE_CLASSES = {cls.__name__: cls for cls in (
    vtkMRMLScalarVolumeNode, vtkMRMLLabelMapVolumeNode, vtkMRMLVectorVolumeNode, vtkMRMLSegmentationNode,
    vtkMRMLSegmentationDisplayNode, vtkMRMLScriptedModuleNode, vtkMRMLSelectionNode,
    vtkMRMLVolumeArchetypeStorageNode)}


class vtkMRMLScene(vtk.vtkObject):
    # Event ids as distinct numbers (their values in Slicer differ; code uses the names).
    NodeAddedEvent = 66000
    NodeRemovedEvent = 66001
    StartCloseEvent = 66003
    EndCloseEvent = 66004

    def __init__(self):
        super().__init__()
        self._nodes: Dict[str, vtkMRMLNode] = {}
        self._counters: Dict[str, itertools.count] = {}
        self._subjectHierarchy = vtkMRMLSubjectHierarchyNode()
        self._addSingletons()

    def _addSingletons(self) -> None:
        selection = vtkMRMLSelectionNode()
        selection.SetSingletonTag("Singleton")
        self.AddNode(selection)

    def CreateNodeByClass(self, className: str):
        if className not in _NODE_CLASSES:
            raise AttributeError(f"the Slicer stand-in cannot create {className}")
        return _NODE_CLASSES[className]()

    def AddNode(self, node):
        tag = node.GetSingletonTag()
        if tag:
            existing = self.GetSingletonNode(tag, node.GetClassName())
            if existing is not None:
                return existing
        counter = self._counters.setdefault(node.GetClassName(), itertools.count(1))
        node._id = f"{node.GetClassName()}{next(counter)}"
        if tag:
            node._id = f"{node.GetClassName()}{tag}"
        node._scene = self
        self._nodes[node._id] = node
        if isinstance(node, (vtkMRMLVolumeNode, vtkMRMLSegmentationNode)):
            self._subjectHierarchy._addDataNode(node)
        self.InvokeEvent(self.NodeAddedEvent)
        return node

    def AddNewNodeByClass(self, className: str, nodeName: str = ""):
        node = self.CreateNodeByClass(className)
        if nodeName:
            node.SetName(nodeName)
        return self.AddNode(node)

    def RemoveNode(self, node) -> None:
        if node is None or node.GetID() not in self._nodes:
            return
        del self._nodes[node.GetID()]
        self._subjectHierarchy._removeDataNode(node)
        node._scene = None
        self.InvokeEvent(self.NodeRemovedEvent)

    def GetNodeByID(self, nodeId: Optional[str]):
        return self._nodes.get(nodeId) if nodeId else None

    def GetSingletonNode(self, tag: str, className: str):
        for node in self._nodes.values():
            if node.GetSingletonTag() == tag and node.IsA(className):
                return node
        return None

    def GetFirstNodeByClass(self, className: str):
        for node in self._nodes.values():
            if node.IsA(className):
                return node
        return None

    def GetFirstNodeByName(self, name: str):
        for node in self._nodes.values():
            if node.GetName() == name:
                return node
        return None

    def GenerateUniqueName(self, baseName: str) -> str:
        names = {node.GetName() for node in self._nodes.values()}
        if baseName not in names:
            return baseName
        for index in itertools.count(1):
            candidate = f"{baseName}_{index}"
            if candidate not in names:
                return candidate

    def GetNumberOfNodes(self) -> int:
        return len(self._nodes)

    def Clear(self, removeSingletons: int = 0) -> None:
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self._nodes.values()):
            if removeSingletons or not node.GetSingletonTag():
                self.RemoveNode(node)
        self.InvokeEvent(self.EndCloseEvent)

    # not Slicer API: the stand-in's helper for util.getNodesByClass
    def _nodesOfClass(self, className: str) -> List[vtkMRMLNode]:
        return [node for node in self._nodes.values() if node.IsA(className)]


class _ApplicationLogic:
    def GetSelectionNode(self):
        return mrmlScene.GetSingletonNode("Singleton", "vtkMRMLSelectionNode")


class _Application(qt.QObject):
    """``slicer.app`` (qSlicerApplication) without a main window, as with --no-main-window."""

    PROPERTIES = ("slicerHome", "temporaryPath")

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "slicerHome", tempfile.mkdtemp(prefix="slicer-home-"))
        object.__setattr__(self, "temporaryPath", tempfile.mkdtemp(prefix="slicer-temp-"))
        object.__setattr__(self, "_logic", _ApplicationLogic())

    def processEvents(self) -> None:
        qt._processEvents()

    def applicationLogic(self):
        return self._logic

    def layoutManager(self):
        return None  # no main window

    def setOverrideCursor(self, cursor) -> None:
        pass

    def restoreOverrideCursor(self) -> None:
        pass


# -- qMRML widgets (Libs/MRML/Widgets) ---------------------------------------------------------

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
    SIGNALS = ("currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
               "nodeAdded(vtkMRMLNode*)", "nodeActivated(vtkMRMLNode*)")
    PROPERTIES = ("nodeTypes", "showChildNodeTypes", "addEnabled", "removeEnabled", "noneEnabled", "noneDisplay",
                  "renameEnabled", "editEnabled", "showHidden", "selectNodeUponCreation", "baseName",
                  "currentNodeID", "hideChildNodeTypes")

    def __init__(self, parent=None):
        super().__init__(parent)
        for name, value in (("nodeTypes", []), ("showChildNodeTypes", True), ("addEnabled", True),
                            ("removeEnabled", True), ("noneEnabled", False), ("noneDisplay", "None"),
                            ("renameEnabled", False), ("_scene", None), ("_current", None)):
            object.__setattr__(self, name, value)

    def setMRMLScene(self, scene) -> None:
        object.__setattr__(self, "_scene", scene)

    def mrmlScene(self):
        return self._scene

    def _accepts(self, node) -> bool:
        if node is None or self._scene is None or self._scene.GetNodeByID(node.GetID()) is not node:
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def currentNode(self):
        node = self._current
        if node is not None and (self._scene is None or self._scene.GetNodeByID(node.GetID()) is not node):
            return None  # removed from the scene
        return node

    @property
    def currentNodeID(self) -> str:
        node = self.currentNode()
        return node.GetID() if node is not None else ""

    @currentNodeID.setter
    def currentNodeID(self, nodeId: str) -> None:
        self.setCurrentNodeID(nodeId)

    def setCurrentNodeID(self, nodeId: str) -> None:
        self.setCurrentNode(self._scene.GetNodeByID(nodeId) if self._scene is not None else None)

    def setCurrentNode(self, node) -> None:
        if node is not None and not self._accepts(node):
            return  # Qt: a node the combo box does not list cannot become current
        if node is None and not self.noneEnabled:
            return
        if node is not self.currentNode():
            object.__setattr__(self, "_current", node)
            self._emit("currentNodeChanged(vtkMRMLNode*)", node)
            self._emit("currentNodeChanged(bool)", node is not None)
            self._emit("currentNodeIDChanged(QString)", node.GetID() if node is not None else "")

    def nodes(self):
        if self._scene is None:
            return []
        return [n for n in self._scene._nodes.values() if self._accepts(n)]


class qSlicerScriptedLoadableModule:
    """The ``parent`` a ScriptedLoadableModule receives (module metadata holder)."""

    _FIELDS = ("title", "categories", "dependencies", "contributors", "helpText", "acknowledgementText",
               "icon", "path", "hidden", "index")

    def __init__(self, path: str):
        object.__setattr__(self, "path", path)
        for name in self._FIELDS[:-1]:
            if name != "path":
                object.__setattr__(self, name, None)

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(f"qSlicerScriptedLoadableModule has no property {name!r}")
        object.__setattr__(self, name, value)


DESIGNER_CLASSES = {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox}

app = _Application()
mrmlScene = vtkMRMLScene()
modules = SimpleNamespace()


class _ShimState:
    """Not Slicer API: what tests script and inspect."""

    def __init__(self):
        self.answers: List[bool] = []      # answers to confirm dialogs, consumed in order
        self.dialogs: List[tuple] = []     # (kind, text) of every dialog shown
        self.pipInstalls: List[object] = []
        self.moduleWidgets: Dict[str, object] = {}
        self.selectedModule: Optional[str] = None
        self.mainWindow = False

    def reset(self) -> None:
        self.__init__()


_shim = _ShimState()

from . import util  # noqa: E402  (util needs app and mrmlScene)
