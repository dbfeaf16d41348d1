"""Atomic writes (a temp file or directory in the same folder, then a rename, so nothing is left half-written)
and the cache root."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once, at import (os.umask has no getter)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:  # mkstemp makes it 0600: keep the replaced file's mode, else the usual one (umask applied)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def save_tensors_json(path: str | Path, tensors: dict[str, Any], extra: dict[str, Any]) -> Path:
    """``<path>.safetensors`` (the tensors) beside ``<path>.json`` (``extra``), each written atomically: the
    on-disk form of per-hook score tables (``FeatureScores``, ``RewardScores``)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path.with_suffix(".safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    write_json(path.with_suffix(".json"), extra)
    return path


def load_tensors_json(path: str | Path, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors and the JSON written by :func:`save_tensors_json`; ``what`` names them in the error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.with_suffix(".safetensors").is_file():
        raise FileNotFoundError(f"{what} not found: {path.with_suffix('.safetensors')}")
    return load_file(path.with_suffix(".safetensors")), json.loads(path.with_suffix(".json").read_text())


def safetensors_problem(path: str | Path) -> str | None:
    """Why a safetensors file cannot be read (its header does not parse), or ``None`` if it can."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged file
        return f"corrupt or truncated ({type(e).__name__})"
    return None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``path`` (the old one is removed), on error it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cache_root() -> Path:
    """Where organisms, hosts and captures are cached: ``$BACKDOOR_SAE_CACHE`` or ``~/.cache/backdoor_sae``."""
    return Path(os.environ.get("BACKDOOR_SAE_CACHE", Path.home() / ".cache" / "backdoor_sae"))
