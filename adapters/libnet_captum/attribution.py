"""Captum-style classes backed by a library network (Lee, 2019).

:class:`LibraryAttribution` is a ``captum.attr.Attribution``: for each chosen layer it returns that
layer's class evidence P (Eq. 3 of the paper), the same numbers as
:meth:`libnet_plugin.LibraryNetwork.predict_scores`. :class:`LibraryExemplars` is a
``captum.influence.DataInfluence``: for each chosen layer, the training inputs behind the library nodes
an input is closest to, shaped like ``captum.influence.SimilarityInfluence``'s result.

Layer activations are read with forward hooks as Captum's ``LayerActivation`` sets them (and a module's
output as the core probe reads it); the hooks live for one forward pass
and are removed in ``finally``, also when the model raises.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import pluggy
import torch
from captum.attr import Attribution
from captum.influence import DataInfluence
from captum.log import log_usage
from torch import Tensor, nn

from libnet_plugin.errors import LayerNotFoundError, LibnetError, NotFittedError, ShapeMismatchError
from libnet_plugin.network import LibraryNetwork
from libnet_plugin.plugins import default_plugin_manager, get_plugin_manager
from libnet_plugin.probe import check_finite, model_device, unknown_layer_message

from . import plugin as _adapter_plugin
from .probe import CaptumForward, layer_activations

__all__ = ["LibraryAttribution", "LibraryExemplars"]

LayerSpec = str | nn.Module
TensorOrTuple = Tensor | tuple[Tensor, ...]
TargetType = None | int | Tensor | Sequence[int]


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a positive integer, got {value!r}")
    try:
        k = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a positive integer, got {value!r}") from None
    if k < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return k


def _root_module(forward_func: Any) -> nn.Module | None:
    """The ``nn.Module`` behind ``forward_func`` (itself, or the owner of a bound ``forward``), if any."""
    for candidate in (forward_func, getattr(forward_func, "__self__", None)):
        if isinstance(candidate, nn.Module):
            return candidate
    return None


def _naming(model: Any, owner: str) -> tuple[dict[str, nn.Module], str] | None:
    """``({name: module}, description)`` for objects whose layers are torch modules with names."""
    if isinstance(model, nn.Module):
        return {n: m for n, m in model.named_modules() if n}, f"{owner} {type(model).__name__}"
    if isinstance(model, CaptumForward):
        return dict(model.layers), f"{owner} CaptumForward"
    return None


class _LibraryLayers:
    """What :class:`LibraryAttribution` and :class:`LibraryExemplars` share: resolving the layers, checking
    and fitting the library network, and reading the layers' activations (:func:`layer_activations`)."""

    forward_func: Callable[..., Any]
    library_network: LibraryNetwork | None

    def _setup_layers(self, forward_func: Callable[..., Any], layers: LayerSpec | Sequence[LayerSpec],
                      library_network: LibraryNetwork | None, device_ids: list[int] | None) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be a torch.nn.Module or a callable, got {type(forward_func).__name__}")
        if library_network is not None and not isinstance(library_network, LibraryNetwork):
            raise TypeError("library_network must be a libnet_plugin.LibraryNetwork or None, got "
                            f"{type(library_network).__name__}")
        self.library_network = library_network
        self.device_ids = device_ids
        self._single_layer = isinstance(layers, (str, nn.Module))
        if self._single_layer:
            specs: list[Any] = [layers]
        elif isinstance(layers, (list, tuple)):
            specs = list(layers)
        else:
            raise TypeError("layers must be a torch.nn.Module, a layer name, or a list of them, got "
                            f"{type(layers).__name__}")
        if not specs:
            raise ValueError("layers must name at least one layer")

        root = _root_module(forward_func)
        # Names come from the library network's model when it has named torch layers (its libraries are
        # keyed by those names), otherwise from the model behind forward_func.
        naming = _naming(library_network.model, "the library network's model") if library_network is not None else None
        if naming is None and root is not None:
            naming = _naming(root, "the model")
        names: list[str] = []
        modules: list[nn.Module] = []
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                if naming is None:
                    raise TypeError(
                        f"layer {spec!r} is given by name, but forward_func is not a torch.nn.Module (nor a bound "
                        "method of one) and no library network with a named model was given; pass the modules")
                named, where = naming
                if spec not in named:
                    raise LayerNotFoundError(unknown_layer_message(spec, list(named), kind=where.removeprefix("the ")))
                names.append(spec)
                modules.append(named[spec])
            elif isinstance(spec, nn.Module):
                if naming is None:
                    names.append(f"layer{i}")
                else:
                    named, where = naming
                    found = next((n for n, m in named.items() if m is spec), None)
                    if found is None:
                        raise LayerNotFoundError(f"layers[{i}] ({type(spec).__name__}) is not a submodule of {where}")
                    names.append(found)
                modules.append(spec)
            else:
                raise TypeError(f"layers[{i}] must be a torch.nn.Module or a layer name, got {type(spec).__name__}")
        if root is not None:
            inside = {id(m) for m in root.modules()}
            for name, module in zip(names, modules):
                if id(module) not in inside:
                    raise LayerNotFoundError(f"layer {name!r} ({type(module).__name__}) is not a submodule of the "
                                             f"model {type(root).__name__} that forward_func runs")
        if len(set(names)) != len(names):
            raise ValueError(f"layers must be distinct, got {names}")
        self.layer_names: list[str] = names
        self.layer_modules: list[nn.Module] = modules
        if library_network is not None:
            self._check_layers_of(library_network)

    def _check_layers_of(self, net: LibraryNetwork) -> None:
        missing = [n for n in self.layer_names if n not in net.layers]
        if missing:
            raise LayerNotFoundError(f"the library network was fitted on the layers {net.layers}; it has no library "
                                     f"for {missing}. Pass a library network fitted on {self.layer_names}, or call "
                                     "fit(train) without one")

    # ------------------------------------------------------------------ fitting
    def fit(self, train: Any, thresholds: float | dict[str, float] | str | None = None, top_k: int | None = None, *,
            additional_forward_args: Any = None, progress: bool | None = None, **options: Any) -> Any:
        r"""
        Build the library network of the layers from the training data; returns ``self``.

        Args:

            train (Tensor, DataLoader, Dataset, or iterable of batches): The training inputs in the
                        order that defines the libraries (anything
                        :meth:`libnet_plugin.LibraryNetwork.fit` accepts; labels are ignored).
                        Exemplar indices refer to this order.
            thresholds (float, dict[str, float], or "auto", optional): theta in (0, 1], one for all
                        layers or one per layer name (see ``layer_names``).
                        Default: 0.7
            top_k (int, optional): The library network's default number of nodes per prediction.
                        Default: 3
            additional_forward_args (Any, optional): Constant extra arguments passed to
                        ``forward_func`` after the inputs of every training batch.
                        Default: None
            progress (bool, optional): Show progress bars. Default: only on a terminal.
            **options (Any): Further keyword arguments of :class:`libnet_plugin.LibraryNetwork`
                        (``device``, ``batch_size``, ``library``, ``plugin_manager``, ...).

        Returns:
            *self*, with ``library_network`` fitted. When a library network was given to the
            constructor, it is refitted with its own settings (passing settings then is an error).

        Examples::

            >>> attr = LibraryAttribution(model, [model.fc1, model.fc2]).fit(x_train, thresholds=0.8)  # doctest: +SKIP
            >>> attr.library_network.library_sizes_  # doctest: +SKIP
        """
        if self.library_network is not None:
            if thresholds is not None or top_k is not None or options or additional_forward_args is not None:
                raise ValueError("this object was given a library network: fit(train) refits it with its own "
                                 "settings; build a new LibraryNetwork to change thresholds, top_k or options")
            self.library_network.fit(train, progress=progress)
            return self
        simple = (isinstance(self.forward_func, nn.Module) and not isinstance(self.forward_func, nn.DataParallel)
                  and self.device_ids is None and additional_forward_args is None)
        if simple:  # the core's built-in probe: the network then saves and loads with the plain model
            model: Any = self.forward_func
        else:
            model = CaptumForward(self.forward_func, dict(zip(self.layer_names, self.layer_modules)),
                                  device_ids=self.device_ids, additional_forward_args=additional_forward_args)
            options["plugin_manager"] = self._manager_with_adapter(options.get("plugin_manager"))
            options.setdefault("device", model_device(self.layer_modules))
        net = LibraryNetwork(model, self.layer_names, thresholds=0.7 if thresholds is None else thresholds,
                             top_k=3 if top_k is None else top_k, **options)
        self.library_network = net.fit(train, progress=progress)
        return self

    @staticmethod
    def _manager_with_adapter(pm: pluggy.PluginManager | None) -> pluggy.PluginManager:
        """A plugin manager that has this adapter's probe (autoloading may have been turned off)."""
        if pm is None:
            pm = default_plugin_manager()
            return pm if pm.is_registered(_adapter_plugin) else get_plugin_manager(autoload=False, plugins=[_adapter_plugin])
        if not pm.is_registered(_adapter_plugin):
            raise LibnetError("the plugin_manager given does not have the Captum adapter's plugin; register it with "
                              "pm.register(libnet_captum.plugin, name='captum')")
        return pm

    # ------------------------------------------------------------------ evaluation
    def _fitted_network(self) -> LibraryNetwork:
        net = self.library_network
        if net is None or not net.is_fitted:
            raise NotFittedError(f"{type(self).__name__} has no fitted library network; pass a fitted "
                                 "library_network= to the constructor or call fit(train) first")
        return net

    def _activations(self, inputs: TensorOrTuple, additional_forward_args: Any) -> tuple[LibraryNetwork, dict[str, Tensor]]:
        """Check the inputs, run the model once, return the fitted network and ``{layer: HAP [B, D]}``."""
        net = self._fitted_network()
        if isinstance(inputs, Tensor):
            tensors: tuple[Tensor, ...] = (inputs,)
        elif isinstance(inputs, tuple) and inputs and all(isinstance(t, Tensor) for t in inputs):
            tensors = inputs
        else:
            raise TypeError(f"inputs must be a Tensor or a tuple of Tensors, got {type(inputs).__name__}")
        for i, t in enumerate(tensors):
            check_finite(t, "the inputs" if len(tensors) == 1 else f"inputs[{i}]")
        shape = net.input_shape_
        if shape is not None and len(tensors) == 1 and tuple(tensors[0].shape[1:]) != tuple(shape):
            raise ShapeMismatchError(
                f"inputs have shape {tuple(tensors[0].shape)} (per input {tuple(tensors[0].shape[1:])}); the library "
                f"network was fitted on inputs of shape [B, {', '.join(map(str, shape))}]")
        _, haps = layer_activations(self.forward_func, self.layer_modules, inputs, additional_forward_args,
                                    self.device_ids, self.layer_names)
        return net, dict(zip(self.layer_names, haps))


