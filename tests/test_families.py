"""The family registry: the zoo, the manifest and the pipeline loader read one table."""

import pytest

from teacache_models import models
from teacache_models.families import FAMILIES, family, pipeline_classes, transformer_class
from teacache_models.weights import load_manifest
from teacache_models.zoo import list_zoo, load_zoo_entry


def test_every_family_names_its_transformer_and_pipelines():
    classes = pipeline_classes()
    for name, entry in FAMILIES.items():
        model_class = transformer_class(name)
        assert model_class is getattr(models, entry.transformer) and model_class.__name__ in models.__all__
        own = [cls for cls in classes.values() if cls.family == name]
        assert len(own) == len(entry.pipelines)
        assert all(issubclass(cls.transformer_class, model_class) for cls in own)
    assert {cls.family for cls in classes.values()} <= set(FAMILIES)


def test_zoo_and_manifest_entries_belong_to_registered_families():
    manifest = load_manifest()
    for name in list_zoo():
        entry = load_zoo_entry(name)
        assert entry.transformer == FAMILIES[entry.family].transformer
        assert manifest[entry.manifest].transformer_class == entry.transformer
    assert {entry.family for entry in manifest.values()} <= set(FAMILIES)


def test_an_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match=r"family 'flux3' is not one of \['flux', 'wan'"):
        family("flux3")


def test_no_family_pipeline_imports_another_family_file():
    """Shared pipeline helpers live in pipelines/shared.py; a family's file imports only shared modules and the
    files of its own family (files registered for exactly the same families)."""
    import ast
    from pathlib import Path

    import teacache_models.pipelines as pipelines

    folder = Path(pipelines.__file__).parent
    families_of: dict[str, set[str]] = {}
    for entry in FAMILIES.values():
        for path in entry.pipelines:
            families_of.setdefault(path.split(":")[0], set()).add(entry.name)
    for module, families in families_of.items():
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
        other_families = {m for m, owners in families_of.items() if owners != families}
        assert not imported & other_families, f"pipelines/{module}.py imports {imported & other_families}"
