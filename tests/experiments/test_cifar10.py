"""``libnet reproduce cifar10``: bad input is refused before any long work, with useful messages; the
paper's settings are encoded as Table 1 states them; the ResNet-44 training recipe (augmentation,
schedule, weight cache) behaves as documented; a run is staged and swapped into ``--out`` only when
complete, keeps its weight cache outside it, and a failed run leaves the earlier run and no empty folder."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from libnet_plugin import cli
from libnet_plugin.experiments import cifar10
from libnet_plugin.experiments.data import CIFAR10_FILES, CIFAR_MEAN, CIFAR_STD, write_fake_cifar10
from libnet_plugin.experiments.models import CifarResNet, ResNet44
from libnet_plugin.experiments.report import ExperimentError, write_run_manifest
from libnet_plugin.experiments.training import (
    TrainConfig,
    _lr_at,
    load_or_train_resnet44,
    random_crop_flip,
    save_weights,
    weights_cache_path,
)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar"), n_train_per_batch=2, n_test=2, seed=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet44.pt"
    torch.save(ResNet44().state_dict(), path)
    return path


def _run(argv, capsys):
    rc = cli.main(["reproduce", "cifar10", *map(str, argv)])
    return rc, capsys.readouterr().err


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ------------------------------------------------------------------------------------------- data


def test_missing_batches_names_the_expected_files(tmp_path, weights, capsys):
    rc, err = _run(["--data-dir", tmp_path, "--weights", weights, "--out", tmp_path / "out", "--device", "cpu"],
                   capsys)
    assert rc == 2
    assert "error:" in err and "Traceback" not in err
    for name in CIFAR10_FILES:
        assert name in err
    assert str(tmp_path) in err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_one_missing_batch_is_named(tmp_path, weights, capsys):
    root = write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    (root / "data_batch_3").unlink()
    rc, err = _run(["--data-dir", tmp_path, "--weights", weights, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert "missing: data_batch_3." in err


# ---------------------------------------------------------------------------------------- weights


def test_weights_of_another_depth_show_the_first_missing_key_and_shape(fake_data, tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "resnet20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in CifarResNet((3, 3, 3)).state_dict().items()}}, path)
    rc, err = _run(["--data-dir", fake_data, "--weights", path, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert "does not fit ResNet44" in err
    assert "'layer1.3.conv1.weight'" in err and "[16, 16, 3, 3]" in err
    assert "ResNet20" in err


def test_weights_with_a_wrong_shape_show_both_shapes(fake_data, tmp_path, capsys):
    path = tmp_path / "resnet44_c100.pt"
    torch.save(ResNet44(num_classes=100).state_dict(), path)
    rc, err = _run(["--data-dir", fake_data, "--weights", path, "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert "'linear.weight'" in err and "[100, 64]" in err and "[10, 64]" in err


def test_missing_weights_file_and_unreadable_weights(fake_data, tmp_path, capsys):
    rc, err = _run(["--data-dir", fake_data, "--weights", tmp_path / "nope.th", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "no such file" in err and "nope.th" in err
    junk = tmp_path / "junk.th"
    junk.write_bytes(b"not a torch file")
    rc, err = _run(["--data-dir", fake_data, "--weights", junk, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "junk.th" in err and "Traceback" not in err


def test_check_weights_accepts_dataparallel_checkpoints(weights, tmp_path):
    ref = torch.load(weights, weights_only=True)
    path = tmp_path / "dp.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}, "epoch": 200, "best_prec1": 93.1}, path)
    state = cifar10.check_weights(path)
    assert set(state) == set(ResNet44().state_dict())
    assert torch.equal(state["linear.weight"], ref["linear.weight"])


def test_weights_or_training_is_required(fake_data, tmp_path, capsys):
    rc, err = _run(["--data-dir", fake_data, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "--weights FILE" in err and "--train-epochs N" in err


def test_weights_and_training_are_exclusive(fake_data, weights, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["reproduce", "cifar10", "--data-dir", str(fake_data), "--weights", str(weights),
                  "--train-epochs", "3"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- device


def test_cuda_without_a_gpu_is_a_clear_error(fake_data, weights, tmp_path, capsys, monkeypatch):
    _no_cuda(monkeypatch)
    rc, err = _run(["--data-dir", fake_data, "--weights", weights, "--device", "cuda", "--out", tmp_path / "o"],
                   capsys)
    assert rc == 2
    assert "--device cuda was requested but no CUDA GPU is available" in err
    assert "--device auto" in err
    assert not (tmp_path / "o").exists()


def test_auto_falls_back_to_cpu_with_a_warning(monkeypatch):
    _no_cuda(monkeypatch)
    device, warning = cifar10.resolve_device("auto")
    assert device == torch.device("cpu")
    assert warning is not None and "no CUDA GPU" in warning and "CPU" in warning
    assert cifar10.resolve_device("CPU") == (torch.device("cpu"), None)


def test_bad_device_names_and_indices(monkeypatch):
    with pytest.raises(ExperimentError, match="'gpu0' is not a device"):
        cifar10.resolve_device("gpu0")
    with pytest.raises(ExperimentError, match="not supported"):
        cifar10.resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ExperimentError, match=r"only 1 CUDA device\(s\), numbered 0..0"):
        cifar10.resolve_device("cuda:3")
    assert cifar10.resolve_device("cuda:0") == (torch.device("cuda:0"), None)


# ---------------------------------------------------------------------------------------- settings


def test_table1_levels_and_sets():
    assert list(cifar10.THRESHOLD_LEVELS) == ["conv1", "layer1", "layer2", "layer3", "linear"]
    assert cifar10.THRESHOLD_LEVELS["conv1"] == (0.18, 0.2, 0.22, 0.24, 0.26, 0.3, 0.32, 0.34)
    assert cifar10.THRESHOLD_LEVELS["layer1"] == (0.64, 0.66, 0.68, 0.7, 0.72, 0.74, 0.76, 0.78)
    assert cifar10.THRESHOLD_LEVELS["layer2"][0] == 0.48 and cifar10.THRESHOLD_LEVELS["layer2"][-1] == 0.62
    assert cifar10.THRESHOLD_LEVELS["layer3"][0] == 0.5 and cifar10.THRESHOLD_LEVELS["layer3"][-1] == 0.64
    assert cifar10.THRESHOLD_LEVELS["linear"][0] == 0.8 and cifar10.THRESHOLD_LEVELS["linear"][-1] == 0.94
    assert all(len(v) == 8 for v in cifar10.THRESHOLD_LEVELS.values())
    assert len(cifar10.CPL_SETS) == 7
    assert list(cifar10.CPL_SETS["S2"].values()) == [0.26, 0.72, 0.56, 0.58, 0.88]
    # every CPL theta is one of the swept levels, so the sets reuse the sweep's libraries
    for thr in cifar10.CPL_SETS.values():
        for layer, theta in thr.items():
            assert theta in cifar10.THRESHOLD_LEVELS[layer]
    assert (cifar10.TOP_K_AGREEMENT, cifar10.TOP_K_CPL) == (8, 20)
    assert len(cifar10.PAPER_EPSILONS) == 19 and cifar10.PAPER_EPSILONS[0] == 0.01 and cifar10.PAPER_EPSILONS[-1] == 1.0
    assert [round(e * 255) for e in cifar10.STANDARD_EPSILONS] == [2, 4, 8, 16]
    cifar10.Cifar10Settings().validate()


def _args(*argv):
    parser = argparse.ArgumentParser()
    cifar10.add_arguments(parser)
    return parser.parse_args(["--data-dir", "d", "--weights", "w", *argv])


def test_quick_and_explicit_options():
    s = cifar10.settings_from_args(_args("--quick"))
    assert s.quick and s.n_train == 1000 and s.n_test == 200 and s.nb_iter == 10
    s = cifar10.settings_from_args(_args("--quick", "--n-train", "50", "--standard-epsilons", "4/255", "0.5",
                                         "--protocols", "standard"))
    assert s.n_train == 50 and s.n_test == 200
    assert s.standard_epsilons == (round(4 / 255, 6), 0.5) and s.protocols == ("standard",)
    s = cifar10.settings_from_args(_args())
    assert not s.quick and s.n_train is None and s.nb_iter == 40 and s.paper_epsilons == cifar10.PAPER_EPSILONS


@pytest.mark.parametrize("argv", [["--standard-epsilons", "0"], ["--paper-epsilons", "x/2"], ["--n-train", "0"]])
def test_bad_numbers_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit):
        _args(*argv)
    assert "error:" in capsys.readouterr().err


def test_settings_validation_names_the_setting():
    with pytest.raises(ExperimentError, match="standard_epsilons are pixel budgets"):
        cifar10.Cifar10Settings(standard_epsilons=(2.0,)).validate()
    bad = {k: dict(v) for k, v in cifar10.CPL_SETS.items()}
    bad["S1"]["layer2"] = 0.57
    with pytest.raises(ExperimentError, match=r"CPL set 'S1': theta 0.57 of layer 'layer2'"):
        cifar10.Cifar10Settings(cpl_sets=bad).validate()
    with pytest.raises(ExperimentError, match="protocols"):
        cifar10.Cifar10Settings(protocols=("fgsm",)).validate()


def test_attacks_that_know_the_detector_are_off_by_default_and_sized_by_the_shared_options():
    from libnet_plugin.experiments.threat_models import DEFAULT_LAMBDAS, QUICK_LAMBDAS, AdaptiveBudget

    assert cifar10.settings_from_args(_args()).adaptive is None
    assert cifar10.settings_from_args(_args("--quick")).adaptive is None
    full = cifar10.settings_from_args(_args("--adaptive-detectors", "msp", "library-fusion")).adaptive
    assert full == AdaptiveBudget(n=48, steps=100, restarts=1, lambdas=DEFAULT_LAMBDAS, queries=500, seed=1,
                                  detectors=("msp", "library-fusion"))
    quick = cifar10.settings_from_args(_args("--quick", "--adaptive-detectors", "msp", "--seed", "3")).adaptive
    assert (quick.n, quick.steps, quick.queries, quick.lambdas, quick.seed) == (12, 10, 50, QUICK_LAMBDAS, 3)
    given = cifar10.settings_from_args(_args("--adaptive-detectors", "msp", "--adaptive-n", "4", "--adaptive-steps",
                                             "2", "--adaptive-restarts", "2", "--adaptive-lambdas", "0", "1",
                                             "--adaptive-kappas", "0", "5", "--black-box-queries", "5")).adaptive
    assert given == AdaptiveBudget(n=4, steps=2, restarts=2, lambdas=(0.0, 1.0), queries=5, seed=1,
                                   detectors=("msp",), kappas=(0.0, 5.0))
    with pytest.raises(ExperimentError, match="adaptive .*steps must be an integer >= 1"):
        cifar10.Cifar10Settings(adaptive=AdaptiveBudget(steps=0)).validate()
    with pytest.raises(ExperimentError, match="needs detectors=True"):
        cifar10.Cifar10Settings(adaptive=AdaptiveBudget(), protocols=("paper",)).validate()


@pytest.mark.parametrize("argv, message", [
    (["--adaptive-detectors", "nope"], r"--adaptive-detectors \['nope'\] are not among the detectors of this run"),
    (["--adaptive-detectors", "msp", "--adaptive-n", "0"],
     "--adaptive-n, --adaptive-steps and --adaptive-restarts must be >= 1 and --black-box-queries >= 0"),
    (["--adaptive-detectors", "msp", "--black-box-queries", "-1"], "--black-box-queries >= 0, got 48, 100, 1, -1"),
    (["--adaptive-detectors", "msp", "--adaptive-lambdas", "-1"], "--adaptive-lambdas must be finite numbers >= 0"),
    (["--adaptive-detectors", "msp", "--adaptive-kappas", "nan"], "--adaptive-kappas must be finite numbers >= 0"),
    (["--adaptive-n", "4", "--black-box-queries", "5"],
     "--adaptive-n, --black-box-queries only size the attacks of --adaptive-detectors, which is not given"),
    (["--adaptive-detectors", "msp", "--no-detectors"], "which --no-detectors skips"),
    (["--adaptive-detectors", "msp", "--protocols", "paper"], "add 'standard' to --protocols"),
])
def test_bad_adaptive_options_exit_2_before_any_work(tmp_path, weights, capsys, argv, message):
    import re

    rc, err = _run(["--data-dir", tmp_path / "no-data", "--weights", weights, "--out", tmp_path / "out", *argv],
                   capsys)
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- training


def test_random_crop_flip_matches_a_per_image_reference():
    x = torch.rand(7, 3, 8, 8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    off = torch.randint(0, 5, (2, 7), generator=g)
    flips = torch.rand(7, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(7):
        ref = padded[b, :, off[0, b]:off[0, b] + 8, off[1, b]:off[1, b] + 8]
        assert torch.equal(out[b], ref.flip(2) if flips[b] else ref)
    assert 0 < int(flips.sum()) < 7  # both branches were exercised


def test_random_crop_flip_edge_cases():
    x = torch.rand(4, 3, 5, 5)
    same = random_crop_flip(x, padding=0, flip=False)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    flipped = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_crop_flip(torch.rand(3, 5, 5))
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(x, padding=-1)


def test_learning_rate_schedules():
    step = TrainConfig(epochs=4, schedule="step")
    total, per = 400, 100
    assert [_lr_at(step, s, total, per) for s in (0, 199, 200, 299, 300, 399)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = TrainConfig(epochs=4, schedule="cosine")
    assert _lr_at(cos, 0, total, per) == pytest.approx(0.1)
    assert _lr_at(cos, 200, total, per) == pytest.approx(0.05)
    warm = TrainConfig(epochs=4, warmup_epochs=1)
    assert _lr_at(warm, 0, total, per) == pytest.approx(0.01) and _lr_at(warm, 100, total, per) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, match", [({"epochs": 0}, "epochs"), ({"lr": 0.0}, "lr"),
                                           ({"schedule": "linear"}, "schedule"),
                                           ({"epochs": 2, "warmup_epochs": 2}, "warmup_epochs")])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs).validate()


def test_training_is_cached_by_data_and_recipe(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    cfg = TrainConfig(epochs=1, batch_size=4, seed=0)
    net, path, info = load_or_train_resnet44(x, y, cfg, tmp_path, x_test=x[:2], y_test=y[:2], progress=False)
    assert info["cached"] == 0 and path.is_file() and path.parent == tmp_path
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["n_train"] == 4
    assert net.normalize and not net.training
    fresh = ResNet44(normalize=True).state_dict()
    assert not torch.equal(net.state_dict()["conv1.weight"], fresh["conv1.weight"])  # SGD moved the weights
    again, path2, info2 = load_or_train_resnet44(x, y, cfg, tmp_path, progress=False)
    assert path2 == path and info2["cached"] == 1 and info2["test_accuracy"] == info["test_accuracy"]
    for k, v in net.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # another recipe or other data is another cache entry; the file is a readable checkpoint
    assert weights_cache_path(tmp_path, x, y, TrainConfig(epochs=2, batch_size=4)) != path
    assert weights_cache_path(tmp_path, x.flip(0), y.flip(0), cfg) != path
    assert set(cifar10.check_weights(path)) == set(ResNet44().state_dict())


def test_train_rejects_bad_input():
    from libnet_plugin.experiments.training import train_resnet44

    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        train_resnet44(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="pixels in \\[0, 1\\]"):
        train_resnet44(torch.rand(4, 3, 32, 32) * 2, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels in 0..9"):
        train_resnet44(torch.rand(4, 3, 32, 32), torch.full((4,), 10))


def test_save_weights_is_atomic_and_loadable(tmp_path):
    net = ResNet44()
    path = save_weights(net, tmp_path / "sub" / "w.th", epochs=3)
    raw = torch.load(path, weights_only=True)
    assert raw["epochs"] == 3 and set(raw["state_dict"]) == set(net.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["w.th"]  # no temp file left behind
    assert not math.isnan(float(raw["state_dict"]["linear.weight"].sum()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_augmentation_and_training_on_cuda(tmp_path):
    x = torch.rand(6, 3, 32, 32)
    cpu = random_crop_flip(x, 4, generator=torch.Generator().manual_seed(0))
    gpu = random_crop_flip(x.cuda(), 4, generator=torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())  # same draws on every device
    net, path, info = load_or_train_resnet44(x, torch.arange(6) % 10, TrainConfig(epochs=1, batch_size=3), tmp_path,
                                             device="cuda", progress=False)
    assert next(net.parameters()).device.type == "cuda" and path.is_file() and info["cached"] == 0
    assert set(cifar10.check_weights(path)) == set(ResNet44().state_dict())  # saved on the CPU, loads anywhere


def test_detector_comparison_gets_the_network_the_attacks_and_seeded_noise(monkeypatch, tmp_path):
    from libnet_plugin.experiments.protocols import AttackSet

    class Sweep:  # records the threshold set the library network is built at
        def to_network(self, model, thresholds, top_k, device):
            return ("NET", model, dict(thresholds), top_k)

    calls = []
    monkeypatch.setattr(cifar10, "detector_comparison", lambda *a, **kw: calls.append((a, kw)) or {"available": True})
    sets = [AttackSet("standard", 0.1, torch.rand(3, 3, 32, 32), "pixels", torch.arange(3))]
    data = (torch.rand(5, 3, 32, 32), torch.arange(5), torch.rand(4, 3, 32, 32), torch.arange(4))
    settings = cifar10.Cifar10Settings()
    for _ in range(2):
        cifar10._run_detectors(Sweep(), "MODEL", settings, torch.device("cpu"), data=data, attack_sets=sets,
                               out_dir=tmp_path, log=None)
    (args, kw), (_, kw2) = calls
    first = next(iter(cifar10.CPL_SETS))
    assert args[0] == ("NET", "MODEL", cifar10.CPL_SETS[first], settings.top_k_cpl)
    assert args[1] == (data[0], data[1]) and args[2][0] is data[2] and args[3] is sets
    assert (kw["space"], kw["protocol"], kw["out_dir"]) == ("normalized", "standard", tmp_path)
    assert (kw["mean"], kw["std"]) == (CIFAR_MEAN, CIFAR_STD)
    noise = kw["ood_sets"]["uniform noise"]
    assert noise.shape == (4, 3, 32, 32) and 0 <= float(noise.min()) and float(noise.max()) <= 1
    assert torch.equal(noise, kw2["ood_sets"]["uniform noise"])  # seeded: the same images every run
    assert kw["adaptive"] is None  # no attacks that know the detector unless asked
    from libnet_plugin.experiments.threat_models import AdaptiveBudget

    budget = AdaptiveBudget(n=4, detectors=("msp",))
    cifar10._run_detectors(Sweep(), "MODEL", cifar10.Cifar10Settings(adaptive=budget), torch.device("cpu"),
                           data=data, attack_sets=sets, out_dir=tmp_path, log=None)
    assert calls[-1][1]["adaptive"] is budget


# ------------------------------------------------------------------------------------ output folder

FAST = ["--device", "cpu", "--n-train", "4", "--protocols", "paper", "--paper-epsilons", "0.1", "--n-paper", "2", "--attack-steps", "1",
        "--no-plots", "--no-detectors", "--no-progress"]


def _files(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _light_pipeline(monkeypatch):
    """Replace the experiment's stages (not the staging, the checks or the training) by a one-line report."""
    from libnet_plugin.experiments.report import write_json_atomic

    def stages(model, x_train, x_test, y_test, settings, *, stage, extra, **kwargs):
        report = {"experiment": "cifar10", "status": "complete", "run": dict(extra), "timings": {"total": 0.0}}
        (stage / "fig4a_library_sizes.png").write_bytes(b"a figure")
        (stage / "report.md").write_text("# a report\n")
        write_json_atomic(stage / "report.json", report)
        return report

    monkeypatch.setattr(cifar10, "_run_pipeline", stages, raising=False)  # (absent before staging: then a full run)


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    """The folder of an earlier complete run, as a run leaves it (copy it before changing it)."""
    out = tmp_path_factory.mktemp("complete") / "cifar10"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"experiment": "cifar10", "status": "complete"}) + "\n")
    (out / "report.md").write_text("# an earlier report\n")
    (out / "attacks.safetensors").write_bytes(b"earlier attacks")
    (out / "fig4a_library_sizes.png").write_bytes(b"an earlier figure")
    write_run_manifest(out)  # what a run writes last: the names, sizes and SHA-256 of its files
    return out


