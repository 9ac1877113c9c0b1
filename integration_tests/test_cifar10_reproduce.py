"""``libnet reproduce cifar10 --quick`` end to end on the CPU, on a synthetic stand-in for CIFAR-10.

The stand-in is random images written in the CIFAR-10 python-batch format (8 images per training batch,
16 test images) and a randomly initialised ResNet44 saved in the public checkpoint layout
(``{"state_dict": {"module.conv1.weight": ...}}``). Its batch-norm statistics are measured on the
stand-in images, so that its activations and answers vary between inputs, as a trained net's do. The
numbers mean nothing; the tests check that the whole path runs, that the report has the paper's
structure, and that the streamed sweep gives exactly what the core's LibraryNetwork gives.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from libnet_plugin import LibraryNetwork, cli
from libnet_plugin.experiments import cifar10
from libnet_plugin.experiments.data import CIFAR_MEAN, CIFAR_STD, load_cifar10, write_fake_cifar10
from libnet_plugin.experiments.models import ResNet44, load_state_dict_checked
from libnet_plugin.experiments.protocols import load_attack_sets, to_model_space
from libnet_plugin.experiments.report import write_run_manifest

pytestmark = pytest.mark.slow

SMALL_ATTACKS = ["--n-paper", "8", "--n-standard", "8", "--attack-steps", "3"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    data = write_fake_cifar10(root / "data", n_train_per_batch=8, n_test=16, seed=0)
    x_train, _, _, _ = load_cifar10(data)
    torch.manual_seed(0)
    net = ResNet44(normalize=True)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    net.train()
    with torch.no_grad():
        net(x_train)
    weights = root / "resnet44.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 0}, weights)
    return root, data, weights


def _model(weights):
    return load_state_dict_checked(ResNet44(), weights).eval()


def test_quick_run_end_to_end(stand_in, tmp_path):
    root, data, weights = stand_in
    out = tmp_path / "out"
    rc = cli.main(["reproduce", "cifar10", "--data-dir", str(root / "data"), "--weights", str(weights), "--quick",
                   "--device", "cpu", "--out", str(out), "--no-progress", *SMALL_ATTACKS])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    x_train, _, x_test, y_test = load_cifar10(data)
    assert report["run"]["n_train"] == 40 and report["run"]["n_test"] == 16  # --quick caps are above the data
    assert report["run"]["quick"] is True and report["run"]["device"] == "cpu"
    assert report["status"] == "complete"
    assert report["detectors"]["available"] or "no detector table" in report["detectors"]["note"]

    # Fig. 4A: eight levels per probed block, sizes within the data, more nodes at the top level
    sizes = report["libraries"]["sizes"]
    assert list(sizes) == list(cifar10.LAYERS)
    for layer, by_theta in sizes.items():
        assert [float(t) for t in by_theta] == list(cifar10.THRESHOLD_LEVELS[layer])
        assert all(1 <= n <= 40 for n in by_theta.values())
        assert by_theta[max(by_theta, key=float)] >= by_theta[min(by_theta, key=float)]
    assert len(set(sizes["conv1"].values()) | set(sizes["linear"].values())) > 1  # not all degenerate

    # the streamed sweep equals a LibraryNetwork fitted by the core at one CPL set (sizes, agreement)
    model = _model(weights)
    xn_train = to_model_space(x_train, "pixels", "normalized", CIFAR_MEAN, CIFAR_STD)
    xn_test = to_model_space(x_test, "pixels", "normalized", CIFAR_MEAN, CIFAR_STD)
    s1 = cifar10.CPL_SETS["S1"]
    net = LibraryNetwork(model, list(cifar10.LAYERS), thresholds=s1, top_k=8, device="cpu").fit(xn_train,
                                                                                                 progress=False)
    for layer, theta in s1.items():
        assert net.library_sizes_[layer] == sizes[layer][f"{theta:g}"]
    direct = net.evaluate((xn_test, y_test), progress=False)
    for layer, theta in s1.items():
        row = next(r for r in report["libraries"]["agreement"][layer] if r["theta"] == theta)
        assert row["top1_agreement"] == pytest.approx(direct[layer]["top1_agreement"])
        assert row["top3_agreement"] == pytest.approx(direct[layer]["top3_agreement"])
        assert row["level"] == cifar10.THRESHOLD_LEVELS[layer].index(theta)
    answers = model(xn_test).argmax(1)
    assert report["model"]["test_accuracy"] == pytest.approx(float((answers == y_test).float().mean()))
    assert report["libraries"]["agreement"]["layer1"][0]["seed_size"] == 2  # the seed's number beside ours

    # Fig. 5C: both protocols, seven sets, one row per epsilon
    det = report["detection"]
    assert set(det) == {"paper", "standard"}
    assert [r["epsilon"] for r in det["paper"]["epsilons"]] == [0.02, 0.1]
    assert all(r["n_selected"] == 8 for r in det["paper"]["epsilons"])  # the paper protocol keeps every image
    assert all(0 <= r["n_selected"] <= 8 for r in det["standard"]["epsilons"])
    for res in det.values():
        assert list(res["results"]) == list(cifar10.CPL_SETS) and res["top_k"] == 20
        for rows in res["results"].values():
            assert len(rows) == len(res["epsilons"])
            for r in rows:
                assert r["auroc"] is None or 0.0 <= r["auroc"] <= 1.0
    assert report["seed"]["cpl_auroc_paper_protocol"]["auroc_range"] == [0.74, 0.81]

    # the attacked inputs are kept, in their protocol's space and budget
    sets, meta = load_attack_sets(out / "attacks.safetensors")
    assert [(s.protocol, s.epsilon) for s in sets] == [("paper", 0.02), ("paper", 0.1), ("standard", 0.031373)]
    for s in sets:
        assert s.x_adv.shape == (8, 3, 32, 32)
        if s.protocol == "paper":  # normalised tensors clipped to [0, 1], as the seed did
            assert s.space == "normalized" and s.x_adv.min() >= 0 and s.x_adv.max() <= 1
        else:
            assert s.space == "pixels"
            assert (s.x_adv - x_test[:8]).abs().max() <= s.epsilon + 1e-5
    assert meta["dataset"] == "cifar10"

    md = (out / "report.md").read_text()
    for text in ("Quick run", "Figs. 4A-C", "### layer1 (CL1)", "Paper protocol", "Standard protocol", "93.10%",
                 "0.74-0.81", "| S7 |"):
        assert text in md
    for name in report["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fig4a_library_sizes.png" in report["figures"] and "fig5c_auroc_standard.png" in report["figures"]
    mem = report["memory"]
    assert mem["library_bytes"] == sum(mem["library_bytes_by_layer"].values()) > 0
    # 16,384 floats per conv1 / layer1 node, 10 per logit node, all stored as float32
    assert mem["library_bytes_by_layer"]["linear"] == 40 * sum(sizes["linear"].values())
    assert mem["library_bytes_by_layer"]["conv1"] == 4 * 16384 * sum(sizes["conv1"].values())
    assert report["timings"]["total"] > 0


def test_train_epochs_trains_once_then_reuses_the_cache(stand_in, tmp_path):
    root, _, _ = stand_in
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["reproduce", "cifar10", "--data-dir", str(root / "data"), "--train-epochs", "1", "--device", "cpu",
            "--out", str(out), "--cache-dir", str(cache), "--quick", "--protocols", "paper", "--paper-epsilons",
            "0.1", "--n-paper", "4", "--attack-steps", "2", "--no-plots", "--no-detectors", "--no-progress"]
    assert cli.main(argv) == 0
    first = json.loads((out / "report.json").read_text())["run"]
    assert first["training"]["cached"] == 0 and first["training"]["epochs"] == 1
    assert not (out / "cache").exists()  # the cache lives outside the run folder, which a rerun replaces
    cached = list(cache.glob("resnet44_e1_s0_*.pt"))
    assert [str(p) for p in cached] == [first["weights"]]
    assert cli.main(argv) == 0
    second = json.loads((out / "report.json").read_text())["run"]
    assert second["training"]["cached"] == 1 and second["weights"] == first["weights"]
    assert second["training"]["test_accuracy"] == first["training"]["test_accuracy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_quick_run_on_cuda(stand_in, tmp_path):
    root, data, weights = stand_in
    out = tmp_path / "out"
    rc = cli.main(["reproduce", "cifar10", "--data-dir", str(root / "data"), "--weights", str(weights), "--quick",
                   "--device", "cuda", "--out", str(out), "--no-progress", "--no-plots", *SMALL_ATTACKS])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["device"].startswith("cuda")
    assert 0 < report["memory"]["library_bytes"] <= report["memory"]["cuda_peak_allocated_bytes"]
    # the same libraries as the core on the CPU, up to borderline cosines moved by GPU rounding (TF32 convs)
    x_train, _, _, _ = load_cifar10(data)
    xn_train = to_model_space(x_train, "pixels", "normalized", CIFAR_MEAN, CIFAR_STD)
    s1 = cifar10.CPL_SETS["S1"]
    net = LibraryNetwork(_model(weights), list(cifar10.LAYERS), thresholds=s1, device="cpu").fit(xn_train,
                                                                                               progress=False)
    for layer, theta in s1.items():
        assert abs(net.library_sizes_[layer] - report["libraries"]["sizes"][layer][f"{theta:g}"]) <= 1
    assert set(report["detection"]) == {"paper", "standard"}


def test_a_failure_after_the_libraries_leaves_a_partial_report(stand_in, tmp_path, monkeypatch, capsys):
    from libnet_plugin.experiments.report import ExperimentError

    def broken(*args, **kwargs):
        raise ExperimentError("attack stage failed")

    monkeypatch.setattr(cifar10, "generate_attack_sets", broken)
    root, _, weights = stand_in
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("an older run's report")
    write_run_manifest(out)  # an earlier run's folder
    rc = cli.main(["reproduce", "cifar10", "--data-dir", str(root / "data"), "--weights", str(weights), "--quick",
                   "--device", "cpu", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 1 and "error: attack stage failed" in capsys.readouterr().err
    partial = json.loads(cifar10.partial_report_path(out).read_text())  # beside the run folder, not in it
    assert partial["status"] == "failed" and "attack stage failed" in partial["error"]
    assert list(partial["libraries"]["sizes"]) == list(cifar10.LAYERS) and "detection" not in partial
    assert (out / "report.md").read_text() == "an older run's report"  # the earlier run is untouched
    assert sorted(p.name for p in out.iterdir()) == [".libnet-run", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.partial-report.json"]  # no staging left


@pytest.fixture(scope="module")
def stand_in_40(stand_in, tmp_path_factory):
    """The stand-in's net with 40 test images: enough to calibrate the detector comparison at FPR 0.05."""
    _, _, weights = stand_in
    data = write_fake_cifar10(tmp_path_factory.mktemp("cifar10-40") / "data", n_train_per_batch=8, n_test=40, seed=0)
    return data, weights


