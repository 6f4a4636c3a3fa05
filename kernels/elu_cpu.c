/* ELU (alpha 1) for SEANet's activations on AVX-512, in one pass: out = max(x, e^min(x, 0) - 1),
 * the formula of the torch path (`kernels.conv.elu_torch`, four passes), so the two differ only by the
 * exponentials' rounding (within one float32 ulp of 1). e^x - 1 >= x everywhere, so the max is
 * exactly x where x > 0 and never below x.
 */
#include <stdint.h>

#include "avx512_math.h"

/* Elements per work item: small activations run on the calling thread alone. */
#define CHUNK 4096

/* `rows` runs of `n` contiguous floats, x's at stride ldx and out's at ldo (out may be x). */
void lockstep_elu_f32(const float *x, int64_t ldx, float *out, int64_t ldo, int64_t rows, int64_t n,
                      int nthreads) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2) if (rows * n > CHUNK)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < chunks; c++) {
            const float *xr = x + r * ldx;
            float *o = out + r * ldo;
            int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
            for (int64_t i = c * CHUNK; i < end; i += 16) {
                __mmask16 m = end - i >= 16 ? 0xFFFF : (__mmask16)((1u << (end - i)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(m, xr + i);
                __m512 e = _mm512_sub_ps(exp_nonpositive(_mm512_min_ps(v, _mm512_setzero_ps())), _mm512_set1_ps(1.0f));
                _mm512_mask_storeu_ps(o + i, m, _mm512_max_ps(e, v));
            }
        }
    }
}
