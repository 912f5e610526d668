"""Every recipe builds: networks from their manifest entries, losses, augmentation, a valid model manifest."""

from __future__ import annotations

import pytest
import torch

from KidneyTumorSegLib.manifest import ModelManifest
from KidneyTumorSegLib.models import _check_patch_fits
from KidneyTumorSegLib.networks import build_network, count_parameters
from KidneyTumorSegLib.normalization import IntensityNormalization
from Training.augmentation import Augmenter
from Training.losses import CompositeLoss
from Training.recipes import SEED_RECIPES, apply_overrides, get_recipe, manifest_dict, names, resolve

torch.set_num_threads(1)

#: a KiTS19-like fingerprint (median spacing (x, y, z) mm, foreground HU statistics)
FINGERPRINT = {"median_spacing": [0.78, 0.78, 3.0], "has_cyst": True,
               "foreground_intensity": {"percentile_00_5": -60.0, "percentile_99_5": 290.0, "mean": 110.0, "std": 60.0}}


def _manifest(resolved):
    weights = {s["name"]: [{"file": f"{s['name']}.pt", "sha256": "0" * 64}] for s in resolved["stages"]}
    return ModelManifest.from_dict(manifest_dict(resolved, weights))


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("name", names())
def test_recipe_builds_networks_losses_and_a_valid_manifest(name, smoke):
    resolved = resolve(get_recipe(name, smoke=smoke), FINGERPRINT)
    manifest = _manifest(resolved)
    for stage in resolved["stages"]:
        # test-time mirroring only along the axes the network was trained mirrored on
        aug = stage["phases"][-1]["training"].get("augmentation") or {}
        trained = set(aug.get("mirror_axes", [])) if aug.get("mirror_probability", 0.5) > 0 else set()
        assert set(manifest.stage(stage["name"]).tta_mirror_axes) == trained
        for phase in stage["phases"]:
            m, t = phase["manifest"], phase["training"]
            spec = manifest.stage(m["name"])
            with torch.device("meta"):  # full-size networks without allocating their weights
                net = build_network(m["network"]["name"], in_channels=manifest.network_in_channels(spec),
                                    num_classes=len(m["classes"]), **m["network"]["kwargs"])
            _check_patch_fits(net, spec, "recipe")  # inference patch fits the network's down-sampling
            dims = getattr(net, "spatial_dims", 3)
            train_patch = tuple(reversed(t["patch_size"]))[-dims:]
            assert all(p % q == 0 for p, q in zip(train_patch, net.min_input_multiple[-dims:]))
            loss = CompositeLoss(t["loss"]["terms"], m["classes"], t["loss"].get("outputs"))
            logits = torch.randn(2, len(m["classes"]), *([4] * dims))
            target = torch.randint(0, len(m["classes"]), (2,) + (4,) * dims)
            outputs = [logits] * {"single": 1, "sum": 2, "deep_supervision": 4}[t["loss"]["outputs"]["kind"]]
            assert torch.isfinite(loss(outputs if len(outputs) > 1 else logits, target, epoch=3))
            norm = IntensityNormalization.from_dict(m["normalization"])
            k = int((m.get("inputs") or {}).get("slices_as_channels") or 1)  # as the trainer builds it
            Augmenter(t.get("augmentation") or {}, [s or 1.0 for s in m["spacing_mm"]], dims, -1.0, k, norm.scale, norm)
    if name == "daza_deeplab":
        with torch.device("meta"):
            net = build_network("deeplabv3plus3d", in_channels=1, num_classes=3)
        assert count_parameters(net) < 560_000  # the paper's "fewer than 560k parameters"


