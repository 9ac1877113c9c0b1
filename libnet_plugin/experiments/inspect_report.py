"""The HTML page of :func:`libnet_plugin.inspect`: one self-contained file, figures embedded as PNG.

:func:`render_html` draws the figures with :mod:`libnet_plugin.experiments.plots` (matplotlib's Agg canvas)
and embeds them as ``data:`` URIs; the page has no script, and a content security policy forbids it any
request (``default-src 'none'``), so it opens from disk in any browser and shows the same offline.
:meth:`libnet_plugin.InspectionReport.save_html` calls :func:`write_html`.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import plots
from .report import write_text_atomic

__all__ = ["render_html", "write_html", "figure_names"]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1200px;
       color: #1b1b1b; padding: 0 1em; line-height: 1.4; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: .8em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; } .note { color: #555; font-size: .9em; }
.bad { color: #b00020; font-weight: 600; } code { background: #f5f5f5; padding: 0 .2em; }
.row { display: flex; flex-wrap: wrap; gap: .8em; } .row figure { flex: 1 1 260px; max-width: 380px; margin: 0; }
"""

#: The page may load nothing: images only from data: URIs, styles only inline, no script at all.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, fmt: str = ".3f") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return format(v, fmt)
    return _e(v)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{_num(c)}</td>" if isinstance(c, (int, float)) or c is None
                                    else f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Raw(str):
    """HTML that is already escaped."""


