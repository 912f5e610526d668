"""Writes the library's bundled sample: one KiTS19-label phantom CT and its truth label map.

    python -m Training.sample --labels ../shared/data/kits19_labels KidneyTumorSegLib/data

The sample is case 148 of the phantom dataset the default model was validated on (built exactly as
``python -m Training phantoms --cases 148 --downsample-inplane 4 --max-slices 96 --cysts`` builds it):
a synthetic CT on the real shape of KiTS19 case 148's kidneys and tumor. Case 148 is outside the
training cases (0-129); it was picked as the smallest validation phantom (by file size) whose tumor is
at least 20 mL. Its shapes come from a KiTS19 label map, so it carries the KiTS19 attribution and
licence (CC BY-NC-SA 4.0; Heller et al., arXiv:1904.00445), written next to it as ``README.md``.
Used by ``kidney-tumor-seg demo``, the Slicer module's self-test and the end-to-end test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from KidneyTumorSegLib.imageio import write_image_atomic

from .dataset import LABELS_NAME, list_cases, read_labels
from .phantom_dataset import make_phantom

SAMPLE_CASE = 148
#: the options of the validation phantom dataset (Training/README.md)
SAMPLE_OPTIONS = {"seed": 0, "downsample_inplane": 4.0, "max_slices": 96, "cysts": True}

ATTRIBUTION = """# The bundled sample

`sample_ct.nii.gz` (int16 HU) and `sample_labels.nii.gz` (uint8: 1 kidney, 2 tumor, 3 cyst) are a
**synthetic** contrast-enhanced CT and its truth, made by `python -m Training.sample` from the KiTS19
label map of case {case:05d} (`python -m Training phantoms --cases {case} --downsample-inplane 4
--max-slices 96 --cysts`): the kidney and tumor shapes and the CT grid are KiTS19's (in-plane
downsampled 4x), every intensity is synthetic. It is not a patient image.

Attribution and licence: the shapes derive from the KiTS19 challenge data, N. Heller et al., "The KiTS19
Challenge Data: 300 Kidney Tumor Cases with Clinical Context, CT Semantic Segmentations, and Surgical
Outcomes", arXiv:1904.00445 (2019), https://kits19.grand-challenge.org, licensed CC BY-NC-SA 4.0
(https://creativecommons.org/licenses/by-nc-sa/4.0/). These two files are shared under the same
licence: attribution, non-commercial use, share-alike.
"""


def write_sample(labels_dir: Path, folder: Path, case: int = SAMPLE_CASE, overwrite: bool = True) -> tuple[Path, Path]:
    """Write ``sample_ct.nii.gz``, ``sample_labels.nii.gz`` and ``README.md`` (attribution) into ``folder``
    from KiTS19 case ``case`` in ``labels_dir``; returns the two image paths."""
    (source,) = list_cases(Path(labels_dir), [case], need_labels=True, image_name=LABELS_NAME)
    ct, labels = make_phantom(read_labels(source), case, **SAMPLE_OPTIONS)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ct_path, labels_path = folder / "sample_ct.nii.gz", folder / "sample_labels.nii.gz"
    write_image_atomic(ct, ct_path, overwrite=overwrite)
    write_image_atomic(labels, labels_path, overwrite=overwrite)
    (folder / "README.md").write_text(ATTRIBUTION.format(case=case))
    return ct_path, labels_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m Training.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, help="folder of KiTS19 case_XXXXX/segmentation.nii.gz")
    parser.add_argument("--case", type=int, default=SAMPLE_CASE)
    parser.add_argument("folder")
    args = parser.parse_args(argv)
    for path in write_sample(Path(args.labels), Path(args.folder), args.case):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
