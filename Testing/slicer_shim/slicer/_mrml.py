"""MRML and segmentation-core classes of the Slicer stand-in.

Each class has only methods that exist with the same name and arguments in Slicer 5.6+
(Libs/MRML/Core, Libs/vtkSegmentationCore). Nodes are real ``vtk.vtkObject`` subclasses, so
observers, ``Modified`` events and ``vtk.vtkMatrix4x4`` arguments behave as in Slicer. Image
geometry is kept as Slicer keeps it (RAS) and converted to ITK's LPS when written to files.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Optional

import numpy as np
import vtk
from vtkmodules.util import numpy_support


def _matrixToNumpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpyToMatrix(array: np.ndarray, matrix: vtk.vtkMatrix4x4) -> None:
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))


class vtkMRMLNode(vtk.vtkObject):
    _classCounters: Dict[str, itertools.count] = {}

    def __init__(self):
        super().__init__()
        self._id: Optional[str] = None
        self._name = ""
        self._scene = None
        self._attributes: Dict[str, str] = {}
        self._references: Dict[str, str] = {}
        self._disableModified = 0
        self._modifiedPending = False
        self._singletonTag: Optional[str] = None

    # identity ------------------------------------------------------------------------
    def GetClassName(self) -> str:
        return type(self).__name__

    def IsA(self, className: str) -> int:
        return int(any(klass.__name__ == className for klass in type(self).__mro__))

    def GetID(self) -> Optional[str]:
        return self._id

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        if name != self._name:
            self._name = name
            self.Modified()

    def GetScene(self):
        return self._scene

    def SetSingletonTag(self, tag: str) -> None:
        self._singletonTag = tag

    def GetSingletonTag(self) -> Optional[str]:
        return self._singletonTag

    # attributes and references -------------------------------------------------------
    def SetAttribute(self, name: str, value: str) -> None:
        self._attributes[name] = str(value)
        self.Modified()

    def GetAttribute(self, name: str) -> Optional[str]:
        return self._attributes.get(name)

    def SetNodeReferenceID(self, role: str, nodeId: Optional[str]):
        old = self._references.get(role)
        if not nodeId:
            self._references.pop(role, None)
        else:
            self._references[role] = nodeId
        if old != self._references.get(role):
            self.Modified()
        return self.GetNodeReference(role)

    def GetNodeReferenceID(self, role: str) -> Optional[str]:
        return self._references.get(role)

    def GetNodeReference(self, role: str):
        nodeId = self._references.get(role)
        return self._scene.GetNodeByID(nodeId) if (nodeId and self._scene is not None) else None

    # modified events -----------------------------------------------------------------
    def Modified(self) -> None:
        if self._disableModified:
            self._modifiedPending = True
            return
        vtk.vtkObject.Modified(self)

    def StartModify(self) -> int:
        previous = self._disableModified
        self._disableModified = 1
        return previous

    def EndModify(self, previous: int) -> int:
        self._disableModified = previous
        if not previous and self._modifiedPending:
            self._modifiedPending = False
            vtk.vtkObject.Modified(self)
        return previous


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._parameters: Dict[str, str] = {}

    def SetParameter(self, name: str, value: str) -> None:
        if self._parameters.get(name) != str(value):
            self._parameters[name] = str(value)
            self.Modified()

    def GetParameter(self, name: str) -> str:
        return self._parameters.get(name, "")

    def GetParameterNames(self) -> List[str]:
        return list(self._parameters)


class vtkMRMLSelectionNode(vtkMRMLNode):
    def GetActiveVolumeID(self) -> Optional[str]:
        return self.GetNodeReferenceID("ActiveVolume")

    def SetActiveVolumeID(self, nodeId: Optional[str]) -> None:
        self.SetNodeReferenceID("ActiveVolume", nodeId)


class vtkMRMLDisplayNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._visibility = 1
        self._visibility3D = 1

    def SetVisibility(self, visible) -> None:
        self._visibility = int(bool(visible))
        self.Modified()

    def GetVisibility(self) -> int:
        return self._visibility

    def SetVisibility3D(self, visible) -> None:
        self._visibility3D = int(bool(visible))
        self.Modified()

    def GetVisibility3D(self) -> int:
        return self._visibility3D


class vtkMRMLSegmentationDisplayNode(vtkMRMLDisplayNode):
    pass


class vtkMRMLTransformableNode(vtkMRMLNode):
    def GetTransformNodeID(self) -> Optional[str]:
        return self.GetNodeReferenceID("transform")

    def SetAndObserveTransformNodeID(self, nodeId: Optional[str]) -> bool:
        self.SetNodeReferenceID("transform", nodeId)
        return True

    def GetDisplayNode(self):
        return self.GetNodeReference("display")


class vtkMRMLVolumeNode(vtkMRMLTransformableNode):
    def __init__(self):
        super().__init__()
        self._imageData = None
        self._spacing = np.ones(3)
        self._origin = np.zeros(3)
        self._directions = np.eye(3)  # columns: RAS direction of the i, j, k axes

    def GetImageData(self):
        return self._imageData

    def SetAndObserveImageData(self, imageData) -> None:
        self._imageData = imageData
        self.Modified()

    def SetSpacing(self, *spacing) -> None:
        self._spacing = np.array(spacing[0] if len(spacing) == 1 else spacing, dtype=float)
        self.Modified()

    def GetSpacing(self):
        return tuple(float(v) for v in self._spacing)

    def SetOrigin(self, *origin) -> None:
        self._origin = np.array(origin[0] if len(origin) == 1 else origin, dtype=float)
        self.Modified()

    def GetOrigin(self):
        return tuple(float(v) for v in self._origin)

    def SetIJKToRASDirectionMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        self._directions = _matrixToNumpy(matrix)[:3, :3].copy()
        self.Modified()

    def GetIJKToRASDirectionMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        array = np.eye(4)
        array[:3, :3] = self._directions
        _numpyToMatrix(array, matrix)

    def GetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        array = np.eye(4)
        array[:3, :3] = self._directions * self._spacing
        array[:3, 3] = self._origin
        _numpyToMatrix(array, matrix)

    def SetIJKToRASMatrix(self, matrix: vtk.vtkMatrix4x4) -> None:
        array = _matrixToNumpy(matrix)
        spacing = np.linalg.norm(array[:3, :3], axis=0)
        self._spacing = spacing
        self._directions = array[:3, :3] / spacing
        self._origin = array[:3, 3].copy()
        self.Modified()

    def CreateDefaultDisplayNodes(self) -> None:
        pass


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    pass


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    pass


class vtkMRMLVectorVolumeNode(vtkMRMLVolumeNode):
    pass


def _ijkToRasOf(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return _matrixToNumpy(matrix)


def _arrayOfImageData(imageData) -> np.ndarray:
    dims = imageData.GetDimensions()
    components = imageData.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return array.reshape(shape)


def _imageDataOfArray(array: np.ndarray):
    imageData = vtk.vtkImageData()
    components = 1 if array.ndim == 3 else array.shape[3]
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = np.ascontiguousarray(array).reshape(-1, components) if components > 1 else np.ascontiguousarray(array).ravel()
    vtkArray = numpy_support.numpy_to_vtk(flat, deep=True)
    vtkArray.SetNumberOfComponents(components)
    imageData.GetPointData().SetScalars(vtkArray)
    return imageData


# ------------------------------------------------------------------------------------------
# Segmentations
# ------------------------------------------------------------------------------------------

class vtkSegment(vtk.vtkObject):
    @staticmethod
    def GetTerminologyEntryTagName() -> str:
        return "TerminologyEntry"

    def __init__(self):
        super().__init__()
        self._name = ""
        self._color = (0.5, 0.5, 0.5)
        self._tags: Dict[str, str] = {}
        self._nameAutoGenerated = True
        self._colorAutoGenerated = True
        self._labelmap: Optional[np.ndarray] = None  # "Binary labelmap" representation
        self._labelmapIjkToRas: Optional[np.ndarray] = None

    def GetName(self) -> str:
        return self._name

    def SetName(self, name: str) -> None:
        self._name = name

    def SetColor(self, r: float, g: float, b: float) -> None:
        self._color = (float(r), float(g), float(b))

    def GetColor(self):
        return self._color

    def SetTag(self, tag: str, value) -> None:
        self._tags[tag] = str(value)

    def GetTag(self, tag: str, value) -> bool:
        if tag not in self._tags:
            return False
        value.set(self._tags[tag])
        return True

    def HasTag(self, tag: str) -> bool:
        return tag in self._tags

    def RemoveTag(self, tag: str) -> None:
        self._tags.pop(tag, None)

    def SetNameAutoGenerated(self, value: bool) -> None:
        self._nameAutoGenerated = bool(value)

    def GetNameAutoGenerated(self) -> bool:
        return self._nameAutoGenerated

    def SetColorAutoGenerated(self, value: bool) -> None:
        self._colorAutoGenerated = bool(value)

    def GetColorAutoGenerated(self) -> bool:
        return self._colorAutoGenerated


class vtkSegmentation(vtk.vtkObject):
    def __init__(self):
        super().__init__()
        self._segments: Dict[str, vtkSegment] = {}
        self._order: List[str] = []
        self._counter = itertools.count(1)

    def GenerateUniqueSegmentID(self, base: str = "") -> str:
        base = base or "Segment"
        candidate = base
        while candidate in self._segments:
            candidate = f"{base}_{next(self._counter)}"
        return candidate

    def AddEmptySegment(self, segmentId: str = "", segmentName: str = "", color=None) -> str:
        if not segmentId or segmentId in self._segments:
            segmentId = self.GenerateUniqueSegmentID(segmentId or segmentName)
        segment = vtkSegment()
        segment.SetName(segmentName or segmentId)
        if color is not None:
            segment.SetColor(*color)
        self._segments[segmentId] = segment
        self._order.append(segmentId)
        self.Modified()
        return segmentId

    def GetSegment(self, segmentId: str) -> Optional[vtkSegment]:
        return self._segments.get(segmentId)

    def GetSegmentIdBySegmentName(self, name: str) -> str:
        for segmentId in self._order:
            if self._segments[segmentId].GetName().lower() == name.lower():
                return segmentId
        return ""

    def GetSegmentIdBySegment(self, segment) -> str:
        for segmentId, candidate in self._segments.items():
            if candidate is segment:
                return segmentId
        return ""

    def RemoveSegment(self, segmentIdOrSegment) -> None:
        segmentId = segmentIdOrSegment if isinstance(segmentIdOrSegment, str) else \
            self.GetSegmentIdBySegment(segmentIdOrSegment)
        if segmentId in self._segments:
            del self._segments[segmentId]
            self._order.remove(segmentId)
            self.Modified()

    def GetNumberOfSegments(self) -> int:
        return len(self._order)

    def GetNthSegment(self, index: int) -> Optional[vtkSegment]:
        return self._segments[self._order[index]] if 0 <= index < len(self._order) else None

    def GetNthSegmentID(self, index: int) -> str:
        return self._order[index] if 0 <= index < len(self._order) else ""


class vtkMRMLSegmentationNode(vtkMRMLTransformableNode):
    def __init__(self):
        super().__init__()
        self._segmentation = vtkSegmentation()
        self._sourceRepresentation = "Binary labelmap"
        self._referenceGeometry = None  # (dims (i, j, k), ijkToRas 4x4)
        self._closedSurface = False

    @staticmethod
    def GetReferenceImageGeometryReferenceRole() -> str:
        return "referenceImageGeometryRef"

    def GetSegmentation(self) -> vtkSegmentation:
        return self._segmentation

    def CreateDefaultDisplayNodes(self) -> None:
        if self.GetDisplayNode() is not None or self._scene is None:
            return
        displayNode = self._scene.AddNewNodeByClass("vtkMRMLSegmentationDisplayNode")
        self.SetNodeReferenceID("display", displayNode.GetID())

    def SetReferenceImageGeometryParameterFromVolumeNode(self, volumeNode) -> None:
        self._referenceGeometry = (tuple(volumeNode.GetImageData().GetDimensions()), _ijkToRasOf(volumeNode))

    def SetSourceRepresentationToBinaryLabelmap(self) -> None:
        self._sourceRepresentation = "Binary labelmap"

    def SetSourceRepresentationToClosedSurface(self) -> None:
        self._sourceRepresentation = "Closed surface"

    def CreateClosedSurfaceRepresentation(self) -> bool:
        self._closedSurface = True
        return True

    def RemoveClosedSurfaceRepresentation(self) -> None:
        self._closedSurface = False


# ------------------------------------------------------------------------------------------
# Subject hierarchy, storage
# ------------------------------------------------------------------------------------------

class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    SCENE_ITEM = 1

    def __init__(self):
        super().__init__()
        self._items: Dict[int, dict] = {self.SCENE_ITEM: {"node": None, "parent": 0, "name": "Scene"}}
        self._nextItem = itertools.count(2)

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        return scene._subjectHierarchy if scene is not None else None

    def GetSceneItemID(self) -> int:
        return self.SCENE_ITEM

    def _addDataNode(self, node) -> None:
        self._items[next(self._nextItem)] = {"node": node, "parent": self.SCENE_ITEM, "name": node.GetName()}

    def _removeDataNode(self, node) -> None:
        for itemId in [i for i, item in self._items.items() if item["node"] is node]:
            del self._items[itemId]

    def GetItemByDataNode(self, node) -> int:
        for itemId, item in self._items.items():
            if item["node"] is node and node is not None:
                return itemId
        return 0

    def GetItemDataNode(self, itemId: int):
        return self._items.get(itemId, {}).get("node")

    def GetItemParent(self, itemId: int) -> int:
        return self._items.get(itemId, {}).get("parent", 0)

    def SetItemParent(self, itemId: int, parentItemId: int) -> None:
        if itemId in self._items and parentItemId in self._items:
            self._items[itemId]["parent"] = parentItemId

    def CreateFolderItem(self, parentItemId: int, name: str) -> int:
        itemId = next(self._nextItem)
        self._items[itemId] = {"node": None, "parent": parentItemId, "name": name}
        return itemId

    def GetItemName(self, itemId: int) -> str:
        return self._items.get(itemId, {}).get("name", "")


def _lpsImageFromVolume(array: np.ndarray, volumeNode):
    """SimpleITK image of an array on ``volumeNode``'s grid, geometry converted RAS -> LPS."""
    import SimpleITK as sitk

    ijkToRas = _ijkToRasOf(volumeNode)
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    flip = np.diag([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in flip @ ijkToRas[:3, 3]))
    image.SetDirection(tuple(float(v) for v in (flip @ (ijkToRas[:3, :3] / spacing)).ravel()))
    return image


class vtkMRMLStorageNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._fileName = ""
        self._useCompression = 1

    def SetFileName(self, fileName: str) -> None:
        self._fileName = fileName

    def GetFileName(self) -> str:
        return self._fileName

    def UseCompressionOff(self) -> None:
        self._useCompression = 0

    def UseCompressionOn(self) -> None:
        self._useCompression = 1

    def SetUseCompression(self, value: int) -> None:
        self._useCompression = int(value)


class vtkMRMLVolumeArchetypeStorageNode(vtkMRMLStorageNode):
    def WriteData(self, node) -> int:
        import SimpleITK as sitk

        if node is None or node.GetImageData() is None:
            return 0
        image = _lpsImageFromVolume(_arrayOfImageData(node.GetImageData()), node)
        sitk.WriteImage(image, self._fileName, bool(self._useCompression))
        return 1
