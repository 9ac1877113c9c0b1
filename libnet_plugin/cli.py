"""The ``libnet`` command line.

Sub-commands live in their own modules, each with ``add_arguments(parser)`` and ``run(args) -> int``;
adapters add theirs through the ``libnet_plugin.cli`` entry-point group (a callable
``register(subparsers)``). A sub-command's module is imported only when that sub-command is named, so
``libnet --version`` and ``libnet --help`` import none of the experiments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence

from ._version import __version__

#: (command path, module, help, needs the ``[experiments]`` extra) of the built-in sub-commands.
COMMANDS: list[tuple[tuple[str, ...], str, str, bool]] = [
    (("reproduce", "mnist"), "libnet_plugin.experiments.mnist", "reproduce the paper's MNIST experiments", True),
    (("reproduce", "cifar10"), "libnet_plugin.experiments.cifar10",
     "reproduce the paper's CIFAR-10 ResNet44 experiments", True),
    (("evaluate-detectors",), "libnet_plugin.experiments.evaluate_detectors",
     "compare every registered detector on MNIST", True),
    (("inspect",), "libnet_plugin.experiments.inspect_model",
     "explain your own model: an HTML report of how its layers reach the decision", False),
]
CLI_ENTRY_POINT_GROUP = "libnet_plugin.cli"
#: The ``[experiments]`` extra of pyproject.toml: ``{distribution: top-level module}``. The one list of the
#: experiments' dependencies in the code (tests/test_cli.py checks it against pyproject.toml); a command
#: that needs a missing one is left out.
EXPERIMENTS_EXTRA: dict[str, str] = {"matplotlib": "matplotlib", "mlxtend": "mlxtend", "scikit-learn": "sklearn",
                                     "scipy": "scipy", "advertorch": "advertorch"}


def missing_experiments_modules() -> list[str]:
    """The top-level modules of :data:`EXPERIMENTS_EXTRA` that this installation lacks (found without importing
    them)."""
    return [m for m in EXPERIMENTS_EXTRA.values() if importlib.util.find_spec(m) is None]


def _named_command(argv: Sequence[str]) -> tuple[str, ...]:
    """The leading words of ``argv`` before its first option: the sub-command path asked for."""
    words = []
    for token in argv:
        if token.startswith("-"):
            break
        words.append(token)
    return tuple(words[:2])


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``libnet`` parser; only the sub-command that ``argv`` names gets its options (its module imported).

    ``argv=None`` reads ``sys.argv[1:]``.
    """
    named = _named_command(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="libnet", description="Library networks: per-layer explanations and "
                                     "a consistency detector for trained classifiers.")
    parser.add_argument("--version", action="version", version=f"libnet-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    extra_installed = not missing_experiments_modules()
    for path, module_name, help_text, needs_extra in COMMANDS:
        if needs_extra and not extra_installed:
            continue  # that command is not part of this installation (pip install 'libnet-plugin[experiments]')
        if len(path) == 1:
            p = sub.add_parser(path[0], help=help_text, description=help_text)
        else:
            if path[0] not in groups:
                gp = sub.add_parser(path[0], help=f"{path[0]} an experiment of the paper")
                groups[path[0]] = gp.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
            p = groups[path[0]].add_parser(path[1], help=help_text, description=help_text)
        if named[:len(path)] == path:
            module = importlib.import_module(module_name)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
