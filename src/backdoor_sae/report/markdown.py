"""Markdown building blocks of the generated tables: number formats and a pipe table."""

from __future__ import annotations

from typing import Any, Sequence


def dash(v: Any, spec: str = "") -> str:
    """``v`` formatted with ``spec``, or an en dash when it is missing."""
    if v is None or v == "":
        return "–"
    return format(v, spec) if spec and isinstance(v, (int, float)) else str(v)


def f3(v: Any) -> str:
    """A rate or an accuracy: three decimals."""
    return dash(v, ".3f")


def f4(v: Any) -> str:
    """A cross-entropy or a KL in nats: four decimals."""
    return dash(v, ".4f")


def params_text(params: Any) -> str:
    """A sweep point's parameters as ``k=v, ...`` (latent lists shortened to their size)."""
    if not isinstance(params, dict):
        return dash(params)
    parts = []
    for k, v in params.items():
        if isinstance(v, dict):
            v = "{" + ", ".join(f"{h}: {len(x)}" for h, x in v.items()) + "}"
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub pipe table (``|`` inside cells escaped)."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
