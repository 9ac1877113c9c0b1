"""Experiments of the paper (MNIST, CIFAR-10) and the detector evaluation, run from the ``libnet`` CLI."""
