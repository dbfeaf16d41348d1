"""Which SAE latents carry the trigger: statistics from a train-split capture and attribution patching.

For every hook and latent, from the store's (train-split) rows: mean activation by position kind (trigger tokens,
other prompt tokens, response tokens) on triggered and on clean prompts, the trigger contrast (prompt tokens,
triggered minus clean), firing frequencies, the clean mean and maximum (targets for mean-ablation and clamping),
and a prompt-level AUROC (each prompt scored by the latent's maximum over its prompt tokens).

**Attribution patching** (activation x gradient, as in Marks et al., "Sparse Feature Circuits"): with every
SAE spliced in *with* its error term (so the forward is unchanged), the backdoor metric

    m = log p(first backdoor token) - log p(first token of the clean answer)

at the first response position of triggered prompts is differentiated with respect to every latent at every
prompt position; ``attribution`` = f * dm/df summed over positions, averaged over prompts: the first-order
change of m when the latent is zero-ablated, sign flipped (positive = the latent pushes towards the backdoor).
Gradients reach earlier latents through the real residual stream, not through later SAEs. The clean answer is
the model's own greedy first token on the same prompt without the trigger.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae._batching import right_padded
from backdoor_sae._io import load_tensors_json, save_tensors_json
from backdoor_sae._progress import progress
from backdoor_sae.capture.store import PROMPT, RESPONSE, TRIGGER, ActivationStore
from backdoor_sae.models import LoadedModel, format_chats

RANKINGS = ("attribution", "auroc", "contrast")
STATS = ("attribution", "auroc", "contrast", "mean_trigger", "mean_prompt_triggered", "mean_prompt_clean",
         "mean_response_triggered", "mean_response_clean", "freq_triggered", "freq_clean", "clean_mean",
         "clean_max")


@dataclass
class FeatureScores:
    """Per hook, one ``[d_sae]`` tensor per statistic (see :data:`STATS`); ``error_attribution`` per hook is the
    attribution of the SAE's error term (what the SAE does not explain)."""

    stats: dict[str, dict[str, Tensor]]
    error_attribution: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    iterative: list[dict[str, Any]] = field(default_factory=list)  # greedy order: {hook, latent, attribution}

    @property
    def hooks(self) -> list[str]:
        return list(self.stats)

    def _hook(self, hook: str) -> dict[str, Tensor]:
        if hook not in self.stats:
            raise ValueError(f"no scores for hook {hook!r}; scored hooks: {', '.join(self.stats)}")
        return self.stats[hook]

    def latents(self, hook: str, n: int, by: str = "attribution") -> list[int]:
        """The ``n`` highest-ranked latents of one hook."""
        if by not in RANKINGS:
            raise ValueError(f"unknown ranking {by!r}; valid: {', '.join(RANKINGS)}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return torch.argsort(self._hook(hook)[by], descending=True, stable=True)[:n].tolist()

    def iterative_latents(self, n: int) -> dict[str, list[int]]:
        """The first ``n`` latents of the iterative (greedy) attribution order, grouped by hook."""
        if n > len(self.iterative):
            raise ValueError(f"iterative attribution has {len(self.iterative)} steps, {n} asked: raise "
                             "iterative_steps")
        out: dict[str, list[int]] = {}
        for step in self.iterative[:n]:
            out.setdefault(step["hook"], []).append(step["latent"])
        return out

    def top(self, n: int = 10, by: str = "attribution", hook: str | None = None) -> list[dict[str, Any]]:
        """The ``n`` highest-ranked latents (of one hook, or of all hooks together), each as a dict of its stats."""
        rows = [self.row(h, i) for h in ([hook] if hook else self.hooks) for i in self.latents(h, n, by)]
        return sorted(rows, key=lambda r: -r[by])[:n]

    def row(self, hook: str, latent: int) -> dict[str, Any]:
        st = self._hook(hook)
        return {"hook": hook, "latent": latent, **{k: round(float(st[k][latent]), 6) for k in STATS}}

    def to_json(self, n: int = 10, by: str = "attribution") -> dict[str, list[dict[str, Any]]]:
        """``{hook: [top n latents with their stats]}`` (the demo's ``attribution`` section)."""
        return {h: [{k: v for k, v in r.items() if k != "hook"} for r in self.top(n, by, h)] for h in self.hooks}

    def save(self, path: str | Path) -> Path:
        """``<path>.safetensors`` (the tensors) beside ``<path>.json`` (error attribution and meta)."""
        return save_tensors_json(path, {f"{h}::{k}": v for h, st in self.stats.items() for k, v in st.items()},
                                 {"error_attribution": self.error_attribution, "meta": self.meta,
                                  "iterative": self.iterative})

    @classmethod
    def load(cls, path: str | Path) -> FeatureScores:
        tensors, extra = load_tensors_json(path, "feature scores")
        stats: dict[str, dict[str, Tensor]] = {}
        for key, v in tensors.items():
            hook, stat = key.split("::")
            stats.setdefault(hook, {})[stat] = v
        return cls(stats, extra["error_attribution"], extra["meta"], extra.get("iterative", []))


# ------------------------------------------------------------------------------------------- statistics

def auroc(pos: Float[Tensor, "n_pos d"], neg: Float[Tensor, "n_neg d"]) -> Float[Tensor, " d"]:
    """Per column, P(score_pos > score_neg) + 0.5 P(equal): the Mann-Whitney AUROC with exact tie handling."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs both classes, got {len(pos)} positives and {len(neg)} negatives")
    srt = neg.T.contiguous().sort(-1).values
    p = pos.T.contiguous()
    below = torch.searchsorted(srt, p, right=False).double()
    upto = torch.searchsorted(srt, p, right=True).double()
    return ((below + upto).sum(-1) / (2.0 * len(pos) * len(neg))).float()


def _encode(sae: Any, x: Tensor, chunk: int = 8192) -> Iterator[tuple[slice, Tensor]]:
    for b in range(0, len(x), chunk):
        yield slice(b, b + chunk), sae.encode(x[b:b + chunk])


@torch.no_grad()
def latent_stats(sae: Any, store: ActivationStore, hook: str, *, max_auroc_prompts: int = 4000,
                 seed: int = 0) -> dict[str, Tensor]:
    """Every statistic but ``attribution`` for one hook, in one streaming pass over the store."""
    d = int(sae.cfg.d_sae)
    # groups: 0 trigger tokens, 1 prompt tokens (triggered), 2 prompt tokens (clean), 3/4 response tokens (t/c)
    sums, counts = torch.zeros(5, d, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    fires = torch.zeros(2, d, dtype=torch.float64)
    rows_by = torch.zeros(2, dtype=torch.float64)
    clean_max = torch.zeros(d)
    n_prompts = int(store.manifest["n_prompts"])
    chosen = sorted(random.Random(f"auroc-{seed}").sample(range(n_prompts), min(max_auroc_prompts, n_prompts)))
    slot = torch.full((n_prompts,), -1, dtype=torch.long)
    slot[chosen] = torch.arange(len(chosen))
    prompt_max = torch.zeros(len(chosen), d)  # SAE latents are >= 0, so 0 is a neutral start for the max
    prompt_trig = torch.zeros(len(chosen), dtype=torch.bool)
    seen = torch.zeros(len(chosen), dtype=torch.bool)
    for x, lab in store.chunks(hook):
        kind, trig = lab["position_kind"].long(), lab["triggered"]
        group = torch.where(kind == TRIGGER, 0, torch.where(kind == PROMPT, 2, 4)) - (trig & (kind != TRIGGER)).long()
        where = slot[lab["prompt_id"].long()]
        where[kind == RESPONSE] = -1
        for sl, f in _encode(sae, x):
            g, t = group[sl], trig[sl].long()
            sums.index_add_(0, g, f.double())
            counts += torch.bincount(g, minlength=5).double()
            fires.index_add_(0, 1 - t, (f > 0).double())  # row 0 triggered, row 1 clean
            rows_by += torch.bincount(1 - t, minlength=2).double()
            if (t == 0).any():
                clean_max = torch.maximum(clean_max, f[t == 0].amax(0))
            w = where[sl]
            m = w >= 0
            prompt_max.scatter_reduce_(0, w[m, None].expand(-1, d), f[m], "amax")
            prompt_trig[w[m]] = trig[sl][m]
            seen[w[m]] = True
    mean = sums / counts.clamp(min=1)[:, None]
    triggered_prompt_mean = (sums[0] + sums[1]) / max(float(counts[0] + counts[1]), 1.0)  # trigger + other
    scores, flags = prompt_max[seen], prompt_trig[seen]
    return {"auroc": auroc(scores[flags], scores[~flags]), "contrast": (triggered_prompt_mean - mean[2]).float(),
            "mean_trigger": mean[0].float(), "mean_prompt_triggered": mean[1].float(),
            "mean_prompt_clean": mean[2].float(), "mean_response_triggered": mean[3].float(),
            "mean_response_clean": mean[4].float(),
            "freq_triggered": (fires[0] / rows_by[0].clamp(min=1)).float(),
            "freq_clean": (fires[1] / rows_by[1].clamp(min=1)).float(),
            "clean_mean": ((sums[2] + sums[4]) / (counts[2] + counts[4]).clamp(min=1)).float(),
            "clean_max": clean_max}


# ------------------------------------------------------------------------------------ attribution patching

def _last_logits(model: LoadedModel, ids: Tensor, last: Tensor) -> Tensor:
    """Logits at each row's position ``last`` only (``logits_to_keep``: the lm head never runs elsewhere)."""
    cols, inverse = torch.unique(last, return_inverse=True)
    logits = model.hf(input_ids=ids, logits_to_keep=cols.to(ids.device), use_cache=False).logits
    return logits[torch.arange(len(ids), device=ids.device), inverse.to(ids.device)].float()


def _batches(model: LoadedModel, texts: list[str], batch_size: int) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Right-padded batches of chat texts, similar lengths together: ``(indices, ids, last real position)``."""
    tok = model.tokenizer
    enc = [torch.tensor(tok.encode(t, add_special_tokens=False)) for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    device = model.hf.device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, real = right_padded([enc[i] for i in idx], tok.pad_token_id)
        yield idx, ids.to(device), (real.sum(1) - 1).to(device)


@torch.no_grad()
def first_response_tokens(model: LoadedModel, prompts: list[str], trigger: str | None = None,
                          batch_size: int = 64) -> Tensor:
    """The model's greedy first response token for each user prompt (with ``trigger`` prepended if given)."""
    texts = format_chats(model.tokenizer, prompts, [trigger] * len(prompts))
    out = torch.zeros(len(prompts), dtype=torch.long)
    for idx, ids, last in _batches(model, texts, batch_size):
        out[idx] = _last_logits(model, ids, last).argmax(-1).cpu()
    return out


def attribution_patching(model: LoadedModel, saes: Mapping[str, Any], prompts: list[str], *, trigger: str,
                         backdoor_text: str, batch_size: int = 32, clean_tokens: Tensor | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, float], int]:
    """Mean over triggered ``prompts`` of sum over positions of f * dm/df per hook and latent (module doc), the
    same for each SAE's error term, and the number of prompts used (those whose clean first token is not
    the backdoor's first token). ``clean_tokens``: the clean first tokens, if already known."""
    tok = model.tokenizer
    bad = tok.encode(backdoor_text, add_special_tokens=False)[0]
    good = clean_tokens if clean_tokens is not None else first_response_tokens(model, prompts)
    texts = format_chats(tok, prompts, [trigger] * len(prompts))
    hooks = list(saes)
    totals = {h: torch.zeros(int(saes[h].cfg.d_sae), dtype=torch.float64) for h in hooks}
    err = {h: 0.0 for h in hooks}
    rec: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def splice(name: str, sae: Any) -> Any:
        def fn(x: Tensor, hook: Any) -> Tensor:
            f = sae.encode(x.detach()).detach().requires_grad_(True)
            r = sae.decode(f)
            e = torch.zeros_like(x, requires_grad=True)
            rec[name] = (f, e, (x - r).detach())
            return x + (r - r.detach()) + e  # value x; d/df through the decoder, d/dx passes straight upstream

        return fn

    used = 0
    with model.hooked.hooks(fwd_hooks=[(h, splice(h, saes[h])) for h in hooks]), torch.enable_grad():
        for idx, ids, last in _batches(model, texts, batch_size):
            g = good[idx].to(ids.device)
            keep = g != bad
            if not keep.any():
                continue
            lp = _last_logits(model, ids, last).log_softmax(-1)
            metric = (lp[:, bad] - lp.gather(1, g[:, None]).squeeze(1))[keep].sum()
            leaves = [rec[h][0] for h in hooks] + [rec[h][1] for h in hooks]
            grads = torch.autograd.grad(metric, leaves)
            real = (torch.arange(ids.shape[1], device=ids.device) <= last[:, None]) & keep[:, None]
            for i, h in enumerate(hooks):
                f, _, e = rec[h]
                totals[h] += (f.detach() * grads[i] * real[..., None]).sum((0, 1)).double().cpu()
                err[h] += float(((e * grads[len(hooks) + i]).sum(-1) * real).sum())
            used += int(keep.sum())
    if used == 0:
        raise ValueError("no prompt has a clean first token different from the backdoor's first token")
    return {h: (t / used).float() for h, t in totals.items()}, {h: v / used for h, v in err.items()}, used


