"""Progress bars that CI can silence: ``BACKDOOR_SAE_PROGRESS=0`` (or tqdm's own ``TQDM_DISABLE=1``)."""

from __future__ import annotations

import os
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_off() -> bool:
    """Whether progress output is silenced (also for the bars of HF ``Trainer``s and ``datasets`` maps)."""
    return os.environ.get("BACKDOOR_SAE_PROGRESS", "1") == "0" or os.environ.get("TQDM_DISABLE", "") == "1"


def progress(iterable: Iterable[Any], **kwargs: Any) -> tqdm:
    return tqdm(iterable, disable=progress_off(), dynamic_ncols=True, leave=False, **kwargs)