def _earlier_run(complete_run, tmp_path):
    out = tmp_path / "runs" / "cifar10"
    shutil.copytree(complete_run, out)
    return out


def test_a_failed_rerun_keeps_the_earlier_run_and_puts_its_partial_report_beside_it(
        fake_data, weights, complete_run, tmp_path, monkeypatch, capsys):
    out = _earlier_run(complete_run, tmp_path)
    before = _files(out)
    assert json.loads(before["report.json"])["status"] == "complete" and "fig4a_library_sizes.png" in before

    def boom(*args, **kwargs):
        raise ExperimentError("boom in the attacks")

    monkeypatch.setattr(cifar10, "generate_attack_sets", boom)
    rc, err = _run(["--data-dir", fake_data, "--weights", weights, "--out", out, *FAST], capsys)
    assert rc == 1 and "boom in the attacks" in err
    assert _files(out) == before  # the earlier complete run, byte for byte
    partial = tmp_path / "runs" / "cifar10.partial-report.json"
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10", partial.name]  # no staging folder
    failed = json.loads(partial.read_text())
    assert failed["status"] == "failed" and "ExperimentError: boom in the attacks" in failed["error"]
    assert set(failed["libraries"]["sizes"]) == set(cifar10.LAYERS) and "detection" not in failed
    assert str(partial) in err and "as it was before the run" in err

    # an interrupted run that stops before the libraries: the earlier run stays, the stale partial report goes
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifar10, "fit_library_sweep", interrupted)
    rc, err = _run(["--data-dir", fake_data, "--weights", weights, "--out", out, *FAST], capsys)
    assert rc == 130 and "interrupted" in err  # the command line's exit status for Ctrl-C
    assert _files(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["cifar10"]


def test_a_first_run_that_fails_leaves_no_folder(fake_data, weights, tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise ExperimentError("boom in the sweep")

    monkeypatch.setattr(cifar10, "fit_library_sweep", boom)
    rc, err = _run(["--data-dir", fake_data, "--weights", weights, "--out", tmp_path / "new" / "runs" / "cifar10",
                    *FAST], capsys)
    assert rc == 1 and "boom in the sweep" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the run folder nor the folders made for it


def test_a_complete_rerun_replaces_the_earlier_run_whole(fake_data, weights, complete_run, tmp_path, monkeypatch,
                                                         capsys):
    out = _earlier_run(complete_run, tmp_path)
    (out / "fig5c_auroc_standard.png").write_bytes(b"another earlier figure")
    write_run_manifest(out)  # the earlier run wrote it
    partial = out.parent / "cifar10.partial-report.json"
    partial.write_text('{"status": "failed"}')  # left by an earlier failed run

    def fake_detectors(sweep, model, settings, device, *, data, attack_sets, out_dir, log):
        (out_dir / "detectors.json").write_text("{}")
        return {"available": True, "protocol": "standard", "attacks": {},
                "table": {"table_markdown": "| detector |\n|---|", "files": {"json": str(out_dir / "detectors.json")}}}

    monkeypatch.setattr(cifar10, "_run_detectors", fake_detectors)
    argv = [a for a in FAST if a != "--no-detectors"]
    rc, err = _run(["--data-dir", fake_data, "--weights", weights, "--out", out, *argv, "--paper-epsilons", "0.2"],
                   capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10"]  # no staging folder, no partial report
    assert sorted(p.name for p in out.iterdir()) == [".libnet-run", "attacks.safetensors", "detectors.json",
                                                     "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and [r["epsilon"] for r in report["detection"]["paper"]["epsilons"]] == [0.2]
    # the paths name the run folder, not the staging folder it was written in
    assert report["detectors"]["table"]["files"]["json"] == str(out / "detectors.json")
    assert json.loads((out / "detectors.json").read_text())["files"]["json"] == str(out / "detectors.json")
    assert ".partial-" not in (out / "report.json").read_text()


def _count_training(monkeypatch):
    from libnet_plugin.experiments import training

    calls = []
    real = training.train_resnet44
    monkeypatch.setattr(training, "train_resnet44", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_the_weight_cache_lives_outside_out_and_survives_reruns(fake_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = _count_training(monkeypatch)
    _light_pipeline(monkeypatch)
    argv = ["--data-dir", fake_data, "--train-epochs", "1", "--out", "runs/cifar10", *FAST]
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    cached = sorted((tmp_path / ".cache").glob("resnet44_e1_s0_*.pt"))  # the default, as for reproduce mnist
    assert len(cached) == 1 and calls == [1] and "trained and saved weights" in err
    assert not (tmp_path / "runs" / "cifar10" / "cache").exists()
    first = json.loads((tmp_path / "runs" / "cifar10" / "report.json").read_text())["run"]
    rc, err = _run(argv, capsys)  # the rerun replaces the run folder and reuses the weights
    assert rc == 0, err
    assert calls == [1] and "loaded cached weights" in err
    second = json.loads((tmp_path / "runs" / "cifar10" / "report.json").read_text())["run"]
    assert second["training"]["cached"] == 1 and second["weights"] == first["weights"] == str(Path(".cache") /
                                                                                               cached[0].name)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(cached[0], other)
    rc, err = _run([*argv, "--cache-dir", other], capsys)  # --cache-dir still chooses the folder
    assert rc == 0 and calls == [1] and f"loaded cached weights {other / cached[0].name}" in err


def test_a_run_folder_of_an_older_version_without_manifest_is_refused(
        fake_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "cifar10"  # as a version before manifests left it: a marker, reports, cached weights
    (out / "cache").mkdir(parents=True)
    (out / ".libnet-run").write_text("a libnet-plugin run folder\n")
    (out / "report.json").write_text("{}")
    (out / "cache" / "resnet44_e1_s0_abc.pt").write_bytes(b"weights")
    before = _files(out)
    calls = _count_training(monkeypatch)
    rc, err = _run(["--data-dir", fake_data, "--train-epochs", "1", "--out", out, *FAST], capsys)
    assert rc == 2 and calls == [] and "Traceback" not in err
    assert "no run manifest" in err
    assert _files(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["cifar10"]


def test_an_out_with_foreign_files_or_holding_the_inputs_is_refused_before_work(fake_data, weights, complete_run,
                                                                                tmp_path, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cifar10, "load_cifar10", no_work)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    rc, err = _run(["--data-dir", fake_data, "--weights", weights, "--out", mine, *FAST], capsys)
    assert rc == 2 and "not an earlier run's" in err and str(mine) in err and "Traceback" not in err
    assert _files(mine) == {"thesis.tex": b"do not delete"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    out = _earlier_run(complete_run, tmp_path)  # the cache may not lie in the folder a run replaces
    rc, err = _run(["--data-dir", fake_data, "--train-epochs", "1", "--out", out, "--cache-dir", out / "cache", *FAST],
                   capsys)
    assert rc == 2 and "--cache-dir" in err and "lies inside the output folder" in err
    assert not (out / "cache").exists()

    only_cache = tmp_path / "old"  # a folder without a run manifest: refused, nothing touched
    (only_cache / "cache").mkdir(parents=True)
    (only_cache / "cache" / "resnet44_e1_s0_abc.pt").write_bytes(b"weights")
    rc, err = _run(["--data-dir", fake_data, "--train-epochs", "1", "--out", only_cache, *FAST], capsys)
    assert rc == 2 and "not an earlier run's" in err
    assert _files(only_cache) == {"cache/resnet44_e1_s0_abc.pt": b"weights"}


def test_bad_labels_in_the_batches_exit_2_before_any_work(weights, tmp_path, monkeypatch, capsys):
    import pickle

    import numpy as np

    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(cifar10, "reproduce_cifar10", no_work)
    root = write_fake_cifar10(tmp_path / "data", n_train_per_batch=2, n_test=2)
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [255, 1]}, fh, protocol=2)
    rc, err = _run(["--data-dir", root, "--weights", weights, "--out", tmp_path / "out", *FAST], capsys)
    assert rc == 2 and "label 255 at index 0 is outside 0..9" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
