"""Save/load: one safetensors file, atomic, never unpickled, bit-identical scores, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin import serialization
from libnet_plugin.errors import SaveFormatError


@pytest.fixture
def fitted(mlp, mlp_data):
    x, _ = mlp_data
    return lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds={"fc1": 0.8, "fc2": 0.85, "out": 0.95}, top_k=3).fit(x)


def test_round_trip_is_bit_identical(fitted, mlp, mlp_data, tmp_path):
    x, _ = mlp_data
    path = tmp_path / "net.lnp"
    fitted.save(path)
    loaded = lnp.LibraryNetwork.load(path, mlp, map_location="cpu")
    assert loaded.library_sizes_ == fitted.library_sizes_
    assert loaded.thresholds == fitted.thresholds and loaded.top_k == 3
    a, b = fitted.predict_scores(x), loaded.predict_scores(x)
    for l in fitted.layers:
        assert torch.equal(a[l], b[l])
    assert torch.equal(fitted.consistency(x), loaded.consistency(x))
    assert torch.equal(fitted.exemplars(x[:4])["fc1"], loaded.exemplars(x[:4])["fc1"])
    assert not list(tmp_path.glob(".*.tmp")), "temp file left behind"


def test_file_is_safetensors_with_json_settings(fitted, tmp_path):
    from safetensors import safe_open

    path = tmp_path / "net.lnp"
    fitted.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    cfg = json.loads(meta["config"])
    assert meta["format_version"] == str(serialization.FORMAT_VERSION)
    assert cfg["layers"] == ["fc1", "fc2", "out"] and cfg["top_k"] == 3
    assert {"torch", "libnet_plugin"} <= set(cfg["versions"])
    assert "library/0/nodes" in keys and "readout/2/weight" in keys


def test_failed_save_keeps_earlier_file(fitted, tmp_path, monkeypatch):
    path = tmp_path / "net.lnp"
    fitted.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(serialization.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_missing_parent_folder(fitted, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fitted.save(tmp_path / "nope" / "net.lnp")


def test_truncated_and_corrupted_files(fitted, mlp, tmp_path):
    path = tmp_path / "net.lnp"
    fitted.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.lnp").write_bytes(data[: len(data) // 2])
    with pytest.raises(SaveFormatError, match="corrupted or truncated"):
        lnp.LibraryNetwork.load(tmp_path / "trunc.lnp", mlp)
    (tmp_path / "junk.lnp").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(SaveFormatError):
        lnp.LibraryNetwork.load(tmp_path / "junk.lnp", mlp)
    with pytest.raises(FileNotFoundError):
        lnp.LibraryNetwork.load(tmp_path / "absent.lnp", mlp)


def test_incompatible_version_and_foreign_file(fitted, mlp, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "net.lnp"
    monkeypatch.setattr(serialization, "FORMAT_VERSION", 99)
    fitted.save(path)
    monkeypatch.undo()
    with pytest.raises(SaveFormatError, match="format version 99.*reads format version 1"):
        lnp.LibraryNetwork.load(path, mlp)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SaveFormatError, match="not one saved by libnet-plugin"):
        lnp.LibraryNetwork.load(tmp_path / "other.safetensors", mlp)


def test_loading_never_unpickles(fitted, tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "net.lnp"
    fitted.save(path)

    def forbidden(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    lnp.LibraryNetwork.load(path, fitted.model)


def test_load_onto_model_without_the_layers(fitted, tmp_path):
    from torch import nn

    path = tmp_path / "net.lnp"
    fitted.save(path)
    with pytest.raises(lnp.LayerNotFoundError, match="'fc1'"):
        lnp.LibraryNetwork.load(path, nn.Sequential(nn.Linear(10, 4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_gpu_saved_loads_on_cpu(mlp, mlp_data, tmp_path):
    x, _ = mlp_data
    gpu = lnp.LibraryNetwork(mlp.cuda(), ["fc1", "out"], thresholds=0.9, device="cuda").fit(x)
    gpu.save(tmp_path / "g.lnp")
    cpu = lnp.LibraryNetwork.load(tmp_path / "g.lnp", mlp.cpu(), map_location="cpu")
    assert cpu.libraries_["fc1"].nodes.device.type == "cpu"
    assert torch.allclose(cpu.predict_scores(x[:5])["out"], gpu.predict_scores(x[:5])["out"].cpu(), atol=1e-4)


def test_saved_files_honour_the_umask_and_write_through_symlinks(tmp_path):
    import os
    import stat
    import time

    from libnet_plugin.serialization import STALE_TEMP_SECONDS, atomic_write_bytes

    old = os.umask(0o022)
    try:
        target = tmp_path / "report.json"
        target.write_bytes(b"old")
        target.chmod(0o644)
        atomic_write_bytes(target, b"new")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_bytes() == b"new"
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.bin", b"x")
        assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
    finally:
        os.umask(old)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_bytes(link, b"through")
    assert link.is_symlink() and target.read_bytes() == b"through"
    stale = tmp_path / ".report.json.abc123.tmp"
    stale.write_bytes(b"half a file")
    past = time.time() - STALE_TEMP_SECONDS - 5
    os.utime(stale, (past, past))
    fresh = tmp_path / ".report.json.def456.tmp"  # perhaps another process's save in progress: kept
    fresh.write_bytes(b"in progress")
    atomic_write_bytes(target, b"again")
    assert not stale.exists() and fresh.exists()
