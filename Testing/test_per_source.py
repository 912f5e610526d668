"""``benchmarks/per_source.py``: source selection, the table row, and the error for a missing data folder."""

from __future__ import annotations

import pytest

from conftest import benchmark_script
from Training.real_ct import SCANS


@pytest.fixture(scope="module")
def script():
    return benchmark_script("per_source")


def test_the_real_scans_are_those_real_ct_scores(script):
    assert sorted(script.REAL_SCANS) == sorted(SCANS)


def test_sources_come_in_the_tables_order_and_unknown_ones_are_refused(script):
    assert script.parse_sources("own, sample,ircad_1.1") == ["sample", "ircad_1.1", "own"]
    with pytest.raises(ValueError, match="kits19"):
        script.parse_sources("sample,kits19")
    with pytest.raises(ValueError):
        script.parse_sources(" , ")


def test_markdown_row_formats_each_source_and_marks_the_unmeasured(script):
    results = {"sample": {"kidney_dice": 0.96981, "tumor_dice": 0.7102},
               "ircad_1.1": {"kidney_dice": 0.5791, "kidney_dice_per_side": {"right": 0.499, "left": 0.666},
                             "tumor_ml": 250.4, "cyst_ml": 13.5},
               "own": {"kidney_dice": 0.935, "tumor_dice": 0.629}}
    row = script.markdown_row("m 1.0", results)
    assert row == "| m 1.0 | 0.970 / 0.710 | 0.579 (0.50 / 0.67) / 264 mL | — | — | 0.935 / 0.629 |"


def test_a_missing_phantom_folder_names_the_command_that_builds_it(script, tmp_path, capsys):
    missing = tmp_path / "no-valgen"
    with pytest.raises(SystemExit) as exc:
        script.main(["--sources", "valgen", "--valgen", str(missing)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "validation-phantoms" in err


def test_tta_reaches_every_source_and_names_the_row(script, tmp_path, monkeypatch, capsys):
    import KidneyTumorSegLib.pipeline as pipeline
    import Training.evaluate as evaluate

    seen = {}

    class Recording(pipeline.Segmenter):
        def __init__(self, package, device="auto", tta=False):
            seen["segmenter"] = tta
            super().__init__(package, device=device, tta=tta)

    def fake_evaluate(model, data, out_csv, cases=None, device="auto", tta=False, **kw):
        seen["evaluate"] = tta
        return {"mean": {"kidney_dice": 0.5, "tumor_dice": 0.25}, "cases": [{}]}

    monkeypatch.setattr(pipeline, "Segmenter", Recording)
    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    (tmp_path / "valgen").mkdir()
    assert script.main(["--sources", "valgen", "--valgen", str(tmp_path / "valgen"), "--tta"]) == 0
    assert seen == {"segmenter": True, "evaluate": True}
    assert "+ TTA | — | — | — | 0.500 / 0.250 | — |" in capsys.readouterr().out
    seen.clear()
    assert script.main(["--sources", "valgen", "--valgen", str(tmp_path / "valgen")]) == 0
    assert seen == {"segmenter": False, "evaluate": False}