class LibraryAttribution(_LibraryLayers, Attribution):
    r"""
    Per-layer class evidence of a library network (Lee, 2019, Eq. 3) as a Captum attribution.

    For every chosen layer, a library stores the normalised activation patterns that were novel when
    the training set passed through, and a Hebbian readout links its nodes to the model's answers.
    The attribution of an input at a layer is the evidence ``P`` of that layer for every class: the sum,
    over the ``top_k`` library nodes most similar to the input's activation, of each node's readout
    weights times its cosine. It says how far each layer has come towards the decision. The result has
    one entry per class, not the layer's shape, so this is an ``Attribution``, not a
    ``LayerAttribution``.

    Args:

        forward_func (Callable or torch.nn.Module): The model, or any function of it returning class
                    scores ``[B, C]``.
        layers (torch.nn.Module, str, or list of them): The layer or layers to explain, as modules or as
                    names from ``model.named_modules()``. One layer gives a Tensor from
                    :meth:`attribute`, a list gives a tuple.
        library_network (libnet_plugin.LibraryNetwork, optional): A library network of ``forward_func``
                    with libraries for these layers (it may have more). Without one, call
                    :meth:`fit` first.
                    Default: None
        device_ids (list[int], optional): Necessary only if ``forward_func`` applies a
                    ``DataParallel`` model, as in Captum's ``LayerActivation``.
                    Default: None

    Attributes:

        layer_names (list[str]): The names of the layers, in order (the keys of the library network).
        library_network (libnet_plugin.LibraryNetwork or None): The library network used.

    Examples::

        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> attr = LibraryAttribution(model, [model[0], model[2]]).fit(torch.randn(500, 8), thresholds=0.9)
        >>> hidden, logits = attr.attribute(torch.randn(4, 8))   # each Tensor[4, 3]
        >>> evidence = attr.attribute(torch.randn(4, 8), target=2)  # tuple of Tensor[4]
    """

    def __init__(self, forward_func: Callable[..., Any], layers: LayerSpec | Sequence[LayerSpec],
                 library_network: LibraryNetwork | None = None, device_ids: list[int] | None = None) -> None:
        Attribution.__init__(self, forward_func)
        self._setup_layers(forward_func, layers, library_network, device_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layer_names}, library_network={self.library_network!r})"

    @log_usage(part_of_slo=True)
    def attribute(self, inputs: TensorOrTuple, target: TargetType = None, additional_forward_args: Any = None,
                  top_k: int | None = 3) -> Tensor | tuple[Tensor, ...]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Input for which the layers' class evidence is
                        computed. If forward_func takes a single tensor as input, a single input
                        tensor should be provided. If forward_func takes multiple tensors as input, a
                        tuple of the input tensors should be provided. Dimension 0 of every tensor
                        corresponds to the number of examples. A single tensor must have the
                        per-example shape the library network was fitted on.
            target (int, list[int], or Tensor, optional): Class for which the evidence is returned.
                        If None, the evidence for every class is returned. Otherwise, either

                        - a single integer or a tensor holding a single integer, applied to every
                          example, or
                        - a list of integers or a 1D tensor of length ``B``, one class per example.

                        Every class must lie in ``[0, C)``.
                        Default: None
            additional_forward_args (Any, optional): If the forward function requires additional
                        arguments other than the inputs, they can be given here: a single
                        non-tuple argument or a tuple of arguments, passed to forward_func after
                        the inputs.
                        Default: None
            top_k (int, optional): Number of library nodes behind the evidence (3 in the paper's MNIST
                        figures, 20 for the consistency score); None uses the library network's own
                        ``top_k``.
                        Default: 3

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*):
                        The class evidence P of each layer, ``[B, C]`` float32 on the library network's
                        device, or ``[B]`` when ``target`` is given. It equals
                        ``library_network.predict_scores(inputs, top_k)[layer]`` (selected at
                        ``target``). A single layer gives a Tensor; a list of layers gives a tuple
                        with one Tensor per layer, in the order given.

        Examples::

            >>> # ImageClassifier takes a single input tensor of images Nx3x32x32,
            >>> # and returns an Nx10 tensor of class scores. x_train holds training images.
            >>> net = ImageClassifier()  # doctest: +SKIP
            >>> attr = LibraryAttribution(net, [net.conv1, net.fc1]).fit(x_train, thresholds=0.7)  # doctest: +SKIP
            >>> input = torch.randn(2, 3, 32, 32)  # doctest: +SKIP
            >>> # evidence of conv1 and fc1 for each of the 10 classes: two Tensors of shape 2x10
            >>> conv1_evidence, fc1_evidence = attr.attribute(input)  # doctest: +SKIP
            >>> # evidence for class 3 only: two Tensors of shape 2
            >>> conv1_3, fc1_3 = attr.attribute(input, target=3)  # doctest: +SKIP
        """
        k = None if top_k is None else _positive_int(top_k, "top_k")
        net, haps = self._activations(inputs, additional_forward_args)
        k = net.top_k if k is None else k
        by_layer = net.scores_from_haps(haps, k, layers=self.layer_names)
        scores = [by_layer[n] for n in self.layer_names]
        if target is not None:
            index = self._target_index(target, scores[0].shape[0], int(net.n_classes_), scores[0].device)
            scores = [p.gather(1, index[:, None]).squeeze(1) for p in scores]
        return scores[0] if self._single_layer else tuple(scores)

    @staticmethod
    def _target_index(target: Any, batch: int, n_classes: int, device: torch.device) -> Tensor:
        """Captum's target forms for a ``[B, C]`` output, as a ``LongTensor[B]``, checked against the classes."""
        if isinstance(target, tuple):
            raise TypeError(f"target must be an int, a list of ints or a Tensor; tuple targets index outputs with more "
                            f"than two dimensions, and the evidence is [B, {n_classes}]; got {target!r}")
        if isinstance(target, bool):
            raise TypeError(f"target must be an int, a list of ints or a Tensor, got {target!r}")
        if isinstance(target, Tensor):
            if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
                raise TypeError(f"a target Tensor must hold integers, got dtype {target.dtype}")
            t = target.detach().reshape(-1).to("cpu", torch.long)
        elif isinstance(target, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in target):
                raise TypeError(f"a target list must hold ints, got {target!r}")
            t = torch.tensor(target, dtype=torch.long)
        else:
            try:
                t = torch.tensor([operator.index(target)], dtype=torch.long)
            except TypeError:
                raise TypeError(f"target must be an int, a list of ints or a Tensor, got {type(target).__name__}") from None
        if t.numel() == 1 and not isinstance(target, list):
            t = t.expand(batch)
        elif t.numel() != batch:
            raise ShapeMismatchError(f"target has {t.numel()} entries for a batch of {batch} inputs; give one class "
                                     "for all inputs or one per input")
        bad = t[(t < 0) | (t >= n_classes)]
        if bad.numel():
            raise ValueError(f"target {int(bad[0])} is outside the classes of the library network: expected "
                             f"0 <= target < {n_classes}")
        return t.to(device)

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the attribution is multiplied by the inputs.

        Returns:
            False: the evidence is not multiplied by the inputs (nor by any baseline difference).
        """
        return False

    def has_convergence_delta(self) -> bool:
        """Whether the attribution has a convergence delta.

        Returns:
            False: the evidence has no completeness property, so there is no convergence delta.
        """
        return False


class LibraryExemplars(_LibraryLayers, DataInfluence):
    r"""
    The training inputs each layer thinks an input resembles: a Captum influence method.

    Every library node is the activation pattern of one training input. For each input and layer,
    :meth:`influence` returns the indices of the training inputs behind the ``top_k`` nodes most
    similar to the input's activation, and the cosine similarities, in the shape of
    ``captum.influence.SimilarityInfluence``. Only the library nodes are searched (not every training
    input), so the answer is fast and uses the same nodes as :class:`LibraryAttribution`.

    Args:

        forward_func (Callable or torch.nn.Module): The model, or any function of it returning class
                    scores ``[B, C]``.
        layers (torch.nn.Module, str, or list of them): The layer or layers, as modules or as names
                    from ``model.named_modules()``.
        library_network (libnet_plugin.LibraryNetwork, optional): A fitted library network with
                    libraries for these layers (for example ``LibraryAttribution.library_network``).
                    Without one, call :meth:`fit` first.
                    Default: None
        device_ids (list[int], optional): Necessary only if ``forward_func`` applies a
                    ``DataParallel`` model.
                    Default: None

    Examples::

        >>> exemplars = LibraryExemplars(model, ["0", "2"], library_network=attr.library_network)  # doctest: +SKIP
        >>> idx, sim = exemplars.influence(x_test[:4], top_k=3)["2"]   # each of shape 4x3  # doctest: +SKIP
        >>> x_train[idx[0]]   # the training inputs layer "2" relates the first test input to  # doctest: +SKIP
    """

    def __init__(self, forward_func: Callable[..., Any], layers: LayerSpec | Sequence[LayerSpec],
                 library_network: LibraryNetwork | None = None, device_ids: list[int] | None = None) -> None:
        self.forward_func = forward_func
        self.model = forward_func  # the attribute name DataInfluence uses
        self._setup_layers(forward_func, layers, library_network, device_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layer_names}, library_network={self.library_network!r})"

    @log_usage(part_of_slo=True)
    def influence(self, inputs: TensorOrTuple, top_k: int = 3,  # type: ignore[override]
                  additional_forward_args: Any = None) -> dict[str, tuple[Tensor, Tensor]]:
        r"""
        Args:

            inputs (Tensor or tuple[Tensor, ...]): Batch of examples for which the exemplars are
                        found, passed to forward_func; dimension 0 is the batch.
            top_k (int, optional): The number of library nodes (training inputs) per example and
                        layer, most similar first; clipped to the library size.
                        Default: 3
            additional_forward_args (Any, optional): Additional arguments passed to forward_func
                        after the inputs.
                        Default: None

        Returns:

            influences (dict): ``{layer name: (indices, similarities)}`` for every layer, in order.
                        ``indices`` is a ``LongTensor`` of shape ``(B, top_k)`` holding positions in
                        the training data in the order ``fit`` saw it; ``similarities`` holds the
                        cosines between the example's activation and those training inputs'
                        activations, shape ``(B, top_k)``, in decreasing order. They equal
                        ``library_network.exemplars(inputs, top_k, return_similarities=True)``.

        Examples::

            >>> influences = LibraryExemplars(net, [net.conv1, net.fc1]).fit(x_train).influence(x_test[:2])  # doctest: +SKIP
            >>> fc1_indices, fc1_similarities = influences["fc1"]   # each of shape 2x3  # doctest: +SKIP
        """
        k = _positive_int(top_k, "top_k")
        net, haps = self._activations(inputs, additional_forward_args)
        indices, sims = net.exemplars_from_haps(haps, k, layers=self.layer_names)
        return {name: (indices[name], sims[name]) for name in self.layer_names}
