"""Run every benchmark and write ``report.json``, ``report.md`` and ``report.png``.

Usage::

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--threads N] [--out benchmarks/results]

Sections (docs/design.md section 6, issue "Performance"):

1. construction: exact batched vs the one-by-one loop vs one plain matrix product, on the synthetic set
   (20,000 x 3,200) and on the MNIST net's conv1 patterns (4,000 x 11,520), results checked equal;
2. the same search step through faiss-cpu's exact inner-product index (CPU only);
3. inference: library-network / detector scoring time over the model's forward time (batch 256, S1);
4. peak memory of fitting against the size of the library;
5. sparse sampling: sparse and projected libraries at a few sizes on the MNIST default;
6. the detector guard's throughput from 1 and from 4 threads, against the model alone;
7. the whole fit (library, then the Hebbian readout's pass) against one plain matrix product, on the
   synthetic set, a clustered set (3,000 centres) and a library that keeps growing (cosines near theta);
8. peak memory and time of fitting and scoring one library against the layer's width (10k to 1M values per
   input; exact, sparse, projected, pooled; benchmarks/bench_layer_size.py; --quick: 10k and 100k);
9. the whole fit (in memory and streamed) and the default guard against the model's forward pass on a
   ResNet-18-style and a ResNet-50-style net (benchmarks/bench_real_models.py), with what the guard adds.

Ratios are measured in one run; absolute times are reported with the machine that produced them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from libnet_plugin.experiments.report import (
    StageTimer,
    ensure_writable_dir,
    markdown_table,
    write_json_atomic,
    write_text_atomic,
)
from libnet_plugin.plugins import make_probe

from . import (
    bench_construction,
    bench_fit,
    bench_guard_threads,
    bench_layer_size,
    bench_memory,
    bench_real_models,
    bench_sparse,
)
from ._util import load_average, machine_info, resolve_device
from .mnist_setup import MnistBench, prepare_mnist
from .synthetic import CLUSTERED, GROWING, SyntheticSpec, synthetic_set

__all__ = ["run", "main", "render_markdown", "plot_report"]

#: conv1's threshold for the construction benchmark (the seed's sweep; about 1,000 nodes on 4,000 images)
CONV1_THETA = 0.7


def _construction(mb: MnistBench, device: torch.device, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    spec = SyntheticSpec(n=5_000) if quick else SyntheticSpec()
    x = synthetic_set(spec)
    repeat = 3 if quick else 5
    out = {"synthetic": {**bench_construction.run_case("synthetic", x, spec.theta, device, repeat=repeat, log=log),
                         "spec": spec.describe()}}
    del x
    n = 1000 if quick else mb.x_train.shape[0]
    probe = make_probe(mb.model, ["conv1"], device)
    haps = torch.cat([probe.run(mb.x_train[i:i + 500]).haps["conv1"] for i in range(0, n, 500)])
    out["mnist_conv1"] = bench_construction.run_case("mnist_conv1", haps, CONV1_THETA, device, repeat=repeat, log=log)
    return out


def _fit(mb: MnistBench, device: torch.device, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Library, readout and whole fit over one plain product (benchmarks/bench_fit.py) on each set."""
    out: dict[str, Any] = {}
    repeat = 2 if quick else 3
    for name, spec in (("synthetic", SyntheticSpec()), ("clustered", CLUSTERED), ("growing", GROWING)):
        if quick:
            spec = replace(spec, n=spec.n // 4)
        out[name] = {**bench_fit.run_case(name, synthetic_set(spec), spec.theta, device, repeat=repeat, log=log),
                     "spec": spec.describe()}
    n = 1000 if quick else mb.x_train.shape[0]
    probe = make_probe(mb.model, ["conv1"], device)
    haps = torch.cat([probe.run(mb.x_train[i:i + 500]).haps["conv1"] for i in range(0, n, 500)])
    out["mnist_conv1"] = bench_fit.run_case("mnist_conv1", haps, CONV1_THETA, device, repeat=repeat, log=log)
    return out


def _memory(mb: MnistBench, device: torch.device, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    spec = SyntheticSpec(n=5_000) if quick else SyntheticSpec()
    out = {"method": "peak resident set size of a fresh process (Linux VmHWM, the counter behind "
                     "resource.getrusage's ru_maxrss, read per process), growth from after set-up to after "
                     "fitting; glibc mmap threshold fixed at 64 KiB so that freed buffers leave the RSS",
           "synthetic": bench_memory.measure("synthetic", {"spec": spec.describe(), "batch_size": 256,
                                                           "device": str(device)})}
    weights = mb.info["weights"].get("path")
    if weights:
        for label, cache in (("mnist_streamed", 0), ("mnist_default_cache", None)):
            out[label] = bench_memory.measure("mnist", {"weights": weights, "cache_bytes": cache,
                                                        "device": str(device), "cache_dir": ".cache"})
    for k, v in out.items():
        if isinstance(v, dict):
            log(f"[memory] {k}: {v}")
    return out


def _detector(device: torch.device, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The detector benchmark of ``benchmarks/bench_detector_overhead.py`` (``main(device, quick=)``), if there."""
    try:
        mod = importlib.import_module("benchmarks.bench_detector_overhead")
    except ModuleNotFoundError as exc:
        if exc.name != "benchmarks.bench_detector_overhead":
            raise
        return {"note": "benchmarks/bench_detector_overhead.py is not there; the library-network scoring "
                        "overhead is measured in the sparse-sampling section"}
    try:
        result = mod.main(device=str(device), quick=quick, log=log)
    except Exception as exc:  # a failing peer benchmark must not lose the rest of the report
        log(f"[detector] failed: {exc!r}")
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
    render = getattr(mod, "render", None)
    if callable(render):
        try:
            result = {**result, "markdown": render(result)}
        except Exception as exc:  # the numbers are kept even when the table cannot be drawn
            log(f"[detector] table not rendered: {exc!r}")
    return result


def run(device: str = "cpu", *, quick: bool = False, out_dir: str | Path = "benchmarks/results",
        cache_dir: str | Path = ".cache", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run all sections; write the report files into ``out_dir``; return the report dict."""
    dev = resolve_device(device)
    out = ensure_writable_dir(out_dir)
    timer = StageTimer(log=log)
    report: dict[str, Any] = {"machine": machine_info(dev), "quick": quick, "sections": {}}
    with timer.stage("mnist_setup"):
        mb = prepare_mnist(dev, quick=quick, cache_dir=cache_dir, log=log)
    report["mnist"] = mb.info
    sections = report["sections"]
    with timer.stage("construction"):
        sections["construction"] = _construction(mb, dev, quick, log)
    with timer.stage("fit"):
        sections["fit"] = _fit(mb, dev, quick, log)
    with timer.stage("memory"):
        sections["memory"] = _memory(mb, dev, quick, log)
    with timer.stage("sparse_sampling"):
        sections["sparse_sampling"] = bench_sparse.run(mb, dev, quick=quick, log=log)
    with timer.stage("detector_overhead"):
        sections["detector_overhead"] = _detector(dev, quick, log)
    with timer.stage("guard_threads"):
        sections["guard_threads"] = bench_guard_threads.main(str(dev), quick=quick, log=log)
    with timer.stage("layer_size"):
        widths = bench_layer_size.WIDTHS[:2] if quick else bench_layer_size.WIDTHS
        sections["layer_size"] = bench_layer_size.run(widths, n=500 if quick else 2000, log=log)
    with timer.stage("real_models"):
        sections["real_models"] = bench_real_models.main(str(dev), quick=quick, log=log)
    report["seconds"] = timer.as_dict()
    report["machine"]["load_average_at_end"] = load_average()
    write_json_atomic(out / "report.json", report)
    try:
        plot_report(report, out / "report.png")
        report["figure"] = "report.png"
    except Exception as exc:  # the numbers matter more than the picture
        log(f"[figure] not written: {exc!r}")
    write_text_atomic(out / "report.md", render_markdown(report))
    log(f"wrote {out / 'report.md'}, {out / 'report.json'} and {out / 'report.png'} in {report['seconds']['total']} s")
    return report


# ------------------------------------------------------------------------------------------------ report
def _machine_line(m: dict[str, Any]) -> str:
    return (f"{m['device_name']}; {m['cpu_count']} CPU cores visible, {m['torch_threads']} torch threads; "
            f"{m['platform']}; Python {m['versions']['python']}, torch {m['versions']['torch']}")


def construction_table(sec: dict[str, Any]) -> str:
    rows = []
    for case in sec.values():
        s, r = case["seconds"], case["ratios"]
        rows.append([case["name"], f"{case['n']} x {case['dim']}", case["theta"], case["nodes"],
                     s.get("loop"), s["dense"], s["screened"], s.get("faiss"), s["matmul"],
                     r.get("loop_over_screened"), r.get("loop_over_dense"), r["screened_over_matmul"],
                     r["dense_over_matmul"], r["dense_mac_rate_fraction_of_matmul"],
                     r.get("loop_mac_rate_fraction_of_matmul"), r.get("faiss_over_screened"),
                     all(case["same_nodes_as_loop"].values())])
    return markdown_table(["set", "N x D", "theta", "nodes", "loop s", "batched s", "screened s", "faiss s",
                           "matmul s", "loop / screened", "loop / batched", "screened / matmul",
                           "batched / matmul", "batched MAC rate / matmul", "loop MAC rate / matmul",
                           "faiss / screened", "same nodes"], rows, floatfmt=".2f")


def fit_table(sec: dict[str, Any]) -> str:
    rows = []
    for case in sec.values():
        s, r = case["seconds"], case["ratios"]
        rows.append([case["name"], f"{case['n']} x {case['dim']}", case["theta"], case["nodes"], s["library"],
                     s["readout"], s["fit"], s["matmul"], r["library_over_matmul"], r["readout_over_matmul"],
                     r["fit_over_matmul"], case["same_nodes"]])
    return markdown_table(["set", "N x D", "theta", "nodes", "library s", "readout s", "fit s", "matmul s",
                           "library / matmul", "readout / matmul", "fit / matmul", "same nodes"], rows,
                          floatfmt=".2f")


def sparse_table(sec: dict[str, Any]) -> str:
    rows = []
    for r in sec["rows"]:
        sizes = "/".join(str(v) for v in r["sizes"].values())
        agree = "/".join(f"{100 * v:.1f}" for v in r["top1_agreement"].values())
        lost = max(r["agreement_lost_points"].values())
        au = "/".join(f"{v:.3f}" if v is not None else "n/a" for v in r["cpl_auroc"].values())
        rows.append([r["label"], sizes, r["library_mb"], agree, lost, au, r["fit_seconds"], r["inference_ratio"],
                     r["library_scoring_ratio"]])
    return markdown_table(["library", "nodes conv1/conv2/fc1/fc2", "library MB", "top-1 agreement % per layer",
                           "max points lost", "CPL AUROC eps .1/.2/.3", "fit s", "consistency / forward",
                           "(forward + scoring) / forward"], rows, floatfmt=".2f")


def memory_table(sec: dict[str, Any]) -> str:
    rows = []
    for k, v in sec.items():
        if not isinstance(v, dict):
            continue
        if "error" in v:
            rows.append([k, None, None, None, None, v["error"]])
            continue
        rows.append([k, v["growth_mb"], v["library_mb"], v.get("library_buffers_mb"), v["all_patterns_mb"],
                     v["peak_mb"]])
    return markdown_table(["fit", "growth MB", "library MB", "library buffers MB", "all N patterns MB",
                           "peak RSS MB"], rows, floatfmt=".1f")


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    sec = report["sections"]
    lines = ["# libnet-plugin benchmarks", "",
             f"Machine: {_machine_line(m)}. Load average (1/5/15 min) at start "
             f"{_load(m.get('load_average_at_start'))}, at end {_load(m.get('load_average_at_end'))}: on a shared "
             "machine other processes slow some turns; every time is the best of several turns.",
             f"Run: {'quick' if report['quick'] else 'full'}, {report['seconds']['total']} s in all "
             f"({', '.join(f'{k} {v} s' for k, v in report['seconds'].items() if k != 'total')}).", "",
             "## 1-2. Library construction (exact batched vs one-by-one loop vs matrix product vs faiss)", "",
             "`batched`: ExactLibrary with the screen off; `screened`: ExactLibrary's default (count-sketch "
             "screen); `matmul`: one plain product of all N inputs with the final library (N x M x D); "
             "`faiss`: the same leader rule with faiss `IndexFlatIP` as the search step. Batch 256. Times are "
             "the best of 3 (quick) or 5 turns, the loop runs once; every method's node list is checked against "
             "the loop's.", "",
             construction_table(sec["construction"]), ""]
    syn = sec["construction"].get("synthetic")
    if syn:
        ok = syn["ratios"]["screened_over_matmul"] <= 2.0
        lines += [f"Target (synthetic set in at most 2x one plain matrix product): screened "
                  f"{syn['ratios']['screened_over_matmul']:.2f}x, batched {syn['ratios']['dense_over_matmul']:.2f}x "
                  f"-> {'met' if ok else 'NOT met'}.", ""]
    fit = sec.get("fit")
    if fit:
        worst = max(fit.values(), key=lambda c: c["ratios"]["fit_over_matmul"])
        lines += ["## 7. The whole fit: library, then the Hebbian readout (benchmarks/bench_fit.py)", "",
                  "`library`: ExactLibrary's default fed the rows in batches of 256; `fit`: `LibraryNetwork.fit` "
                  "(two streamed passes) of a model whose probed layer is an identity on the rows, with a linear "
                  "head for the answers; `readout` = fit - library (the second pass: the [N, M] similarity, g and "
                  "the product with the answers); `matmul`: one plain product of all N rows with the final "
                  "library. Best of interleaved turns.", "", fit_table(fit), "",
                  f"Target (whole fit within 1.5x of one plain product): worst set {worst['name']} at "
                  f"{worst['ratios']['fit_over_matmul']:.2f}x -> "
                  f"{'met' if worst['ratios']['fit_over_matmul'] <= 1.5 else 'NOT met'}.", ""]
    sp = sec["sparse_sampling"]
    lines += ["## 3 and 5. Inference overhead and sparse sampling (MNIST default, set S1)", "",
              f"Library network fitted on {report['mnist']['n_train']} training images at S1 "
              f"({', '.join(f'{k} {v}' for k, v in sp['thresholds'].items())}); agreement: top-1 with the model's "
              f"answer (top_k 3) on {sp['n_test']} test images; CPL AUROC: top_k 20, standard protocol "
              f"(PGD-{report['mnist']['attacks']['nb_iter']} in pixel space on the first "
              f"{report['mnist']['attacks']['n_images']} test images, kept: {report['mnist']['attacks']['kept']}); "
              f"inference: `net.consistency(x)` (forward with probes + scoring + CPL) over the model's forward, "
              f"batch {sp['batch_size']}, {sp['timing']}.", "", sparse_table(sp), ""]
    def within(key: str) -> str:
        ok = [r["label"] for r in sp["rows"] if r[key] <= 1.3 and max(r["agreement_lost_points"].values()) <= 1.0]
        return ", ".join(ok) if ok else "none in this run"

    probe = sorted(r["probe_ratio"] for r in sp["rows"])[len(sp["rows"]) // 2]
    lines += [f"Target (at most 1.3x the forward time at no more than one point of agreement lost per layer): "
              f"end to end (`consistency / forward`): {within('inference_ratio')}; forward + library scoring: "
              f"{within('library_scoring_ratio')}. The probe alone (forward with hooks and its finite checks) "
              f"takes {probe:.2f}x the forward (median over the rows).", ""]
    lines += ["## 4. Peak memory of fitting", "", sec["memory"]["method"] + ".", "", memory_table(sec["memory"]), ""]
    det = sec["detector_overhead"]
    lines += ["## Detector overhead (benchmarks/bench_detector_overhead.py)", ""]
    if "markdown" in det:
        lines += [det["markdown"], ""]
    else:
        lines += ["```", _short_json({k: v for k, v in det.items() if k != "machine"}), "```", ""]
    guard = sec.get("guard_threads")
    if guard:
        lines += ["## 6. The guard from several threads (benchmarks/bench_guard_threads.py)", "",
                  f"Batches of {guard['batch']}, {guard['calls_per_thread']} calls per thread, torch using "
                  f"{guard['torch_threads']} threads per call; inputs per second.", "",
                  markdown_table(["threads", "model", "guard", "guard / model"],
                                 [[r["threads"], r["model_inputs_per_s"], r["guard_inputs_per_s"],
                                   r["guard_over_model"]] for r in guard["rows"]], floatfmt=".2f"), ""]
    layer = sec.get("layer_size")
    if layer:
        lines += ["## 8. Memory against the layer's width (benchmarks/bench_layer_size.py)", "",
                  f"{layer['settings']['n']} synthetic inputs per width in batches of {layer['settings']['batch']}, "
                  "each configuration in a fresh process (peak RSS, Linux VmHWM); fit = library pass + Hebbian pass "
                  "(times include generating the rows); scoring: 256 inputs, top_k 8.", "",
                  bench_layer_size.render(layer), ""]
    real = sec.get("real_models")
    if real:
        lines += real_models_section(real)
    if report.get("figure"):
        lines += [f"![benchmarks]({report['figure']})", ""]
    return "\n".join(lines)


def real_models_section(sec: dict[str, Any]) -> list[str]:
    """Section 9: fit and guard over the forward pass on the ResNet-style nets, with the targets of issue 30."""
    m, st = sec["machine"], sec["setting"]
    rows = []
    for r in sec["nets"].values():
        q, a = r["ratios"], r["guard_above_forward_s"]
        rows.append([r["net"], f"{r['n']} x {r['px']} px", r["passes"]["fit_in_memory"], q["fit_in_memory_over_forward"],
                     q["fit_in_memory_over_own_pass"], r["passes"]["fit_streamed"], q["fit_streamed_over_forward"],
                     q["fit_streamed_over_own_pass"], q["guard_over_forward"],
                     a["hooks"] * 1e3, a["after_the_model"] * 1e3, a["after_the_model_profile"]["shares"]])
    return ["## 9. Fit and guard against the forward pass (benchmarks/bench_real_models.py)", "",
            f"Random weights and inputs, layers layer2/layer3/layer4, `thresholds=\"auto\"`; {st['n']} inputs, "
            f"batch {st['batch']}, best of {st['repeat']} turns; {m['threads']} torch threads, load average "
            f"{_load(m.get('load_average_at_start'))} at start, {_load(sec.get('load_average_at_end'))} at end. "
            "Targets: fit at most 1.3x one forward pass over the data in memory, 2.2x streamed; the default "
            "guard at most 1.05x the forward at batch 64.", "",
            markdown_table(["net", "inputs", "passes (memory)", "fit / forward (memory)", "fit / own pass (memory)",
                            "passes (streamed)", "fit / forward (streamed)", "fit / own pass (streamed)",
                            "guard / forward", "hooks ms", "after the model ms",
                            "after the model, by op (profiled shares)"], rows, floatfmt=".2f"), ""]


def _load(values: Any) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "n/a"


def _short_json(obj: Any) -> str:
    import json

    from libnet_plugin.experiments.report import to_jsonable

    return json.dumps(to_jsonable(obj), indent=1)[:4000]


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """A 2 x 2 figure: construction times, and sparse sampling (agreement, AUROC, inference ratio) vs size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axs = fig.subplots(2, 2)
    ax = axs[0, 0]
    cases = list(report["sections"]["construction"].values())
    methods = ["loop", "dense", "screened", "faiss", "matmul"]
    names = {"dense": "batched", "matmul": "one matmul"}
    width = 0.8 / len(methods)
    for j, meth in enumerate(methods):
        vals = [c["seconds"].get(meth) or 0.0 for c in cases]
        ax.bar([i + j * width for i in range(len(cases))], vals, width, label=names.get(meth, meth))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))],
                  [f"{c['name']}\n{c['n']}x{c['dim']}, {c['nodes']} nodes" for c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("seconds (best of the turns)")
    ax.set_title("Exact library construction")
    ax.legend(fontsize=8)
    rows = report["sections"]["sparse_sampling"]["rows"]
    exact = rows[0]  # the plain exact library comes first

    def size(r: dict) -> int | None:
        n = r["options"].get("n_units", r["options"].get("n_components"))
        return max(n.values()) if isinstance(n, dict) else n

    groups: dict[str, list[dict]] = {}  # one line per kind of library, over its sizes
    for r in rows:
        if size(r) is not None:
            groups.setdefault(r["label"].replace(f" {size(r)}", ""), []).append(r)

    panels = [(axs[0, 1], lambda r: 100 * r["top1_agreement"]["conv1"], "conv1 top-1 agreement (%)", False),
              (axs[1, 0], lambda r: r["cpl_auroc"][max(r["cpl_auroc"])] or float("nan"),
               f"CPL AUROC, standard protocol, eps {max(exact['cpl_auroc'])}", False),
              (axs[1, 1], lambda r: r["inference_ratio"], "net.consistency time / forward time (batch 256)", True)]
    for ax, fn, title, is_time in panels:
        for i, (g, rs) in enumerate(groups.items()):
            rs = sorted(rs, key=size)
            ax.plot([size(r) for r in rs], [fn(r) for r in rs], "o-", color=f"C{i}", label=g)
        ax.axhline(fn(exact), color="k", ls="--", lw=1, label="exact")
        if is_time:
            ax.axhline(1.3, color="r", ls=":", lw=1, label="target 1.3x")
            ax.set_yscale("log")
            ax.set_yticks([1, 1.3, 1.5, 2, 3, 4], labels=["1", "1.3", "1.5", "2", "3", "4"])
            ax.minorticks_off()
        ax.set_xscale("log", base=2)
        ax.set_xlabel("units seen per layer (sparse) / components (projected)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"libnet-plugin benchmarks on {report['machine']['device_name']}", fontsize=10)
    fig.savefig(path, dpi=110)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smaller sets and fewer configurations (about a minute)")
    parser.add_argument("--out", default="benchmarks/results", help="output folder (default: %(default)s)")
    parser.add_argument("--cache-dir", default=".cache", help="trained weights and attacks (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    report = run(args.device, quick=args.quick, out_dir=args.out, cache_dir=args.cache_dir)
    print()
    print(construction_table(report["sections"]["construction"]))
    print()
    print(sparse_table(report["sections"]["sparse_sampling"]))
    print()
    print(fit_table(report["sections"]["fit"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
