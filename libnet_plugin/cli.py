"""The ``libnet`` command line.

Sub-commands live in their own modules, each with ``add_arguments(parser)`` and ``run(args) -> int``;
adapters add theirs through the ``libnet_plugin.cli`` entry-point group (a callable
``register(subparsers)``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from ._version import __version__

#: (command path, module, help) of the built-in sub-commands.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("reproduce", "mnist"), "libnet_plugin.experiments.mnist", "reproduce the paper's MNIST experiments"),
    (("reproduce", "cifar10"), "libnet_plugin.experiments.cifar10", "reproduce the paper's CIFAR-10 ResNet44 experiments"),
    (("evaluate-detectors",), "libnet_plugin.experiments.evaluate_detectors", "compare every registered detector on MNIST"),
    (("inspect",), "libnet_plugin.experiments.inspect_model",
     "explain your own model: an HTML report of how its layers reach the decision"),
]
CLI_ENTRY_POINT_GROUP = "libnet_plugin.cli"
#: Top-level modules of the ``[experiments]`` extra: a command that needs a missing one is left out.
EXPERIMENTS_EXTRA = frozenset({"matplotlib", "mlxtend", "sklearn", "advertorch"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libnet", description="Library networks: per-layer explanations and "
                                     "a consistency detector for trained classifiers.")
    parser.add_argument("--version", action="version", version=f"libnet-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name or (exc.name or "").split(".")[0] in EXPERIMENTS_EXTRA:
                continue  # that command is not part of this installation (pip install 'libnet-plugin[experiments]')
            raise
        if len(path) == 1:
            p = sub.add_parser(path[0], help=help_text, description=help_text)
        else:
            if path[0] not in groups:
                gp = sub.add_parser(path[0], help=f"{path[0]} an experiment of the paper")
                groups[path[0]] = gp.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
            p = groups[path[0]].add_parser(path[1], help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    from importlib.metadata import entry_points

    for ep in entry_points(group=CLI_ENTRY_POINT_GROUP):
        try:
            ep.load()(sub)
        except ImportError as exc:
            warnings.warn(f"libnet CLI plugin {ep.name!r} is skipped: {exc}", RuntimeWarning, stacklevel=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``libnet`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
