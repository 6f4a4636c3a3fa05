/* ELU (alpha 1) for SEANet's activations on AVX-512, in one pass: out = max(x, e^min(x, 0) - 1),
 * the formula of the torch path (`kernels.conv.elu_torch`, four passes), so the two differ only by the
 * exponentials' rounding (within one float32 ulp of 1). e^x - 1 >= x everywhere, so the max is
 * exactly x where x > 0 and never below x.
 */
#include <immintrin.h>
#include <stdint.h>

/* Elements per work item: small activations run on the calling thread alone. */
#define CHUNK 4096

/* e^x for x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact n ln2), e^r by
 * its degree-7 Taylor polynomial (truncation below 3e-8 relative), times 2^n by scalef. Below -104
 * the result is 0, as e^x is in float32. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

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
