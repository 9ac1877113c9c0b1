"""The core (``libnet_plugin`` outside ``experiments/``) imports only torch, numpy, pluggy, safetensors and tqdm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from libnet_plugin.cli import EXPERIMENTS_EXTRA

#: top-level modules of the [experiments] extra (and the adapters' heavy dependencies)
FORBIDDEN = (*EXPERIMENTS_EXTRA.values(), "captum", "onnx", "onnxruntime")

_SCRIPT = r"""
import importlib, json, pkgutil, sys
import libnet_plugin as lnp
core = []
todo = [(lnp.__path__, "libnet_plugin.")]
while todo:  # like pkgutil.walk_packages, without importing the experiments package to look inside it
    path, prefix = todo.pop()
    for m in pkgutil.iter_modules(path, prefix):
        if m.name == "libnet_plugin.experiments":
            continue
        core.append(m.name)
        module = importlib.import_module(m.name)
        if m.ispkg:
            todo.append((module.__path__, m.name + "."))
from libnet_plugin.builtins import DETECTORS
pm = lnp.get_plugin_manager(autoload=False)
for n in DETECTORS:  # every detector of the registry
    pm.hook.libnet_consistency_detector(name=n, settings={})
print(json.dumps({"core": core, "modules": sorted(sys.modules)}))
"""


def test_the_core_imports_none_of_the_experiments_dependencies():
    env = {**os.environ, "LIBNET_PLUGIN_NO_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, check=True).stdout
    seen = json.loads(out)
    assert "libnet_plugin.network" in seen["core"]
    loaded = {m.split(".")[0] for m in seen["modules"]}
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    assert not [m for m in seen["modules"] if m.startswith("libnet_plugin.experiments")]
    assert {"torch", "numpy", "pluggy"} <= loaded
