"""``slicer.util`` of the Slicer stand-in: the functions of Base/Python/slicer/util.py that the
module uses, with their real names and arguments."""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
import xml.etree.ElementTree as ET

import numpy as np
import vtk

import ctk
import qt
import slicer
from slicer._mrml import _arrayOfImageData, _ijkToRasOf, _imageDataOfArray, _lpsImageFromVolume, _numpyToMatrix

# ------------------------------------------------------------------------------------------
# UI
# ------------------------------------------------------------------------------------------


def _designerClass(name: str):
    for namespace in (qt.DESIGNER_CLASSES, ctk.DESIGNER_CLASSES, slicer.DESIGNER_CLASSES):
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
        slotName = connection.findtext("slot").split("(")[0]
        sender.connect(connection.findtext("signal"), getattr(receiver, slotName))
    return widget


def _descendants(widget):
    for child in widget.children():
        yield child
        yield from _descendants(child)


def childWidgetVariables(widget):
    """Get child widgets as attributes of an object (attribute name = widget name)."""
    ui = type("", (), {})()
    for child in _descendants(widget):
        if child.objectName:
            setattr(ui, child.objectName, child)
    return ui


# ------------------------------------------------------------------------------------------
# Dialogs (answers scripted by the tests, every dialog recorded)
# ------------------------------------------------------------------------------------------

def _answer(kind, text):
    slicer._shim.dialogs.append((kind, text))
    if not slicer._shim.answers:
        raise AssertionError(f"unexpected {kind} dialog (no scripted answer): {text}")
    return slicer._shim.answers.pop(0)


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    return bool(_answer("confirmOkCancel", text))


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    return bool(_answer("confirmYesNo", text))


def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    slicer._shim.dialogs.append(("error", text))
    logging.error(text)


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    slicer._shim.dialogs.append(("warning", text))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    slicer._shim.dialogs.append(("info", text))


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    logging.info(message)


@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    """Show an error popup if the body raises, then re-raise (as Slicer's util does)."""
    try:
        if waitCursor:
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        yield
        if waitCursor:
            slicer.app.restoreOverrideCursor()
    except Exception as e:
        if waitCursor:
            slicer.app.restoreOverrideCursor()
        if show:
            errorDisplay(f"{message}\n\n{e}" if message is not None else str(e), detailedText=traceback.format_exc())
        raise


# ------------------------------------------------------------------------------------------
# Modules
# ------------------------------------------------------------------------------------------

def mainWindow(verbose=True):
    return None


def selectModule(module):
    moduleName = module if isinstance(module, str) else module.name
    if not slicer._shim.mainWindow:
        raise RuntimeError("Could not find moduleSelector in the main window")
    slicer._shim.selectedModule = moduleName


def getModuleWidget(module):
    moduleName = module if isinstance(module, str) else module.name
    if moduleName not in slicer._shim.moduleWidgets:
        raise RuntimeError(f"Could not find module widget representation with name '{moduleName}'")
    return slicer._shim.moduleWidgets[moduleName]


def modulePath(moduleName):
    return getattr(slicer.modules, moduleName.lower()).path


def pip_install(requirements):
    """Recorded, never executed: a test must not install packages."""
    slicer._shim.pipInstalls.append(requirements)


# ------------------------------------------------------------------------------------------
# MRML helpers
# ------------------------------------------------------------------------------------------

def getNodesByClass(className, scene=None):
    return (scene or slicer.mrmlScene)._nodesOfClass(className)


def arrayFromVolume(volumeNode):
    """Array view of the voxels in (k, j, i) order."""
    return _arrayOfImageData(volumeNode.GetImageData())


def addVolumeFromArray(narray, ijkToRAS=None, name=None, nodeClassName=None):
    if narray.dtype == np.int64:
        raise ValueError("int64 arrays are not supported by VTK image data")
    node = slicer.mrmlScene.AddNewNodeByClass(nodeClassName or "vtkMRMLScalarVolumeNode",
                                               name or slicer.mrmlScene.GenerateUniqueName("Volume"))
    if ijkToRAS is not None:
        matrix = vtk.vtkMatrix4x4()
        _numpyToMatrix(np.asarray(ijkToRAS, dtype=float), matrix)
        node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveImageData(_imageDataOfArray(narray))
    node.CreateDefaultDisplayNodes()
    return node


