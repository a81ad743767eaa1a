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

#include "bf16.h"

/* The B operand of tile products whose columns are 16 rows of d bf16s (NULL: a zero column):
 * pairs of dims as dwords, [d / 32 tiles][16 pairs][16 columns]. */
static inline void pack_pair_columns(const bf16 *const cols[16], int d, uint32_t *dst) {
    for (int c = 0; c < d / 32; c++)
        for (int kp = 0; kp < 16; kp++)
            for (int n = 0; n < 16; n++) {
                uint32_t pair = 0;
                if (cols[n]) memcpy(&pair, cols[n] + 32 * c + 2 * kp, sizeof pair);
                dst[c * 256 + kp * 16 + n] = pair;
            }
}
