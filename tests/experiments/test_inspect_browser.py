"""The `libnet inspect` page in a real browser: headless Chromium renders it from disk with no network and no script.

Needs Debian's ``chromium`` (``apt-get install chromium``); skipped, with the reason, where it is missing. With
``LIBNET_UPDATE_SCREENSHOT=1`` the screenshot is also written to docs/figures/inspect-report.png (the README's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.experiments.inspect_report import figure_names

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "figures" / "inspect-report.png"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason=f"{CHROMIUM} is missing (Debian: apt-get install chromium)")]


class Stripes(nn.Module):
    """A small CNN for 12x12 images; trained below to tell where a bright stripe lies (4 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc1 = nn.Linear(8 * 8 * 8, 24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


def stripes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 12, 12, generator=g) * 0.6
    for c in range(4):
        x[y == c, 0, 3 * c:3 * c + 3, :] += 0.1
    return x.clamp(0, 1), y


def trained() -> Stripes:
    torch.manual_seed(0)
    model = Stripes()
    x, y = stripes(160, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page of lnp.inspect on the torch model."""
    report = lnp.inspect(trained(), stripes(160, 1), stripes(48, 2), progress=False)
    folder = tmp_path_factory.mktemp("inspect")
    return report, report.save_html(folder / "index.html"), folder


@pytest.fixture(scope="module")
def onnx_page(tmp_path_factory):
    """The page `libnet inspect MODEL.onnx` writes for the same model exported to ONNX."""
    pytest.importorskip("onnxruntime")
    from libnet_onnx import export_onnx
    from libnet_plugin.cli import main

    folder = tmp_path_factory.mktemp("inspect-onnx")
    export_onnx(trained(), torch.rand(2, 1, 12, 12), folder / "stripes.onnx", dynamo=False)
    for name, (x, y) in (("train", stripes(160, 1)), ("test", stripes(48, 2))):
        np.savez(folder / f"{name}.npz", x=x.numpy(), y=y.numpy())
    assert main(["inspect", str(folder / "stripes.onnx"), "--train", str(folder / "train.npz"), "--test",
                 str(folder / "test.npz"), "--out", str(folder / "out"), "--no-progress"]) == 0
    report = lnp.InspectionReport(json.loads((folder / "out" / "report.json").read_text()))
    return report, folder / "out" / "index.html", folder


def chromium(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={folder / 'profile'}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("which", ["page", "onnx_page"])
def test_the_page_names_every_layer_and_shows_every_figure(which, request):
    report, path, folder = request.getfixturevalue(which)
    run = chromium(folder, "--dump-dom", path.resolve().as_uri())
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    assert "<h1>libnet inspect: " in dom and report.layers == ["conv1", "conv2", "fc1", "fc2"]
    for layer in report.layers:
        assert f"<code>{layer}</code>" in dom, layer
        assert f"layer {layer}" in dom
    imgs = re.findall(r"<img [^>]*>", dom)
    names = [re.search(r'data-figure="([^"]+)"', i).group(1) for i in imgs]
    assert names == figure_names(report) and "exemplars" in names  # figure_names reads the numbers only
    assert all(re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', i) for i in imgs)
    # no script at all, and nothing the browser refused to load or run (the page's policy forbids any request)
    assert "<script" not in dom.lower() and "<script" not in path.read_text().lower()
    log = run.stderr
    assert not re.search(r"Uncaught|Refused to|CONSOLE\(", log), log[-2000:]


def test_screenshot(page):
    _, path, folder = page
    shot = folder / "shot.png"
    run = chromium(folder, "--hide-scrollbars", "--window-size=1100,1500", f"--screenshot={shot}",
                   path.resolve().as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (1500, 1100)
    assert float(np.std(img[..., :3])) > 0.05  # the page is drawn, not a blank canvas
    if os.environ.get("LIBNET_UPDATE_SCREENSHOT") == "1":
        from PIL import Image

        with Image.open(shot) as im:  # a palette PNG keeps the committed figure small
            im.convert("RGB").quantize(colors=128).save(SCREENSHOT, optimize=True)
