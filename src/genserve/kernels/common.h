/* Shared by the native kernels. */
#pragma once
#include <stdlib.h>

/* A buffer that grows to at least `bytes` (64-byte aligned) and never shrinks: kept per
 * thread in `__thread` variables by the caller, reused every call. NULL when out of memory. */
static inline void *grow_buffer(void **buf, size_t *cap, size_t bytes) {
    if (bytes > *cap) {
        free(*buf);
        *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
        *cap = *buf ? bytes : 0;
    }
    return *buf;
}

/* [0, n) split in `align`-multiples over nt threads: thread t's [*lo, *hi) (maybe empty) */
static inline void thread_band(int n, int align, int t, int nt, int *lo, int *hi) {
    const int blocks = (n + align - 1) / align, per = (blocks + nt - 1) / nt;
    const int b0 = t * per, b1 = b0 + per < blocks ? b0 + per : blocks;
    *lo = b0 * align < n ? b0 * align : n;
    *hi = b1 * align < n ? b1 * align : n;
    if (*lo > *hi) *lo = *hi;
}
