"""The ``libnet`` command line: what ``--version`` / ``--help`` import, and the experiments extra's one list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from libnet_plugin.cli import COMMANDS, EXPERIMENTS_EXTRA, _named_command, build_parser

_SCRIPT = r"""
import json, sys
from libnet_plugin.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["reproduce", "--help"]])
def test_version_and_help_import_none_of_the_experiments(argv):
    env = {**os.environ, "LIBNET_PLUGIN_NO_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, *argv], capture_output=True, text=True, env=env,
                         check=True).stdout
    modules = json.loads(out.strip().splitlines()[-1])
    assert "libnet_plugin.cli" in modules
    assert not [m for m in modules if m.startswith("libnet_plugin.experiments")]
    assert not {m.split(".")[0] for m in modules} & set(EXPERIMENTS_EXTRA.values())


def test_experiments_extra_is_pyprojects():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["experiments"]
    names = {req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip().lower()
             for req in extra}
    assert names == set(EXPERIMENTS_EXTRA)


def test_only_the_named_command_gets_its_options():
    assert _named_command(["reproduce", "mnist", "--quick"]) == ("reproduce", "mnist")
    assert _named_command(["--help"]) == ()
    parser = build_parser(["evaluate-detectors", "--quick"])
    args = parser.parse_args(["evaluate-detectors", "--quick"])
    assert args.quick is True and callable(args._run)
    assert {path[0] for path, *_ in COMMANDS} == {"reproduce", "evaluate-detectors", "inspect"}
