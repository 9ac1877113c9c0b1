"""Fork-safe scoring: what a pre-forking server (gunicorn ``--preload``, ``multiprocessing`` with ``fork``) needs.

PyTorch's CPU operators run on an OpenMP thread pool. With GNU OpenMP (the pool of PyTorch's Linux
wheels), a process forked after that pool started inherits a pool without its threads: the child's
first parallel operator waits for them forever. Fitting or scoring before the fork starts the pool, so
a worker forked after ``fit`` hangs on its first score.

:func:`prepare_for_fork` makes every child forked afterwards run PyTorch single-threaded (its pool is
then never used); the parent keeps its threads. Setting ``OMP_NUM_THREADS=1`` in the environment before
Python starts does the same for the parent and the children alike. Both give the parent's scores in
the child, to float32 rounding.

Example:
    >>> import libnet_plugin as lnp
    >>> lnp.prepare_for_fork()  # once, before the workers are forked (e.g. at import of the served app)
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["prepare_for_fork"]

_LOCK = threading.Lock()
_REGISTERED = False


def _single_threaded_child() -> None:
    """Runs in each forked child, before it returns from ``fork``: PyTorch leaves the inherited pool alone."""
    torch.set_num_threads(1)


def prepare_for_fork() -> None:
    """Make every process forked from now on run PyTorch on one thread, so that it never waits on the
    OpenMP pool it inherited (which hangs). Call it once in the parent, after loading or fitting and
    before forking workers; calling it again does nothing. The parent's own threads are unchanged.

    Not needed with the ``spawn`` or ``forkserver`` start methods, whose children start a fresh PyTorch.
    It concerns CPU scoring: a process that has used CUDA cannot use it in a forked child at all (PyTorch
    refuses), so serve GPU models from spawned workers.

    Example:
        >>> import libnet_plugin as lnp
        >>> lnp.prepare_for_fork()  # in the parent, before forking the workers
        >>> lnp.prepare_for_fork()  # again: nothing more happens
    """
    global _REGISTERED
    with _LOCK:
        if not _REGISTERED and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_single_threaded_child)
            _REGISTERED = True
