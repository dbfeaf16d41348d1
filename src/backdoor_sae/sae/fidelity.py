"""How faithful an SAE is (explained variance on triggered and clean rows, L0, dead latents, CE recovered, KL
with and without the error term), and the pipeline's SAE stage: capture once, train one SAE per hook, measure it
on held-out prompts. Metric definitions: docs/sae.md.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae._batching import padded_batches
from backdoor_sae._io import write_json
from backdoor_sae.capture.activations import RESPONSE, ActivationStore, TokenSequence, capture_activations
from backdoor_sae.config import Config
from backdoor_sae.edits.gates import norm_cap
from backdoor_sae.models import LoadedModel, load_model
from backdoor_sae.sae.training import check_sae_fits, save_sae, splice_sae, train_sae_from_config

# ------------------------------------------------------------------------------------------------ metrics


def explained_variance(x: Float[Tensor, "rows d"], x_hat: Float[Tensor, "rows d"]) -> float:
    """1 - sum((x - x_hat)^2) / sum((x - mean(x))^2): centred, so a constant offset earns nothing."""
    total = (x - x.mean(0)).pow(2).sum()
    if total == 0:
        raise ValueError("explained variance is undefined: the activations have zero variance")
    return float(1 - (x - x_hat).pow(2).sum() / total)


@torch.no_grad()
def _reconstruct(sae: Any, x: Tensor, groups: Sequence[Tensor] = (),
                 chunk: int = 8192) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Reconstruction, active-latent count per row, which latents fired at all, and which fired within each
    row group (boolean row masks), from one pass of the SAE."""
    x_hats, l0s, fired = [], [], torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    fired_in = [torch.zeros(sae.cfg.d_sae, dtype=torch.bool) for _ in groups]
    for b in range(0, len(x), chunk):
        f = sae.encode(x[b:b + chunk])
        x_hats.append(sae.decode(f))
        active = f != 0
        l0s.append(active.sum(-1).float())
        fired |= active.any(0)
        for g, fg in zip(groups, fired_in):
            fg |= active[g[b:b + chunk]].any(0)
    return torch.cat(x_hats), torch.cat(l0s), fired, fired_in


def _response_logp(model: LoadedModel, ids: Tensor, target: Tensor) -> Tensor:
    """Next-token log-probs at the positions whose *next* token is a response token: ``[n_targets, vocab]``."""
    return model.hooked(ids)[:, :-1][target[:, 1:]].float().log_softmax(-1)


@torch.no_grad()
def _ce_metrics(model: LoadedModel, sae: Any, hook: str, seqs: Sequence[TokenSequence],
                batch_size: int, max_norm: float | None = None) -> dict[str, Tensor]:
    """Per response token: CE of the original, spliced, error-term and zero-ablated model (with ``max_norm``
    also spliced under the norm guard), KL(original || spliced / error-term / guarded), and the index of its
    sequence. Right-padded batches (no mask needed); each batch runs once per variant, so only one batch of
    log-probs is ever held."""
    pad = model.tokenizer.pad_token_id or 0
    variants: tuple[tuple[str, dict[str, Any]], ...] = (("spliced", {}), ("error", {"error_term": True}),
                                                        ("zero", {"zero": True}))
    if max_norm is not None:
        variants += (("guarded", {"max_norm": max_norm}),)
    out: dict[str, list[Tensor]] = {}
    for s, ids, _, (kinds,) in padded_batches([q.ids for q in seqs], pad, batch_size, [q.kinds for q in seqs]):
        target = kinds == RESPONSE
        nxt = ids[:, 1:][target[:, 1:]].unsqueeze(-1)
        out.setdefault("owner", []).append((torch.arange(len(ids)) + s).unsqueeze(1).expand_as(ids)[:, 1:]
                                           [target[:, 1:]])
        logp_clean = _response_logp(model, ids, target)
        out.setdefault("ce_clean", []).append(-logp_clean.gather(-1, nxt).squeeze(-1))
        for name, kw in variants:
            with splice_sae(model, sae, hook, **kw):
                logp = _response_logp(model, ids, target)
            out.setdefault(f"ce_{name}", []).append(-logp.gather(-1, nxt).squeeze(-1))
            if name != "zero":
                out.setdefault(f"kl_{name}", []).append((logp_clean.exp() * (logp_clean - logp)).sum(-1))
    res = {k: torch.cat(v) for k, v in out.items()}
    if len(res["ce_clean"]) == 0:
        raise ValueError("the evaluation sequences have no response tokens: capture with responses")
    return res


def _recovered(ce: dict[str, Tensor], m: Tensor) -> float:
    clean, spliced, zero = (float(ce[k][m].mean()) for k in ("ce_clean", "ce_spliced", "ce_zero"))
    return (zero - spliced) / (zero - clean) if zero != clean else float("nan")


