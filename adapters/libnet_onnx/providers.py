"""Choosing onnxruntime execution providers: CPU by default, CUDA / TensorRT when asked and available."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnxruntime as ort

from .errors import ExecutionProviderError

__all__ = ["PROVIDER_ALIASES", "resolve_providers", "default_providers"]

#: Short names accepted wherever a provider is asked for (case-insensitive), beside the full names.
PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
CPU = "CPUExecutionProvider"

ProviderSpec = str | tuple[str, Mapping[str, Any]]


def _is_pair(spec: Any) -> bool:
    """True for one ``(name, options)`` pair (as opposed to a tuple of names)."""
    return isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping)


def _full_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"an execution provider is a name or a (name, options) pair, got {name!r}")
    full = PROVIDER_ALIASES.get(name.lower(), name)
    known = set(ort.get_all_providers()) | set(ort.get_available_providers())
    if full not in known:
        raise ExecutionProviderError(
            f"unknown onnxruntime execution provider {name!r}; use one of the short names "
            f"{sorted(PROVIDER_ALIASES)} or a full name such as {sorted(known)}")
    return full


def resolve_providers(requested: Sequence[ProviderSpec] | ProviderSpec | None, *, fallback: bool = True
                      ) -> tuple[list[str], list[dict[str, Any]]]:
    """Turn the providers a user asked for into the lists ``onnxruntime.InferenceSession`` takes.

    Providers are tried in the order given; ``CPUExecutionProvider`` is always appended as the last
    resort. A provider that this onnxruntime installation does not offer (CUDA on a CPU-only build,
    TensorRT without TensorRT) is dropped with a ``RuntimeWarning`` that names it, unless ``fallback`` is
    False.

    Args:
        requested: ``None`` (CPU only), one provider, or a sequence of them; each is a short name
            (``"cpu"``, ``"cuda"``, ``"tensorrt"`` ...), a full name (``"CUDAExecutionProvider"``), or a
            ``(name, options)`` pair such as ``("cuda", {"device_id": 1})``.
        fallback: drop unavailable providers with a warning (default) instead of raising.

    Returns:
        ``(providers, provider_options)``: full names and one options dict per provider.

    Raises:
        ExecutionProviderError: a name onnxruntime does not know (the message lists the valid names), or an
            unavailable provider when ``fallback`` is False.

    Example:
        >>> resolve_providers(None)
        (['CPUExecutionProvider'], [{}])
        >>> resolve_providers("cpu")
        (['CPUExecutionProvider'], [{}])
    """
    if requested is None:
        requested = []
    elif isinstance(requested, str) or _is_pair(requested):
        requested = [requested]
    available = ort.get_available_providers()
    names: list[str] = []
    options: list[dict[str, Any]] = []
    dropped: list[str] = []
    for spec in requested:
        name, opts = (spec if _is_pair(spec) else (spec, {}))
        full = _full_name(name)
        if full in names or full in dropped:
            continue
        if full not in available:
            if not fallback:
                raise ExecutionProviderError(
                    f"onnxruntime execution provider {full!r} is not available in this installation (available: "
                    f"{available}); install an onnxruntime build that includes it, or allow fallback")
            dropped.append(full)
            continue
        names.append(full)
        options.append(dict(opts))
    if CPU not in names:
        names.append(CPU)
        options.append({})
    for full in dropped:
        warnings.warn(f"onnxruntime execution provider {full!r} is not available in this installation (available: "
                      f"{available}); falling back to {names}", RuntimeWarning, stacklevel=2)
    return names, options


def default_providers(device: Any) -> list[ProviderSpec]:
    """The providers implied by a torch device: CUDA (on that device index) then CPU for ``cuda``, else CPU."""
    dev_type = getattr(device, "type", str(device).split(":")[0] if device is not None else "cpu")
    if dev_type == "cuda":
        index = getattr(device, "index", None)
        return [("cuda", {"device_id": int(index or 0)}), "cpu"]
    return ["cpu"]
