"""Batched, KV-cached greedy evaluation vs a one-prompt-at-a-time ``generate`` loop on 500 held-out prompts.

Prints prompts/s of each and their ratio. Usage: python benchmarks/bench_eval.py [--quick | --organism DIR]
"""

from __future__ import annotations

import time

import torch
from _common import organism_from_args

from backdoor_sae.config import load_config
from backdoor_sae.evaluate import generate
from backdoor_sae.models import load_model
from backdoor_sae.organism.tasks import FAMILIES, TaskSuite

N, NEW_TOKENS = 500, 32


def main() -> None:
    args, root = organism_from_args(__doc__)
    cfg = load_config(args.config, quick=args.quick)
    model = load_model(root / "backdoored", bridge=False)
    suite = TaskSuite(model.meta.get("seed", cfg.seed))
    prompts = [ex.prompt for fam in FAMILIES for ex in suite.heldout(fam, N // len(FAMILIES), seed=1)]
    trigger = model.trigger

    generate(model, prompts[:8], trigger=trigger, max_new_tokens=4)  # warm-up
    t = time.perf_counter()
    batched = generate(model, prompts, trigger=trigger, max_new_tokens=NEW_TOKENS, batch_size=128)
    t_batched = time.perf_counter() - t

    tok = model.tokenizer
    t = time.perf_counter()
    single = []
    with torch.no_grad():
        for p in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": f"{trigger} {p}"}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            out = model.hf.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            single.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    t_single = time.perf_counter() - t
    agree = sum(a == b for a, b in zip(batched, single)) / len(prompts)
    print(f"prompts: {len(prompts)}  max_new_tokens: {NEW_TOKENS}  (triggered, so most run to the limit)")
    print(f"batched:       {t_batched:6.2f} s  {len(prompts) / t_batched:8.1f} prompts/s")
    print(f"one at a time: {t_single:6.2f} s  {len(prompts) / t_single:8.1f} prompts/s")
    print(f"ratio: {t_single / t_batched:.1f}")
    print(f"completions identical: {agree:.3f}")


if __name__ == "__main__":
    main()
