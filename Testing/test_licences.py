"""The licence a package's weights carry comes from the data they were trained on (Training/licences.py)."""

import json

from Training.licences import UNSPECIFIED, combined_licence, dataset_licence, spdx_id


def test_licence_texts_become_spdx_ids():
    assert spdx_id("CC BY-NC-SA 4.0 (derived from the KiTS19 label maps, Heller et al.)") == "CC-BY-NC-SA-4.0"
    assert spdx_id("Attribution-NonCommercial-ShareAlike 4.0 International\n") == "CC-BY-NC-SA-4.0"
    assert spdx_id("Attribution-NonCommercial-NoDerivatives 4.0 International") == "CC-BY-NC-ND-4.0"
    assert spdx_id("CC BY 4.0") == "CC-BY-4.0"
    assert spdx_id("Apache License, Version 2.0") == "Apache-2.0"
    assert spdx_id("  our hospital's terms ") == "our hospital's terms"


def test_dataset_licence_reads_the_record_then_the_licence_file(tmp_path):
    assert dataset_licence(tmp_path) is None and dataset_licence(None) is None
    (tmp_path / "LICENSE").write_text("\n\nAttribution-NonCommercial-ShareAlike 4.0 International\n\n=====\n")
    assert dataset_licence(tmp_path) == "CC-BY-NC-SA-4.0"
    (tmp_path / "phantoms.json").write_text(json.dumps({"licence": "CC BY 4.0 (ours)"}))
    assert dataset_licence(tmp_path) == "CC-BY-4.0"


def test_real_kits_label_folders_record_their_licence(shared_dir):
    for name in ("kits19_labels", "kits23_labels"):
        assert dataset_licence(shared_dir / "data" / name) == "CC-BY-NC-SA-4.0"


def test_combined_licence_keeps_every_term_and_never_guesses():
    assert combined_licence(["CC-BY-NC-SA-4.0", "CC BY-NC-SA 4.0 (x)"]) == "CC-BY-NC-SA-4.0"
    assert combined_licence(["Apache-2.0", "CC-BY-NC-SA-4.0"]) == "Apache-2.0 AND CC-BY-NC-SA-4.0"
    assert combined_licence(["Apache-2.0 AND CC-BY-NC-SA-4.0", "CC-BY-4.0"]) == "Apache-2.0 AND CC-BY-NC-SA-4.0 AND CC-BY-4.0"
    assert combined_licence(["CC-BY-NC-SA-4.0", None]) == UNSPECIFIED
    assert combined_licence([]) == UNSPECIFIED


def test_the_bundled_model_carries_the_kits_licence():
    from KidneyTumorSegLib.models import load_package

    assert load_package(None).manifest.licence == "CC-BY-NC-SA-4.0"
