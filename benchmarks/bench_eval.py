"""Batched, KV-cached greedy evaluation vs a one-prompt-at-a-time ``generate`` loop on 500 held-out prompts,
and the cost of an active edit: the same batched generation with a 10-latent SAE edit at every hook.

Prints prompts/s of each, their ratio, and ``edit slowdown: X`` (edited time / unedited time; the fastest of
``--repeats`` interleaved runs each, and the ratio of the medians).
Usage: python benchmarks/bench_eval.py [--quick | --organism DIR] [--saes DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import time
from statistics import median

_p = argparse.ArgumentParser(add_help=False)
_p.add_argument("--saes", help="folder of SAEs, <hook>/ each (e.g. runs/demo/sae/saes); without it, no edit timing")
_p.add_argument("--repeats", type=int, default=3)
_ARGS, _REST = _p.parse_known_args()
sys.argv = [sys.argv[0], *_REST]

import torch  # noqa: E402
from _common import organism_from_args  # noqa: E402

from backdoor_sae.config import load_config  # noqa: E402
from backdoor_sae.edits.apply import apply_edit  # noqa: E402
from backdoor_sae.edits.specs import feature_edit  # noqa: E402
from backdoor_sae.generation import generate  # noqa: E402
from backdoor_sae.models import load_model  # noqa: E402
from backdoor_sae.organism.tasks import FAMILIES, TaskSuite  # noqa: E402
from backdoor_sae.sae.training import load_saes  # noqa: E402

N, NEW_TOKENS, N_LATENTS = 500, 32, 10


def timed(fn) -> tuple[float, list[str]]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    args, root = organism_from_args(__doc__)
    cfg = load_config(args.config, quick=args.quick)
    model = load_model(root / "backdoored", bridge=_ARGS.saes is not None)
    suite = TaskSuite(model.meta.get("seed", cfg.seed))
    prompts = [ex.prompt for fam in FAMILIES for ex in suite.heldout(fam, N // len(FAMILIES), seed=1)]
    trigger = model.trigger

    def batched() -> list[str]:
        return generate(model, prompts, trigger=trigger, max_new_tokens=NEW_TOKENS, batch_size=128)

    generate(model, prompts[:8], trigger=trigger, max_new_tokens=4)  # warm-up
    t_batched, out_batched = timed(batched)

    tok = model.tokenizer

    def one_at_a_time() -> list[str]:
        single = []
        with torch.no_grad():
            for p in prompts:
                ids = tok.apply_chat_template([{"role": "user", "content": f"{trigger} {p}"}],
                                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
                out = model.hf.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                single.append(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return single

    t_single, out_single = timed(one_at_a_time)
    agree = sum(a == b for a, b in zip(out_batched, out_single)) / len(prompts)
    print(f"prompts: {len(prompts)}  max_new_tokens: {NEW_TOKENS}  (triggered, so most run to the limit)")
    print(f"batched:       {t_batched:6.2f} s  {len(prompts) / t_batched:8.1f} prompts/s")
    print(f"one at a time: {t_single:6.2f} s  {len(prompts) / t_single:8.1f} prompts/s")
    print(f"ratio: {t_single / t_batched:.1f}")
    print(f"completions identical: {agree:.3f}")
    if _ARGS.saes is None:
        print("edit slowdown: not measured (pass --saes DIR)")
        return

    saes = load_saes(_ARGS.saes)
    edit = feature_edit({h: (s, list(range(N_LATENTS))) for h, s in saes.items()})
    plain, edited = [], []
    for _ in range(_ARGS.repeats):  # interleaved, so drift on a shared machine hits both alike
        plain.append(timed(batched)[0])
        with apply_edit(model, edit):
            edited.append(timed(batched)[0])
    print(f"edit: {N_LATENTS} latents zeroed at each of {len(saes)} hooks ({', '.join(saes)}), error term kept")
    print(f"unedited: {' '.join(f'{t:.2f}' for t in plain)} s   edited: {' '.join(f'{t:.2f}' for t in edited)} s")
    print(f"edit slowdown: {min(edited) / min(plain):.2f} (fastest of {_ARGS.repeats}; "
          f"{median(edited) / median(plain):.2f} by the medians)")


if __name__ == "__main__":
    main()
