"""Shared set-up for the benchmark scripts: offline, quiet, 2 threads, and the organism to measure."""

from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from backdoor_sae.cli import _quiet  # noqa: E402
from backdoor_sae.config import load_config  # noqa: E402
from backdoor_sae.organism.train import get_organism  # noqa: E402


def organism_from_args(description: str, parse_only: bool = False) -> tuple[argparse.Namespace, Path | None]:
    """``--organism DIR`` (a made organism) or ``--config/--quick`` (train or reuse the cached one);
    ``parse_only``: the flags and the set-up, no organism."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--organism", help="organism directory (holding base/ and backdoored/)")
    p.add_argument("--config")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    _quiet()
    torch.set_num_threads(2)
    if parse_only:
        return args, None
    if args.organism:
        return args, Path(args.organism)
    root, _, _ = get_organism(load_config(args.config, quick=args.quick))
    return args, root
