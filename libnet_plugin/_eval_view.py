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
model's modules later are copied over by :func:`refresh_view` before each use. No thread holds a reference
to the view's modules but the guard, so nothing switches them to training mode, and a batch-norm module
in eval mode reads its running statistics without writing them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Dropout(0.5)).train()
    >>> view, _ = eval_view(model)
    >>> view.training, view[1].training, model.training, view[0].weight is model[0].weight
    (False, False, True, True)
    >>> before = model[1].running_mean.clone()
    >>> _ = view(torch.randn(4, 3))
    >>> bool(torch.equal(model[1].running_mean, before))
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["eval_view", "structure_key", "refresh_view"]

#: the attributes of a view module that are its own: the rest mirror the model's module
_OWN = ("_modules", "training")


def structure_key(model: nn.Module) -> tuple[Any, ...]:
    """Identity of the model's module tree (which module holds which submodule): a view is rebuilt when it changes."""
    return tuple((id(m), *map(id, m._modules.values())) for m in model.modules())


def eval_view(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Module]] | None:
    """The eval-mode view of ``model`` and ``{id(model module): view module}``; ``None`` for a model whose
    modules keep their mode outside the Python object (TorchScript) or call the original modules
    directly (``torch.compile``'s wrapper)."""
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule) or type(m).__name__ == "OptimizedModule":
            return None
    memo: dict[int, nn.Module] = {}

    def view(m: nn.Module) -> nn.Module:
        got = memo.get(id(m))
        if got is not None:
            return got
        v = object.__new__(type(m))
        v.__dict__.update(m.__dict__)  # shares the parameter, buffer and hook tables (and every other attribute)
        memo[id(m)] = v  # before the children: a module reached twice (shared layers) has one view
        v.__dict__["_modules"] = type(m._modules)((k, None if c is None else view(c)) for k, c in m._modules.items())
        v.__dict__["training"] = False
        return v

    return view(model), memo


def refresh_view(model: nn.Module, views: dict[int, nn.Module]) -> None:
    """Mirror onto the view the attributes set on (or removed from) the model's modules since it was built
    (a flag such as ``use_cache``, a tensor attribute): everything but the view's own submodule table and mode."""
    for m in model.modules():
        v = views.get(id(m))
        if v is None:
            continue
        src, dst = list(m.__dict__.items()), v.__dict__
        for k, value in src:
            if k not in _OWN and dst.get(k, dst) is not value:
                dst[k] = value
        if len(dst) != len(src):
            keep = {k for k, _ in src}
            for k in [k for k in dst if k not in keep and k not in _OWN]:
                del dst[k]
