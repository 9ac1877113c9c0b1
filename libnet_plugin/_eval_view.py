"""An eval-mode view of a torch model: the guard's forward passes never run in training mode.

``model.train()`` / ``model.eval()`` set a flag on every module object; a forward pass reads each module's
flag when that module runs, so a thread that switches modes while another thread is inside a forward
pass changes that pass halfway (dropout on, batch-norm updating its running statistics). Taking a lock
does not help: ``model.train()`` takes none.

:func:`eval_view` builds a second tree of module objects, one per module of the model, each with its own
``training`` flag fixed to ``False`` and its own submodule table (pointing at the other view modules),
and every other attribute shared with the model's module: the same parameter and buffer tables (so the
same tensors, also after ``model.to(...)`` or ``load_state_dict``), the same hook tables (the model's
forward hooks run, and hooks registered on the view are the model's too); other attributes set on the
model's modules later are copied over by :meth:`EvalView.sync` before each use. No thread holds a reference
to the view's modules but the guard, so nothing switches them to training mode, and a batch-norm module
in eval mode reads its running statistics without writing them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
    >>> view = EvalView.of(model).root
    >>> view.training, view[1].training, model.training, view[0].weight is model[0].weight
    (False, False, True, True)
    >>> before = model[1].running_mean.clone()
    >>> _ = view(torch.randn(4, 3))
    >>> bool(torch.equal(model[1].running_mean, before))
    True
"""

from __future__ import annotations

import operator

import torch
from torch import nn

__all__ = ["EvalView"]

#: the attributes of a view module that are its own: the rest mirror the model's module
_OWN = frozenset(("_modules", "training"))


class EvalView:
    """The eval-mode view of a model (see the module's docstring): ``root`` and ``views`` (``{id(model
    module): view module}``). Build it with :meth:`of`; call :meth:`sync` before each use."""

    def __init__(self, model: nn.Module, root: nn.Module, views: dict[int, nn.Module]):
        self.model, self.root, self.views = model, root, views
        # per module: its attribute table and the view's, a snapshot of its attribute values, its submodule
        # table and a snapshot of its submodules (compared by identity, in C, on every sync)
        self._entries = [(m.__dict__, views[id(m)].__dict__, tuple(m.__dict__.values()), m._modules,
                          tuple(m._modules.values())) for m in model.modules()]

    @classmethod
    def of(cls, model: nn.Module) -> EvalView | None:
        """The view of ``model``; ``None`` for a model whose modules keep their mode outside the Python object
        (TorchScript) or may call the original modules directly: ``torch.compile``'s wrapper, and a module
        whose ``forward`` was replaced on the instance (accelerate's hooks bind the original module)."""
        for m in model.modules():
            if (isinstance(m, torch.jit.ScriptModule) or type(m).__name__ == "OptimizedModule"
                    or "forward" in m.__dict__):
                return None
        views: dict[int, nn.Module] = {}

        def view(m: nn.Module) -> nn.Module:
            got = views.get(id(m))
            if got is not None:
                return got
            v = object.__new__(type(m))
            v.__dict__.update(m.__dict__)  # shares the parameter, buffer and hook tables (and every other attribute)
            views[id(m)] = v  # before the children: a module reached twice (shared layers) has one view
            v.__dict__["_modules"] = type(m._modules)((k, None if c is None else view(c)) for k, c in m._modules.items())
            v.__dict__["training"] = False
            return v

        return cls(model, view(model), views)

    def sync(self) -> bool:
        """Mirror onto the view the attributes set on (or removed from) the model's modules since the last
        sync (a flag such as ``use_cache``, a tensor attribute). Returns ``False``, changing nothing, when a
        module gained, lost or replaced a submodule, or had its ``forward`` replaced: then build a new view
        (or find none possible)."""
        entries = self._entries
        for *_, mods, kids in entries:
            if len(mods) != len(kids) or not all(map(operator.is_, mods.values(), kids)):
                return False
        for i, (src, dst, values, mods, kids) in enumerate(entries):
            if len(src) == len(values) and all(map(operator.is_, src.values(), values)):
                continue  # nothing changed on this module (the usual case): one C-level pass over its values
            if "forward" in src:  # replaced on the instance since: the view cannot cover it (see of)
                return False
            items = list(src.items())
            for k, value in items:
                if k not in _OWN and dst.get(k, dst) is not value:
                    dst[k] = value
            keep = {k for k, _ in items}
            for k in [k for k in dst if k not in keep and k not in _OWN]:
                del dst[k]
            entries[i] = (src, dst, tuple(v for _, v in items), mods, kids)
        return True