def loadVolume(filename, properties={}, returnNode=False):
    """Load a volume file; geometry converted from the file's LPS to Slicer's RAS."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(filename)
    except RuntimeError as exc:
        raise RuntimeError(f"Failed to load volume from {filename}: {exc}")
    flip = np.diag([-1.0, -1.0, 1.0])
    spacing = np.array(image.GetSpacing())
    directions = flip @ np.array(image.GetDirection()).reshape(3, 3)
    ijkToRas = np.eye(4)
    ijkToRas[:3, :3] = directions * spacing
    ijkToRas[:3, 3] = flip @ np.array(image.GetOrigin())
    name = properties.get("name") or os.path.basename(filename).split(".")[0]
    className = "vtkMRMLLabelMapVolumeNode" if properties.get("labelmap") else "vtkMRMLScalarVolumeNode"
    return addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRas, name, className)


def saveNode(node, filename, properties={}):
    """Write a volume (NRRD/NIfTI by extension) or a segmentation (.seg.nrrd label map with
    Slicer's per-segment header fields: SegmentN_Name, SegmentN_LabelValue, SegmentN_Tags)."""
    import SimpleITK as sitk

    if node.IsA("vtkMRMLVolumeNode"):
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(filename)
        return bool(storage.WriteData(node))
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        if node._referenceGeometry is None:
            return False
        dims, ijkToRas = node._referenceGeometry
        labels = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint8)
        reference = slicer.vtkMRMLScalarVolumeNode()
        matrix = vtk.vtkMatrix4x4()
        _numpyToMatrix(ijkToRas, matrix)
        reference.SetIJKToRASMatrix(matrix)
        meta = {}
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            if segment._labelmap is not None:
                labels[segment._labelmap > 0] = index + 1
            tags = "".join(f"{k}:{v}|" for k, v in segment._tags.items())
            meta.update({f"Segment{index}_Name": segment.GetName(), f"Segment{index}_LabelValue": str(index + 1),
                         f"Segment{index}_Tags": tags, f"Segment{index}_Color": " ".join(f"{c:g}" for c in segment.GetColor())})
        image = _lpsImageFromVolume(labels, reference)
        for key, value in meta.items():
            image.SetMetaData(key, value)
        sitk.WriteImage(image, filename, True)
        return True
    return False


def updateSegmentBinaryLabelmapFromArray(narray, segmentationNode, segmentId, referenceVolumeNode=None):
    """Set a segment's binary labelmap from a (k, j, i) array on the reference volume's grid."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise ValueError(f"segment {segmentId!r} not found")
    if referenceVolumeNode is None:
        if segmentationNode._referenceGeometry is None:
            raise ValueError("no reference geometry")
        dims, ijkToRas = segmentationNode._referenceGeometry
    else:
        dims, ijkToRas = referenceVolumeNode.GetImageData().GetDimensions(), _ijkToRasOf(referenceVolumeNode)
    if tuple(narray.shape) != (dims[2], dims[1], dims[0]):
        raise ValueError(f"array shape {narray.shape} does not match the reference volume")
    segment._labelmap = np.array(narray, copy=True)
    segment._labelmapIjkToRas = ijkToRas.copy()


def arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode=None):
    """Copy of a segment's labelmap on the reference volume's grid (the stand-in only supports
    the grid it was stored on; Slicer would resample)."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None or segment._labelmap is None:
        return None
    if referenceVolumeNode is not None and not np.allclose(_ijkToRasOf(referenceVolumeNode), segment._labelmapIjkToRas):
        raise NotImplementedError("the Slicer stand-in does not resample segments")
    return segment._labelmap.copy()


class VTKObservationMixin:
    def __init__(self):
        super().__init__()
        self.Observations = []

    def removeObservers(self, method=None):
        for obj, event, m, group, tag, priority in list(self.Observations):
            if method is None or m == method:
                obj.RemoveObserver(tag)
                self.Observations.remove([obj, event, m, group, tag, priority])

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        for o, e, m, g, t, p in self.Observations:
            if o is obj and e == event and m == method:
                return
        tag = obj.AddObserver(event, method, priority)
        self.Observations.append([obj, event, method, group, tag, priority])

    def removeObserver(self, obj, event, method):
        for o, e, m, g, t, p in list(self.Observations):
            if o is obj and e == event and m == method:
                o.RemoveObserver(t)
                self.Observations.remove([o, e, m, g, t, p])

    def hasObserver(self, obj, event, method):
        return any(o is obj and e == event and m == method for o, e, m, g, t, p in self.Observations)
