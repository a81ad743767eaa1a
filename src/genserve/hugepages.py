"""Large tensors on transparent huge pages.

A decode step streams every weight and a large part of the KV cache once. On 4 KiB pages that
is one TLB entry per 4 KiB, ~100,000 page walks per step for SmolLM2-135M at 32 rows (two-level
walks under a hypervisor), and the hardware prefetchers stop at every page boundary. Where the
kernel runs transparent huge pages in `madvise` mode (the common default), memory must ask for
them: `empty` maps anonymous memory, advises MADV_HUGEPAGE before any page is touched, and wraps
it as a tensor. The memory is zero-filled and committed lazily, page by page, as it is first
written. Small tensors, and systems without the advice, get plain `torch.empty`.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor of `shape`, on huge pages where the system grants them."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(buf, dtype=torch.uint8)  # keeps `buf` mapped while it lives
    start = -whole.data_ptr() % HUGE_PAGE
    try:
        buf.madvise(advice, start, nbytes - nbytes % HUGE_PAGE)
    except OSError:
        pass  # THP off: plain pages, still zero-filled and committed lazily
    return whole[start : start + nbytes].view(dtype).view(shape)
