"""Label map -> Slicer segments, on exactly the input volume's grid.

The library writes a uint8 label map on the input's grid (same size, spacing, origin and
direction). Here it is checked against the volume node's own geometry (converted from
Slicer's RAS to ITK's LPS), then each label becomes a segment through the Segmentations module logic's
``ImportLabelmapToSegmentationNode`` (what ``slicer.util.updateSegmentBinaryLabelmapFromArray``
does, called on the logic class itself so that it also works in plain Python with slicer-core,
where there is no ``slicer.modules``) with a label map on the input volume's grid, so the
segments share the input's voxels exactly (what DICOM SEG export and the Segment Editor
expect). The reverse (:func:`labelsFromSegments`) exports the segments, edited or not, onto
the volume's grid for measuring.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
import vtk

import slicer

from .terminology import ALL_SEGMENTS, SegmentSpec

logger = logging.getLogger(__name__)

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


class GeometryMismatchError(RuntimeError):
    """The label map is not on the input volume's grid."""


def volumeGeometryLPS(volumeNode) -> Tuple[Tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """(size (i, j, k), spacing (3,), origin LPS (3,), direction LPS 3x3 with axis directions
    as columns) of a scalar volume node, in ITK conventions."""
    size = tuple(int(d) for d in volumeNode.GetImageData().GetDimensions())
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    spacing = np.linalg.norm(ijkToRas[:3, :3], axis=0)
    directionRas = ijkToRas[:3, :3] / spacing
    return size, spacing, _LPS_FROM_RAS @ ijkToRas[:3, 3], _LPS_FROM_RAS @ directionRas


def checkSameGrid(labelImage, volumeNode, originToleranceMm: float = 1e-3) -> None:
    """Raise :class:`GeometryMismatchError` unless the SimpleITK ``labelImage`` lies on the
    volume node's voxel grid (NIfTI stores geometry in float32, hence the small tolerances)."""
    size, spacing, origin, direction = volumeGeometryLPS(volumeNode)
    labelSize = tuple(int(s) for s in labelImage.GetSize())
    if labelSize != size:
        raise GeometryMismatchError(f"the label map has size {labelSize} but the input volume has {size}")
    labelSpacing = np.array(labelImage.GetSpacing())
    labelOrigin = np.array(labelImage.GetOrigin())
    labelDirection = np.array(labelImage.GetDirection()).reshape(3, 3)
    tolerance = originToleranceMm + 1e-6 * float(np.abs(origin).max())
    if not np.allclose(labelSpacing, spacing, rtol=1e-5, atol=1e-6):
        raise GeometryMismatchError(f"label map spacing {tuple(labelSpacing)} differs from the input's {tuple(spacing)}")
    if not np.allclose(labelOrigin, origin, rtol=0.0, atol=tolerance):
        raise GeometryMismatchError(f"label map origin {tuple(labelOrigin)} differs from the input's {tuple(origin)} (LPS mm)")
    if not np.allclose(labelDirection, direction, rtol=0.0, atol=1e-4):
        raise GeometryMismatchError("the label map's axis directions differ from the input's")


def _segmentationsLogic():
    """The Segmentations module logic: Slicer's instance when there is one, else the class
    (the import/export functions used here are static)."""
    modules = getattr(slicer, "modules", None)
    module = getattr(modules, "segmentations", None) if modules is not None else None
    return module.logic() if module is not None else slicer.vtkSlicerSegmentationsModuleLogic


def _labelmapOnGrid(volumeNode, array=None):
    """A hidden temporary label map volume on ``volumeNode``'s grid (remove it after use)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__KidneyTumorSeg_temp__")
    node.SetHideFromEditors(True)
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    if array is not None:
        slicer.util.updateVolumeFromArray(node, array)
    return node


def _removeNode(node) -> None:
    displayNode = node.GetDisplayNode()
    if displayNode is not None:
        slicer.mrmlScene.RemoveNode(displayNode)
    slicer.mrmlScene.RemoveNode(node)


def segmentMask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """A segment as a uint8 0/1 array (k, j, i) on ``volumeNode``'s grid (resampled when the
    segmentation has another geometry)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    labelmap = _labelmapOnGrid(volumeNode)
    try:
        if not _segmentationsLogic().ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap, volumeNode):
            raise RuntimeError(f"could not export segment {segmentId}")
        imageData = labelmap.GetImageData()
        dims = volumeNode.GetImageData().GetDimensions()
        if imageData is None or imageData.GetPointData().GetScalars() is None:
            return np.zeros((dims[2], dims[1], dims[0]), np.uint8)
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        _removeNode(labelmap)


