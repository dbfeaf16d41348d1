"""BACKDOOR_SAE_NUMERICS=portable: torch's AVX2 kernels, MKL's strict reproducibility and two threads, set before
torch loads (docs/reproducibility.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TRAIN = """
import hashlib, os, sys
import backdoor_sae  # first: it sets the numeric environment before torch loads
import torch
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
# the organism's kinds of op: bias-free linears (MKL), SiLU, row-wise RMS norms, a mean loss
w1, w2 = torch.nn.Linear(96, 384, bias=False), torch.nn.Linear(384, 96, bias=False)
opt = torch.optim.AdamW([*w1.parameters(), *w2.parameters()], lr=1e-2)
x = torch.randn(512, 96)
for _ in range(5):
    h = torch.nn.functional.silu(w1(x))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    loss = (w2(h) - x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in (w1.weight, w2.weight))).hexdigest()[:16]
print(torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR"), torch.get_num_threads(), h)
"""


def _run(threads: int | None, numerics: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")}
    env.pop("BACKDOOR_SAE_NUMERICS", None)
    if numerics:
        env["BACKDOOR_SAE_NUMERICS"] = numerics
    out = subprocess.run([sys.executable, "-c", TRAIN, *([str(threads)] if threads else [])], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def _has_avx2() -> bool:
    try:
        return " avx2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx2() or os.cpu_count() < 2, reason="needs an x86 CPU with AVX2 and two cores")
def test_portable_numerics():
    default = _run(None, "portable")
    assert default[:3] == ["AVX2", "AVX2,STRICT", "2"]  # AVX2 kernels, MKL's strict CBWR, two threads
    one, two = _run(1, "portable"), _run(2, "portable")
    assert one[3] == two[3] == default[3]  # matrix products and row-wise ops: the same bits on one thread and two


def test_native_numerics_are_untouched():
    capability, cbwr, _, _ = _run(2, None)
    assert cbwr == "None" and capability in ("DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256")
