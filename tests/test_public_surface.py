"""What the README and the API reference name is importable from ``libnet_plugin``, with one version source."""

from __future__ import annotations

import ast
import pathlib
import re

import libnet_plugin as lnp
from libnet_plugin._version import __version__

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_public_names_are_importable_from_the_package():
    for name in ("ModelChangedError", "DistributedFitError", "GuardOutput", "MultiInput", "ConsistencyDetector",
                 "LibraryNetwork", "SaveIntegrityError", "ShapeMismatchError"):
        assert name in lnp.__all__ and getattr(lnp, name) is not None, name
    from libnet_plugin._batches import MultiInput
    from libnet_plugin.consistency_detector import GuardOutput, ModelChangedError
    from libnet_plugin.distributed import DistributedFitError

    assert lnp.MultiInput is MultiInput and lnp.GuardOutput is GuardOutput  # the private paths keep working
    assert lnp.ModelChangedError is ModelChangedError and lnp.DistributedFitError is DistributedFitError
    assert issubclass(lnp.ModelChangedError, lnp.LibnetError) and issubclass(lnp.DistributedFitError, lnp.LibnetError)


def test_one_version_source():
    assert lnp.__version__ == __version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, flags=re.M)
    assert 'version = { attr = "libnet_plugin._version.__version__" }' in pyproject
    assert not re.search(r'^version = "', pyproject, flags=re.M), "pyproject must not repeat the version"
    assert f'version: "{__version__}"' in (ROOT / "CITATION.cff").read_text()


def test_the_adapters_import_no_private_module_of_the_core():
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("libnet_plugin"):
                assert not any(part.startswith("_") for part in node.module.split(".")), (path.name, node.module)


def test_the_api_reference_documents_every_public_name():
    api = (ROOT / "docs" / "api" / "index.md").read_text()
    documented = set(re.findall(r"^::: libnet_plugin\.(\w+)$", api, flags=re.M))
    assert set(lnp.__all__) - {"__version__"} <= documented, sorted(set(lnp.__all__) - documented)
    from libnet_plugin.builtins import DETECTORS

    detectors = (ROOT / "docs" / "api" / "detectors.md").read_text()
    for cls in DETECTORS.values():
        assert f"::: {cls.__module__}.{cls.__name__}\n" in detectors, cls.__name__
    testing = (ROOT / "docs" / "api" / "testing.md").read_text()
    assert "::: libnet_plugin.testing" in testing


def test_the_api_reference_documents_the_adapters_public_names():
    for package, page in (("libnet_captum", "captum.md"), ("libnet_onnx", "onnx.md")):
        tree = ast.parse((ROOT / "adapters" / package / "__init__.py").read_text(encoding="utf-8"))
        names = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                     and any(getattr(t, "id", None) == "__all__" for t in n.targets))
        text = (ROOT / "docs" / "api" / page).read_text()
        documented = set(re.findall(rf"^::: {package}\.\w+\.(\w+)$", text, flags=re.M))
        assert set(names) <= documented, (package, sorted(set(names) - documented))
