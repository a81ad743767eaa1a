"""Tensors on transparent huge pages (genserve/hugepages.py): zero-filled, aligned, and the
background prefault never changes what the engine writes meanwhile."""

from __future__ import annotations

import gc
import mmap

import torch

from genserve import hugepages


def test_small_tensors_are_plain_zeros():
    t = hugepages.empty((16, 16), torch.bfloat16)
    assert t.shape == (16, 16) and t.dtype == torch.bfloat16 and not t.any()


def test_large_tensor_is_zeroed_and_aligned_to_huge_pages():
    t = hugepages.empty((3, 1 << 20), torch.float32)  # 12 MiB
    assert t.shape == (3, 1 << 20) and t.is_contiguous() and not t.any()
    if hasattr(mmap, "MADV_HUGEPAGE"):  # else plain torch.zeros
        assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t[2, -1] = 5.0  # the last element is writable memory
    assert t.sum().item() == 5.0


def test_prefault_keeps_concurrent_writes_and_outlives_dropped_tensors():
    kept = hugepages.empty((64 << 20,), torch.uint8, prefault=True)
    dropped = hugepages.empty((64 << 20,), torch.uint8, prefault=True)
    # written while the background thread commits the same pages
    pattern = torch.arange(1 << 20, dtype=torch.int64).to(torch.uint8)
    for i in range(0, 64, 8):
        kept[i << 20 : (i + 1) << 20] = pattern
    del dropped
    gc.collect()
    hugepages.wait_prefaulted()  # returns although one tensor went away mid-way
    for i in range(64):
        chunk = kept[i << 20 : (i + 1) << 20]
        assert torch.equal(chunk, pattern) if i % 8 == 0 else not chunk.any()
