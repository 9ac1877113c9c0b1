"""`libnet` CLI sub-commands of the ONNX adapter: ``libnet layers MODEL.onnx``.

Registered through the ``libnet_plugin.cli`` entry-point group; onnx is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``libnet layers``."""
    parser.add_argument("model", help="path to an ONNX model file")
    parser.add_argument("--kind", choices=("all", "module", "input", "tensor"), default="all",
                        help="list PyTorch module names (from the exporter's records), the 'MODULE:input' layer "
                             "specs (what each module receives), ONNX tensor names, or all three (default)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace) -> int:
    """Print the probe-able layer names of an ONNX model with their operator, dtype and shape."""
    from .errors import OnnxModelError
    from .graph import OnnxGraph, format_shape

    try:
        graph = OnnxGraph(args.model)
    except (OnnxModelError, FileNotFoundError) as exc:
        print(f"libnet layers: error: {exc}", file=sys.stderr)
        return 2
    kinds: tuple[Any, ...] = ("module", "input", "tensor") if args.kind == "all" else (args.kind,)
    layers = [info for kind in kinds for info in graph.layers(kind)]
    if args.json:
        out: list[dict[str, Any]] = [{"name": l.name, "kind": l.kind, "tensor": l.tensor, "op_type": l.op_type,
                                      "dtype": l.dtype, "shape": list(l.shape) if l.shape is not None else None}
                                     for l in layers]
        print(json.dumps(out, indent=1))
        return 0
    inputs = "; ".join(spec.describe() for spec in graph.inputs)
    print(f"ONNX model {graph.source}: input{'s' if len(graph.inputs) > 1 else ''} {inputs}; outputs {graph.outputs}")
    for kind, title in (("module", "PyTorch module names (from the exporter's records)"),
                        ("input", "Module inputs (the layer specs 'MODULE:input')"),
                        ("tensor", "ONNX tensors")):
        if kind not in kinds:
            continue
        rows = [[l.name, l.op_type, l.dtype, format_shape(l.shape)] + ([l.tensor] if kind != "tensor" else [])
                for l in layers if l.kind == kind]
        print(f"\n{title}: {len(rows)}")
        if rows:
            header = ["name", "op", "dtype", "shape"] + (["tensor"] if kind != "tensor" else [])
            print(_table([header] + rows))
    return 0


def register(subparsers: Any) -> None:
    """Add this adapter's sub-commands to the ``libnet`` CLI."""
    help_text = "list the probe-able layer names of an ONNX model (module names and tensors, with shapes)"
    parser = subparsers.add_parser("layers", help=help_text, description=help_text)
    add_arguments(parser)
    parser.set_defaults(_run=run)
