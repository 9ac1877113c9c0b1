"""Keyed integrity: files saved with ``key=`` refuse every edit made without the key, digests recomputed or not."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import libnet_plugin as lnp
from libnet_plugin import serialization
from libnet_plugin.errors import SaveFormatError, SaveIntegrityError

KEY = b"\x00server-secret\xff"


def _edit(path, *, config=None, tensors=None, drop=()):
    """Rewrite a saved file as an attacker without the key would: edit, then recompute the (unkeyed) digests."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    if config is not None:
        config(cfg)
    data.update(tensors or {})
    meta["config"] = json.dumps(cfg, sort_keys=True)
    meta["digests"] = json.dumps(serialization.file_digests(meta["kind"], meta["config"], data), sort_keys=True)
    for k in drop:
        meta.pop(k, None)
    save_file(data, str(path), metadata=meta)


@pytest.fixture
def det(fitted):
    return lnp.ConsistencyDetector(fitted, method="library-distance").calibrate(torch.randn(60, 10), fpr=0.1)


@pytest.mark.parametrize("key", [KEY, "a key from the environment"])
def test_a_signed_file_loads_with_its_key_and_without_one(tmp_path, det, mlp, mlp_data, key):
    x, _ = mlp_data
    det.save(tmp_path / "det.lnp", key=key)
    for loaded in (lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp, key=key),
                   lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp)):  # no key: digests only, as before
        assert loaded.threshold_ == det.threshold_ and torch.equal(loaded.score(x[:20]), det.score(x[:20]))
    det.net.save(tmp_path / "net.lnp", key=key)
    net = lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp, key=key)
    assert net.library_sizes_ == det.net.library_sizes_


def test_a_shifted_calibration_with_recomputed_digests_is_refused_with_the_key(tmp_path, det, mlp):
    det.save(tmp_path / "det.lnp", key=KEY)
    shifted = det.calibration_scores_ + 1e6  # a threshold no input reaches: the detector would flag nothing

    def shift(cfg):
        cfg["calibration"]["threshold"] = det.threshold_ + 1e6

    _edit(tmp_path / "det.lnp", config=shift, tensors={"calibration/scores": shifted})
    with pytest.raises(SaveIntegrityError, match="does not verify with the key"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp, key=KEY)


def test_a_renamed_method_with_recomputed_digests_is_refused_with_the_key(tmp_path, det, mlp):
    det.save(tmp_path / "det.lnp", key=KEY)

    def rename(cfg):
        cfg["method"] = "cpl"

    _edit(tmp_path / "det.lnp", config=rename)
    assert lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp).method == "cpl"  # what the digests cannot catch
    with pytest.raises(SaveIntegrityError, match="does not verify"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp, key=KEY)


def test_edited_nodes_with_recomputed_digests_are_refused_with_the_key(tmp_path, fitted, mlp):
    fitted.save(tmp_path / "net.lnp", key=KEY)
    with safe_open(str(tmp_path / "net.lnp"), "pt") as f:
        nodes = f.get_tensor("library/0/nodes")
    _edit(tmp_path / "net.lnp", tensors={"library/0/nodes": nodes.flip(1).contiguous()})
    with pytest.raises(SaveIntegrityError, match="does not verify"):
        lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp, key=KEY)


def test_a_wrong_key_is_refused(tmp_path, det, mlp):
    det.save(tmp_path / "det.lnp", key=KEY)
    with pytest.raises(SaveIntegrityError, match="signed with another key"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp, key=KEY + b"!")


@pytest.mark.parametrize("how", ["unsigned", "signature removed"])
def test_an_unsigned_file_is_refused_when_a_key_is_given(tmp_path, det, mlp, how):
    det.save(tmp_path / "det.lnp", key=None if how == "unsigned" else KEY)
    if how != "unsigned":
        _edit(tmp_path / "det.lnp", drop=["signature"])
    with pytest.raises(SaveIntegrityError, match="is not signed"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp, key=KEY)
    assert isinstance(SaveIntegrityError("x"), SaveFormatError)  # callers catching SaveFormatError see it too


def test_a_forged_signature_entry_is_refused(tmp_path, det, mlp):
    det.save(tmp_path / "det.lnp", key=KEY)
    with safe_open(str(tmp_path / "det.lnp"), "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    for forged in ('{"algorithm": "none", "value": ""}', "[" * 10_000, '"x"', '{"algorithm": "hmac-sha256", "value": 1}'):
        save_file(data, str(tmp_path / "det.lnp"), metadata={**meta, "signature": forged})
        with pytest.raises(SaveFormatError):
            lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp, key=KEY)


@pytest.mark.parametrize("key, error", [(b"", ValueError), ("", ValueError), (123, TypeError)])
def test_keys_must_be_non_empty_bytes_or_str(tmp_path, fitted, key, error):
    with pytest.raises(error, match="key"):
        fitted.save(tmp_path / "net.lnp", key=key)
    assert not (tmp_path / "net.lnp").exists()


def test_the_readme_server_recipe_runs(monkeypatch, tmp_path):
    from readme_blocks import readme_code_blocks, run_readme_block

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIBNET_KEY", "a secret")
    _, ns = run_readme_block("detector")  # defines det and model
    recipe = next(b for b in readme_code_blocks("detector") if "LIBNET_KEY" in b)
    exec(compile(recipe, "README.md[detector]", "exec"), ns)
    assert ns["served"].threshold_ == ns["det"].threshold_
    monkeypatch.setenv("LIBNET_KEY", "another secret")
    with pytest.raises(SaveIntegrityError):
        exec(compile(recipe.replace('det.save("det.lnp", key=key)', ""), "README.md[detector]", "exec"), ns)


def test_attack_set_files_take_a_key_too(tmp_path):
    from libnet_plugin.experiments.protocols import AttackSet, load_attack_sets, save_attack_sets

    sets = [AttackSet("standard", 0.1, torch.rand(3, 1, 4, 4), "pixels", torch.arange(3))]
    save_attack_sets(tmp_path / "attacks.safetensors", sets, {"seed": 0}, key=KEY)
    got, meta = load_attack_sets(tmp_path / "attacks.safetensors", key=KEY)
    assert torch.equal(got[0].x_adv, sets[0].x_adv) and meta == {"seed": 0}
    with pytest.raises(SaveIntegrityError):
        load_attack_sets(tmp_path / "attacks.safetensors", key="another key")
