"""``libnet inspect MODEL --train DATA``: explain your own model in one command (an HTML report and its numbers).

MODEL is an ONNX file (probed by the ONNX adapter) or a Python factory ``package.module:callable`` that
returns an ``nn.Module`` (the current folder is on the import path, as for ``uvicorn app:app``); an attribute
that already is an ``nn.Module`` works too. DATA is a ``.npz`` with ``x`` (and optionally ``y``, integer
labels), a ``.pt`` / ``.safetensors`` file of tensors (``x`` and ``y``; a ``.pt`` may also hold one tensor or
an ``(x, y)`` pair), or a folder of images in class sub-folders (the ImageFolder layout, read with Pillow: pixels
in [0, 1], one channel when every image is greyscale, else RGB; ``--image-size`` resizes; any normalisation
belongs in the model). The report goes to ``DIR/index.html`` (self-contained) and ``DIR/report.json``; the output
folder is guarded as every run's (:func:`libnet_plugin.experiments.report.staged_output`).

Everything that can be checked is checked before the long work, with exit status 2: the factory, the data
files, the shape the model accepts, the labels' range and the output folder.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LibnetError
from ..inspection import DEFAULT_N_LAYERS, InspectionError, inspect, probeable_layers, spread
from .report import check_run_folder, staged_output, write_json_atomic

__all__ = ["add_arguments", "run", "load_model", "load_data", "load_image_folder", "parse_thresholds", "onnx_layers"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``libnet inspect``."""
    parser.add_argument("model", metavar="MODEL",
                        help="an ONNX file, or a Python factory package.module:callable returning an nn.Module")
    parser.add_argument("--train", metavar="DATA",
                        help="training inputs: .npz with x and optional y; .pt or .safetensors of tensors x, y; or a "
                             "folder of images in class sub-folders")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="resize the images of an image folder to H x W (default: they must all have one size)")
    parser.add_argument("--test", metavar="DATA", help="test inputs, same formats (default: the training data)")
    parser.add_argument("--layers", nargs="+", metavar="L",
                        help=f"layers to probe, in order (default: {DEFAULT_N_LAYERS} of the leaf modules that hold "
                             "a weight matrix or kernel, evenly spaced; printed)")
    parser.add_argument("--list-layers", action="store_true",
                        help="print the probe-able layers (and the default choice) and stop")
    parser.add_argument("--thresholds", nargs="+", default=["auto"], metavar="SPEC",
                        help="auto (each layer's theta from the data), one theta T for all layers, or L=T per layer "
                             "(layers not named: auto) (default: auto)")
    parser.add_argument("--out", default="libnet-inspect", metavar="DIR",
                        help="folder receiving index.html and report.json (default: %(default)s): new, empty or an "
                             "earlier run's holding only what that run wrote (anything else is refused)")
    parser.add_argument("--top-k", type=int, default=3, help="library nodes behind each layer's prediction")
    parser.add_argument("--fpr", type=float, default=0.05, help="false-positive rate of the detector's threshold")
    parser.add_argument("--sample", type=int, default=3, help="least and most consistent test inputs shown (each)")
    parser.add_argument("--index", type=int, nargs="+", default=[], metavar="I", help="test inputs to show as well")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: on a terminal only)")


