/* One streaming step of a whole transformer stack in fp32 on AVX-512, for the CPU engine: every
 * layer's norms, products, RoPE, KV write, attention, feed-forward and residuals in one call and
 * one OpenMP region. On CPU a Mimi transformer step of one session was ~530 ATen ops, half its
 * time; here what is left is the weights' streaming (gemm_tiles.h) and a barrier per phase.
 *
 * Semantics are `StreamingTransformer.forward`'s torch path (kernels/attention.py, paged_attention.py,
 * rope.py, norm.py): the T new keys of a row are written first, then query t (absolute position
 * p = offset + t) attends over the last `context` positions that are <= p and, with windows, less
 * than its slot's window back. Keys live in pages [pages, heads, page_size, head_dim] per layer:
 * with a page table (the LM's KV pool) position p of a slot is row p % page_size of page
 * table[slot][(p / page_size) % pages_per_slot]; without one (a ring per slot) the page is the
 * slot and holds the whole ring (page_size = context, one page a slot). Positions are visited in
 * order, page run by page run, so the sums are the same whatever the pages.
 * Every row is computed on its own, so a row's result does not depend on its batch.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "avx512_math.h"
#include "gemm_tiles.h"

enum { FF_GELU = 0, FF_SILU_GATE = 1, FF_GELU_GATE = 2 };

typedef struct {
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* biases NULL for RMSNorm */
    const float *in_proj, *out_proj, *ff_in, *ff_out;   /* packed panels (gemm_tiles.h) */
    const float *scale1, *scale2;                       /* layer scales, or NULL */
} StackLayer;

typedef struct {
    int64_t dim, heads, head_dim, layers, context;
    int64_t page_size, pages_per_slot, pool_pages;           /* pool_pages: rows of the caches per layer */
    int64_t hidden, ff_kind, rms, sessions;                  /* sessions: rows of offsets (and tables) */
    float eps, rope_max_period;                              /* period 0: no RoPE */
} StackShape;

/* Where a slot's keys are: its page table and window (both NULL for a ring per slot). */
typedef struct {
    const int32_t *table, *window;
} StackPages;

/* Head sizes up to MAX_CHUNKS x 16 (Moshi's are 64 and 128). */
#define MAX_CHUNKS 8

static inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static int64_t ff_in_width(const StackShape *s) { return s->ff_kind == FF_GELU ? s->hidden : 2 * s->hidden; }

/* Floats of scratch a call over `rows` rows needs. */
int64_t lockstep_stack_scratch(const StackShape *s, int64_t rows, int nthreads) {
    int64_t C = s->dim, gated = s->ff_kind == FF_GELU ? 0 : s->hidden;
    return rows * (6 * C + ff_in_width(s) + gated + s->head_dim) + (int64_t)nthreads * s->context;
}

/* y = norm(x) over C features, in the torch path's order of operations. */
static void norm_row(const StackShape *s, const float *x, const float *w, const float *b, float *y) {
    int64_t C = s->dim;
    __m512 acc = _mm512_setzero_ps();
    if (s->rms) {
        for (int64_t i = 0; i < C; i += 16) {
            __m512 v = _mm512_maskz_loadu_ps(tail_mask(C - i), x + i);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float r = 1.0f / sqrtf(hsum(acc) / (float)C + s->eps);
        for (int64_t i = 0; i < C; i += 16) {
            __mmask16 m = tail_mask(C - i);
            __m512 wr = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_set1_ps(r));
            _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), wr));
        }
        return;
    }
    for (int64_t i = 0; i < C; i += 16) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(tail_mask(C - i), x + i));
    float mean = hsum(acc) / (float)C;
    __m512 mv = _mm512_set1_ps(mean);
    acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < C; i += 16) {
        __mmask16 m = tail_mask(C - i);
        __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), mv);
        acc = _mm512_fmadd_ps(d, d, acc);
    }
    __m512 r = _mm512_set1_ps(1.0f / sqrtf(hsum(acc) / (float)C + s->eps));
    for (int64_t i = 0; i < C; i += 16) {
        __mmask16 m = tail_mask(C - i);
        __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mv), r);
        __m512 v = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, b + i));
        _mm512_mask_storeu_ps(y + i, m, v);
    }
}

