"""HTML building blocks of ``report.html``: the page style, escaping, cell formatting, tables and sections
(every text taken from results goes through :func:`esc`)."""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable, Sequence

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
max-width:1280px;padding:0 24px 48px;color:#1d2733;line-height:1.4}
h1{margin:20px 0 4px}h2{border-bottom:2px solid #dde3ea;padding-bottom:4px;margin-top:36px}
nav a{margin-right:14px;color:#2a5db0;text-decoration:none}.muted{color:#6b7785}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #dde3ea;padding:3px 8px;text-align:right}th{background:#f2f5f8}td{white-space:nowrap}
td:first-child,th:first-child{text-align:left}td.l{text-align:left;white-space:normal}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
.card{border:1px solid #dde3ea;border-radius:6px;padding:8px 12px;background:#fbfcfd}
.card h4{margin:2px 0 6px}.card table{font-size:12px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;margin:3px 0;line-height:1.9;
overflow-wrap:anywhere}.tok{white-space:pre-wrap;border-radius:3px;padding:1px 0}
table.stats td{font-size:11px;padding:1px 6px}table.stats td.l{color:#4a5663}
.tok.max{outline:2px solid #c0392b;font-weight:bold}
.tok.k0{text-decoration:underline}.tok.k2{font-style:italic}
.tag{font-family:system-ui,sans-serif;font-size:11px;border-radius:3px;padding:0 4px;margin-right:6px}
.tag.t{background:#f8d7da}.tag.c{background:#d4edda}.chips span{display:inline-block;margin:2px 4px 2px 0;
padding:0 5px;border-radius:3px;background:#e8f0fe;font-family:ui-monospace,monospace;font-size:12px;white-space:pre}
.chips.neg span{background:#fdecea}pre{background:#f6f8fa;padding:8px;overflow:auto;font-size:12px}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """A table cell's text: 4 decimals (scientific below 1e-3), yes/no for booleans, a dash for nothing."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.2e}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


class Raw(str):
    """A table cell that is already HTML (built from escaped parts): :func:`table` leaves it as it is."""


def _cell(v: Any) -> str:
    return v if isinstance(v, Raw) else esc(fmt(v))


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]], left: Sequence[int] = ()) -> str:
    """An HTML table of plain values (every cell escaped); columns in ``left`` are left-aligned and wrap."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td{' class=l' if i in left else ''}>{_cell(v)}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="scroll"><table>{head}{body}</table></div>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def params_text(params: Any) -> str:
    """``{"layer": "all", "n": 10}`` as ``layer=all, n=10``."""
    if not isinstance(params, dict):
        return fmt(params)
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={fmt(v)}" for k, v in params.items())