# ---------------------------------------------------------------------------------------------- inputs
def load_model(spec: str) -> Any:
    """An ONNX path as given, or the ``nn.Module`` a ``package.module:callable`` factory returns.

    Raises:
        InspectionError: no such file, a factory that does not import, has no such attribute, fails, or
            returns something that is not an ``nn.Module``.
    """
    if spec.lower().endswith(".onnx"):
        if not os.path.isfile(spec):
            raise InspectionError(f"MODEL {spec!r}: no such ONNX file")
        return spec
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InspectionError(f"MODEL {spec!r} is neither an .onnx file nor a factory package.module:callable")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error of the user's module: say which and why
        raise InspectionError(f"MODEL {spec!r}: module {module_name!r} does not import "
                              f"({type(exc).__name__}: {exc})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InspectionError(f"MODEL {spec!r}: {obj.__name__ if obj is module else part!r} has no "
                                  f"attribute {part!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise InspectionError(f"MODEL {spec!r} is a {type(obj).__name__}, neither an nn.Module nor a callable")
        try:
            obj = obj()
        except Exception as exc:
            raise InspectionError(f"MODEL {spec!r}: calling the factory failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, nn.Module):
        raise InspectionError(f"MODEL {spec!r}: the factory returned {type(obj).__name__!r}, not a torch nn.Module")
    return obj.eval()


def _tensors(d: Any, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(d, torch.Tensor):
        return d, None
    if isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(t, torch.Tensor) for t in d):
        return d[0], d[1]
    if isinstance(d, dict):
        if "x" not in d:
            raise InspectionError(f"DATA {path!r} has no tensor named 'x' (it holds {sorted(map(str, d))})")
        x, y = d["x"], d.get("y")
        if not isinstance(x, torch.Tensor) or (y is not None and not isinstance(y, torch.Tensor)):
            raise InspectionError(f"DATA {path!r}: x and y must be tensors")
        return x, y
    raise InspectionError(f"DATA {path!r} holds a {type(d).__name__}; give a tensor, an (x, y) pair or a dict "
                          "with x (and y)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_image_folder(path: str, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(x [N, C, H, W] in [0, 1], y, class names)`` from a folder of class sub-folders (sorted names = 0, 1, ...).

    Raises:
        InspectionError: no class sub-folder or image, or images of several sizes without ``size``.
    """
    from PIL import Image

    root = Path(path)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()]
    if not files:
        raise InspectionError(f"DATA {path!r}: a folder must hold one sub-folder of images per class "
                              f"({', '.join(IMAGE_SUFFIXES)}); found {len(classes)} sub-folders and no image")
    images = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except OSError as exc:
            raise InspectionError(f"DATA {path!r}: image {str(f)!r} cannot be read ({exc})") from exc
    grey = all(im.mode in ("1", "L", "I", "I;16", "F") for im in images)
    arrays = []
    for im in images:
        im = im.convert("L" if grey else "RGB")
        if size is not None:
            im = im.resize((size[1], size[0]))
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise InspectionError(f"DATA {path!r}: the images have {len(shapes)} sizes ({shapes[:4]}); give --image-size "
                              "H W to resize them")
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if grey else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.tensor([c for _, c in files]), classes


def load_data(path: str, image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, y or None)`` from a ``.npz``, ``.pt`` or ``.safetensors`` file or an image folder (see the module
    docstring).

    Raises:
        InspectionError: no such file, an unknown format, no ``x``, labels that are not one whole number per input.
    """
    p = Path(path)
    if p.is_dir():
        x, y, _ = load_image_folder(path, image_size)
        return x, y
    if not p.is_file():
        raise InspectionError(f"DATA {path!r}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise InspectionError(f"DATA {path!r} has no array named 'x' (it holds {sorted(z.files)})")
                x, y = torch.from_numpy(z["x"].copy()), (torch.from_numpy(z["y"].copy()) if "y" in z.files else None)
        elif suffix == ".pt":
            x, y = _tensors(torch.load(p, map_location="cpu", weights_only=True), path)
        elif suffix == ".safetensors":
            from safetensors.torch import load_file

            x, y = _tensors(load_file(str(p)), path)
        else:
            raise InspectionError(f"DATA {path!r}: unknown format {suffix or '(no suffix)'}; give .npz, .pt or "
                                  ".safetensors")
    except InspectionError:
        raise
    except Exception as exc:
        raise InspectionError(f"DATA {path!r} cannot be read ({type(exc).__name__}: {exc})") from exc
    if x.dim() < 1 or x.shape[0] == 0:
        raise InspectionError(f"DATA {path!r}: x of shape {tuple(x.shape)} holds no inputs")
    if x.dtype == torch.float64:
        x = x.float()
    if y is not None:
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise InspectionError(f"DATA {path!r}: y must hold one label per input, shape ({x.shape[0]},); got "
                                  f"{tuple(y.shape)}")
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise InspectionError(f"DATA {path!r}: y must hold whole class numbers, got values such as "
                                  f"{y[:3].tolist()}")
        y = y.long()
    return x, y


def parse_thresholds(items: list[str]) -> Any:
    """``["auto"]`` -> ``"auto"``; ``["0.7"]`` -> ``0.7``; ``["fc1=0.9", ...]`` -> ``{"fc1": 0.9, ...}``.

    Example:
        >>> parse_thresholds(["auto"]), parse_thresholds(["0.7"]), parse_thresholds(["fc1=0.9", "conv1=auto"])
        ('auto', 0.7, {'fc1': 0.9, 'conv1': 'auto'})
    """
    def number(text: str, what: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise InspectionError(f"--thresholds {what!r}: {text!r} is not a number") from None

    if len(items) == 1 and "=" not in items[0]:
        return "auto" if items[0] == "auto" else number(items[0], items[0])
    out: dict[str, Any] = {}
    for item in items:
        layer, sep, value = item.rpartition("=")
        if not sep or not layer:
            raise InspectionError(f"--thresholds takes auto, one theta for all layers, or L=T items; got {items}")
        out[layer] = "auto" if value == "auto" else number(value, item)
    return out


_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def onnx_layers(path: str) -> list[str]:
    """The layers of an ONNX model to choose from: the leaf PyTorch module names its export records (graph
    order) whose operator holds a weight (Conv, Gemm, MatMul; all leaves when none does), else such tensors."""
    try:
        from libnet_onnx import list_layers
    except ImportError as exc:
        raise InspectionError(f"MODEL {path!r} is an ONNX file, and the ONNX adapter is not installed "
                              f"(pip install 'libnet-plugin[onnx]'): {exc}") from exc
    infos = list_layers(path, "all")
    modules = [i.name for i in infos if i.kind == "module"]
    leaves = [i for i in infos if i.kind == "module" and not any(o.startswith(i.name + ".") for o in modules)]
    weighted = [i.name for i in leaves if i.op_type in _WEIGHTED_OPS]
    if weighted or leaves:
        return weighted or [i.name for i in leaves]
    return [i.name for i in infos if i.kind == "tensor" and i.op_type in _WEIGHTED_OPS]


# ---------------------------------------------------------------------------------------------- run
def _fail(exc: BaseException) -> int:
    print(f"libnet inspect: error: {exc}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Check everything, inspect the model, write DIR/index.html and DIR/report.json."""
    try:
        out = None if args.list_layers else check_run_folder(args.out)
        model = load_model(args.model)
        thresholds = parse_thresholds(args.thresholds)
        if args.train is None:
            raise InspectionError("--train DATA is required: the training inputs build the libraries")
        size = tuple(args.image_size) if args.image_size else None
        train = load_data(args.train, size)
        test = load_data(args.test, size) if args.test else None
        if not 0.0 < args.fpr < 1.0:
            raise InspectionError(f"--fpr must lie in (0, 1), got {args.fpr}")
        layers = args.layers
        candidates: list[str] = []
        if not isinstance(model, nn.Module):
            candidates = onnx_layers(model)
        elif args.list_layers:
            try:
                candidates = probeable_layers(model, train[0][:2])
            except RuntimeError as exc:
                raise InspectionError(f"the model refuses the training inputs of shape {tuple(train[0].shape)}: "
                                      f"{str(exc).splitlines()[0]}") from exc
        if args.list_layers:
            print(f"probe-able layers ({len(candidates)}): {' '.join(candidates)}")
            print(f"default choice ({DEFAULT_N_LAYERS} evenly spaced): {' '.join(spread(candidates))}")
            return 0
        if layers is None and not isinstance(model, nn.Module):
            if not candidates:
                raise InspectionError(f"MODEL {args.model!r}: no probe-able layer found; name them with --layers")
            layers = spread(candidates)
            print(f"layers: {layers} ({len(layers)} of the {len(candidates)} leaf modules the ONNX export records, "
                  "evenly spaced with the first and the last)")
        report = inspect(model, train, test, layers=layers, thresholds=thresholds, top_k=args.top_k, fpr=args.fpr,
                         sample=args.sample, indices=args.index, batch_size=args.batch_size, device=args.device,
                         progress=args.progress, log=print)
        if layers is not None and args.layers is None:
            report.data["settings"]["layer_choice"] = "ONNX: leaf module names of the export, evenly spaced"
            report.data["settings"]["candidate_layers"] = candidates
        report.data["settings"]["model"] = args.model
        assert out is not None
        with staged_output(out) as stage:
            t0 = time.perf_counter()
            report.save_html(stage / "index.html")
            report.data["timings"]["html"] = round(time.perf_counter() - t0, 3)  # in report.json, not on the page
            write_json_atomic(stage / "report.json", report.to_dict())
    except (LibnetError, NotADirectoryError, PermissionError) as exc:  # InspectionError, ExperimentError, a layer name
        return _fail(exc)
    print(f"report: {out / 'index.html'} (numbers in {out / 'report.json'}); "
          f"{report.data['timings']['total']:.1f} s")
    return 0
