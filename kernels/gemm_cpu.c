/* lockstep's fp32 CPU product for the engine's skinny products (a few rows against weights of
 * megabytes read from memory every tick): the tiles are in gemm_tiles.h, shared with the fused kernels.
 */
#include "gemm_tiles.h"

void lockstep_linear_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *w, int64_t N,
                         const float *bias, float *y, int64_t ldy, int nthreads) {
#pragma omp parallel num_threads(nthreads)
    linear_rows(x, M, K, ldx, w, N, bias, y, ldy);
}
