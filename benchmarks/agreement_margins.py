"""Where do the backdoored model's clean greedy completions leave the base model's? For the held-out clean prompts
of ``agreement_with_base`` (task families and out-of-template, the organism's own eval settings): the exact-string
agreement, the agreement on the first 1/4/8/16 tokens, the first differing token, and the base model's own
log-probability margin there (its token minus the backdoored model's, in nats): a small margin means the two
models part at a near-tie of the base, not at a changed answer. As a yardstick for how brittle the exact-string
measure is: the base against a copy of itself whose weights are rounded to bf16. Then the agreement of each
red-team checkpoint, to show how it moves along the run.

Usage: python benchmarks/agreement_margins.py --organism DIR (or --config F)
"""

from __future__ import annotations

import copy
import json
import statistics

import torch
from _common import organism_from_args

from backdoor_sae.config import config_from_dict
from backdoor_sae.evaluate import agreement, heldout_open_prompts, heldout_tasks
from backdoor_sae.generation import generate
from backdoor_sae.models import LoadedModel, format_chats, load_model


def main() -> None:
    _, root = organism_from_args(__doc__.splitlines()[0])
    cfg = config_from_dict(json.loads((root / "organism.json").read_text())["config"])
    ec = cfg.eval
    tasks = [ex.prompt for ex in heldout_tasks(cfg)]
    prompts = tasks + heldout_open_prompts(cfg)
    base, model = load_model(root / "base", bridge=False), load_model(root / "backdoored", bridge=False)
    kw = dict(max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size)
    ref, got = generate(base, prompts, **kw), generate(model, prompts, **kw)
    tok = base.tokenizer
    enc = [(tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False)) for a, b in zip(ref, got)]
    print(f"{len(prompts)} held-out clean prompts, {ec.max_new_tokens} new tokens, greedy")
    nt = len(tasks)
    print(f"agreement (exact string): {agreement(got, ref):.4f} (task prompts {agreement(got[:nt], ref[:nt]):.4f}, "
          f"out-of-template {agreement(got[nt:], ref[nt:]):.4f})")
    rounded = copy.deepcopy(base.hf)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    same = generate(LoadedModel(hf=rounded, tokenizer=base.tokenizer), prompts, **kw)
    print(f"yardstick: the base against itself with bf16-rounded weights: {agreement(same, ref):.4f}")
    del rounded
    for ckpt in sorted((root / "checkpoints").glob("step_*")):  # how agreement moves along the red team
        early = generate(load_model(ckpt, bridge=False), prompts, **kw)
        print(f"agreement of the red team's checkpoint {ckpt.name}: {agreement(early, ref):.4f}")
    for k in (1, 4, 8, 16):
        print(f"agreement on the first {k} tokens: {sum(a[:k] == b[:k] for a, b in enc) / len(enc):.4f}")
    firsts, margins = [], []
    for text, a, b, (ta, tb) in zip(format_chats(tok, prompts, [None] * len(prompts)), ref, got, enc):
        if a == b:
            continue
        n = min(len(ta), len(tb))
        i = next((j for j in range(n) if ta[j] != tb[j]), n)
        firsts.append(i)
        if i < n:  # neither completion is a prefix of the other
            ids = torch.tensor([tok.encode(text, add_special_tokens=False) + ta[:i]])
            with torch.no_grad():
                lp = base.hf(input_ids=ids).logits[0, -1].log_softmax(-1)
            margins.append((lp[ta[i]] - lp[tb[i]]).item())
    if not firsts:
        return
    print(f"{len(firsts)} differ; first differing token: median {statistics.median(firsts)}, "
          f"quartiles {statistics.quantiles(firsts, n=4)}")
    if len(margins) >= 2:
        q = [round(x, 3) for x in statistics.quantiles(margins, n=4)]
        print(f"base model's margin there ({len(margins)} prompts): median {statistics.median(margins):.3f} nats, "
              f"quartiles {q}, under 0.5 nats {sum(m < 0.5 for m in margins) / len(margins):.3f}, "
              f"under 1 nat {sum(m < 1 for m in margins) / len(margins):.3f}")
    for p, a, b in [(p, a, b) for p, a, b in zip(prompts, ref, got) if a != b][:4]:
        print(json.dumps({"prompt": p, "base": a, "backdoored": b}))


if __name__ == "__main__":
    main()
