"""Where a run was made: date, machine and software, recorded in ``results.json`` (``environment``) because the
same seed gives different numbers on different CPUs (docs/reproducibility.md)."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "transformers", "transformer-lens", "sae-lens", "trl", "peft")
NUMERIC_ENV = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Date (UTC), machine (CPU model, cores, torch's threads and kernel dispatch, GPU if any), software versions
    and the numeric environment variables that change results."""
    import torch

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, " \
              f"{torch.backends.cpu.get_cpu_capability()} kernels" + (f", {gpu}" if gpu else ", no GPU")
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "machine": machine,
            "software": ", ".join(f"{p} {version(p)}" for p in PACKAGES) + f", Python {platform.python_version()}",
            "numeric_env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ}}