def labelsFromSegments(segmentationNode, volumeNode) -> np.ndarray:
    """The Kidney, Tumor and Cyst segments as one library label map (uint8, k, j, i, on
    ``volumeNode``'s grid): 1 kidney, 2 tumor, 3 cyst; where segments overlap, a lesion wins
    over kidney and tumor over cyst. Missing segments are empty."""
    dims = volumeNode.GetImageData().GetDimensions()
    labels = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    segmentation = segmentationNode.GetSegmentation()
    for spec in (ALL_SEGMENTS[0], ALL_SEGMENTS[2], ALL_SEGMENTS[1]):  # kidney, cyst, then tumor on top
        segmentId = segmentation.GetSegmentIdBySegmentName(spec.name)
        if segmentId:
            labels[segmentMask(segmentationNode, segmentId, volumeNode) > 0] = spec.label
    return labels


def labelImageLPS(labels: np.ndarray, volumeNode):
    """A SimpleITK image of ``labels`` (k, j, i) with ``volumeNode``'s geometry in LPS."""
    import SimpleITK as sitk

    _, spacing, origin, direction = volumeGeometryLPS(volumeNode)
    image = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def existingResultSegments(segmentationNode) -> List[str]:
    """Names of segments in ``segmentationNode`` that a new result would replace."""
    if segmentationNode is None:
        return []
    segmentation = segmentationNode.GetSegmentation()
    return [spec.name for spec in ALL_SEGMENTS if segmentation.GetSegmentIdBySegmentName(spec.name)]


def _setTerminology(segment, spec: SegmentSpec) -> None:
    segment.SetTag(segment.GetTerminologyEntryTagName(), spec.terminology)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)


def importLabels(labels: np.ndarray, volumeNode, segmentationNode,
                 plan: Dict[SegmentSpec, Sequence[int]]) -> List[str]:
    """Replace the result segments of ``segmentationNode`` by the labels in ``labels``.

    ``labels``: uint8 array in (k, j, i) order (as ``sitk.GetArrayFromImage`` and
    ``slicer.util.arrayFromVolume`` return it) on ``volumeNode``'s grid. ``plan`` maps each
    segment to the label values it takes (see ``terminology.segmentPlan``). Segments named like
    ours are replaced; the user's other segments are kept. Returns the new segment IDs. On any
    failure the segments added so far are removed again (no partial result).
    """
    dims = volumeNode.GetImageData().GetDimensions()
    if labels.shape != (dims[2], dims[1], dims[0]):
        raise GeometryMismatchError(f"label array shape {labels.shape} does not match the volume (k, j, i) = "
                                    f"{(dims[2], dims[1], dims[0])}")
    segmentation = segmentationNode.GetSegmentation()
    if hasattr(segmentationNode, "SetSourceRepresentationToBinaryLabelmap"):
        segmentationNode.SetSourceRepresentationToBinaryLabelmap()
    else:  # Slicer < 5.4
        segmentationNode.SetMasterRepresentationToBinaryLabelmap()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentationNode.SetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())

    for spec in ALL_SEGMENTS:
        oldId = segmentation.GetSegmentIdBySegmentName(spec.name)
        if oldId:
            segmentation.RemoveSegment(oldId)

    added: List[str] = []
    labelmap = _labelmapOnGrid(volumeNode)
    try:
        for spec, values in plan.items():
            segmentId = segmentation.AddEmptySegment("", spec.name)
            added.append(segmentId)
            segment = segmentation.GetSegment(segmentId)
            segment.SetColor(*spec.color)
            _setTerminology(segment, spec)
            mask = np.isin(labels, np.asarray(values, dtype=labels.dtype)).astype(np.uint8)
            slicer.util.updateVolumeFromArray(labelmap, mask)
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not _segmentationsLogic().ImportLabelmapToSegmentationNode(labelmap, segmentationNode, ids):
                raise RuntimeError(f"importing the {spec.name} label map into the segmentation failed")
    except Exception:
        for segmentId in added:
            segmentation.RemoveSegment(segmentId)
        raise
    finally:
        _removeNode(labelmap)
    return added


def placeNextToVolume(segmentationNode, volumeNode) -> None:
    """Put the segmentation in the volume's subject hierarchy folder/study (DICOM SEG export
    needs it in the same study) and under the volume's parent transform."""
    segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    if shNode is None:
        return
    volumeItem = shNode.GetItemByDataNode(volumeNode)
    if not volumeItem:
        return
    parentItem = shNode.GetItemParent(volumeItem)
    segmentationItem = shNode.GetItemByDataNode(segmentationNode)
    if not segmentationItem:
        # Slicer's subject hierarchy plugin logic (Qt) creates items for new nodes; without
        # it (plain Python, batch mode) the item is created here.
        shNode.CreateItem(parentItem, segmentationNode)
    else:
        shNode.SetItemParent(segmentationItem, parentItem)