def test_seed_recipes_carry_the_papers_numbers():
    liu = resolve(get_recipe("liu_c2f"), FINGERPRINT)
    coarse, fine = (s["phases"][0] for s in liu["stages"])
    assert coarse["manifest"]["spacing_mm"] == [1.62, 1.62, 3.21] and coarse["manifest"]["patch_size"] == [160, 160, 80]
    assert fine["manifest"]["spacing_mm"] == [0.78, 0.78, 3.0] and fine["manifest"]["patch_size"] == [144, 144, 48]
    assert fine["manifest"]["region"]["margin_mm"] == 20.0
    assert fine["training"]["optimizer"] == {"name": "adam", "lr": 3e-4, "weight_decay": 1e-5, "betas": [0.9, 0.999], "eps": 1e-8}
    assert fine["training"]["scheduler"]["factor"] == 0.2 and fine["training"]["scheduler"]["patience"] == 30
    assert fine["training"]["epochs"] == 700 and fine["training"]["batch_size"] == 2
    assert liu["postprocessing"]["max_kidney_components"] == 2

    rv = resolve(get_recipe("resunet_vnet25d"), FINGERPRINT)
    kidney, tumor = (s["phases"][0] for s in rv["stages"])
    assert kidney["manifest"]["spacing_mm"] == [1.56, 1.56, 2.0]  # 2x the median in-plane spacing: ~256^2 slices
    assert kidney["manifest"]["patch_size"][2] == 64 and kidney["manifest"]["overlap"] == 0.5  # stride 32
    assert kidney["training"]["loss"]["outputs"] == {"kind": "deep_supervision", "initial": 0.33, "factor": 0.8, "every_epochs": 15}
    assert tumor["manifest"]["spacing_mm"] == [None, None, 1.0] and tumor["manifest"]["inputs"]["mask_labels"]

    vb = resolve(get_recipe("vbnet_multires"), FINGERPRINT)
    assert [s["phases"][0]["manifest"]["spacing_mm"] for s in vb["stages"]] == [[6.0] * 3, [1.0] * 3]
    assert vb["stages"][1]["phases"][0]["manifest"]["classes"] == ["background", "kidney", "tumor", "cyst"]
    no_cyst = resolve(get_recipe("vbnet_multires"), dict(FINGERPRINT, has_cyst=False))
    assert no_cyst["stages"][1]["phases"][0]["manifest"]["classes"] == ["background", "kidney", "tumor"]

    tp = resolve(get_recipe("two_phase_vnet"), FINGERPRINT)
    roi = tp["stages"][1]["phases"][0]
    assert roi["manifest"]["patch_size"] == [384, 240, 80]
    assert roi["manifest"]["region"]["size_mm"] == pytest.approx([384 * 0.78, 240 * 0.78, 240.0])
    assert roi["training"]["keep_top_k"] == 5 and roi["training"]["scheduler"] == {"name": "step", "step_epochs": 200, "gamma": 0.5}
    assert tp["postprocessing"]["cyst_intensity_rule"] is True

    dz = resolve(get_recipe("deeplab3d"), FINGERPRINT)  # the name for it
    pre, tune = dz["stages"][0]["phases"]
    assert pre["manifest"]["spacing_mm"] == [0.78, 0.78, 3.0] and pre["training"]["patch_size"] == [48, 48, 48]
    assert tune["manifest"]["patch_size"] == [44, 44, 44]
    assert pre["manifest"]["normalization"] == {"kind": "ct_zscore", "low": -60.0, "high": 290.0, "center": 110.0, "scale": 60.0}
    assert pre["training"]["loss"]["terms"][1] == {"name": "focal", "gamma": 2.0, "weight": 0.5}
    assert set(SEED_RECIPES) <= set(names())


def test_overrides_and_missing_fingerprint_are_reported():
    from KidneyTumorSegLib.errors import InputError

    r = apply_overrides(get_recipe("vbnet_multires"), ["fine.manifest.spacing_mm=[2,2,2]", "coarse.training.epochs=5"])
    resolved = resolve(r, FINGERPRINT)
    assert resolved["stages"][1]["phases"][0]["manifest"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert resolved["stages"][0]["phases"][0]["epochs"] == 5 and resolved["overrides"]
    with pytest.raises(InputError):
        apply_overrides(get_recipe("vbnet_multires"), ["nostage.training.epochs=5"])
    # Daza's two phases replaced by one (a CPU-sized comparison leaves the fine-tuning phase out)
    one = resolve(apply_overrides(get_recipe("daza_deeplab"), ["segment.phases=[]", "segment.training.epochs=7"]), FINGERPRINT)
    assert [p["epochs"] for p in one["stages"][0]["phases"]] == [7]
    assert one["stages"][0]["phases"][0]["manifest"]["patch_size"] == [48, 48, 48]
    two = resolve(apply_overrides(get_recipe("daza_deeplab"), ['segment.phases=[{"epochs": 3}, {"epochs": 2}]']), FINGERPRINT)
    assert [p["epochs"] for p in two["stages"][0]["phases"]] == [3, 2]
    with pytest.raises(InputError, match="phases"):
        apply_overrides(get_recipe("daza_deeplab"), ['segment.phases={"epochs": 3}'])
    with pytest.raises(InputError):
        get_recipe("no_such_recipe")
    with pytest.raises(ValueError, match="fingerprint"):
        resolve(get_recipe("daza_deeplab"), None)