/* x += scale * u (scale NULL: 1), then y = norm(x) when w is given. */
static void residual_row(const StackShape *s, float *x, const float *u, const float *scale, const float *w,
                         const float *b, float *y) {
    int64_t C = s->dim;
    for (int64_t i = 0; i < C; i += 16) {
        __mmask16 m = tail_mask(C - i);
        __m512 v = _mm512_maskz_loadu_ps(m, u + i);
        if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, scale + i));
        _mm512_mask_storeu_ps(x + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, x + i), v));
    }
    if (w) norm_row(s, x, w, b, y);
}

/* Interleaved pairs (a, b) -> (a cos - b sin, b cos + a sin), cs = (cos, sin) per pair. */
static void rope_head(float *v, const float *cs, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        float a = v[2 * i], b = v[2 * i + 1], c = cs[2 * i], sn = cs[2 * i + 1];
        v[2 * i] = a * c - b * sn;
        v[2 * i + 1] = b * c + a * sn;
    }
}

/* Scores of one query against n consecutive keys at k (rows of D), q held in registers, in NCH
 * chunks of 16 (the last masked by `tail`). */
#define SCORES(NCH)                                                                                     \
    static void scores_##NCH(const float *q, const float *k, int64_t n, int64_t D, __mmask16 tail,      \
                             float scale, float *out) {                                                 \
        __m512 qv[NCH];                                                                                 \
        for (int i = 0; i < NCH; i++) qv[i] = _mm512_maskz_loadu_ps(i + 1 < NCH ? 0xFFFF : tail, q + 16 * i); \
        for (int64_t j = 0; j < n; j++, k += D) {                                                       \
            __m512 acc = _mm512_mul_ps(qv[0], _mm512_maskz_loadu_ps(NCH > 1 ? 0xFFFF : tail, k));       \
            for (int i = 1; i < NCH; i++)                                                               \
                acc = _mm512_fmadd_ps(qv[i], _mm512_maskz_loadu_ps(i + 1 < NCH ? 0xFFFF : tail, k + 16 * i), acc); \
            out[j] = hsum(acc) * scale;                                                                 \
        }                                                                                               \
    }

/* out += sum_j w[j] v_j over n consecutive values at v, NCH accumulators in registers (out is read
 * and written once a run, exactly, so a sum over several runs is the sum over one). */
#define WEIGHTED(NCH)                                                                                   \
    static void weighted_##NCH(const float *w, const float *v, int64_t n, int64_t D, __mmask16 tail,    \
                               float *out) {                                                            \
        __m512 acc[NCH];                                                                                \
        for (int i = 0; i < NCH; i++) acc[i] = _mm512_maskz_loadu_ps(i + 1 < NCH ? 0xFFFF : tail, out + 16 * i); \
        for (int64_t j = 0; j < n; j++, v += D) {                                                       \
            __m512 wj = _mm512_set1_ps(w[j]);                                                           \
            for (int i = 0; i < NCH; i++)                                                               \
                acc[i] = _mm512_fmadd_ps(wj, _mm512_maskz_loadu_ps(i + 1 < NCH ? 0xFFFF : tail, v + 16 * i), acc[i]); \
        }                                                                                               \
        for (int i = 0; i < NCH; i++) _mm512_mask_storeu_ps(out + 16 * i, i + 1 < NCH ? 0xFFFF : tail, acc[i]); \
    }

SCORES(1) SCORES(2) SCORES(3) SCORES(4) SCORES(5) SCORES(6) SCORES(7) SCORES(8)
WEIGHTED(1) WEIGHTED(2) WEIGHTED(3) WEIGHTED(4) WEIGHTED(5) WEIGHTED(6) WEIGHTED(7) WEIGHTED(8)

typedef void (*scores_fn)(const float *, const float *, int64_t, int64_t, __mmask16, float, float *);
typedef void (*weighted_fn)(const float *, const float *, int64_t, int64_t, __mmask16, float *);
static const scores_fn SCORES_FOR[MAX_CHUNKS + 1] = {0, scores_1, scores_2, scores_3, scores_4,
                                                     scores_5, scores_6, scores_7, scores_8};
static const weighted_fn WEIGHTED_FOR[MAX_CHUNKS + 1] = {0, weighted_1, weighted_2, weighted_3, weighted_4,
                                                         weighted_5, weighted_6, weighted_7, weighted_8};

/* Offset (in floats, within a layer) of position p's row for head hd of `slot`. */
static inline int64_t kv_row(const StackShape *s, const StackPages *pg, int64_t slot, int64_t hd, int64_t p) {
    int64_t ps = s->page_size, r = p % (ps * s->pages_per_slot);
    int64_t page = pg->table ? pg->table[slot * s->pages_per_slot + r / ps] : slot;
    return ((page * s->heads + hd) * ps + r % ps) * s->head_dim;
}