def _pairs(items: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(f"{p['true']}→{p['confused_with']} ({p['index']:.2f})" for p in items) or "none"


class _Figures:
    """Draws figures into a temporary folder and returns them as ``<figure>`` elements with a data: URI."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names: list[str] = []

    def add(self, name: str, draw: Callable[[Path], Path], caption: str) -> str:
        path = draw(self.folder / f"{name}.png")
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        self.names.append(name)
        return (f'<figure id="fig-{_e(name)}"><img alt="{_e(caption)}" data-figure="{_e(name)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>')


def figure_names(report: Any) -> list[str]:
    """The figures of the page of ``report``'s run (``data-figure`` of each ``<img>``), in page order.

    Read from the numbers alone (``report.data``), so a report rebuilt from ``report.json`` names them too.
    """
    d = report.data
    layers = d["settings"]["layers"]
    names = ["library-sizes", "agreement", "decision-path"] + [f"confusion-{i}" for i in range(len(layers))]
    if d["consistency"].get("cpl") is not None:
        names += ["cpl", "layer-consistency"]
    if d["detector"].get("scores") is not None:
        names.append("detector")
    if d["settings"].get("thumbnails"):
        names.append("exemplars")
    return names


def _overview(d: Mapping[str, Any]) -> str:
    s = d["settings"]
    layers = s["layers"]
    rows = [[_Raw(f"<code>{_e(l)}</code>"), d["layers"][l]["theta"], d["layers"][l]["size"], d["layers"][l]["hap_dim"],
             d["layers"][l]["top1_agreement"], d["layers"][l]["top3_agreement"], d["layers"][l]["accuracy"],
             _pairs(d["layers"][l]["most_confused"])] for l in layers]
    acc = "" if d["model_accuracy"] is None else f" The model's own accuracy on the test data: {d['model_accuracy']:.3f}."
    warn = ('<p class="bad">No test data was given: every number below is measured on the training data, '
            "which flatters it.</p>") if s["test_is_train"] else ""
    return (f"<h2>Layers at a glance</h2>{warn}<p>{len(layers)} layers probed ({_e(s['layer_choice'])}); "
            f"{s['n_train']} training inputs built the libraries, {s['n_test']} test inputs measured them; "
            f"{s['n_classes']} classes.{acc}</p>"
            + _table(["layer", "θ", "nodes", "HAP size", "top-1 agreement", "top-3 agreement", "accuracy",
                      f"most confused (true→other, CI; on {s['confusion_basis']})"], rows))


def _path_section(d: Mapping[str, Any], figs: _Figures) -> str:
    layers = d["settings"]["layers"]
    p = d["decision_path"]
    classes = [c for c in p["classes"]]
    matrix = [[c["agreement"][l] for l in layers] for c in classes]
    marks = [(i, layers.index(c["first_layer"])) for i, c in enumerate(classes) if c["first_layer"] is not None]
    fig = figs.add("decision-path", lambda path: plots.plot_heatmap(
        matrix, [f"class {c['class']} (n={c['n']})" for c in classes], layers, path,
        title="Agreement with the model, per class",
        xlabel="layer", ylabel="model's answer", marks=marks),
        "The decision's path: per class, each layer's agreement with the model; red: the first layer agreeing "
        "on most inputs of that class")
    rows = [[c["class"], c["n"], _Raw(f"<code>{_e(c['first_layer'])}</code>") if c["first_layer"] else "none"]
            + [c["agreement"][l] for l in layers] for c in classes]
    under = p["underperforming_layer"]
    text = (f'<p class="bad">Under-performing layer: <code>{_e(under["layer"])}</code>: {_e(under["why"])}.</p>'
            if under else "<p>No layer agrees less with the model than the layer before it.</p>")
    text += f"<p>Weakest layer (lowest top-1 agreement): <code>{_e(p['weakest_layer'])}</code>.</p>"
    return ("<h2>The decision's path</h2>" + text
            + _table(["class", "inputs", "first layer agreeing"] + [f"agreement {l}" for l in layers], rows) + fig)


def _consistency_section(d: Mapping[str, Any], figs: _Figures) -> str:
    c, det, layers = d["consistency"], d["detector"], d["settings"]["layers"]
    out = "<h2>Consistency of the layers and the detector</h2>"
    if c.get("cpl") is not None:
        out += (f"<p>CPL (Eq. 5, top_k = {c['top_k']}): mean {c['mean']:.3f} over the test inputs; low values mean "
                "the layers disagree.</p>")
        out += figs.add("cpl", lambda path: plots.plot_score_histogram(
            c["cpl"], path, xlabel="CPL", title="Consistency of the layers' predictions (CPL)",
            value_range=(0.0, 1.0)), "CPL of the test inputs")
        out += figs.add("layer-consistency", lambda path: plots.plot_heatmap(
            c["pairwise"], layers, layers, path, title="Mean cosine between two layers' softmax(P)",
            xlabel="layer", ylabel="layer"), "Which layers agree with which (" + c["pairwise_note"] + ")")
    else:
        out += "<p>CPL needs at least two layers.</p>"
    if det.get("scores") is not None:
        flagged = det["flagged"]
        out += (f"<p>Detector <code>{_e(det['method'])}</code>: threshold {det['threshold']:.4g} at "
                f"{det['fpr']:.0%} FPR ({_e(det['note'])}; {det['calibration_inputs']} calibration inputs). "
                f"Flagged: {len(flagged)} of {len(det['scores'])} test inputs; held-out flagged rate "
                f"{det['flagged_rate_held_out']:.3f}.</p>")
        if flagged:
            shown = ", ".join(str(i) for i in flagged[:60]) + (" …" if len(flagged) > 60 else "")
            out += f"<p>Flagged inputs (test indices): {_e(shown)}</p>"
        out += figs.add("detector", lambda path: plots.plot_score_histogram(
            det["scores"], path, threshold=det["threshold"], xlabel="detector score (higher: more suspicious)",
            title=f"Detector scores, threshold at {det['fpr']:.0%} FPR"), "Detector scores of the test inputs")
    elif det.get("error"):
        out += f"<p class=\"bad\">The detector could not be calibrated: {_e(det['error'])}</p>"
    return out


def _samples_section(report: Any, figs: _Figures) -> str:
    d = report.data
    layers = d["settings"]["layers"]
    out = ["<h2>Inputs, layer by layer</h2><p>The least and most consistent test inputs (and any named): each "
           "layer's top-3 classes with their evidence P (Eq. 3), and the training inputs (by index, in the order "
           "the fit visited them) behind the nearest library nodes, with their cosine.</p>"]
    rows = []
    for s in d["samples"]:
        head = (f"<b>#{s['index']}</b> ({_e(s['why'])})<br>label {_e(s['label'])}, model {s['model_answer']}<br>"
                f"CPL {_num(s['cpl'])}, score {_num(s['detector_score'], '.3g')}"
                + ('<br><span class="bad">flagged</span>' if s["flagged"] else ""))
        if s.get("token_ids") is not None:
            head += f"<br>tokens: <code>{_e(' '.join(map(str, s['token_ids'][:16])))}</code>"
        cells = [_Raw(head)]
        for l in layers:
            e = s["layers"][l]
            top = "<br>".join(f"{t['class']}: {t['evidence']:.3g}" for t in e["top3"])
            ex = ", ".join(f"{i} ({c:.2f})" for i, c in zip(e["exemplars"], e["similarities"]))
            cells.append(_Raw(f"{top}<br><span class=\"note\">exemplars {_e(ex)}</span>"))
        rows.append(cells)
    out.append(_table(["input"] + [f"layer {l}" for l in layers], rows))
    if report.images:
        titles = [f"#{s['index']} m{s['model_answer']}" for s in d["samples"]]
        sims = {l: [s["layers"][l]["similarities"] for s in d["samples"]] for l in layers}
        out.append(figs.add("exemplars", lambda path: plots.plot_exemplars(
            report.images["queries"], report.images["exemplars"], path, similarities=sims, query_titles=titles),
            "Each sampled test input, then per layer the training inputs behind its most similar library nodes"))
    return "".join(out)


def _settings_section(d: Mapping[str, Any]) -> str:
    s = {k: v for k, v in d["settings"].items()}
    rows = [[k, _Raw(f"<code>{_e(v)}</code>")] for k, v in s.items()]
    vers = [[k, v] for k, v in d["versions"].items()]
    times = [[k, v] for k, v in d["timings"].items()]
    return ("<h2>Settings, versions, timings</h2>" + _table(["setting", "value"], rows)
            + _table(["package", "version"], vers) + _table(["stage", "seconds"], times)
            + "<p class=\"note\">Every number of this page is in report.json (InspectionReport.to_dict()).</p>")


def render_html(report: Any, *, title: str | None = None) -> str:
    """The page of an :class:`~libnet_plugin.InspectionReport` as one HTML string (figures embedded)."""
    d = report.data
    layers = d["settings"]["layers"]
    with tempfile.TemporaryDirectory(prefix="libnet-inspect-") as tmp:
        figs = _Figures(Path(tmp))
        sizes = {l: {r["theta"]: r["size"] for r in d["layers"][l]["sweep"]} for l in layers}
        table = {l: d["layers"][l]["sweep"] for l in layers}
        parts = [_overview(d)]
        parts.append("<h2>Library size and agreement against θ</h2>")
        parts.append(figs.add("library-sizes", lambda p: plots.plot_library_sizes(sizes, p),
                              "Library size against θ per layer (the paper's Fig. 2A for this model)"))
        parts.append(figs.add("agreement", lambda p: plots.plot_agreement(table, p, top_k=d["settings"]["top_k"]),
                              "Top-1 / top-3 agreement with the model and accuracy against θ (Fig. 2B/C)"))
        parts.append(_path_section(d, figs))
        parts.append(f"<h2>Confusion index at the chosen θ</h2><p>Eq. 4 on {_e(d['settings']['confusion_basis'])}: "
                     "row d1, column d2; blank rows are classes no input of which the layer got right.</p>")
        parts.append('<div class="row">')
        for i, l in enumerate(layers):
            ci = {d["layers"][l]["theta"]: {l: [[float("nan") if v is None else v for v in r]
                                                for r in d["layers"][l]["confusion_index"]]}}
            parts.append(figs.add(f"confusion-{i}", lambda p, ci=ci, l=l: plots.plot_confusion_grid(
                ci, p, title=f"Confusion index, layer {l}"), f"Confusion index of layer {l}"))
        parts.append("</div>")
        parts.append(_consistency_section(d, figs))
        parts.append(_samples_section(report, figs))
        parts.append(_settings_section(d))
    name = title or f"libnet inspect: {d['settings']['model']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(name)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(name)}</h1>"
            "<p class=\"note\">How far each probed layer has come towards the model's decision: library networks "
            "(Lee, 2019), one library of activation patterns and one Hebbian readout per layer.</p>"
            + "".join(parts) + "</body></html>\n")


def write_html(report: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write :func:`render_html` to ``path`` atomically; return the path."""
    return write_text_atomic(path, render_html(report, title=title))
