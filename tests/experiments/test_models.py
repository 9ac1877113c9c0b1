"""Tests of libnet_plugin.experiments.models: architectures, names, weight loading, normalisation, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libnet_plugin.errors import LibnetError
from libnet_plugin.experiments import models
from libnet_plugin.experiments.data import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD, load_mnist_default
from libnet_plugin.experiments.models import (
    MnistNet,
    Normalize,
    ResNet44,
    StateDictMismatchError,
    load_state_dict_checked,
    predict_labels,
    train_mnist_net,
)


def _output_sizes(model: nn.Module, names, x):
    sizes = {}
    handles = [
        getattr(model, n).register_forward_hook(
            lambda m, i, o, n=n: sizes.__setitem__(n, o[0].numel())
        )
        for n in names
    ]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, sizes


def test_mnist_net_shapes_and_names():
    torch.manual_seed(0)
    net = MnistNet().eval()
    assert [name for name, _ in net.named_children()] == ["conv1", "conv2", "fc1", "fc2"]
    out, sizes = _output_sizes(net, ["conv1", "conv2", "fc1", "fc2"], torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert sizes == {"conv1": 11520, "conv2": 3200, "fc1": 500, "fc2": 10}
    # log-softmax output: rows are log-probabilities
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(3), atol=1e-5)
    # normalisation buffers are not part of the weights
    assert set(net.state_dict()) == {f"{m}.{p}" for m in ("conv1", "conv2", "fc1", "fc2")
                                     for p in ("weight", "bias")}


def _expected_resnet44_params(num_classes=10):
    conv = lambda cin, cout: cin * cout * 9  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(3, 16) + bn(16)
    cin = 16
    for planes in (16, 32, 64):
        for _ in range(7):
            total += conv(cin, planes) + bn(planes) + conv(planes, planes) + bn(planes)
            cin = planes
    return total + 64 * num_classes + num_classes


def test_resnet44_structure():
    net = ResNet44().eval()
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == _expected_resnet44_params()
    assert 0.65e6 < n_params < 0.67e6
    assert [n for n, _ in net.named_children()] == ["conv1", "bn1", "layer1", "layer2", "layer3",
                                                    "linear"]
    keys = set(net.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn1.bias",
                "layer2.0.conv2.weight", "layer3.6.bn2.num_batches_tracked", "linear.weight",
                "linear.bias"):
        assert key in keys
    assert not any("shortcut" in k or "input_" in k for k in keys)
    assert len(net.layer1) == len(net.layer2) == len(net.layer3) == 7
    out, sizes = _output_sizes(net, ["conv1", "layer1", "layer2", "layer3", "linear"],
                               torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert sizes == {"conv1": 16384, "layer1": 16384, "layer2": 8192, "layer3": 4096, "linear": 10}
    assert ResNet44(num_classes=7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_option_a_shortcut_pads_channels_with_zeros():
    block = ResNet44().layer2[0]
    x = torch.randn(2, 16, 32, 32)
    sc = block.shortcut(x)
    assert sc.shape == (2, 32, 16, 16)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2])
    assert sc[:, :8].abs().sum() == 0 and sc[:, 24:].abs().sum() == 0
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    assert isinstance(ResNet44().layer1[0].shortcut, nn.Identity)


def test_state_dict_with_module_prefix_loads(tmp_path):
    torch.manual_seed(1)
    src = ResNet44()
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    # old checkpoints lack num_batches_tracked; torch tolerates it and so must we
    wrapped = {k: v for k, v in wrapped.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.th"
    torch.save({"state_dict": wrapped, "best_prec1": 93.1}, path)
    torch.manual_seed(2)
    dst = ResNet44()
    assert not torch.equal(dst.conv1.weight, src.conv1.weight)
    assert load_state_dict_checked(dst, path) is dst
    for key, value in src.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[key], value), key
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(dst.eval()(x), src.eval()(x))


def test_state_dict_mismatch_messages():
    net = MnistNet()
    state = net.state_dict()
    missing = {k: v for k, v in state.items() if k != "conv2.bias"}
    with pytest.raises(StateDictMismatchError, match=r"missing key\(s\), first 'conv2.bias'"):
        load_state_dict_checked(MnistNet(), missing)
    extra = dict(state, **{"fc3.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected key\(s\), first 'fc3.weight'"):
        load_state_dict_checked(MnistNet(), extra)
    bad_shape = dict(state, **{"fc2.weight": torch.zeros(9, 500)})
    with pytest.raises(ValueError) as info:
        load_state_dict_checked(MnistNet(), bad_shape)
    msg = str(info.value)
    assert "'fc2.weight'" in msg and "[9, 500]" in msg and "[10, 500]" in msg
    assert isinstance(info.value, LibnetError)


def test_state_dict_bad_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_state_dict_checked(MnistNet(), path)
    with pytest.raises(FileNotFoundError):
        load_state_dict_checked(MnistNet(), tmp_path / "absent.pt")
    with pytest.raises(TypeError):
        load_state_dict_checked(MnistNet(), 42)


def test_normalize_flag_equivalence():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    plain = MnistNet().eval()
    pixel = MnistNet(normalize=True).eval()
    load_state_dict_checked(pixel, plain.state_dict())
    expected = plain((x - MNIST_MEAN) / MNIST_STD)
    assert torch.allclose(pixel(x), expected, atol=1e-5)
    assert torch.allclose(nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), plain)(x), expected,
                          atol=1e-5)
    assert not torch.allclose(plain(x), expected, atol=1e-3)

    xc = torch.rand(2, 3, 32, 32)
    res = ResNet44().eval()
    res_pix = load_state_dict_checked(ResNet44(normalize=True), res.state_dict()).eval()
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(res_pix(xc), res((xc - mean) / std), atol=1e-4)


def test_normalize_rejects_bad_std():
    with pytest.raises(ValueError, match="std"):
        Normalize(0.0, 0.0)
    with pytest.raises(ValueError, match="std"):
        Normalize((0.1, 0.2), (1.0, -1.0))


def test_train_mnist_net_small_and_deterministic():
    x_tr, y_tr, x_te, y_te = load_mnist_default(seed=0, n_train=1000)
    x_te, y_te = x_te[:500], y_te[:500]
    net = train_mnist_net(x_tr, y_tr, epochs=1, seed=0, progress=False)
    acc = (predict_labels(net, (x_te - MNIST_MEAN) / MNIST_STD) == y_te).float().mean().item()
    assert acc > 0.75  # chance is 0.1; one epoch on 1,000 images gives about 0.85-0.9
    again = train_mnist_net(x_tr[:256], y_tr[:256], epochs=1, seed=3, progress=False)
    again2 = train_mnist_net(x_tr[:256], y_tr[:256], epochs=1, seed=3, progress=False)
    assert torch.equal(again.fc2.weight, again2.fc2.weight)
    assert not again.training


def test_adversarial_training_gives_a_more_robust_net():
    from libnet_plugin.experiments.models import _linf_attack

    x_tr, y_tr, x_te, y_te = load_mnist_default(seed=0, n_train=1000)
    x_te, y_te = (x_te[:200] - MNIST_MEAN) / MNIST_STD, y_te[:200]
    plain = train_mnist_net(x_tr, y_tr, epochs=1, seed=0, progress=False)
    robust = train_mnist_net(x_tr, y_tr, epochs=1, seed=0, progress=False, adversarial_eps=0.2)
    again = train_mnist_net(x_tr[:128], y_tr[:128], epochs=1, seed=0, progress=False, adversarial_eps=0.2,
                            adversarial_steps=3)
    again2 = train_mnist_net(x_tr[:128], y_tr[:128], epochs=1, seed=0, progress=False, adversarial_eps=0.2,
                             adversarial_steps=3)
    assert torch.equal(again.fc2.weight, again2.fc2.weight)  # deterministic for the seed, attacks included
    eps = 0.2 / MNIST_STD
    acc = {}
    for name, net in (("plain", plain), ("robust", robust)):
        adv = _linf_attack(net, x_te, y_te, eps, 10, torch.Generator().manual_seed(1))
        assert float((adv - x_te).abs().max()) <= eps * (1 + 1e-5)  # within the radius
        assert float(adv.min()) >= (0 - MNIST_MEAN) / MNIST_STD - 1e-5  # and the pixel box
        assert float(adv.max()) <= (1 - MNIST_MEAN) / MNIST_STD + 1e-5
        acc[name] = (predict_labels(net, adv) == y_te).float().mean().item()
    assert acc["robust"] > acc["plain"] + 0.15, acc  # measured: 0.33 against 0.085 under PGD-10 at eps 0.2
    with pytest.raises(ValueError, match="adversarial_eps"):
        train_mnist_net(x_tr[:8], y_tr[:8], progress=False, adversarial_eps=2.0)


def test_train_mnist_net_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_mnist_net(torch.full((4, 1, 28, 28), 255.0), torch.zeros(4, dtype=torch.long),
                        progress=False)
    with pytest.raises(ValueError, match="shaped"):
        train_mnist_net(torch.rand(4, 28, 28), torch.zeros(4, dtype=torch.long), progress=False)


def test_predict_labels_restores_mode():
    net = MnistNet().train()
    labels = predict_labels(net, torch.rand(5, 1, 28, 28), batch_size=2)
    assert labels.shape == (5,) and labels.dtype == torch.long
    assert net.training
    assert models.predict_labels(net, torch.rand(0, 1, 28, 28)).shape == (0,)


def test_junk_weight_files_always_get_the_clear_error(tmp_path):
    """200 seeded junk files (random bytes, bit flips and truncations of a real file, fake zips): each is refused
    with SaveFormatError / StateDictMismatchError (both ValueError), never another exception."""
    import io
    import random

    from libnet_plugin.errors import LibnetError
    from libnet_plugin.experiments.models import MnistNet, load_state_dict_checked

    rng = random.Random(0)
    buf = io.BytesIO()
    torch.save(MnistNet().state_dict(), buf)
    good = buf.getvalue()
    for i in range(200):
        kind = i % 4
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
        elif kind == 1:
            flipped = bytearray(good)
            for _ in range(5):
                flipped[rng.randrange(len(flipped))] = rng.getrandbits(8)
            data = bytes(flipped)
        elif kind == 2:
            data = good[:rng.randint(0, len(good))]
        else:
            data = b"PK\x03\x04" + bytes(rng.getrandbits(8) for _ in range(300))
        path = tmp_path / f"w{i}.pt"
        path.write_bytes(data)
        try:
            load_state_dict_checked(MnistNet(), path)
        except (LibnetError, ValueError) as exc:
            assert str(exc)
        # a flipped byte may still load (e.g. inside a tensor's data): that is a valid, if different, weight file
