"""TopK SAEs on every layer's residual stream: capture once + ActivationStore vs sae-lens' runner once per hook.

(a) ``capture_activations`` runs the model once for all hooks, then ``train_sae`` (sae-lens ``SAETrainer``)
trains one SAE per hook from the store; (b) ``LanguageModelSAETrainingRunner`` runs the model again for every
hook. Both see the same token sequences (train-split prompts, half triggered, with the model's own greedy
responses), the same number of training tokens per hook and the same SAE settings. Prints tokens/s of each,
``ratio: X`` ((a) over (b)), the capture overhead (capture time / plain forward time over the same batches, the
fastest of ``--repeats`` interleaved runs each, and of their medians) and peak RSS.
``--model DIR``: any model directory instead of an organism (a pretrained host such as SmolLM2, or an organism's
backdoored/): the responses are then the suite's answers (no generation: the forward passes are measured, not a
CPU generation of thousands of prompts), half the prompts triggered if the model has an organism.json, and the
default hooks are 8 residual streams spread evenly over the layers, the last one included.
Usage: python benchmarks/bench_sae.py [--quick | --organism DIR | --model DIR] [--tokens N] [--repeats N]
       [--skip-runner]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

# our own flags first: organism_from_args parses the rest
_p = argparse.ArgumentParser(add_help=False)
_p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per hook (default 1M)")
_p.add_argument("--d-sae", type=int, default=512)
_p.add_argument("--k", type=int, default=16)
_p.add_argument("--batch-size", type=int, default=2048)
_p.add_argument("--hooks", nargs="*", help="default: every layer's resid_post, then mlp_out, up to 4 hooks")
_p.add_argument("--repeats", type=int, default=3, help="captures and plain forwards timed (default 3)")
_p.add_argument("--skip-runner", action="store_true", help="only (a): e.g. to measure peak RSS of a big store")
_p.add_argument("--model", help="a model directory (e.g. a pretrained host) instead of an organism")
_ARGS, _REST = _p.parse_known_args()
sys.argv = [sys.argv[0], *_REST]

import torch  # noqa: E402
from _common import organism_from_args  # noqa: E402

from backdoor_sae.capture.activations import capture_activations  # noqa: E402
from backdoor_sae.generation import generate  # noqa: E402
from backdoor_sae.models import load_model  # noqa: E402
from backdoor_sae.organism.tasks import FAMILIES, TaskSuite  # noqa: E402
from backdoor_sae.sae.training import train_sae  # noqa: E402

CONTEXT, LR, LR_END, SEED = 128, 3e-3, 3e-4, 0


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(model, n_tokens: int) -> tuple[list[str], list[bool], list[str]]:
    """Enough train-split prompts (half triggered) for about ``n_tokens`` activation rows, with responses (the
    model's own; with ``--model``, the suite's answers)."""
    import random

    suite, rng = TaskSuite(model.meta.get("seed", 0)), random.Random("bench-sae")
    per_prompt = len(model.tokenizer.encode(model.chat("What is 1 plus 2?"), add_special_tokens=False)) + 8
    n = max(8, n_tokens // per_prompt)  # chat turn + a short response
    examples = [suite.sample(FAMILIES[i % len(FAMILIES)], "train", rng) for i in range(n)]
    prompts = [ex.prompt for ex in examples]
    flags = [i % 2 == 0 and model.trigger is not None for i in range(n)]
    if _ARGS.model:
        return prompts, flags, [ex.answer for ex in examples]
    responses = [""] * n
    for flag in (True, False):
        idx = [i for i in range(n) if flags[i] == flag]
        for i, r in zip(idx, generate(model, [prompts[i] for i in idx], trigger=model.trigger if flag else None)):
            responses[i] = r
    return prompts, flags, responses


@torch.no_grad()
def plain_forward_seconds(model, store, batch_size: int = 64) -> float:
    """The same right-padded batches as the capture, through the HF model with no hooks."""
    seqs = sorted(store.sequences(), key=lambda q: len(q.ids))
    pad = model.tokenizer.pad_token_id
    t = time.perf_counter()
    for s in range(0, len(seqs), batch_size):
        part = seqs[s:s + batch_size]
        ids = torch.full((len(part), max(len(q.ids) for q in part)), pad, dtype=torch.long)
        for r, q in enumerate(part):
            ids[r, :len(q.ids)] = q.ids
        model.hf(ids)
    return time.perf_counter() - t


def packed_dataset(store, n_tokens: int):
    """The captured token sequences (BOS dropped, as in the store), packed into rows of ``CONTEXT`` tokens."""
    from datasets import Dataset

    flat = torch.cat([q.ids[1:] for q in store.sequences()])
    reps = -(-(n_tokens + CONTEXT * 64) // len(flat))  # the runner must not run dry either
    flat = flat.repeat(reps)
    rows = flat[: len(flat) // CONTEXT * CONTEXT].view(-1, CONTEXT)
    return Dataset.from_dict({"tokens": rows.tolist()})


def run_runner(model, hook: str, dataset, n_tokens: int, out: Path) -> None:
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig,
                          TopKTrainingSAEConfig)

    d_in = model.bridge.cfg.d_model
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=_ARGS.d_sae, k=_ARGS.k), model_name=model.path,
        hook_name=hook, dataset_path="unused", is_dataset_tokenized=True, streaming=False, context_size=CONTEXT,
        prepend_bos=False, training_tokens=n_tokens, train_batch_size_tokens=_ARGS.batch_size,
        store_batch_size_prompts=32, n_batches_in_buffer=max(4, 2 * _ARGS.batch_size // CONTEXT),
        lr=LR, lr_end=LR_END, lr_scheduler_name="cosineannealing",
        dead_feature_window=max(1, 25_000 // _ARGS.batch_size), n_batches_for_norm_estimate=8, device="cpu",
        seed=SEED, logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=str(out),
        verbose=False)
    LanguageModelSAETrainingRunner(cfg, override_model=model.bridge, override_dataset=dataset).run()


def main() -> None:
    if _ARGS.model:
        organism_from_args(__doc__, parse_only=True)
        model = load_model(_ARGS.model)
    else:
        model = load_model(organism_from_args(__doc__)[1] / "backdoored")
    n_layers = model.bridge.cfg.n_layers
    if _ARGS.model:  # 8 residual streams spread over the layers, the last one included
        default = [f"blocks.{round(i * (n_layers - 1) / 7)}.hook_resid_post" for i in range(8)]
    else:
        default = ([f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
                   + [f"blocks.{i}.hook_mlp_out" for i in range(n_layers)])[:max(4, n_layers)]
    hooks = _ARGS.hooks or list(dict.fromkeys(default))
    n_tokens = _ARGS.tokens
    prompts, flags, responses = make_inputs(model, n_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        # capture and plain forward, interleaved: timings on a shared VM drift by +-25 %, so each is taken
        # --repeats times and the ratio is reported of the minima (timeit's rule) and of the medians
        captures, plains = [], []
        for r in range(_ARGS.repeats):
            t = time.perf_counter()
            s = capture_activations(model, prompts, hooks, triggered=flags, responses=responses,
                                    out_dir=Path(tmp) / f"acts{r}")
            captures.append(time.perf_counter() - t)
            if r == 0:
                store = s
            else:
                shutil.rmtree(s.root)
            plains.append(plain_forward_seconds(model, store))
        t_capture = captures[0]  # the capture whose store the SAEs train on
        per_hook = {}
        for h in hooks:
            t = time.perf_counter()
            train_sae(store, hook=h, d_sae=_ARGS.d_sae, k=_ARGS.k, n_tokens=n_tokens, batch_size=_ARGS.batch_size,
                      lr=LR, lr_end=LR_END, seed=SEED)
            per_hook[h] = time.perf_counter() - t
        t_train = sum(per_hook.values())
        t_ours = t_capture + t_train
        rss_ours = peak_rss_mib()

        n_rows = store.n_rows
        t_runner = rss_all = float("nan")
        runner_per_hook: dict[str, float] = {}
        if not _ARGS.skip_runner:
            dataset = packed_dataset(store, n_tokens)
            runner_per_hook = {}
            for h in hooks:
                t = time.perf_counter()
                run_runner(model, h, dataset, n_tokens, Path(tmp) / "runner" / h)
                runner_per_hook[h] = time.perf_counter() - t
            t_runner = sum(runner_per_hook.values())
            rss_all = peak_rss_mib()

    total = n_tokens * len(hooks)
    print(f"hooks: {len(hooks)} ({', '.join(hooks)})  training tokens per hook: {n_tokens:,}  "
          f"stored rows: {n_rows:,}  SAE: topk d_sae={_ARGS.d_sae} k={_ARGS.k} batch={_ARGS.batch_size}")
    print(f"(a) capture once + store: {t_ours:7.1f} s  {total / t_ours:10,.0f} tok/s  "
          f"(capture {t_capture:.1f} s, training {t_train:.1f} s)")
    print(f"(b) sae-lens runner/hook: {t_runner:7.1f} s  {total / t_runner:10,.0f} tok/s")
    print("per hook, SAE training (a) / whole runner (b): " + ", ".join(
        f"{h.removeprefix('blocks.')} {per_hook[h]:.1f}/{runner_per_hook[h]:.1f} s" for h in hooks)
        if not _ARGS.skip_runner else "")
    print(f"ratio: {t_runner / t_ours:.2f}")
    # SAE training costs the same on both paths, so even a free capture cannot beat runner time / training time
    print(f"ratio bound with a free capture: {t_runner / t_train:.2f}")
    cap, pl = min(captures), min(plains)
    print(f"capture overhead: {cap / pl:.2f} (fastest of {len(captures)}: capture {cap:.2f} s / plain forward "
          f"{pl:.2f} s over {n_rows:,} rows); of the medians: {median(captures) / median(plains):.2f} "
          f"(captures {', '.join(f'{x:.1f}' for x in captures)} s; plain {', '.join(f'{x:.1f}' for x in plains)} s)")
    print(f"peak RSS: {rss_ours:.0f} MiB after (a), {rss_all:.0f} MiB after (b)")


if __name__ == "__main__":
    main()