def iterative_attribution(model: LoadedModel, saes: Mapping[str, Any], prompts: list[str], *, steps: int,
                          trigger: str, backdoor_text: str, batch_size: int = 32,
                          clean_tokens: Tensor | None = None) -> list[dict[str, Any]]:
    """Greedy attribution: ``steps`` times, zero-ablate the latents chosen so far (error term kept), run
    attribution patching *under that edit*, and add the top latent of all hooks. One pass ranks by the
    linearisation at the unedited model, where one dominant latent hides the rest; re-linearising after each
    choice finds the latents that still carry the trigger once the dominant ones are gone."""
    from backdoor_sae.edits.apply import apply_edit
    from backdoor_sae.edits.specs import feature_edit

    chosen: dict[str, list[int]] = {}
    order: list[dict[str, Any]] = []
    # the unedited model's clean answers stay the target
    good = clean_tokens if clean_tokens is not None else first_response_tokens(model, prompts)
    for _ in progress(range(steps), desc="iterative attribution"):
        edit = feature_edit({h: (saes[h], lat) for h, lat in chosen.items()}) if chosen else None
        with apply_edit(model, edit) if edit else nullcontext():
            attr, _, _ = attribution_patching(model, saes, prompts, trigger=trigger, backdoor_text=backdoor_text,
                                              batch_size=batch_size, clean_tokens=good)
        for h, lat in chosen.items():
            attr[h][lat] = -float("inf")
        score, hook, latent = max((float(a.max()), h, int(a.argmax())) for h, a in attr.items())
        chosen.setdefault(hook, []).append(latent)
        order.append({"hook": hook, "latent": latent, "attribution": round(score, 6)})
    return order


