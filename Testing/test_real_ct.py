"""The shipped default model on real CT (``Training/real_ct.py``): floors that turn CI red when a model change makes
it worse on patients. The scans live in ``../shared/data/real_ct`` (evaluation only; never in the repository)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import shared_path
from KidneyTumorSegLib.models import load_package
from KidneyTumorSegLib.pipeline import Segmenter
from Training.real_ct import check_scan

torch.set_num_threads(1)
REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct"

# Regression floors of the shipped model, a little below what it measures (kidney-vbnet-phantom 0.4.0 with the
# plausibility rules, 2026-12-02, `python benchmarks/real_ct_check.py`): IRCAD 1.1 kidney Dice 0.579 with 264 mL of
# false lesion (the patient has none), example_ct_sm 0.399 with 176 mL. 0.3.0 measured 0.360 / 283 mL and 0.526 /
# 147 mL: 0.4.0's added domain-randomised localisation network finds the right kidney of the contrast-enhanced scan
# that 0.3.0 missed, and does worse on the unenhanced one (outside the model's contrast-enhanced domain; both models
# label most of it lesion). Far from what a clinical tool needs (issue 13 asks for >= 0.90 and <= 5 mL); the floors
# only stop a change from making the shipped model worse on patients.
FLOORS = {"ircad_1.1": {"kidney_dice": 0.55, "max_lesion_ml": 290.0},
          "example_ct_sm": {"kidney_dice": 0.37, "max_lesion_ml": 195.0}}
# Of the false lesion volume, at least this share must come with the "unsure" note (the manifest's
# ``lesion_confidence_note_below``, 0.75): measured 2026-12-04, all of it on both scans (IRCAD 1.1: 184 mL at a
# mean lesion probability of 0.65 and 80 mL at 0.68; example_ct_sm: 176 mL at 0.72).
MIN_UNSURE_SHARE = 0.5


@pytest.fixture(scope="module")
def segmenter():
    shared_path("data", "real_ct")  # skips only without ../shared
    return Segmenter(load_package(None), device="cpu")


@pytest.mark.parametrize("scan", sorted(FLOORS))
def test_default_model_on_real_ct(segmenter, scan):
    row = check_scan(scan, REAL_CT, segmenter)
    floor = FLOORS[scan]
    assert row["kidney_dice"] >= floor["kidney_dice"], row
    assert row["tumor_ml"] + row["cyst_ml"] <= floor["max_lesion_ml"], row
    below = segmenter.manifest.postprocessing.lesion_confidence_note_below
    lesion_ml = sum(item["volume_ml"] for item in row["lesions"])
    unsure_ml = sum(item["volume_ml"] for item in row["lesions"] if item["confidence"] < below)
    assert unsure_ml >= MIN_UNSURE_SHARE * lesion_ml, row["lesions"]
    assert sum("the model is unsure of the" in note for note in row["notes"]) == sum(
        item["confidence"] < below for item in row["lesions"]), row["notes"]
