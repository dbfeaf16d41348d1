"""Direct-I/O safetensors files: ordinary safetensors on disk, exact round trips, and every fallback path."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backdoor_sae._tensorfile import _ALIGN, aligned_empty, load_tensor, save_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 3, 4096, 5001])  # empty, smaller than a block, aligned, unaligned tail
def test_round_trip_is_exact_and_plain_safetensors(tmp_path, dtype, rows):
    t = aligned_empty(rows, 48, dtype)
    t.copy_(torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows)).to(dtype))
    path = tmp_path / "x.safetensors"
    save_tensor(t, path)
    assert torch.equal(load_tensor(path), t)
    assert torch.equal(load_file(str(path))["acts"], t)  # safetensors itself reads the file
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    if t.numel() * t.element_size() >= _ALIGN:
        assert (8 + n) % _ALIGN == 0  # the data starts on a block boundary


def test_unaligned_memory_and_foreign_files_fall_back(tmp_path):
    from safetensors.torch import save_file

    base = aligned_empty(3001, 40, torch.float32).normal_()
    t = base[1:]  # contiguous, but starts 160 bytes past a page boundary
    save_tensor(t, tmp_path / "a.safetensors")
    w = torch.randn(10, 4)[:, :2]  # not contiguous
    save_tensor(w, tmp_path / "b.safetensors", name="w")
    save_file({"acts": t.contiguous()}, str(tmp_path / "c.safetensors"))  # written by safetensors: unaligned data
    assert torch.equal(load_tensor(tmp_path / "a.safetensors"), t)
    assert torch.equal(load_tensor(tmp_path / "b.safetensors", name="w"), w)
    assert torch.equal(load_tensor(tmp_path / "c.safetensors"), t)


def test_tmpfs_falls_back(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    t = aligned_empty(2048, 64, torch.float32).normal_()
    path = shm / f"backdoor_sae_test_{id(t)}.safetensors"
    try:
        save_tensor(t, path)  # tmpfs refuses O_DIRECT: plain safetensors
        assert torch.equal(load_tensor(path), t)
    finally:
        path.unlink(missing_ok=True)