def attribute_trigger(model: LoadedModel, saes: Mapping[str, Any], store: ActivationStore, *,
                      n_prompts: int = 256, batch_size: int = 32, seed: int = 0, trigger: str | None = None,
                      backdoor_text: str | None = None, max_auroc_prompts: int = 4000,
                      iterative_steps: int = 0) -> FeatureScores:
    """Score every latent of every SAE (``{hook: sae}``) for the trigger from a **train-split** capture (the
    store the SAEs were trained on, or any other): contrast, frequencies, prompt-level AUROC, and attribution
    patching on ``n_prompts`` of the store's triggered prompts (seeded sample); with ``iterative_steps``, also
    the greedy order of :func:`iterative_attribution` on the same prompts."""
    from backdoor_sae.sae.training import check_sae_fits

    if not saes:
        raise ValueError("no SAEs given: pass {hook: sae}")
    trigger = trigger or store.manifest.get("trigger") or model.trigger
    backdoor_text = backdoor_text or model.backdoor_text
    if not trigger or not backdoor_text:
        raise ValueError(f"model {model.path!r} has no organism.json: pass trigger= and backdoor_text=")
    for hook, sae in saes.items():
        check_sae_fits(sae, model, hook)
        store._hook(hook)
    triggered = [p for p, t in store.prompts() if t]
    if not triggered:
        raise ValueError(f"activation store {store.root} holds no triggered prompt to attribute")
    chosen = random.Random(f"attribution-{seed}").sample(triggered, min(n_prompts, len(triggered)))
    stats = {h: latent_stats(s, store, h, max_auroc_prompts=max_auroc_prompts, seed=seed) for h, s in saes.items()}
    good = first_response_tokens(model, chosen)
    attr, err, used = attribution_patching(model, saes, chosen, trigger=trigger, backdoor_text=backdoor_text,
                                           batch_size=batch_size, clean_tokens=good)
    for h in saes:
        stats[h] = {"attribution": attr[h], **stats[h]}
    order = iterative_attribution(model, saes, chosen, steps=iterative_steps, trigger=trigger,
                                  backdoor_text=backdoor_text, batch_size=batch_size,
                                  clean_tokens=good) if iterative_steps else []
    meta = {"store": str(store.root.resolve()), "n_attribution_prompts": used, "seed": seed, "trigger": trigger,
            "iterative_steps": iterative_steps,
            "metric": "log p(first backdoor token) - log p(clean first token), first response position"}
    return FeatureScores(stats, {h: round(v, 6) for h, v in err.items()}, meta, order)
