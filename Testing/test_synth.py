"""Domain-randomised synthesis (Training/synth.py): tissue maps that keep the real label geometry, intensities drawn
per patch from the phase priors or at random, the ``synthesize`` augmentation, and a synthesis cache trained and
exported end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from KidneyTumorSegLib.labels import CYST, KIDNEY, TUMOR
from KidneyTumorSegLib.normalization import IntensityNormalization
from Training.augmentation import Augmenter
from Training.phantom_anatomy import Grid, Tissue, procedural_labels
from Training.recipes import get_recipe, resolve
from Training.runs import stage_manifests
from Training.synth import (NUM_TISSUES, PHASES, SynthTissue, TissueSynthesizer, case_frame, synth_stage_volumes,
                            tissue_map)

torch.set_num_threads(1)
KIDNEY_PARTS = (SynthTissue.CORTEX, SynthTissue.MEDULLA, SynthTissue.SINUS_FAT, SynthTissue.COLLECTING,
                SynthTissue.RENAL_VESSEL)
TUMOR_PARTS = (SynthTissue.TUMOR, SynthTissue.TUMOR_B, SynthTissue.NECROSIS, SynthTissue.CALCIFICATION)
WINDOW = (-200.0, 500.0, 150.0, 350.0)


def _labels(seed=3, direction=None):
    return procedural_labels((80, 72, 48), (4.0, 4.0, 5.0), rng=np.random.default_rng(seed), tumors=1, cysts=1,
                             direction=direction)


def test_tissue_map_keeps_every_label_in_its_own_tissues():
    img = _labels()
    lab = sitk.GetArrayFromImage(img)
    grid = Grid.of(img)
    T = tissue_map(lab, grid, case_frame(img), np.random.default_rng(0))
    assert T.shape == lab.shape and T.dtype == np.int8 and T.min() >= 0 and T.max() < NUM_TISSUES
    assert np.isin(T[lab == KIDNEY], KIDNEY_PARTS).all()
    assert np.isin(T[lab == TUMOR], TUMOR_PARTS).all()
    assert (T[lab == CYST] == SynthTissue.CYST).all()
    outside = T[lab == 0]
    assert not np.isin(outside, KIDNEY_PARTS + TUMOR_PARTS + (SynthTissue.CYST,)).any()
    # the kidney's outer shell is cortex and the body around it is there: fat, muscle, bone, organs
    assert (T[lab == KIDNEY] == SynthTissue.CORTEX).mean() > 0.3
    assert {Tissue.FAT, Tissue.MUSCLE, Tissue.CORTICAL_BONE} <= set(np.unique(outside).tolist())


def test_stage_volumes_follow_the_truth_on_a_permuted_grid():
    # KiTS-style storage: slice axis first, permuted direction; the stage grid is canonical (LPS-aligned)
    direction = (0, 0, 1, 0, 1, 0, -1, 0, 0)
    img = procedural_labels((48, 72, 80), (5.0, 4.0, 4.0), rng=np.random.default_rng(3), tumors=1, direction=direction)
    manifests = {m["name"]: m for m in stage_manifests(resolve(get_recipe("synth_default"), {"has_cyst": True}))}
    frame = case_frame(img)
    fine = synth_stage_volumes(manifests["fine"], img, frame, np.random.default_rng(1))
    assert 1 <= len(fine) <= 2
    total_kidney = 0
    for tissues, target in fine:
        assert tissues.shape == (1,) + target.shape and tissues.dtype == np.int8
        assert np.isin(tissues[0][target == 1], KIDNEY_PARTS).all()  # kidney class <- kidney tissues
        assert np.isin(tissues[0][target == 2], TUMOR_PARTS).all()
        total_kidney += int((target > 0).sum()) * 8  # 2 mm voxels
    truth_mm3 = float((sitk.GetArrayViewFromImage(img) > 0).sum()) * 5 * 4 * 4
    assert total_kidney == pytest.approx(truth_mm3, rel=0.15)
    (coarse, target), = synth_stage_volumes(manifests["coarse"], img, frame, np.random.default_rng(1))
    # the whole image at 6 mm on the canonical (z, y, x) axes: z from index axis 0 (48 x 5 mm), y from axis 1
    # (72 x 4 mm), x from axis 2 (80 x 4 mm = 320 mm -> ceil(53.3))
    assert target.shape == (40, 48, 54)
    # left kidney (LPS +x) lies at larger x index than the right one in the canonical array
    xs = np.nonzero(target)[2]
    assert xs.max() - xs.min() > 20


def test_synthesizer_is_reproducible_and_draws_phase_priors():
    T = torch.full((1, 1, 8, 8, 8), float(SynthTissue.CORTEX))
    T[..., :4] = float(Tissue.AIR)
    syn = TissueSynthesizer({"random_probability": 0.0, "phases": ["unenhanced"], "texture_scale": 0.0, "bias_hu": 0.0},
                            WINDOW)
    a = syn(T, torch.Generator().manual_seed(5))
    b = syn(T, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    hu = a * WINDOW[3] + WINDOW[2]
    lo, hi = PHASES["unenhanced"]["cortex"]
    assert lo - 1e-3 <= float(hu[..., 4:].mean()) <= hi + 1e-3 and float(hu[..., 4:].std()) < 1e-3
    assert torch.allclose(hu[..., :4], torch.tensor(-200.0))  # air, clipped to the window
    arterial = TissueSynthesizer({"random_probability": 0.0, "phases": ["arterial"], "texture_scale": 0.0, "bias_hu": 0.0},
                                 WINDOW)
    cortex = [float(arterial(T, torch.Generator().manual_seed(s))[..., 4:].mean()) * WINDOW[3] + WINDOW[2] for s in range(20)]
    assert min(cortex) >= PHASES["arterial"]["cortex"][0] - 1e-3 and max(cortex) > PHASES["unenhanced"]["cortex"][1] + 50


def test_random_contrast_varies_tissues_but_keeps_air_dark():
    T = torch.zeros((1, 1, 4, 4, 8))
    T[..., 4:] = float(Tissue.LIVER)
    syn = TissueSynthesizer({"random_probability": 1.0, "texture_scale": 0.0, "bias_hu": 0.0}, WINDOW)
    liver = []
    for s in range(30):
        out = syn(T, torch.Generator().manual_seed(s)) * WINDOW[3] + WINDOW[2]
        assert torch.allclose(out[..., :4], torch.tensor(-200.0))
        liver.append(float(out[..., 4:].mean()))
    assert min(liver) < 0 and max(liver) > 300  # spans the random range [-150, 450] HU
    with pytest.raises(ValueError, match="unknown synthesize key"):
        TissueSynthesizer({"contrast": 1}, WINDOW)
    with pytest.raises(ValueError, match="phases"):
        TissueSynthesizer({"phases": ["late"]}, WINDOW)


def test_augmenter_synthesizes_before_the_spatial_transform_and_keeps_labels_aligned():
    T = torch.full((2, 1, 16, 16, 16), float(Tissue.FAT))
    T[:, :, 4:12, 4:12, 4:12] = float(SynthTissue.CORTEX)
    T[:, :, 0] = -1.0  # the sampler's padding: air
    y = (T[:, 0] == float(SynthTissue.CORTEX)).to(torch.uint8)
    norm = IntensityNormalization.from_dict({"kind": "window", "low": -200.0, "high": 500.0, "center": 150.0, "scale": 350.0})
    spec = {"synthesize": {"random_probability": 0.0, "phases": ["venous"], "texture_scale": 0.0, "bias_hu": 0.0},
            "rotation_deg": [0, 0, 90], "rotation_probability": 1.0}
    aug = Augmenter(spec, (2.0, 2.0, 2.0), 3, -1.0, 1, 350.0, norm)
    x2, y2 = aug(T, y, torch.Generator().manual_seed(0))
    assert torch.equal(T[:, 0] == float(SynthTissue.CORTEX), y.bool())  # inputs untouched
    hu = x2[:, 0] * 350.0 + 150.0
    inside, outside = hu[y2.bool()], hu[~y2.bool() & (hu > -150)]
    assert float(inside.min()) > float(outside.max())  # venous cortex brighter than fat, where the labels went
    with pytest.raises(ValueError, match="normalization"):
        Augmenter(spec, (2.0, 2.0, 2.0), 3, -1.0, 1, 350.0, None)


def test_synthesis_cache_trains_and_exports_a_loadable_model(tmp_path):
    from KidneyTumorSegLib.models import load_package
    from KidneyTumorSegLib.pipeline import Segmenter
    from Training.cli import main

    labels_dir = tmp_path / "labels"
    for n in (1, 2):
        (labels_dir / f"case_{n:05d}").mkdir(parents=True)
        sitk.WriteImage(_labels(seed=n), str(labels_dir / f"case_{n:05d}" / "segmentation.nii.gz"))
    cache = tmp_path / "cache"
    assert main(["--quiet", "synth-preprocess", "--labels", str(labels_dir), "--recipe", "synth_default", "--smoke",
                 "--out", str(cache), "--variants", "2"]) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["synthetic"]["variants"] == 2 and meta["cases"] == [1, 2]
    run = tmp_path / "run"
    assert main(["--quiet", "train", "--recipe", "synth_default", "--smoke", "--data", str(cache), "--out", str(run),
                 "--fold", "all"]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["phantoms"] is True and record["synthetic"]["kind"] == "synthseg_tissue_maps"
    assert main(["--quiet", "export", "--run", str(run), "--out", str(tmp_path / "pkg")]) == 0
    package = load_package(str(tmp_path / "pkg"))
    # CT-like (air and tissue): Segmenter.segment validates its input and refuses a constant image
    ct = sitk.GetImageFromArray(np.where(np.random.default_rng(0).random((24, 32, 32)) < 0.3, -1000, 40).astype(np.int16))
    ct.SetSpacing((4.0, 4.0, 5.0))
    result = Segmenter(package, device="cpu").segment(ct)
    assert result.labels.GetSize() == ct.GetSize()


def test_lesions_are_kept_visible_against_the_parenchyma():
    syn = TissueSynthesizer({"random_probability": 0.5, "lesion_contrast_hu": 25.0}, WINDOW)
    plain = TissueSynthesizer({"random_probability": 0.5}, WINDOW)
    closest, closest_plain = [], []
    for s in range(200):
        for tab, out in ((syn, closest), (plain, closest_plain)):
            mu, _ = tab.means(torch.Generator().manual_seed(s))
            k = mu[[SynthTissue.CORTEX, SynthTissue.MEDULLA]]
            for t in (SynthTissue.TUMOR, SynthTissue.TUMOR_B, SynthTissue.CYST):
                out.append(float((mu[t] - k).abs().min()))
    assert min(closest) >= 25.0 - 1e-3
    assert min(closest_plain) < 25.0  # without the rule some lesions are nearly iso-dense
    # a lesion between a bright cortex and a dark medulla stays where it is when it is far enough from both
    mu = torch.zeros(NUM_TISSUES)
    mu[SynthTissue.CORTEX], mu[SynthTissue.MEDULLA] = 250.0, 80.0
    mu[SynthTissue.TUMOR], mu[SynthTissue.TUMOR_B], mu[SynthTissue.CYST] = 160.0, 235.0, 90.0
    moved = syn._visible_lesions(mu)
    assert moved[SynthTissue.TUMOR] == 160.0  # between, 90 and 80 HU away: kept
    assert moved[SynthTissue.TUMOR_B] == 225.0 and moved[SynthTissue.CYST] == 105.0  # nearest admissible values
    # a smaller distance from the medulla alone: a lesion may share the medulla's density, never the cortex's
    loose = TissueSynthesizer({"lesion_contrast_hu": 25.0, "medulla_contrast_hu": 0.0}, WINDOW)
    moved = loose._visible_lesions(mu)
    assert moved[SynthTissue.CYST] == 90.0 and moved[SynthTissue.TUMOR_B] == 225.0
    mu2 = mu.clone()
    mu2[SynthTissue.TUMOR] = 80.0  # iso-dense with the medulla
    assert loose._visible_lesions(mu2)[SynthTissue.TUMOR] == 80.0 and syn._visible_lesions(mu2)[SynthTissue.TUMOR] != 80.0
    with pytest.raises(ValueError, match="medulla_contrast_hu"):
        TissueSynthesizer({"lesion_contrast_hu": 25.0, "medulla_contrast_hu": 40.0}, WINDOW)


def test_an_iso_enhancing_tumor_part_is_drawn_at_the_cortex_density_when_asked():
    from Training.synth import ISO_PART_HU

    base = {"random_probability": 0.5, "lesion_contrast_hu": 25.0}
    off, half = TissueSynthesizer(base, WINDOW), TissueSynthesizer(dict(base, iso_part_probability=0.5), WINDOW)
    iso = 0
    for s in range(200):
        mu_off, _ = off.means(torch.Generator().manual_seed(s))
        mu, _ = half.means(torch.Generator().manual_seed(s))
        # the option changes the second tumor part only, and only by moving it to the cortex
        rest = [t for t in range(NUM_TISSUES) if t != SynthTissue.TUMOR_B]
        assert torch.equal(mu[rest], mu_off[rest])
        if float(mu[SynthTissue.TUMOR_B]) != float(mu_off[SynthTissue.TUMOR_B]):
            iso += 1
            assert abs(float(mu[SynthTissue.TUMOR_B] - mu[SynthTissue.CORTEX])) <= ISO_PART_HU + 1e-4
        # the first part keeps its distance from both parenchymas
        k = mu[[SynthTissue.CORTEX, SynthTissue.MEDULLA]]
        assert float((mu[SynthTissue.TUMOR] - k).abs().min()) >= 25.0 - 1e-3
    assert 70 <= iso <= 130
    with pytest.raises(ValueError, match="iso_part_probability"):
        TissueSynthesizer(dict(base, iso_part_probability=1.5), WINDOW)


def test_validation_only_datasets_are_refused_for_training(tmp_path):
    from KidneyTumorSegLib.errors import InputError
    from Training.dataset import VALIDATION_ONLY_MARKER
    from Training.preprocess import Cache, init_cache
    from Training.synth import preprocess_synth

    (tmp_path / "case_00001").mkdir()
    sitk.WriteImage(_labels(seed=1), str(tmp_path / "case_00001" / "segmentation.nii.gz"))
    (tmp_path / VALIDATION_ONLY_MARKER).write_text('{"never_train": true}')
    manifests = stage_manifests(resolve(get_recipe("synth_default", smoke=True), {"has_cyst": True}))
    with pytest.raises(InputError, match="validation-only"):
        preprocess_synth(tmp_path / "cache", manifests, tmp_path, None)
    with pytest.raises(InputError, match="validation-only"):
        init_cache(Cache(tmp_path / "cache2"), tmp_path, None)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache2").exists()


def test_fov_cut_makes_a_scan_end_inside_the_patch():
    x = torch.zeros((8, 1, 10, 6, 6))
    y = torch.ones((8, 10, 6, 6), dtype=torch.uint8)
    aug = Augmenter({"fov_cut": {"probability": 1.0, "max_fraction": 0.5, "axes": [2]}}, (2.0, 2.0, 2.0), 3, -1.0)
    x2, y2 = aug(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.zeros_like(x)) and bool((y == 1).all())  # inputs untouched
    for i in range(8):
        cut = (x2[i, 0] == -1.0).all(dim=(1, 2))  # along z only: whole slices
        assert torch.equal(cut, (y2[i] == 0).all(dim=(1, 2)))  # labels cut with the image
        n = int(cut.sum())
        assert 1 <= n <= 5 and (bool(cut[:n].all()) or bool(cut[-n:].all()))  # one slab at one end
        assert not bool((x2[i, 0] == -1.0).any(dim=(1, 2))[~cut].any())
    off = Augmenter({"fov_cut": {"probability": 0.0}}, (2.0, 2.0, 2.0), 3, -1.0)
    x3, y3 = off(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(x3, x) and torch.equal(y3, y)
    # a short scan: only a slab of 2-3 slices (0.2-0.3 of 10) stays, somewhere inside the patch
    slab = Augmenter({"fov_cut": {"probability": 1.0, "axes": [2], "slab_probability": 1.0, "slab_fraction": [0.2, 0.3]}},
                     (2.0, 2.0, 2.0), 3, -1.0)
    x4, y4 = slab(x, y, torch.Generator().manual_seed(1))
    starts = set()
    for i in range(8):
        kept = ~(x4[i, 0] == -1.0).all(dim=(1, 2))
        assert torch.equal(kept, (y4[i] == 1).all(dim=(1, 2)))
        idx = torch.nonzero(kept).flatten()
        assert 2 <= len(idx) <= 3 and int(idx[-1] - idx[0]) == len(idx) - 1  # one contiguous slab
        starts.add(int(idx[0]))
    assert len(starts) > 1 and any(0 < s_ < 7 for s_ in starts)  # placed at random, not only at the ends


class _FixedSampler:
    def __init__(self, value):
        self.value = value

    def batch(self, epoch, iteration, rank=0):
        return np.full((2, 1, 4, 4, 4), self.value, np.float32), np.zeros((2, 4, 4, 4), np.uint8)


def test_mixed_batches_come_from_the_second_source_at_its_fraction_reproducibly():
    from Training.sampling import BatchDataset

    keys = [(e, i) for e in range(4) for i in range(100)]
    data = BatchDataset(_FixedSampler(0.0), keys, mix=_FixedSampler(1.0), mix_fraction=0.3, seed=5)
    items = [data[i] for i in range(len(data))]
    sources = np.array([s for _, _, _, s in items])
    # the batch's content is the chosen sampler's, and the reported source says which
    assert all(float(x[0, 0, 0, 0, 0]) == s for x, _, _, s in items)
    assert 0.25 < sources.mean() < 0.35
    again = BatchDataset(_FixedSampler(0.0), keys, mix=_FixedSampler(1.0), mix_fraction=0.3, seed=5)
    assert [again.source_of(*k) for k in keys] == list(sources)
    alone = BatchDataset(_FixedSampler(0.0), keys)
    assert {alone[i][3] for i in range(20)} == {0}
    with pytest.raises(ValueError, match="fraction"):
        BatchDataset(_FixedSampler(0.0), keys, mix=_FixedSampler(1.0), mix_fraction=1.0)


def test_synth_mixed_trains_on_both_sources_and_needs_the_second(tmp_path, monkeypatch):
    from KidneyTumorSegLib.errors import InputError
    from Training.cli import main
    from Training.runs import train_run
    from Training.sampling import PatchSampler

    labels_dir = tmp_path / "labels"
    for n in (1, 2):
        (labels_dir / f"case_{n:05d}").mkdir(parents=True)
        sitk.WriteImage(_labels(seed=n), str(labels_dir / f"case_{n:05d}" / "segmentation.nii.gz"))
    synth, phantoms, rendered = tmp_path / "synth", tmp_path / "phantoms", tmp_path / "rendered"
    assert main(["--quiet", "synth-preprocess", "--labels", str(labels_dir), "--recipe", "synth_mixed", "--smoke",
                 "--out", str(synth)]) == 0
    assert main(["--quiet", "phantoms", "--labels", str(labels_dir), "--out", str(phantoms)]) == 0
    assert main(["--quiet", "preprocess", "--data", str(phantoms), "--recipe", "synth_mixed", "--smoke",
                 "--out", str(rendered)]) == 0
    with pytest.raises(InputError, match="--mix-data"):
        train_run("synth_mixed", synth, tmp_path / "no-mix", fold=None, smoke=True, device="cpu")
    with pytest.raises(InputError, match="synthesis cache"):
        train_run("synth_mixed", synth, tmp_path / "synth-mix", fold=None, smoke=True, device="cpu", mix_data=synth)
    with pytest.raises(InputError, match="no stage"):
        train_run("synth_default", synth, tmp_path / "unused", fold=None, smoke=True, device="cpu", mix_data=rendered)

    drawn = []
    original = PatchSampler.batch

    def recording(self, epoch, iteration, rank=0):
        drawn.append(self.folder.parent.resolve())
        return original(self, epoch, iteration, rank)

    monkeypatch.setattr(PatchSampler, "batch", recording)
    run = tmp_path / "run"
    train_run("synth_mixed", synth, run, fold=None, smoke=True, device="cpu", mix_data=rendered,
              overrides=["coarse.training.iterations_per_epoch=6", "fine.training.iterations_per_epoch=6"])
    record = json.loads((run / "run.json").read_text())
    assert record["mix"]["cache"] == str(rendered.resolve()) and record["mix"]["train_cases"] == [1, 2]
    assert record["mix"]["stages"] == ["coarse", "fine"]
    assert record["mix"]["phantoms"] is True and record["phantoms"] is True  # rendered phantoms: still no patient
    assert drawn.count(rendered.resolve()) > 0 and drawn.count(synth.resolve()) > 0
    assert len(drawn) == 2 * 2 * 6
    with pytest.raises(InputError, match="resumed run keeps"):
        train_run(None, None, run, resume=True, device="cpu", mix_data=rendered)


def test_medullary_pyramids_are_cones_from_the_sinus():
    from Training.synth import _pyramids

    grid = Grid((41, 41, 41), (1.0, 1.0, 1.0), (-20.0, -20.0, -20.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    x, y, z = grid.axis_coords()
    cones = _pyramids(x, y, z, (0.0, 0.0, 0.0), (10.0, 10.0, 10.0), np.zeros(grid.shape, np.float32),
                      np.random.default_rng(0))
    assert 0.15 < cones.mean() < 0.9  # several cones, not the whole kidney
    # a cone holds whole rays: a voxel inside keeps its twice-as-far twin inside (directions only decide)
    zz, yy, xx = np.nonzero(cones[10:31, 10:31, 10:31])
    zz, yy, xx = zz + 10, yy + 10, xx + 10
    far = cones[2 * zz - 20, 2 * yy - 20, 2 * xx - 20]
    assert far.mean() > 0.97


def test_organ_lesions_stay_in_their_organ_and_some_touch_the_kidney():
    from Training.phantom_anatomy import frame_from_grid
    from Training.synth import _organ_lesions

    grid = Grid((40, 40, 30), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    base = np.full(grid.shape, Tissue.FAT, np.int8)
    base[:, :, :20] = Tissue.LIVER
    base[:, :4] = Tissue.CORTICAL_BONE
    fg = np.zeros(grid.shape, bool)
    fg[10:20, 15:25, 21:30] = True  # a "kidney" 2 mm from the liver's edge
    painted, touching = 0, 0
    for seed in range(12):
        T = base.copy()
        _organ_lesions(T, fg, grid, frame_from_grid(grid), np.random.default_rng(seed))
        lesion = np.isin(T, (SynthTissue.ORGAN_LESION, SynthTissue.ORGAN_CYST))
        if not lesion.any():
            continue
        painted += 1
        assert np.isin(base[lesion], (Tissue.LIVER, Tissue.FAT)).all()  # never bone
        assert (base[lesion] == Tissue.LIVER).mean() > 0.5
        touching += bool(lesion[10:20, 15:25, 16:20].any())  # in the liver right beside the kidney
    assert 3 <= painted < 12  # in some maps only
    assert touching >= 1  # the case that matters: a liver mass against the kidney


def test_a_pelvis_lies_below_the_kidneys_with_muscle_inside_its_wings():
    from Training.phantom_anatomy import BodyFrame
    from Training.synth import _pelvis

    # a tall grid: body around a spine only (no labels needed), kidneys' level at z = 0
    grid = Grid((90, 70, 80), (4.0, 4.0, 4.0), (-180.0, -140.0, -280.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    frame = BodyFrame(0.0, 0.0, 0.0, 1.0)
    x, y, z = (c.ravel() for c in grid.axis_coords())
    T = np.full(grid.shape, Tissue.FAT, np.int8)
    T[:, (np.abs(y) < 16)[:, None] & (np.abs(x) < 20)[None]] = Tissue.BONE  # vertebral bodies on the midline
    before = T.copy()
    _pelvis(T, grid, frame, np.random.default_rng(0))
    changed = (T != before).any(axis=(1, 2))
    assert changed.any() and z[changed].max() <= -80.0  # nothing at or above the crest (80-130 mm below the kidneys)
    lateral = np.abs(x)[None, None, :] > 40.0
    wing = np.isin(T, (Tissue.BONE, Tissue.CORTICAL_BONE)) & lateral
    assert wing.any(axis=(1, 2))[changed].mean() > 0.9  # bone beside the spine at the pelvic levels
    # muscle on both faces of each wing: the iliacus inside, the gluteal muscles outside, left and right
    k = int(np.flatnonzero(changed)[len(np.flatnonzero(changed)) // 2])
    for side in (1, -1):
        row = T[k][:, (side * x > 40.0)]
        assert (row == Tissue.MUSCLE).sum() > 20 and (row == Tissue.CORTICAL_BONE).sum() > 5
    # bone stays bone (the sacrum paints bone over the lumbar spine)
    assert (T[before == Tissue.BONE] != Tissue.FAT).all()


def test_a_stomach_lies_left_and_anterior_and_a_gallbladder_under_the_liver():
    from Training.phantom_anatomy import BodyFrame
    from Training.synth import _stomach_and_gallbladder

    grid = Grid((100, 90, 80), (4.0, 4.0, 4.0), (-200.0, -180.0, -160.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    x, y, z = (c.ravel() for c in grid.axis_coords())
    gallbladders = 0
    for seed in range(6):
        T = np.full(grid.shape, Tissue.FAT, np.int8)
        T[:, :, x < -60] = Tissue.LIVER
        _stomach_and_gallbladder(T, grid, BodyFrame(0.0, 0.0, 0.0, 1.0), np.random.default_rng(seed))
        sac = np.isin(T, (Tissue.BOWEL_WALL, Tissue.BOWEL_CONTENT, Tissue.BOWEL_GAS))
        k, j, i = np.nonzero(sac)
        # patient left (LPS +x), anterior (-y), not below the kidneys, a fluid-filled sac inside a wall
        assert x[i].mean() > 15 and y[j].mean() < -20 and np.median(z[k]) > -30
        assert 80 <= sac.sum() * 64 / 1000 <= 1500
        assert (T == Tissue.BOWEL_CONTENT).sum() > (T == Tissue.BOWEL_WALL).sum() / 4
        assert not (sac & (x < -60)[None, None]).any()  # the liver stays liver
        gb = T == SynthTissue.ORGAN_CYST
        if gb.any():
            gallbladders += 1
            k, j, i = np.nonzero(gb)
            assert x[i].mean() < -20 and y[j].mean() < 0  # right, anterior
    assert 2 <= gallbladders <= 5  # in some maps only (70 %)


def test_parallel_synthesis_writes_the_same_cache_as_one_process(tmp_path, monkeypatch):
    """``synth-preprocess --workers 2`` gives byte-identical volumes and the same index as one process (every case's
    bodies are seeded by case, variant and stage, not by the order cases finish in); a rerun keeps what is there."""
    import concurrent.futures

    from Training.cli import main

    pools = []

    class CountedPool(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountedPool)
    labels_dir = tmp_path / "labels"
    for n in (1, 2, 3):
        (labels_dir / f"case_{n:05d}").mkdir(parents=True)
        sitk.WriteImage(_labels(seed=n), str(labels_dir / f"case_{n:05d}" / "segmentation.nii.gz"))
    caches = {}
    for workers in (0, 2):
        cache = tmp_path / f"cache{workers}"
        assert main(["--quiet", "synth-preprocess", "--labels", str(labels_dir), "--recipe", "synth_default", "--smoke",
                     "--out", str(cache), "--variants", "1", "--workers", str(workers)]) == 0
        caches[workers] = cache
    assert pools == [2]  # one process pool, for the run with workers
    files = {w: sorted(p.relative_to(c) for p in c.rglob("*") if p.is_file()) for w, c in caches.items()}
    assert files[0] == files[2] and len([f for f in files[0] if f.name.endswith("_image.npy")]) >= 3
    for rel in files[0]:
        a, b = (caches[w] / rel for w in (0, 2))
        if rel.suffix == ".json":
            assert json.loads(a.read_text()) == json.loads(b.read_text()), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel
    before = {rel: (caches[2] / rel).stat().st_mtime_ns for rel in files[2] if rel.suffix == ".npy"}
    assert main(["--quiet", "synth-preprocess", "--labels", str(labels_dir), "--recipe", "synth_default", "--smoke",
                 "--out", str(caches[2]), "--variants", "1", "--workers", "2"]) == 0
    assert {rel: (caches[2] / rel).stat().st_mtime_ns for rel in before} == before


def test_synthesis_workers_must_be_a_count(tmp_path):
    from Training.synth import preprocess_synth

    manifests = stage_manifests(resolve(get_recipe("synth_default", smoke=True), {"has_cyst": True}))
    with pytest.raises(Exception, match="--workers must be an integer >= 0, got -1"):
        preprocess_synth(tmp_path / "cache", manifests, tmp_path, None, workers=-1)
