"""One adaptive-budget policy for the three commands: the seed from ``--seed``, the same checks."""

from __future__ import annotations

import argparse

import pytest

from libnet_plugin.experiments import cifar10, evaluate_detectors, mnist
from libnet_plugin.experiments.report import ExperimentError


def _args(module, *argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_budget_seed_is_the_commands_seed():
    assert mnist._adaptive_budget(_args(mnist, "--seed", "3")).seed == 3
    assert mnist._adaptive_budget(_args(mnist)).seed == 0
    assert evaluate_detectors._budget(_args(evaluate_detectors, "--seed", "4"), False).seed == 4
    args = _args(cifar10, "--data-dir", "d", "--adaptive-detectors", "msp", "--seed", "5")
    assert cifar10._adaptive_budget(args).seed == 5
    assert cifar10._adaptive_budget(_args(cifar10, "--data-dir", "d", "--adaptive-detectors", "msp")).seed == 1


@pytest.mark.parametrize("module, argv", [(mnist, ["--no-adaptive"]), (evaluate_detectors, ["--no-adaptive"]),
                                          (cifar10, ["--data-dir", "d"])])
def test_sizing_options_without_the_attacks_are_refused(module, argv):
    budget = {mnist: mnist._adaptive_budget, evaluate_detectors: lambda a: evaluate_detectors._budget(a, False),
              cifar10: cifar10._adaptive_budget}[module]
    assert budget(_args(module, *argv)) is None
    with pytest.raises(ExperimentError, match="--adaptive-steps"):
        budget(_args(module, *argv, "--adaptive-steps", "3"))
