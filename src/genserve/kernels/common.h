/* Shared by the native kernels (each .c file is its own library). */
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