/* Query q at absolute position `pos` of `slot` (head hd), whose newest position is `last`: the
 * positions max(0, last - context + 1, pos - window + 1) .. pos, page run by page run. */
static void attend(const StackShape *s, const StackPages *pg, int64_t slot, int64_t hd, const float *q,
                   const float *kc, const float *vc, int64_t pos, int64_t last, float *probs, float *out) {
    int64_t D = s->head_dim, ps = s->page_size, nch = (D + 15) / 16;
    int64_t lo = last - s->context + 1 > 0 ? last - s->context + 1 : 0;
    if (pg->window && pos - pg->window[slot] + 1 > lo) lo = pos - pg->window[slot] + 1;
    int64_t n = pos - lo + 1;
    __mmask16 tail = tail_mask(D - 16 * (nch - 1));
    float scale = (float)(1.0 / sqrt((double)D));
    for (int64_t p = lo, run; p <= pos; p += run) {
        run = ps - p % ps < pos - p + 1 ? ps - p % ps : pos - p + 1;
        SCORES_FOR[nch](q, kc + kv_row(s, pg, slot, hd, p), run, D, tail, scale, probs + (p - lo));
    }
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < n; i += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, tail_mask(n - i), probs + i));
    __m512 tv = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, probs + i), tv)));
        _mm512_mask_storeu_ps(probs + i, m, e);
        total = _mm512_add_ps(total, e);
    }
    __m512 inv = _mm512_set1_ps(1.0f / hsum(total));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(probs + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, probs + i), inv));
    }
    memset(out, 0, D * sizeof(float));
    for (int64_t p = lo, run; p <= pos; p += run) {
        run = ps - p % ps < pos - p + 1 ? ps - p % ps : pos - p + 1;
        WEIGHTED_FOR[nch](probs + (p - lo), vc + kv_row(s, pg, slot, hd, p), run, D, tail, out);
    }
}

/* The feed-forward's GELU over n floats, exported so the tests can hold it to its stated accuracy. */
void lockstep_gelu_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, m, gelu_erf(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* The feed-forward's activation over one row: in place for FF_GELU, else into `gated`. */
static void activate_row(const StackShape *s, float *h, float *gated) {
    int64_t H = s->hidden;
    for (int64_t i = 0; i < H; i += 16) {
        __mmask16 m = tail_mask(H - i);
        __m512 a = _mm512_maskz_loadu_ps(m, h + i);
        if (s->ff_kind == FF_GELU) {
            _mm512_mask_storeu_ps(h + i, m, gelu_erf(a));
            continue;
        }
        __m512 g = _mm512_maskz_loadu_ps(m, h + H + i), act;
        if (s->ff_kind == FF_SILU_GATE)
            act = _mm512_div_ps(a, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_clamped(_mm512_sub_ps(_mm512_setzero_ps(), a))));
        else
            act = gelu_erf(a);
        _mm512_mask_storeu_ps(gated + i, m, _mm512_mul_ps(act, g));
    }
}

/* x: B x T rows of `dim` at strides (sb, st, sc); out: [B*T, dim]; slots: B rows of `offsets`
 * (and of the page tables and windows in `pg`), which advance by T; the caches are
 * [layers, pool_pages, heads, page_size, head_dim]. A slot may repeat (the engine's padded rows
 * share one scratch slot): those rows then race on its pages, which nothing reads, and its offset
 * advances once per row. Returns 0; or, with nothing written, -1 for a slot outside [0, sessions),
 * -2 for a negative offset, -3 for a shape the kernel does not take. */
