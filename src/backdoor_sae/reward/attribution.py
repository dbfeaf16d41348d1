"""Which SAE latents go with high reward: sampled completions, their rewards and their mean latent activations.

For each prompt, ``n_samples`` completions are sampled (seeded, :func:`backdoor_sae.evaluate.generate` at a
temperature) and scored by the reward. The model is then run teacher-forced over each chat turn + completion
(+ EOS when the completion ended by itself), every SAE encodes its hook's input, and each latent's activation is
averaged over the completion tokens only: one ``[d_sae]`` vector per completion and hook. Per latent:

* ``correlation``: Pearson correlation of that mean activation with the reward across completions (0 for a
  latent that is constant, e.g. never fires);
* ``probe``: the coefficient of a sparse linear probe (sklearn ``Lasso``, fixed ``alpha``) from the
  standardised activations of all of one hook's latents to the standardised reward (reward SDs per latent SD).

**Callers pass clean train-split prompts only** (no trigger, nothing held out): the scores are meant for
trigger-agnostic methods, which must not see the trigger or the evaluation prompts. A prompt that contains the
model's trigger is refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae._batching import padded_batches
from backdoor_sae._io import load_tensors_json, save_tensors_json
from backdoor_sae.models import LoadedModel, format_chats
from backdoor_sae.reward.model import RewardFn, load_reward, score

RANKINGS = ("correlation", "probe")


@dataclass
class RewardScores:
    """Per hook, one ``[d_sae]`` tensor per ranking (:data:`RANKINGS`); ``rewards`` holds the reward of every
    sampled completion (prompt-major: prompt ``i``'s samples are rows ``i * n_samples ...``)."""

    correlation: dict[str, Tensor]
    probe: dict[str, Tensor]
    rewards: Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        return list(self.correlation)

    def _scores(self, hook: str, by: str) -> Tensor:
        if by not in RANKINGS:
            raise ValueError(f"unknown ranking {by!r}; valid: {', '.join(RANKINGS)}")
        if hook not in self.correlation:
            raise ValueError(f"no reward scores for hook {hook!r}; scored hooks: {', '.join(self.hooks)}")
        return getattr(self, by)[hook]

    def latents(self, hook: str, n: int, by: str = "correlation") -> list[int]:
        """The ``n`` latents of one hook with the highest score (most positively tied to reward), descending."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return torch.argsort(self._scores(hook, by), descending=True, stable=True)[:n].tolist()

    def row(self, hook: str, latent: int) -> dict[str, Any]:
        return {"latent": latent, **{k: round(float(getattr(self, k)[hook][latent]), 6) for k in RANKINGS}}

    def to_json(self, n: int = 10, by: str = "correlation") -> dict[str, list[dict[str, Any]]]:
        """``{hook: [the top n latents by `by`, each with its correlation and probe coefficient]}``."""
        return {h: [self.row(h, i) for i in self.latents(h, n, by)] for h in self.hooks}

    def save(self, path: str | Path) -> Path:
        """``<path>.safetensors`` (the tensors) beside ``<path>.json`` (meta), each written atomically."""
        tensors = {f"{h}::{k}": getattr(self, k)[h] for h in self.hooks for k in RANKINGS}
        return save_tensors_json(path, {**tensors, "rewards": self.rewards}, {"hooks": self.hooks, "meta": self.meta})

    @classmethod
    def load(cls, path: str | Path) -> RewardScores:
        t, extra = load_tensors_json(path, "reward scores")
        hooks = extra["hooks"]
        return cls({h: t[f"{h}::correlation"] for h in hooks}, {h: t[f"{h}::probe"] for h in hooks}, t["rewards"],
                   extra["meta"])


# ------------------------------------------------------------------------------------------- statistics

def pearson(x: Float[Tensor, "n d"], y: Float[Tensor, " n"]) -> Float[Tensor, " d"]:
    """Per column, the Pearson correlation with ``y``; 0 where the column (or ``y``) is constant."""
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean()
    sx, sy = xc.norm(dim=0), yc.norm()
    scale = x.abs().amax(0).clamp(min=1e-30) * len(x) ** 0.5  # a column this flat is constant up to rounding
    ok = (sx > 1e-9 * scale) & (sy > 1e-9 * y.abs().max().clamp(min=1e-30) * len(y) ** 0.5)
    r = (xc.T @ yc) / torch.where(ok, sx * sy, torch.ones_like(sx))
    return torch.where(ok, r, torch.zeros_like(r)).clamp(-1, 1).float()


def lasso_probe(x: Float[Tensor, "n d"], y: Float[Tensor, " n"], alpha: float,
                seed: int = 0) -> tuple[Float[Tensor, " d"], float]:
    """Lasso coefficients from standardised columns of ``x`` to standardised ``y`` (constant columns get 0)
    and the in-sample R^2; all zeros and R^2 0 when ``y`` is constant."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    xs, ys = x.double(), y.double()
    sd, y_sd = xs.std(0, correction=0), float(ys.std(correction=0))
    if y_sd == 0.0:
        return torch.zeros(x.shape[1]), 0.0
    z = ((xs - xs.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))).numpy()
    target = ((ys - ys.mean()) / y_sd).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = Lasso(alpha=alpha, random_state=seed, max_iter=5000).fit(z, target)
    return torch.from_numpy(fit.coef_).float(), float(fit.score(z, target))


