"""Fork-safe scoring: a child forked after fit scores as the parent does (and never hangs)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, sys, warnings
    import torch
    from torch import nn
    import libnet_plugin as lnp

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    train = torch.randn(200, 32)
    det = lnp.ConsistencyDetector.from_model(model, train, ["0", "2", "4"], thresholds=0.5, method="cpl")
    det.calibrate(torch.randn(40, 32), fpr=0.1)
    probe = torch.randn(256, 32)
    want = det.score(probe)
    torch.randn(512, 512) @ torch.randn(512, 512)  # the parent's thread pool is started, as after any real fit
    if sys.argv[1] == "prepared":
        lnp.prepare_for_fork()

    def child(q):
        q.put(det.score(probe).tolist())  # a list: a tensor would travel as a file descriptor of the child

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,), daemon=True)
    p.start()
    try:
        got = torch.tensor(q.get(timeout=40))
    except Exception:
        p.kill()
        print("the forked child did not answer within 40 s")
        sys.exit(3)
    p.join(10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print("same scores")
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_after_fit_scores_as_the_parent(tmp_path):
    script = tmp_path / "fork_after_fit.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default pool, as a server has
    try:
        done = subprocess.run([sys.executable, str(script), "prepared"], capture_output=True, text=True, timeout=60,
                              env=env)
    except subprocess.TimeoutExpired:  # pragma: no cover - what the test guards against
        pytest.fail("the script forking after fit did not finish within 60 s (a hung child)")
    assert done.returncode == 0 and "same scores" in done.stdout, done.stdout + done.stderr[-3000:]
