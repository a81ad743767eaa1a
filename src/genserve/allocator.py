"""glibc malloc settings for the buffers of a step.

PyTorch takes a CPU tensor's memory from malloc. A prefill step of a few thousand tokens
allocates and frees activations of tens of MiB per layer; glibc serves blocks that large from
fresh `mmap`s, or returns the top of its heap to the kernel once more than a few MiB there are
free, so every step faults in and zero-fills the same memory again: ~13,000 page faults per
4,096-token prefill step of SmolLM2-135M, 30-35 ms of kernel time. `retain_step_buffers()` raises
both limits: blocks up to 32 MiB come from the heap, and freed heap memory stays mapped (up to
1 GiB), so later steps reuse it without faults. The process's resident size then keeps its
largest step's buffers, as a caching allocator would.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30


def retain_step_buffers() -> bool:
    """Applies the settings (once per process is enough; repeating is harmless). False where
    malloc is not glibc's (no `mallopt`) or it refused a value."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.debug("mallopt refused the step-buffer settings")
    return ok
