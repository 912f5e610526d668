"""Writes the library's bundled sample: one procedural phantom CT and its truth label map.

    python -m Training.sample KidneyTumorSegLib/data

The sample is used by ``kidney-tumor-seg demo`` and by the end-to-end test; its seed is
outside the range the minimal trainer uses, so the default model never saw it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

from .phantoms import procedural_phantom

SAMPLE_SEED = 987660
SAMPLE_SIZE = (128, 128, 64)
SAMPLE_SPACING = (3.0, 3.0, 4.0)


def write_sample(folder: Path) -> tuple[Path, Path]:
    """Write ``sample_ct.nii.gz`` (int16 HU) and ``sample_labels.nii.gz`` (uint8) into ``folder``."""
    ct, labels = procedural_phantom(SAMPLE_SIZE, SAMPLE_SPACING, seed=SAMPLE_SEED, kidneys="both", tumors=1, cysts=1)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, labels_path = folder / "sample_ct.nii.gz", folder / "sample_labels.nii.gz"
    sitk.WriteImage(ct, str(ct_path), useCompression=True)
    sitk.WriteImage(labels, str(labels_path), useCompression=True)
    return ct_path, labels_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Training.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    for path in write_sample(Path(args.folder)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