def test_attacks_that_know_the_detector(stand_in_40, tmp_path, monkeypatch):
    """``--adaptive-detectors msp``: the detector comparison also attacks msp with the attacks that know it,
    in pixel space through the ResNet44's normalisation; report.json carries the evasion entries and the
    budget, report.md the evasion table. The comparison is cut to two detectors to keep the run short."""
    two = {"msp": ("msp", {}), "cpl (top_k 3)": ("cpl", {"top_k": 3})}  # cheap ones: ResNet44 features are large
    monkeypatch.setattr(cifar10, "registered_detectors", lambda pm=None: dict(two))
    monkeypatch.setattr("libnet_plugin.experiments.comparison.registered_detectors", lambda pm=None: dict(two))
    data, weights = stand_in_40
    out = tmp_path / "out"
    rc = cli.main(["reproduce", "cifar10", "--data-dir", str(data), "--weights", str(weights), "--quick",
                   "--device", "cpu", "--out", str(out), "--no-progress", "--no-plots", "--protocols", "standard",
                   "--attack-steps", "3", "--adaptive-detectors", "msp", "--adaptive-n", "4", "--adaptive-steps", "2",
                   "--adaptive-lambdas", "0", "1", "--black-box-queries", "5"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    budget = {"n": 4, "steps": 2, "restarts": 1, "lambdas": [0.0, 1.0], "queries": 5, "detectors": ["msp"],
              "seed": 1}
    assert budget.items() <= report["settings"]["adaptive"].items()
    det = report["detectors"]
    assert det["available"], det.get("note")
    table = det["table"]
    assert budget.items() <= table["adaptive"]["budget"].items()
    n = table["adaptive"]["n"]
    assert 1 <= n <= 4
    attacks = table["detectors"]["msp"]["attacks"]
    assert attacks["white-box method"] == "score gradient" and list(attacks["by_epsilon"]) == ["0.031373"]
    entry = attacks["by_epsilon"]["0.031373"]
    assert entry["n"] == n and entry["black-box"] is not None
    for key in ("non-adaptive", "white-box", "fooled (white-box)", "black-box", "strongest"):
        assert 0.0 <= entry[key] <= 1.0
    assert entry["strongest"] >= max(entry["non-adaptive"], entry["white-box"], entry["black-box"])
    assert all(0.0 <= v <= 1.0 for v in entry["strongest_at_fpr"].values())
    assert "attacks" not in table["detectors"]["cpl (top_k 3)"]  # not in --adaptive-detectors
    md = (out / "report.md").read_text()
    assert "### Evasion: misclassified and not flagged" in md and "| msp | score gradient |" in md
    assert "](evasion.png)" in md and (out / "evasion.png").read_bytes()[:4] == b"\x89PNG"
    assert table["files"]["evasion_png"] == str(out / "evasion.png")  # the run folder, not the staging one
    assert json.loads((out / "detectors.json").read_text())["adaptive"]["n"] == n


def test_a_bad_adaptive_option_exits_2_before_any_work(stand_in_40, tmp_path, capsys):
    data, weights = stand_in_40
    out = tmp_path / "out"
    rc = cli.main(["reproduce", "cifar10", "--data-dir", str(data), "--weights", str(weights), "--quick",
                   "--device", "cpu", "--out", str(out), "--adaptive-detectors", "msp", "--adaptive-steps", "0"])
    assert rc == 2 and "--adaptive-n, --adaptive-steps and --adaptive-restarts must be >= 1" in capsys.readouterr().err
    assert not out.exists() and not cifar10.partial_report_path(out).exists()


def test_too_few_test_images_for_the_detector_comparison_give_a_note(stand_in, tmp_path, monkeypatch):
    seen = {}

    def evaluate_detectors(net, train, clean_test, attacked_sets, ood_sets=None, detectors=None, out_dir=None, **kw):
        seen.update(net=net, train=train, clean_test=clean_test, attacked=attacked_sets, ood=ood_sets, out_dir=out_dir)
        return {"rows": [], "table_markdown": "| detector | stand-in |\n|---|---|\n| cpl | 0.250 |"}

    monkeypatch.setattr("libnet_plugin.experiments.comparison.evaluate_detectors", evaluate_detectors)
    root, _, weights = stand_in
    out = tmp_path / "out"
    rc = cli.main(["reproduce", "cifar10", "--data-dir", str(root / "data"), "--weights", str(weights), "--quick",
                   "--device", "cpu", "--out", str(out), "--no-progress", "--no-plots", "--protocols", "standard",
                   "--n-standard", "4", "--attack-steps", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    det = report["detectors"]
    # the stand-in data has 16 test images: fewer than calibration at FPR 0.05 needs, so a note and no call
    assert not det["available"] and "needs at least 19" in det["note"] and not seen
    assert "needs at least 19" in (out / "report.md").read_text()
