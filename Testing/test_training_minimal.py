"""The minimal trainer that made the bundled default model still runs end to end."""

import json

import SimpleITK as sitk
import torch

from KidneyTumorSegLib.models import load_package
from KidneyTumorSegLib.pipeline import Segmenter
from Training.minimal import default_manifest, main
from Training.phantoms import procedural_phantom


def test_minimal_trainer_exports_a_loadable_package(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "pkg"
    assert main(["--out", str(out), "--cases", "2", "--iterations", "2", "--coarse-iterations", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["package"] == str(out)
    package = load_package(str(out))  # checksums verified
    assert package.manifest.provenance["iterations"] == {"coarse": 1, "fine": 2}
    assert [s.name for s in package.manifest.stages] == [s["name"] for s in default_manifest()["stages"]]
    ct, _ = procedural_phantom((64, 64, 40), (4.0, 4.0, 5.0), seed=3)
    result = Segmenter(package, device="cpu").segment(ct)
    assert result.labels.GetSize() == ct.GetSize() and result.labels.GetPixelID() == sitk.sitkUInt8
