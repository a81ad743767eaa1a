/* AMX tile set-up shared by the kernels built with -mamx-tile -mamx-bf16. */
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Configures this thread's eight tiles as 16 rows of 64 bytes: 16 x 32 bf16s, or 16 x 16 fp32. */
static inline void amx_tiles_16x64(void) {
    TileConfig cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    /* GCC may drop the stores above at -O2, as if LDTILECFG read only the palette byte: a
     * compiler barrier keeps them */
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}
