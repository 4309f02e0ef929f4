"""Spec files (zoos, sweeps) as a path or a built-in name: one loader, the same errors for both kinds."""
from __future__ import annotations

import pytest

from layerlab.errors import LayerlabError, SpecError
from layerlab.specfiles import read_spec
from layerlab.sweep import load_sweep
from layerlab.train import load_zoo


def test_builtin_names_resolve_and_unknown_names_list_the_builtins():
    p, doc = read_spec("dynamics", "zoo", "zoos")
    assert p.name == "dynamics.yaml" and set(doc["models"]) == {"resnet-sgd", "resnet-adam", "vit-sgd", "vit-adam"}
    with pytest.raises(SpecError, match=r"no zoo file 'dynamcs' .*built-in zoos: demo, dynamics"):
        load_zoo("dynamcs")
    with pytest.raises(SpecError, match=r"no sweep file 'dem' .*built-in sweeps: demo"):
        load_sweep("dem")


@pytest.mark.parametrize("loader, kind", [(load_zoo, "zoo"), (load_sweep, "sweep")])
def test_missing_invalid_and_non_mapping_files(tmp_path, loader, kind):
    with pytest.raises(LayerlabError, match=f"{kind} file .*missing.yaml' does not exist"):
        loader(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(SpecError, match=f"{kind} file .*bad.yaml is not valid YAML"):
        loader(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=f"{kind} file .*list.yaml must be a YAML mapping with .*got list"):
        loader(listed)
