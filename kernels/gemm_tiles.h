/* The tiles of y = x @ W^T + b in fp32 with AVX-512, for the CPU engine's products: a few rows
 * (sessions x positions) against weights of megabytes that stream from memory every tick.
 *
 * W is packed as [P][K][16] panels (columns 16p..16p+15, zero-padded to an even P), so a tile of 32
 * columns reads two contiguous streams, each prefetched PREFETCH k-steps ahead into L2: without
 * that, the hardware prefetcher left the loads waiting once the FMAs took longer than the
 * streaming (4-16 rows ran at 60-75% of the 1-row speed). A tile holds up to MAX_ROWS rows x 32
 * columns of accumulators in registers (24 of the 32 zmm); more rows go in further passes over the
 * same panels, which are by then in L2.
 *
 * Every output element is one FMA chain over k = 0..K-1 from zero, then + bias, whatever the tile,
 * the pass, the thread count or the number of rows: a row's result does not depend on its batch.
 *
 * `linear_rows` is an orphaned `omp for`: it splits its work over the threads of the parallel region
 * it is called in (gemm_cpu.c's own, or a fused kernel's), with the same arithmetic either way.
 */
#ifndef LOCKSTEP_GEMM_TILES_H
#define LOCKSTEP_GEMM_TILES_H
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define PANEL 16
#define MAX_ROWS 12
#define PREFETCH 96

#define TILE(MR)                                                                                        \
    static void tile_##MR(const float *x, int64_t ldx, const float *w, int64_t K, const float *bias,    \
                          float *y, int64_t ldy, int64_t ncols) {                                      \
        const float *v = w + K * PANEL;                                                                 \
        __m512 a0[MR], a1[MR];                                                                          \
        for (int m = 0; m < MR; m++) {                                                                  \
            a0[m] = _mm512_setzero_ps();                                                                \
            a1[m] = _mm512_setzero_ps();                                                                \
        }                                                                                               \
        for (int64_t k = 0; k < K; k++) {                                                               \
            _mm_prefetch((const char *)(w + (k + PREFETCH) * PANEL), _MM_HINT_T1);                      \
            _mm_prefetch((const char *)(v + (k + PREFETCH) * PANEL), _MM_HINT_T1);                      \
            __m512 w0 = _mm512_loadu_ps(w + k * PANEL), w1 = _mm512_loadu_ps(v + k * PANEL);            \
            for (int m = 0; m < MR; m++) {                                                              \
                __m512 xb = _mm512_set1_ps(x[m * ldx + k]);                                             \
                a0[m] = _mm512_fmadd_ps(xb, w0, a0[m]);                                                 \
                a1[m] = _mm512_fmadd_ps(xb, w1, a1[m]);                                                 \
            }                                                                                           \
        }                                                                                               \
        __mmask16 k0 = ncols >= 16 ? 0xFFFF : (__mmask16)((1u << ncols) - 1);                           \
        __mmask16 k1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : (__mmask16)((1u << (ncols - 16)) - 1); \
        __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias) : _mm512_setzero_ps();                       \
        __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + 16) : _mm512_setzero_ps();                  \
        for (int m = 0; m < MR; m++) {                                                                  \
            _mm512_mask_storeu_ps(y + m * ldy, k0, _mm512_add_ps(a0[m], b0));                           \
            _mm512_mask_storeu_ps(y + m * ldy + 16, k1, _mm512_add_ps(a1[m], b1));                      \
        }                                                                                               \
    }

TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, const float *, float *, int64_t,
                        int64_t);
static const tile_fn TILES[MAX_ROWS + 1] = {0,      tile_1, tile_2, tile_3,  tile_4,  tile_5, tile_6,
                                            tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

/* Inside a parallel region: x: M rows of K (row stride ldx), w: the packed panels of N columns, bias: N or NULL, y: M rows of
 * N (row stride ldy). Work items are (pair of panels, group of rows); rows are split into groups
 * only when the pairs alone would leave threads idle and there are rows enough to share. */
static inline void linear_rows(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, int64_t N,
                               const float *bias, float *y, int64_t ldy) {
    int nthreads = omp_get_num_threads();
    int64_t pairs = (N + 2 * PANEL - 1) / (2 * PANEL);
    int64_t blocks = (M + MAX_ROWS - 1) / MAX_ROWS;
    int64_t groups = (2 * nthreads + pairs - 1) / pairs;
    if (groups > blocks) groups = blocks;
    if (groups < 1) groups = 1;
    int64_t group_rows = (M + groups - 1) / groups;
#pragma omp for schedule(static) collapse(2)
    for (int64_t q = 0; q < pairs; q++) {
        for (int64_t g = 0; g < groups; g++) {
            int64_t c0 = 2 * PANEL * q, ncols = N - c0 < 2 * PANEL ? N - c0 : 2 * PANEL;
            int64_t r0 = g * group_rows, r1 = r0 + group_rows < M ? r0 + group_rows : M;
            if (r0 >= r1) continue;
            /* Balanced passes: 13 rows go as 7 + 6, not 12 + 1. */
            int64_t passes = (r1 - r0 + MAX_ROWS - 1) / MAX_ROWS;
            int64_t rows = (r1 - r0 + passes - 1) / passes;
            for (int64_t m0 = r0; m0 < r1; m0 += rows) {
                int64_t mr = r1 - m0 < rows ? r1 - m0 : rows;
                TILES[mr](x + m0 * ldx, ldx, w + 2 * q * K * PANEL, K, bias ? bias + c0 : 0, y + m0 * ldy + c0,
                          ldy, ncols);
            }
        }
    }
}

#endif
