"""Large tensors on transparent huge pages.

A decode step streams every weight and a large part of the KV cache once. On 4 KiB pages that
is one TLB entry per 4 KiB, ~100,000 page walks per step for SmolLM2-135M at 32 rows (two-level
walks under a hypervisor), and the hardware prefetchers stop at every page boundary. Where the
kernel runs transparent huge pages in `madvise` mode (the common default), memory must ask for
them: `empty` maps anonymous memory, advises MADV_HUGEPAGE before any page is touched, and wraps
it as a tensor. Small tensors, and systems without the advice, get plain `torch.zeros`.

The memory is zero-filled and committed as it is first written. A first write costs a page
fault that zeroes 2 MiB (about 2 ms on a VM that must compact memory for it), which a serving
engine should not pay in the middle of a step: `prefault=True` commits the whole tensor ahead of
use, from a background thread (MADV_POPULATE_WRITE, Linux 5.14+; it never changes data, so the
engine can use the memory meanwhile), and `wait_prefaulted()` waits for that to finish.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import queue
import threading
import weakref

import torch

HUGE_PAGE = 2 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PREFAULT_CHUNK = 64 << 20  # bytes per madvise call: the worker lets go of the mapping between

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int

_pending: queue.Queue = queue.Queue()
_worker_lock = threading.Lock()
_worker: threading.Thread | None = None


def empty(shape: tuple[int, ...], dtype: torch.dtype, *, prefault: bool = False) -> torch.Tensor:
    """A zero-filled tensor of `shape`, on huge pages where the system grants them."""
    nbytes = math.prod(shape) * dtype.itemsize
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
    if prefault:
        _prefault_later(buf, whole.data_ptr() + start, nbytes)
    return whole[start : start + nbytes].view(dtype).view(shape)


def wait_prefaulted() -> None:
    """Returns once every tensor asked for with `prefault=True` is committed (or gone)."""
    _pending.join()


def _prefault_later(buf: mmap.mmap, address: int, length: int) -> None:
    global _worker
    _pending.put((weakref.ref(buf), address, length))
    with _worker_lock:
        if _worker is None:
            _worker = threading.Thread(target=_prefault, name="genserve-prefault", daemon=True)
            _worker.start()


def _prefault() -> None:
    """Commits the queued mappings a chunk of each in turn, so that the low offsets of every
    tensor (the KV blocks an engine hands out first, in every layer) come first."""
    active: list[list] = []  # [mapping ref, next address, end address]
    while True:
        if not active:
            active.append(_job(_pending.get()))
        while True:
            try:
                active.append(_job(_pending.get_nowait()))
            except queue.Empty:
                break
        for job in list(active):
            ref, at, end = job
            buf = ref()  # held through the call: the mapping stays
            # through ctypes, which lets go of the GIL (mmap.madvise keeps it, ~2 ms a page)
            ok = buf is not None and not _libc.madvise(
                at, min(PREFAULT_CHUNK, end - at), MADV_POPULATE_WRITE
            )  # fails on kernels without MADV_POPULATE_WRITE: pages then fault in on first use
            del buf
            job[1] = at + PREFAULT_CHUNK
            done = not ok or job[1] >= end
            if done:
                active.remove(job)
                _pending.task_done()


def _job(item: tuple) -> list:
    ref, address, length = item
    return [ref, address, address + length]
