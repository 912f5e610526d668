"""``benchmarks/region_margin_sensitivity.py``: the manifest it varies, and the package on disk left alone."""

from __future__ import annotations

from conftest import benchmark_script
from KidneyTumorSegLib.manifest import ModelManifest
from KidneyTumorSegLib.models import load_package, sha256_file


def test_with_margin_moves_only_the_refinement_regions():
    package = load_package(None)
    manifest_file = package.root / "manifest.json"
    before = sha256_file(manifest_file)
    varied = benchmark_script("region_margin_sensitivity").with_margin(package.manifest, 7.5)
    for old, new in zip(package.manifest.stages, varied.stages):
        if old.role == "localize":
            assert new == old  # the localisation stage runs on the whole volume: nothing to move
        else:
            assert old.region.kind == "components" and new.region.margin_mm == 7.5
            assert new.region.margin_mm != old.region.margin_mm
            assert new.region.max_size_mm == old.region.max_size_mm and new.weights == old.weights
    # still a valid manifest, and the package itself is unchanged
    again = ModelManifest.from_dict(varied.to_dict())
    assert [s.region.margin_mm for s in again.stages] == [s.region.margin_mm for s in varied.stages]
    assert sha256_file(manifest_file) == before