int lockstep_stack_f32(const StackShape *s, const StackLayer *layers, const float *x, int64_t sb, int64_t st,
                       int64_t sc, int64_t B, int64_t T, const int64_t *slots, int64_t *offsets, float *k_cache,
                       float *v_cache, const StackPages *pg, float *out, float *scratch, int nthreads) {
    if (s->head_dim < 1 || s->head_dim > 16 * MAX_CHUNKS || s->dim != s->heads * s->head_dim || s->context < 1 ||
        T < 1 || T > s->context || nthreads < 1 || s->hidden < 1 || s->page_size < 1 || s->pages_per_slot < 1 ||
        s->page_size * s->pages_per_slot < s->context || (!pg->table && s->pages_per_slot != 1))
        return -3;
    for (int64_t l = 0; l < s->layers; l++)
        if (!s->rms && !(layers[l].norm1_b && layers[l].norm2_b)) return -3;
    for (int64_t b = 0; b < B; b++) {
        if (slots[b] < 0 || slots[b] >= s->sessions) return -1;
        if (offsets[slots[b]] < 0) return -2;
    }
    const int64_t C = s->dim, H = s->heads, D = s->head_dim, N = B * T;
    const int64_t FF = ff_in_width(s), gated_w = s->ff_kind == FF_GELU ? 0 : s->hidden;
    float *h = scratch, *qkv = h + N * C, *att = qkv + N * 3 * C, *upd = att + N * C, *ff = upd + N * C;
    float *gated = ff + N * FF, *rope = gated + N * gated_w, *probs = rope + N * D;
    float *ff_act = s->ff_kind == FF_GELU ? ff : gated;
    const int64_t layer_stride = s->pool_pages * H * s->page_size * D;

#pragma omp parallel num_threads(nthreads)
    {
        float *my_probs = probs + (int64_t)omp_get_thread_num() * s->context;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N; r++) {
            const float *src = x + (r / T) * sb + (r % T) * st;
            if (sc == 1)
                memcpy(out + r * C, src, C * sizeof(float));
            else
                for (int64_t i = 0; i < C; i++) out[r * C + i] = src[i * sc];
            norm_row(s, out + r * C, layers[0].norm1_w, layers[0].norm1_b, h + r * C);
            if (s->rope_max_period > 0) {
                /* The torch path's tables: freq_i = e^(i * -2 ln(period) / D), angle = freq_i * position, in fp32. */
                float step = (float)(-log((double)s->rope_max_period) * 2 / (double)D);
                float position = (float)(offsets[slots[r / T]] + r % T);
                for (int64_t i = 0; i < D / 2; i++) {
                    float angle = expf((float)i * step) * position;
                    rope[r * D + 2 * i] = cosf(angle);
                    rope[r * D + 2 * i + 1] = sinf(angle);
                }
            }
        }
        for (int64_t l = 0; l < s->layers; l++) {
            const StackLayer *L = layers + l;
            linear_rows(h, N, C, C, L->in_proj, 3 * C, 0, qkv, 3 * C);
#pragma omp for schedule(static) collapse(2)
            for (int64_t b = 0; b < B; b++) {
                for (int64_t hd = 0; hd < H; hd++) {
                    int64_t slot = slots[b], off = offsets[slot], last = off + T - 1;
                    float *kc = k_cache + l * layer_stride, *vc = v_cache + l * layer_stride;
                    for (int64_t t = 0; t < T; t++) {
                        float *q = qkv + (b * T + t) * 3 * C + hd * D;
                        if (s->rope_max_period > 0) {
                            rope_head(q, rope + (b * T + t) * D, D);
                            rope_head(q + C, rope + (b * T + t) * D, D);
                        }
                        int64_t row = kv_row(s, pg, slot, hd, off + t);
                        memcpy(kc + row, q + C, D * sizeof(float));
                        memcpy(vc + row, q + 2 * C, D * sizeof(float));
                    }
                    for (int64_t t = 0; t < T; t++)
                        attend(s, pg, slot, hd, qkv + (b * T + t) * 3 * C + hd * D, kc, vc, off + t, last, my_probs,
                               att + (b * T + t) * C + hd * D);
                }
            }
            linear_rows(att, N, C, C, L->out_proj, C, 0, upd, C);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < N; r++)
                residual_row(s, out + r * C, upd + r * C, L->scale1, L->norm2_w, L->norm2_b, h + r * C);
            linear_rows(h, N, C, C, L->ff_in, FF, 0, ff, FF);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < N; r++) activate_row(s, ff + r * FF, gated + r * gated_w);
            linear_rows(ff_act, N, s->hidden, s->hidden, L->ff_out, C, 0, upd, C);
            const StackLayer *next = l + 1 < s->layers ? L + 1 : 0;
#pragma omp for schedule(static)
            for (int64_t r = 0; r < N; r++)
                residual_row(s, out + r * C, upd + r * C, L->scale2, next ? next->norm1_w : 0,
                             next ? next->norm1_b : 0, h + r * C);
        }
    }
    for (int64_t b = 0; b < B; b++) offsets[slots[b]] += T;
    return 0;
}
