"""The deep k-nearest-neighbours baseline, ``"knn"`` (Papernot & McDaniel, 2018), without attack examples."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._batches import iter_batches, n_rows
from .._validate import check_int
from ..distributed import gather_all, world
from ..errors import NotFittedError, SaveFormatError, ShapeMismatchError
from ..library import normalize_rows
from ..probe import ProbeResult
from ._features import (
    check_layers,
    require_tensor,
)
from .api import ConsistencyScore, FittedNetwork

__all__ = ['DeepKNNScore']


class DeepKNNScore(ConsistencyScore):
    """Deep k-nearest neighbours (Papernot & McDaniel, 2018), ``"knn"``, without attack examples.

    Paper: Papernot & McDaniel, "Deep k-Nearest Neighbors: Towards Confident, Interpretable and Robust Deep
    Learning", 2018, https://arxiv.org/abs/1803.04765.

    Keeps the normalised activations of every training input for the chosen layers (this memory is what
    the library networks avoid). For a new input, per layer, the ``k`` training activations of largest
    cosine vote with their labels; the score is the number of votes, summed over layers, that disagree
    with the model's answer (the DkNN nonconformity; its conformal p-value is a monotone function of it,
    so the calibrated threshold plays the same role).

    Args:
        k: neighbours per layer (10 here; the DkNN paper used 75, which scored lower on MNIST).
        layers: layers to use (default: every probed layer).
        labels: ``"auto"`` (ground-truth labels when the training data carries them, else the model's
            answers), ``"true"`` (require labels) or ``"model"`` (the model's answers).

    Example:
        >>> DeepKNNScore(k=3).k
        3
    """

    name: ClassVar[str] = "knn"
    requires_training_data: ClassVar[bool] = True

    def __init__(self, k: int = 10, layers: Sequence[str] | None = None, labels: str = "auto"):
        self.k = check_int(k, "k")
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        if labels not in ("auto", "true", "model"):
            raise ValueError(f"labels must be 'auto', 'true' or 'model', got {labels!r}")
        self.labels = labels
        self.layers_: list[str] | None = None
        self.train_: dict[str, Tensor] = {}
        self.train_labels_: Tensor | None = None

    def __repr__(self) -> str:
        return f"DeepKNNScore(k={self.k}, layers={self.layers}, labels={self.labels!r})"

    def fit(self, net: FittedNetwork, data: Iterable[Any] | None = None) -> DeepKNNScore:
        """Store the normalised training activations of the chosen layers and the training labels.

        Args:
            net: the fitted library network.
            data: the training data (inputs, or ``(inputs, labels)`` batches).

        Returns:
            self.
        """
        net.check_fitted()
        if data is None:
            raise ValueError("the 'knn' detector keeps the training activations: pass train= to ConsistencyDetector "
                             "or call det.fit(train) before calibrate")
        layers = check_layers(net, self.layers, self.name)
        parts: dict[str, list[Tensor]] = {l: [] for l in layers}
        labels: list[Tensor] = []
        for x, y in iter_batches(data, net.batch_size):
            if n_rows(x) == 0:
                continue
            r = net.run(x)
            if self.labels == "model" or (self.labels == "auto" and y is None):
                labels.append(r.answers.to(net.device))
            elif y is None:
                raise ValueError("labels='true' needs training data with labels: pass (X, y) or a labelled loader")
            else:
                labels.append(y.to(net.device, torch.long))
            for l in layers:
                parts[l].append(normalize_rows(r.haps[l]))
        if not labels and world() is None:
            raise ValueError("the 'knn' detector received no training inputs (empty data)")
        what = "training inputs for the 'knn' detector"
        train = {l: gather_all(torch.cat(p) if p else torch.empty(0), net.device, what)  # all ranks' rows
                 for l, p in parts.items()}
        train_labels = gather_all(torch.cat(labels) if labels else torch.empty(0, dtype=torch.long), net.device, what)
        self.layers_, self.train_, self.train_labels_ = layers, train, train_labels
        return self

    def check_is_fitted(self) -> None:
        if self.layers_ is None:
            raise NotFittedError("the 'knn' detector is not fitted; call fit(net, train) first")

    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        answers = result.answers.to(net.device)
        total = torch.zeros(answers.shape[0], device=net.device)
        labels = self.train_labels_
        assert self.layers_ is not None and labels is not None  # check_is_fitted above
        for l in self.layers_:
            ref = self.train_[l]
            x = normalize_rows(result.haps[l].to(ref.device))
            if x.shape[1] != ref.shape[1]:
                raise ShapeMismatchError(f"layer {l!r}: activations of size {x.shape[1]}, fitted on {ref.shape[1]}")
            idx = (x @ ref.T).topk(min(self.k, ref.shape[0]), dim=1).indices
            total += (labels[idx] != answers[:, None]).sum(dim=1).to(total.dtype)
        return total

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "layers": self.layers, "labels": self.labels, "layers_": self.layers_}

    def state_dict(self) -> dict[str, Tensor]:
        if self.layers_ is None:
            return {}
        out = {f"layer/{i}/train": self.train_[l] for i, l in enumerate(self.layers_)}
        if self.train_labels_ is not None:
            out["labels"] = self.train_labels_
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        self.layers_ = check_layers(net, config.get("layers_"), self.name)
        self.train_ = {l: require_tensor(state, f"layer/{i}/train", self.name).float().to(net.device)
                       for i, l in enumerate(self.layers_)}
        self.train_labels_ = require_tensor(state, "labels", self.name).long().to(net.device)
        dims = getattr(net, "hap_dims_", {})
        for l, bank in self.train_.items():  # checked at load, not at the first score
            if bank.dim() != 2 or bank.shape[1] != dims.get(l, bank.shape[1]) or bank.shape[0] != self.train_labels_.shape[0]:
                raise SaveFormatError(f"the saved training activations of layer {l!r} of the {self.name!r} detector have "
                                      f"shape {list(bank.shape)}, expected [{self.train_labels_.shape[0]}, {dims.get(l)}] "
                                      "(modified or corrupted)")