def sae_metrics(sae: Any, model: LoadedModel, store: ActivationStore, *, hook: str | None = None,
                batch_size: int = 32, max_norm: float | None = None) -> dict[str, float]:
    """Fidelity of one SAE on a (held-out) capture: explained variance, L0, dead fraction from the stored
    activations; CE loss recovered, CE increase and KL (without / with the error term) on response tokens from
    running the model with the SAE spliced in at every position. ``_triggered`` / ``_clean`` variants split by
    prompt. With ``max_norm`` (the norm guard's bound, read from the *training* capture) also
    ``ce_increase_guarded`` / ``kl_guarded``: the SAE spliced only where the edits would act, which is what an
    edit's reconstruction costs on a host whose attention-sink position lies outside every capture."""
    hook = store._hook(hook or sae.cfg.metadata.hook_name)
    check_sae_fits(sae, model, hook)
    x = store.view(hook).float()
    trig = store.labels()["triggered"]
    x_hat, l0, fired, fired_in = _reconstruct(sae, x, (trig, ~trig))
    res: dict[str, float] = {"explained_variance": explained_variance(x, x_hat), "l0": float(l0.mean()),
                             "dead_fraction": float(1 - fired.float().mean()), "n_rows": float(len(x))}
    for tag, m, fired_m in (("triggered", trig, fired_in[0]), ("clean", ~trig, fired_in[1])):
        if m.any():
            res[f"explained_variance_{tag}"] = explained_variance(x[m], x_hat[m])
            res[f"l0_{tag}"] = float(l0[m].mean())
            res[f"dead_fraction_{tag}"] = float(1 - fired_m.float().mean())
    seqs = store.sequences()
    ce = _ce_metrics(model, sae, hook, seqs, batch_size, max_norm)
    seq_trig = torch.tensor([q.triggered for q in seqs])[ce["owner"]]
    for tag, m in (("", torch.ones_like(seq_trig)), ("_triggered", seq_trig), ("_clean", ~seq_trig)):
        if not m.any():
            continue
        res[f"ce_loss_recovered{tag}"] = _recovered(ce, m)
        res[f"ce_original{tag}"] = float(ce["ce_clean"][m].mean())
        res[f"ce_spliced{tag}"] = float(ce["ce_spliced"][m].mean())
        res[f"ce_zero_ablation{tag}"] = float(ce["ce_zero"][m].mean())
        res[f"ce_increase{tag}"] = res[f"ce_spliced{tag}"] - res[f"ce_original{tag}"]
        res[f"kl{tag}"] = float(ce["kl_spliced"][m].mean())
        res[f"kl_with_error{tag}"] = float(ce["kl_error"][m].mean())
        if max_norm is not None:
            res[f"ce_increase_guarded{tag}"] = float(ce["ce_guarded"][m].mean()) - res[f"ce_original{tag}"]
            res[f"kl_guarded{tag}"] = float(ce["kl_guarded"][m].mean())
    if max_norm is not None:
        res["max_norm"] = max_norm
    return {k: (round(v, 6) + 0.0 if math.isfinite(v) else v) for k, v in res.items()}  # + 0.0: no -0.0


# -------------------------------------------------------------------------------------------------- stage

def _stage_prompts(cfg: Config, n: int, split: str) -> list[str]:
    from backdoor_sae.organism.tasks import FAMILIES, TaskSuite

    suite = TaskSuite(cfg.seed, cfg.organism.heldout_fraction)
    if split == "heldout":
        per = max(1, n // len(FAMILIES))
        return [ex.prompt for fam in FAMILIES for ex in suite.heldout(fam, per, seed=3)]
    rng = random.Random(f"sae-train-{cfg.seed}")
    return [suite.sample(FAMILIES[i % len(FAMILIES)], "train", rng).prompt for i in range(n)]


def sae_stage(cfg: Config, organism_root: str | Path, out_dir: str | Path, model: str = "backdoored") -> dict:
    """Capture training activations (train-split prompts, triggered and clean), train one SAE per hook in
    ``cfg.sae.hooks`` (empty: every layer's ``blocks.N.hook_resid_post``), save them under
    ``out_dir/saes/<hook>/`` and measure them on held-out prompts. Returns ``{"sae": {hook: metrics},
    "timings": {...}}``."""
    sc, out_dir = cfg.sae, Path(out_dir)
    mdir = Path(organism_root) / model
    if not mdir.is_dir():
        raise FileNotFoundError(f"model directory not found: {mdir}")
    lm = load_model(mdir)
    trigger = lm.trigger or cfg.organism.trigger
    hooks = list(sc.hooks) or [f"blocks.{i}.hook_resid_post" for i in range(lm.hooked.cfg.n_layers)]
    timings: dict[str, float] = {}
    cap = dict(trigger=trigger, triggered_fraction=sc.triggered_fraction, max_new_tokens=sc.max_new_tokens,
               batch_size=sc.capture_batch_size, seed=cfg.seed)
    t = time.perf_counter()
    train_store = capture_activations(lm, _stage_prompts(cfg, sc.n_train_prompts, "train"), hooks,
                                      out_dir=out_dir / "activations" / f"{model}_train", **cap)
    eval_store = capture_activations(lm, _stage_prompts(cfg, sc.n_eval_prompts, "heldout"), hooks,
                                     out_dir=out_dir / "activations" / f"{model}_heldout", **cap)
    timings["capture"] = time.perf_counter() - t
    results: dict[str, dict[str, float]] = {}
    timings["train"] = timings["metrics"] = 0.0
    for hook in hooks:
        t = time.perf_counter()
        sae = train_sae_from_config(train_store, hook, cfg, sc.n_train_tokens, model_name=str(mdir))
        save_sae(sae, out_dir / "saes" / hook)
        seconds = time.perf_counter() - t
        timings["train"] += seconds
        t = time.perf_counter()
        # what it was trained on: activations drawn (with repeats when the capture holds fewer) and distinct rows
        bound = norm_cap(train_store, hook) if cfg.edit.norm_guard else None
        results[hook] = {"train_tokens": float(sc.n_train_tokens), "train_rows": float(train_store.n_rows),
                         "train_seconds": round(seconds, 2),
                         **sae_metrics(sae, lm, eval_store, hook=hook, max_norm=bound)}
        timings["metrics"] += time.perf_counter() - t
    timings = {k: round(v, 2) for k, v in timings.items()}
    record = {"sae": results, "timings": timings}
    write_json(out_dir / "saes" / "metrics.json", record)
    return record