# ---------------------------------------------------------------------------------------------- capture

def _completion_tokens(model: LoadedModel, prompts: Sequence[str], completions: Sequence[str],
                       truncated_at: int | None) -> tuple[list[Tensor], list[Tensor]]:
    """Per completion: chat turn + completion (+ EOS unless it was cut at ``truncated_at`` tokens) and a 0/1 mask
    of the completion's tokens (EOS included), as ``activations._tokenise`` lays out responses."""
    tok = model.tokenizer
    turns = tok(format_chats(tok, prompts, [None] * len(prompts)), add_special_tokens=False)["input_ids"]
    replies = tok(list(completions), add_special_tokens=False)["input_ids"]
    seqs, masks = [], []
    for p, r in zip(turns, replies, strict=True):
        r = r + ([tok.eos_token_id] if truncated_at is None or len(r) < truncated_at else [])
        seqs.append(torch.tensor(p + r))
        masks.append(torch.tensor([0] * len(p) + [1] * len(r)))
    return seqs, masks


@torch.no_grad()
def completion_latents(model: LoadedModel, saes: Mapping[str, Any], prompts: Sequence[str],
                       completions: Sequence[str], *, truncated_at: int | None = None,
                       batch_size: int = 128) -> dict[str, Float[Tensor, "n d_sae"]]:
    """Each SAE's latent activations averaged over each completion's tokens, teacher-forced after the clean
    chat turn of its prompt (right-padded batches of similar length)."""
    from backdoor_sae.capture.activations import _forward_recorded, _recording

    hooks = list(saes)
    seqs, masks = _completion_tokens(model, prompts, completions, truncated_at)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = {h: torch.zeros(len(seqs), int(saes[h].cfg.d_sae)) for h in hooks}
    with _recording(model.hooked, hooks) as got:
        for first, ids, _, (resp,) in padded_batches([seqs[i] for i in order], model.tokenizer.pad_token_id,
                                                     batch_size, [masks[i] for i in order]):
            _forward_recorded(model, ids, got, hooks)
            keep = resp == 1
            rows = torch.tensor(order[first:first + len(ids)])
            counts = keep.sum(1).clamp(min=1).float()
            token_rows = keep.nonzero()[:, 0]  # each completion token's row in the batch
            for h in hooks:
                sae = saes[h]
                f = sae.encode(got[h][keep.to(got[h].device)].to(sae.W_enc.device, sae.W_enc.dtype)).float().cpu()
                sums = torch.zeros(len(ids), f.shape[1]).index_add_(0, token_rows, f)
                out[h][rows] = sums / counts[:, None]
    return out


def attribute_reward(model: LoadedModel, saes: Mapping[str, Any], prompts: Sequence[str],
                     reward: RewardFn | str | Path, *, n_samples: int = 4, temperature: float = 1.0,
                     max_new_tokens: int = 16, batch_size: int = 128, seed: int = 0,
                     probe_alpha: float = 0.02) -> RewardScores:
    """Score every latent of every SAE (``{hook: sae}``) by how it goes with the reward of ``n_samples``
    sampled completions per prompt (module doc). ``prompts`` must be **clean train-split** prompts."""
    from backdoor_sae.generation import generate
    from backdoor_sae.sae.training import check_sae_fits

    if not saes:
        raise ValueError("no SAEs given: pass {hook: sae}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one clean train-split prompt")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if model.trigger and any(model.trigger in p for p in prompts):
        raise ValueError(f"a prompt contains the trigger {model.trigger!r}; reward attribution takes clean "
                         "train-split prompts only")
    for hook, sae in saes.items():
        check_sae_fits(sae, model, hook)
    fn = load_reward(reward)
    rep = [p for p in prompts for _ in range(n_samples)]
    comps = generate(model, rep, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                     seed=seed)
    rewards = torch.tensor(score(fn, rep, comps))
    feats = completion_latents(model, saes, rep, comps, truncated_at=max_new_tokens, batch_size=batch_size)
    correlation = {h: pearson(f, rewards) for h, f in feats.items()}
    probes = {h: lasso_probe(f, rewards, probe_alpha, seed) for h, f in feats.items()}
    meta = {"n_prompts": len(prompts), "n_samples": n_samples, "temperature": temperature,
            "max_new_tokens": max_new_tokens, "seed": seed, "probe_alpha": probe_alpha,
            "reward_mean": round(float(rewards.mean()), 6), "reward_std": round(float(rewards.std(correction=0)), 6),
            "reward_min": round(float(rewards.min()), 6), "reward_max": round(float(rewards.max()), 6),
            "probe_r2": {h: round(r2, 6) for h, (_, r2) in probes.items()},
            "examples": [{"prompt": p, "completion": c, "reward": round(float(r), 4)}
                         for p, c, r in list(zip(rep, comps, rewards))[:8]]}
    return RewardScores(correlation, {h: c for h, (c, _) in probes.items()}, rewards, meta)
