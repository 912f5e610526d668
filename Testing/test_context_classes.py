"""Context classes (manifest ``context_classes``; recipe ``synth_context``): the networks also name the surroundings
(liver, spleen, bowel) of the synthetic anatomy; inference adds those channels to background; training labels them
from the tissue map; a network without them is grown so that it starts from exactly its old predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from KidneyTumorSegLib.manifest import StageSpec
from KidneyTumorSegLib.normalization import IntensityNormalization
from KidneyTumorSegLib.stages import fold_context
from Training.augmentation import Augmenter, context_labels
from Training.phantom_anatomy import Tissue, procedural_labels
from Training.recipes import get_recipe
from Training.synth import SynthTissue, context_tissues
from Training.trainer import context_targets, with_context_outputs

torch.set_num_threads(1)
NORM = {"kind": "window", "low": -200.0, "high": 500.0, "center": 150.0, "scale": 350.0}


def _stage_dict(context=None):
    d = {"name": "fine", "role": "segment", "classes": ["background", "kidney", "tumor"],
         "network": {"name": "vbnet", "kwargs": {"features": [4, 8, 8, 8, 8], "down_blocks": [1, 1, 1, 1],
                                                 "up_blocks": [1, 1, 1, 1], "norm": "batch"}},
         "weights": [{"file": "w.pt", "sha256": "0" * 64}], "spacing_mm": [2.0, 2.0, 2.0], "normalization": NORM,
         "patch_size": [16, 16, 16]}
    if context is not None:
        d["context_classes"] = context
    return d


def test_manifest_reads_writes_and_checks_context_classes():
    plain = StageSpec.from_dict(_stage_dict(), "stage")
    assert plain.context_classes == () and plain.num_outputs == 3
    assert "context_classes" not in plain.to_dict()  # older manifests write back unchanged
    spec = StageSpec.from_dict(_stage_dict(["liver", "bowel"]), "stage")
    assert spec.num_outputs == 5 and StageSpec.from_dict(spec.to_dict(), "stage") == spec
    for bad in (["kidney"], ["liver", "liver"], ["not a name"], "liver", [3], ["c%d" % i for i in range(9)]):
        with pytest.raises(ValueError, match="context_classes"):
            StageSpec.from_dict(_stage_dict(bad), "stage")


def test_context_probabilities_are_added_to_background():
    spec = StageSpec.from_dict(_stage_dict(["liver", "bowel"]), "stage")
    rng = np.random.default_rng(0)
    p = rng.random((5, 3, 4, 4)).astype(np.float32)
    p /= p.sum(axis=0, keepdims=True)
    expected_bg = p[0] + p[3] + p[4]
    kidney, tumor = p[1].copy(), p[2].copy()
    folded = fold_context(spec, p.copy())
    assert folded.shape == (3, 3, 4, 4)
    np.testing.assert_allclose(folded[0], expected_bg, rtol=1e-6)
    np.testing.assert_array_equal(folded[1], kidney)
    np.testing.assert_array_equal(folded[2], tumor)
    np.testing.assert_allclose(folded.sum(axis=0), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="expected 5 output channels"):
        fold_context(spec, p[:4].copy())
    plain, three = StageSpec.from_dict(_stage_dict(), "stage"), p[:3].copy()
    assert fold_context(plain, three) is three


def test_context_labels_name_only_background_voxels_of_their_tissues():
    tissues = torch.full((1, 6, 6, 6), float(Tissue.FAT))
    tissues[0, :2] = float(Tissue.LIVER)
    tissues[0, 2, :, :3] = float(Tissue.BOWEL_GAS)
    tissues[0, 2, :, 3:] = float(Tissue.BOWEL_WALL)
    tissues[0, 5] = float(SynthTissue.ORGAN_LESION)  # a liver mass stays background
    y = torch.zeros((1, 6, 6, 6), dtype=torch.uint8)
    y[0, 1, 1:3, 1:3] = 2  # a tumor drawn where the map says liver keeps its label
    ctx = [(c, torch.as_tensor(ids)) for c, ids in context_targets(["liver", "bowel"], 3)]
    before = y.clone()
    out = context_labels(tissues, y, ctx)
    assert torch.equal(y, before)  # the input is untouched
    assert (out[0, 1, 1:3, 1:3] == 2).all()
    assert int((out[0, :2] == 3).sum()) == 2 * 36 - 4  # liver, except the tumor
    assert (out[0, 2] == 4).all()  # gas and wall: bowel
    assert (out[0, 3:] == 0).all()  # fat and the liver mass
    assert context_tissues("bowel") == (int(Tissue.BOWEL_WALL), int(Tissue.BOWEL_CONTENT), int(Tissue.BOWEL_GAS))
    from KidneyTumorSegLib.errors import InputError

    with pytest.raises(InputError, match="unknown context class"):
        context_tissues("pancreas")


def test_augmenter_labels_context_before_the_spatial_transform():
    T = torch.full((1, 1, 16, 16, 16), float(Tissue.FAT))
    T[:, :, :, :, :6] = float(Tissue.LIVER)
    y = torch.zeros((1, 16, 16, 16), dtype=torch.uint8)
    norm = IntensityNormalization.from_dict(NORM)
    spec = {"synthesize": {"random_probability": 0.0, "phases": ["venous"], "texture_scale": 0.0, "bias_hu": 0.0},
            "mirror_axes": [0], "mirror_probability": 1.0}
    aug = Augmenter(spec, (2.0, 2.0, 2.0), 3, -1.0, 1, 350.0, norm, context=context_targets(["liver"], 2))
    x2, y2 = aug(T, y, torch.Generator().manual_seed(0))
    assert (y2[0, :, :, -6:] == 2).all() and (y2[0, :, :, :-6] == 0).all()  # mirrored along x with the image
    hu = x2[0, 0] * 350.0 + 150.0
    assert float(hu[y2[0] == 2].mean()) > float(hu[y2[0] == 0].mean()) + 50  # venous liver brighter than fat
    with pytest.raises(ValueError, match="synthesize"):
        Augmenter({"mirror_axes": [0]}, (2.0, 2.0, 2.0), 3, -1.0, 1, 350.0, norm, context=context_targets(["liver"], 2))


def test_a_network_grown_for_context_classes_predicts_what_it_did():
    from KidneyTumorSegLib.networks import build_network

    kwargs = {"features": [4, 8, 8, 8, 8], "down_blocks": [1, 1, 1, 1], "up_blocks": [1, 1, 1, 1], "norm": "batch"}
    torch.manual_seed(0)
    old = build_network("vbnet", in_channels=1, num_classes=4, **kwargs).eval()
    new = build_network("vbnet", in_channels=1, num_classes=7, **kwargs).eval()
    grown = with_context_outputs(old.state_dict(), new.state_dict(), 4)
    new.load_state_dict(grown)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        p_old = torch.softmax(old(x), dim=1).numpy()[0]
        p_new = torch.softmax(new(x), dim=1).numpy()[0]
    spec = StageSpec.from_dict(dict(_stage_dict(["liver", "spleen", "bowel"]),
                                    classes=["background", "kidney", "tumor", "cyst"]), "stage")
    np.testing.assert_allclose(fold_context(spec, p_new.copy()), p_old, atol=1e-5)
    assert not np.allclose(p_new[0], p_old[0], atol=1e-3)  # background's probability really was shared out


def test_synth_context_recipe_trains_exports_and_segments(tmp_path):
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.cli import main

    recipe = get_recipe("synth_context", smoke=True)
    assert all(s["manifest"]["context_classes"] == ["liver", "spleen", "bowel"] for s in recipe["stages"])
    labels_dir = tmp_path / "labels"
    for n in (1, 2):
        (labels_dir / f"case_{n:05d}").mkdir(parents=True)
        lab = procedural_labels((80, 72, 48), (4.0, 4.0, 5.0), rng=np.random.default_rng(n), tumors=1, cysts=1)
        sitk.WriteImage(lab, str(labels_dir / f"case_{n:05d}" / "segmentation.nii.gz"))
    cache = tmp_path / "cache"
    assert main(["--quiet", "synth-preprocess", "--labels", str(labels_dir), "--recipe", "synth_context", "--smoke",
                 "--out", str(cache)]) == 0
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--recipe", "synth_context", "--smoke", "--data", str(cache), "--out", str(run),
                 "--fold", "all"]) == 0
    assert main(["--quiet", "export", "--run", str(run), "--out", str(tmp_path / "pkg")]) == 0
    package = load_package(str(tmp_path / "pkg"))
    stages = {s.name: s for s in package.manifest.stages}
    assert stages["fine"].context_classes == ("liver", "spleen", "bowel") and stages["fine"].num_outputs == 7
    state = torch.load(package.weights_path(stages["fine"].weights[0].file), weights_only=True)
    assert any(v.dim() >= 1 and v.shape[0] == 7 for v in state.values())  # the network has the context outputs
    ct = sitk.GetImageFromArray(np.where(np.random.default_rng(0).random((24, 32, 32)) < 0.3, -1000, 40).astype(np.int16))
    ct.SetSpacing((4.0, 4.0, 5.0))
    result = Segmenter(package, device="cpu").segment(ct)
    values = set(np.unique(sitk.GetArrayFromImage(result.labels)).tolist())
    assert result.labels.GetSize() == ct.GetSize() and values <= {0, 1, 2, 3}  # context never reaches the labels
    assert json.loads((run / "run.json").read_text())["recipe"] == "synth_context"
