"""Helpers of the KidneyTumorSeg Slicer module.

``process``, ``terminology`` and ``results`` are plain Python (no Slicer imports) and are
unit-tested outside Slicer; ``segments``, ``logic`` and ``batch`` use Slicer's API.
"""
