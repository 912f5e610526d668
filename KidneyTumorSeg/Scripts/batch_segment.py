"""Segment kidneys, tumors and cysts in every CT of a folder, with 3D Slicer's KidneyTumorSeg module.

Usage (Linux/macOS; on Windows use Slicer.exe):

    Slicer --no-splash --no-main-window --python-script /path/to/KidneyTumorSeg/Scripts/batch_segment.py \
        --input /data/cts --output /data/results [--model NAME_OR_FOLDER] [--device auto|cpu|cuda|mps] \
        [--tta] [--no-cyst-segment] [--force] [--dicom-seg]

or, without Slicer, with plain Python and ``pip install slicer-core`` (plus the library's
torch, numpy, SimpleITK): ``python batch_segment.py --input ... --output ...`` (same files;
DICOM folders need Slicer).

Inputs: NIfTI / NRRD / MetaImage files in --input, and sub-folders holding a DICOM series.
Outputs: <case>.seg.nrrd per case (Kidney / Tumor / Cyst segments on the CT's grid, with
terminology) and measurements.csv (volumes, tumor count and largest diameter, run time,
status); with --dicom-seg also <case>.dcm, a DICOM SEG, for each DICOM series folder (written by
KidneyTumorSegLib, as ``kidney-tumor-seg segment FOLDER -o case.dcm``). Exit code: 0 when every case succeeded, 1 when any failed, 2 for bad arguments.
"""

import os
import sys

# The module folder (parent of Scripts/) holds KidneyTumorSegHelpers; Slicer has it on
# sys.path only when the module is loaded, which --no-main-window does not guarantee.
_moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _moduleDir not in sys.path:
    sys.path.insert(0, _moduleDir)

from KidneyTumorSegHelpers import batch  # noqa: E402

sys.exit(batch.main(sys.argv[1:]))
