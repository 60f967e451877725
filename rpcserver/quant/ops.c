/* The hot non-matmul ops of a decode step, compiled (built with kernels.c by native.py; wrapped by
 * ops.py). Each one computes what its reference in rpcserver/kernels.py computes, within float32
 * rounding:
 *   op_attention      write the new K/V rows into the caches, then softmax(scale * q.k) . v over
 *                     the cells each token may see (GQA, sliding window, softcap; f32 or f16 caches)
 *   op_rope           rotary embedding, normal (adjacent pairs) or neox (halves), partial dims
 *   op_rms_norm_mul   x / sqrt(mean(x^2) + eps), optionally times a weight row
 * Work is split over OpenMP threads only when there is enough of it. Every size, stride and index
 * was checked by the Python caller, except cells, which op_attention checks itself.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* below this many multiply-adds an op stays on the calling thread (a fork costs a few us) */
#define OPS_PAR_WORK (1 << 15)

int llr_num_threads(void);   /* kernels.c: the node's --threads, for every calling thread */

static inline int ops_threads(void) {
#ifdef _OPENMP
    return llr_num_threads();
#else
    return 1;
#endif
}

/* ---- IEEE half <-> float ------------------------------------------------------------------- */

static inline float ops_h2f(uint16_t h) { return llr_f16_to_f32(h); }

/* round to nearest even, overflow to inf, as numpy's astype(float16) */
static inline uint16_t ops_f2h(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7fffffffu;
    if (x >= 0x47800000u) /* >= 65536, inf or nan */
        return (uint16_t)(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (x < 0x38800000u) { /* below 2^-14: a subnormal half (or zero), rounded by a float add */
        const uint32_t magic_bits = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        float m, r;
        memcpy(&m, &magic_bits, 4);
        memcpy(&r, &x, 4);
        r += m;
        uint32_t rb;
        memcpy(&rb, &r, 4);
        return (uint16_t)(sign | (rb - magic_bits));
    }
    const uint32_t odd = (x >> 13) & 1u;
    x += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
    return (uint16_t)(sign | (x >> 13));
#endif
}

static inline void ops_h2f_row(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = ops_h2f(src[i]);
}

static inline void ops_f2h_row(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), 0));
#endif
    for (; i < n; i++) dst[i] = ops_f2h(src[i]);
}

/* ---- vector helpers -------------------------------------------------------------------------- */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define OPS_VEC 1

/* 8 floats of a cache row (float32, or IEEE half) */
static inline __m256 ops_ld8(const void *row, int f16, int64_t i) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
               : _mm256_loadu_ps((const float *)row + i);
}

/* e^x for x <= 0 (softmax exponents): 2^n e^r with n = round(x / ln 2), r = x - n ln 2 split in two
 * (Cody-Waite), e^r by Cephes's degree-7 polynomial; relative error ~1e-7; e^x = 0 below -87.3. */
static inline __m256 ops_exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x);   /* NaN stays NaN */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

static inline float ops_hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* dst[i] = scale * q . K[idx[i]] (then softcapped) for the nv visible cells; D % 8 == 0.
 * Eight cells at a time: eight independent accumulators, one horizontal reduction for all. */
static inline __attribute__((always_inline)) void
ops_scores_vec(const float *qj, const char *cache, int64_t row_bytes, int f16, const int32_t *idx, int64_t nv,
               int64_t D, float scale, float softcap, float *dst) {
    int64_t i = 0;
    const __m256 sc8 = _mm256_set1_ps(scale);
    for (; i + 8 <= nv; i += 8) {
        const char *r[8];
        __m256 a[8];
        for (int c = 0; c < 8; c++) {
            r[c] = cache + idx[i + c] * row_bytes;
            a[c] = _mm256_setzero_ps();
        }
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(qj + d);
            for (int c = 0; c < 8; c++) a[c] = _mm256_fmadd_ps(qv, ops_ld8(r[c], f16, d), a[c]);
        }
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        const __m256 s8 = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(s8, sc8));
    }
    for (; i < nv; i++) {
        const char *r = cache + idx[i] * row_bytes;
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d), ops_ld8(r, f16, d), a);
        dst[i] = ops_hsum8(a) * scale;
    }
    if (softcap > 0.0f)
        for (i = 0; i < nv; i++) dst[i] = softcap * tanhf(dst[i] / softcap);
}

/* o[j][d0 : d0 + 8*NC] = sum_i p[j][i] V[idx[i]][d0 : ...] for NJ heads: NJ*NC accumulators in
 * registers (NJ, NC constants after inlining) */
static inline __attribute__((always_inline)) void
ops_pv_tile(const float *p, int64_t L, int NJ, int NC, const char *cache, int64_t row_bytes, int f16,
            const int32_t *idx, int64_t nv, int64_t d0, int64_t D, float *o) {
    __m256 a[4][8];
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < NC; c++) a[j][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nv; i++) {
        const char *r = cache + idx[i] * row_bytes;
        __m256 vv[8];
        for (int c = 0; c < NC; c++) vv[c] = ops_ld8(r, f16, d0 + 8 * c);
        for (int j = 0; j < NJ; j++) {
            const __m256 pj = _mm256_broadcast_ss(p + j * L + i);
            for (int c = 0; c < NC; c++) a[j][c] = _mm256_fmadd_ps(pj, vv[c], a[j][c]);
        }
    }
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < NC; c++) _mm256_storeu_ps(o + j * D + d0 + 8 * c, a[j][c]);
}

/* o[j] = sum_i p[j][i] V[idx[i]] for the hp heads (o rows D apart, p rows L apart); D % 8 == 0.
 * Tiles of up to 4 heads x 8*NC columns with NJ*NC <= 8 accumulators. */
static inline __attribute__((always_inline)) void
ops_pv_vec(const float *p, int64_t L, int64_t hp, const char *cache, int64_t row_bytes, int f16,
           const int32_t *idx, int64_t nv, int64_t D, float *o) {
    const int64_t chunks = D / 8;
    for (int64_t j0 = 0; j0 < hp; j0 += 4) {
        const int nj = hp - j0 < 4 ? (int)(hp - j0) : 4;
        const int nc = nj == 1 ? 8 : nj == 2 ? 4 : 2;
        const float *pj = p + j0 * L;
        float *oj = o + j0 * D;
        int64_t c = 0;
        for (; c + nc <= chunks; c += nc) {
            switch (nj) {
            case 1: ops_pv_tile(pj, L, 1, 8, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            case 2: ops_pv_tile(pj, L, 2, 4, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            case 3: ops_pv_tile(pj, L, 3, 2, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            default: ops_pv_tile(pj, L, 4, 2, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            }
        }
        for (; c < chunks; c++) {
            switch (nj) {
            case 1: ops_pv_tile(pj, L, 1, 1, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            case 2: ops_pv_tile(pj, L, 2, 1, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            case 3: ops_pv_tile(pj, L, 3, 1, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            default: ops_pv_tile(pj, L, 4, 1, cache, row_bytes, f16, idx, nv, 8 * c, D, oj); break;
            }
        }
    }
}
#endif

/* softmax of each of the hp score rows (L apart) over their first nv entries, in place */
static inline void ops_softmax_rows(float *sc, int64_t L, int64_t hp, int64_t nv) {
    for (int64_t j = 0; j < hp; j++) {
        float *sj = sc + j * L, mx = sj[0], sum = 0.0f;
        int64_t i = 1;
#ifdef OPS_VEC
        if (nv >= 8) {
            __m256 mv = _mm256_loadu_ps(sj);
            for (i = 8; i + 8 <= nv; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sj + i));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            mx = _mm_cvtss_f32(h);
        }
#endif
        for (; i < nv; i++) mx = sj[i] > mx ? sj[i] : mx;
        i = 0;
#ifdef OPS_VEC
        const __m256 m8 = _mm256_set1_ps(mx);
        __m256 s8 = _mm256_setzero_ps();
        for (; i + 8 <= nv; i += 8) {
            const __m256 e = ops_exp8(_mm256_sub_ps(_mm256_loadu_ps(sj + i), m8));
            _mm256_storeu_ps(sj + i, e);
            s8 = _mm256_add_ps(s8, e);
        }
        sum = ops_hsum8(s8);
#endif
        for (; i < nv; i++) {
            sj[i] = expf(sj[i] - mx);
            sum += sj[i];
        }
        for (i = 0; i < nv; i++) sj[i] /= sum;
    }
}

static inline float ops_dot(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---- attention ----------------------------------------------------------------------------- */

typedef struct {
    const float *q;
    const char *k_cache, *v_cache;
    int64_t kc_stride, vc_stride;
    int kc_f16, vc_f16;
    const int32_t *tok_pos, *tok_seq, *kv_pos, *kv_seq;
    int64_t L, n_head, n_kv, D, g, hp, n_sub, sliding_window;
    float scale, softcap;
    float *out;
} ops_attn_ctx;

/* per thread: scores [hp, L], the visible cells of its current token [L] (kept while consecutive
 * items share the token), one converted f16 row [D] */
typedef struct {
    float *sc, *row;
    int32_t *idx;
    int64_t cur_t, nv;
} ops_attn_scratch;

static int ops_attn_scratch_init(ops_attn_scratch *s, const ops_attn_ctx *c) {
    s->sc = (float *)malloc(sizeof(float) * (size_t)(c->hp * c->L + c->D + 1));
    s->idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(c->L + 1));
    s->row = s->sc ? s->sc + c->hp * c->L : NULL;
    s->cur_t = -1;
    s->nv = 0;
    return s->sc && s->idx;
}

static void ops_attn_scratch_free(ops_attn_scratch *s) {
    free(s->sc);
    free(s->idx);
}

/* work item `it`: token t, kv head hk, the hp query heads from h0 */
static void ops_attn_item(const ops_attn_ctx *c, ops_attn_scratch *s, int64_t it) {
    const int64_t L = c->L, D = c->D, hp = c->hp, qw = c->n_head * D;
    const int64_t t = it / (c->n_kv * c->n_sub), rem = it % (c->n_kv * c->n_sub);
    const int64_t hk = rem / c->n_sub, h0 = hk * c->g + (rem % c->n_sub) * hp;
    float *sc = s->sc, *row = s->row;
    const int32_t *idx = s->idx;
    if (t != s->cur_t) {
        const int32_t pos = c->tok_pos[t], seq = c->tok_seq[t];
        const int64_t sw = c->sliding_window;
        int64_t nv = 0;
        for (int64_t j = 0; j < L; j++) {
            const int32_t p = c->kv_pos[j];
            s->idx[nv] = (int32_t)j;
            nv += c->kv_seq[j] == seq && p >= 0 && p <= pos && (sw <= 0 || (int64_t)pos - p < sw);
        }
        s->cur_t = t;
        s->nv = nv;
    }
    const int64_t nv = s->nv;
    float *o = c->out + t * qw + h0 * D;   /* the hp heads' outputs are adjacent */
    if (nv == 0) {   /* nothing visible: the reference's p is 0 everywhere */
        memset(o, 0, sizeof(float) * (size_t)(hp * D));
        return;
    }
    const float *qt = c->q + t * qw + h0 * D;
    const int kc_f16 = c->kc_f16, vc_f16 = c->vc_f16;
    const float scale = c->scale, softcap = c->softcap;
    const char *kbase = c->k_cache + hk * D * (kc_f16 ? 2 : 4), *vbase = c->v_cache + hk * D * (vc_f16 ? 2 : 4);
    const int64_t kc_bytes = c->kc_stride * (kc_f16 ? 2 : 4), vc_bytes = c->vc_stride * (vc_f16 ? 2 : 4);
#ifdef OPS_VEC
    if (D % 8 == 0) {
        for (int64_t j = 0; j < hp; j++) {
            if (kc_f16) ops_scores_vec(qt + j * D, kbase, kc_bytes, 1, idx, nv, D, scale, softcap, sc + j * L);
            else ops_scores_vec(qt + j * D, kbase, kc_bytes, 0, idx, nv, D, scale, softcap, sc + j * L);
        }
        ops_softmax_rows(sc, L, hp, nv);
        if (vc_f16) ops_pv_vec(sc, L, hp, vbase, vc_bytes, 1, idx, nv, D, o);
        else ops_pv_vec(sc, L, hp, vbase, vc_bytes, 0, idx, nv, D, o);
        return;
    }
#endif
    for (int64_t i = 0; i < nv; i++) {
        const float *kr;
        if (kc_f16) {
            ops_h2f_row((const uint16_t *)(kbase + idx[i] * kc_bytes), row, D);
            kr = row;
        } else {
            kr = (const float *)(kbase + idx[i] * kc_bytes);
        }
        for (int64_t j = 0; j < hp; j++) {
            float sj = ops_dot(qt + j * D, kr, D) * scale;
            if (softcap > 0.0f) sj = softcap * tanhf(sj / softcap);
            sc[j * L + i] = sj;
        }
    }
    ops_softmax_rows(sc, L, hp, nv);
    memset(o, 0, sizeof(float) * (size_t)(hp * D));
    for (int64_t i = 0; i < nv; i++) {
        const float *vr;
        if (vc_f16) {
            ops_h2f_row((const uint16_t *)(vbase + idx[i] * vc_bytes), row, D);
            vr = row;
        } else {
            vr = (const float *)(vbase + idx[i] * vc_bytes);
        }
        for (int64_t j = 0; j < hp; j++) {
            const float pj = sc[j * L + i];
            float *oj = o + j * D;
            for (int64_t d = 0; d < D; d++) oj[d] += pj * vr[d];
        }
    }
}

/* q [N, n_head*D], k/v [N, n_kv*D] float32, contiguous. Caches: row c of k_cache starts at element
 * c*kc_stride (float32, or IEEE half when kc_f16), likewise v_cache. Writes k[t]/v[t] at row
 * cells[t] (in token order: a repeated cell keeps the last row), then out [N, n_head*D] float32:
 * for each token and head, softmax(scale * q.k [softcapped]) . v over the first L cells the token
 * may see (same sequence, kv_pos in [0, tok_pos], within the sliding window when > 0); zeros when
 * it sees none. GQA: head h reads kv head h / (n_head / n_kv).
 * Returns 0; -2 when a cell is outside [0, M) (nothing written); -1 when scratch memory ran out. */
int op_attention(const float *q, const float *k, const float *v, void *k_cache, void *v_cache,
                 int64_t kc_stride, int64_t vc_stride, int kc_f16, int vc_f16, int64_t M,
                 const int32_t *cells, const int32_t *tok_pos, const int32_t *tok_seq, int64_t N,
                 const int32_t *kv_pos, const int32_t *kv_seq, int64_t L,
                 int64_t n_head, int64_t n_kv, int64_t D, float scale, int64_t sliding_window, float softcap,
                 float *out) {
    const int64_t kvw = n_kv * D;
    for (int64_t t = 0; t < N; t++)
        if (cells[t] < 0 || (int64_t)cells[t] >= M) return -2;
    for (int64_t t = 0; t < N; t++) {
        const int64_t c = cells[t];
        if (kc_f16) ops_f2h_row(k + t * kvw, (uint16_t *)k_cache + c * kc_stride, kvw);
        else memcpy((float *)k_cache + c * kc_stride, k + t * kvw, (size_t)kvw * sizeof(float));
        if (vc_f16) ops_f2h_row(v + t * kvw, (uint16_t *)v_cache + c * vc_stride, kvw);
        else memcpy((float *)v_cache + c * vc_stride, v + t * kvw, (size_t)kvw * sizeof(float));
    }
    if (N == 0 || n_head == 0 || D == 0) return 0;

    const int64_t g = n_head / n_kv;
    const int nth = ops_threads();
    const int par = nth > 1 && N * n_head * L * D >= OPS_PAR_WORK;
    /* heads per work item: all the group's heads share each K/V row read, unless that leaves too
     * few items to keep the threads busy */
    int64_t hp = g;
    if (par)
        for (hp = g; hp > 1; hp--)
            if (g % hp == 0 && N * n_kv * (g / hp) >= 4 * (int64_t)nth) break;
    const ops_attn_ctx c = {q, (const char *)k_cache, (const char *)v_cache, kc_stride, vc_stride, kc_f16, vc_f16,
                            tok_pos, tok_seq, kv_pos, kv_seq, L, n_head, n_kv, D, g, hp, g / hp, sliding_window,
                            scale, softcap, out};
    const int64_t items = N * n_kv * c.n_sub;
    int err = 0;
    if (!par) {
        ops_attn_scratch s;
        if (ops_attn_scratch_init(&s, &c))
            for (int64_t it = 0; it < items; it++) ops_attn_item(&c, &s, it);
        else
            err = -1;
        ops_attn_scratch_free(&s);
        return err;
    }
#pragma omp parallel num_threads(ops_threads())
    {
        ops_attn_scratch s;
        const int ok = ops_attn_scratch_init(&s, &c);
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (ok) {
                ops_attn_item(&c, &s, it);
            } else {
#pragma omp atomic write
                err = -1;
            }
        }
        ops_attn_scratch_free(&s);
    }
    return err;
}

/* ---- rope ---------------------------------------------------------------------------------- */

static void ops_rope_row(const float *xr0, float *o0, int32_t pos, int64_t H, int64_t head_dim, int64_t n_dims,
                         int mode, const double *inv_freq) {
    const int64_t half = n_dims / 2;
    float cs[half + 1], sn[half + 1];
    for (int64_t i = 0; i < half; i++) {
        const double th = (double)pos * inv_freq[i];
        cs[i] = (float)cos(th);
        sn[i] = (float)sin(th);
    }
    for (int64_t h = 0; h < H; h++) {
        const float *xr = xr0 + h * head_dim;
        float *o = o0 + h * head_dim;
        if (mode == 2) {
            for (int64_t i = 0; i < half; i++) {
                const float x0 = xr[i], x1 = xr[i + half];
                o[i] = x0 * cs[i] - x1 * sn[i];
                o[i + half] = x0 * sn[i] + x1 * cs[i];
            }
        } else {
            for (int64_t i = 0; i < half; i++) {
                const float x0 = xr[2 * i], x1 = xr[2 * i + 1];
                o[2 * i] = x0 * cs[i] - x1 * sn[i];
                o[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
            }
        }
        if (o != xr)
            for (int64_t i = n_dims; i < head_dim; i++) o[i] = xr[i];
    }
}

/* x, out [N, width] float32 (out may be x), width a multiple of head_dim; n_dims even, <= head_dim
 * (and small: its cos/sin live on the stack). inv_freq [n_dims/2] float64 = freq_scale *
 * base^(-2i/n_dims), the caller's (as the reference computes it). As the reference: theta = pos *
 * inv_freq in float64, cos/sin in float64 rounded to float32, the rotation in float32; mode 2
 * (neox) rotates (x[i], x[i + n_dims/2]), any other mode adjacent pairs (x[2i], x[2i+1]). */
void op_rope(const float *x, float *out, const int32_t *pos, int64_t N, int64_t width, int64_t head_dim,
             int64_t n_dims, int mode, const double *inv_freq) {
    const int64_t H = width / head_dim;
    if (N > 1 && N * width >= OPS_PAR_WORK && ops_threads() > 1) {
#pragma omp parallel for num_threads(ops_threads())
        for (int64_t t = 0; t < N; t++)
            ops_rope_row(x + t * width, out + t * width, pos[t], H, head_dim, n_dims, mode, inv_freq);
    } else {
        for (int64_t t = 0; t < N; t++)
            ops_rope_row(x + t * width, out + t * width, pos[t], H, head_dim, n_dims, mode, inv_freq);
    }
}

/* ---- rms_norm ------------------------------------------------------------------------------ */

/* sum of a[i]^2 in float32, in numpy's pairwise order (its float32 add.reduce, which the
 * reference's mean runs): blocks of up to 128 summed in 8 lanes, halves of larger runs summed
 * apart. The same order gives the same bits: the squares are rounded as numpy's x * x (ISO C
 * mode, -std=c11, does not contract them into fmas) and the sums are kept from reassociation. */
#if defined(__clang__)
#define OPS_IN_ORDER
#define OPS_IN_ORDER_BODY _Pragma("clang fp reassociate(off)")
#elif defined(__GNUC__)
#define OPS_IN_ORDER __attribute__((optimize("no-associative-math")))
#define OPS_IN_ORDER_BODY
#else
#define OPS_IN_ORDER
#define OPS_IN_ORDER_BODY
#endif
OPS_IN_ORDER static float ops_pairwise_sumsq(const float *a, int64_t n) {
    OPS_IN_ORDER_BODY
    if (n < 8) {
        float res = 0.0f;
        for (int64_t i = 0; i < n; i++) res += a[i] * a[i];
        return res;
    }
    if (n <= 128) {
        float r[8];
        for (int j = 0; j < 8; j++) r[j] = a[j] * a[j];
        int64_t i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j] * a[i + j];
        float res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i] * a[i];
        return res;
    }
    int64_t n2 = n / 2;
    n2 -= n2 % 8;
    return ops_pairwise_sumsq(a, n2) + ops_pairwise_sumsq(a + n2, n - n2);
}

/* the reference's float32 steps: ms = sum / K, x / sqrt(ms + eps) (then * w, as the mul op) */
static void ops_rms_row(const float *xr, int64_t K, const float *w, float eps, float *o) {
    const float ms = ops_pairwise_sumsq(xr, K) / (float)K, d = sqrtf(ms + eps);
    if (w) {
        for (int64_t i = 0; i < K; i++) o[i] = (xr[i] / d) * w[i];
    } else {
        for (int64_t i = 0; i < K; i++) o[i] = xr[i] / d;
    }
}

/* out [N, K] = x / sqrt(mean(x*x) + eps) [* w] row by row, as the reference computes it; out may be x */
void op_rms_norm_mul(const float *x, int64_t N, int64_t K, const float *w, float eps, float *out) {
    if (N > 1 && N * K >= OPS_PAR_WORK && ops_threads() > 1) {
#pragma omp parallel for num_threads(ops_threads())
        for (int64_t r = 0; r < N; r++) ops_rms_row(x + r * K, K, w, eps, out + r * K);
    } else {
        for (int64_t r = 0; r < N; r++) ops_rms_row(x + r * K, K, w, eps, out + r * K);
    }
}

/* ---- swiglu --------------------------------------------------------------------------------- *
 * out = silu(g) * u = g / (1 + e^-g) * u. e^x by range reduction (x = k ln2 + r, |r| <= ln2/2) and
 * a degree-6 polynomial (Cephes' expf coefficients): within 2 ulp of expf on [-86, 88.3] (the
 * argument is clamped there: 2^k stays a normal float), so silu is within a few ulp of the truth
 * (tests/test_cpu_ops.py), and exactly 0 below g = -88.3 where it is under 4e-37. */
static inline float ops_expf(float x) {
    x = x > 88.3f ? 88.3f : (x < -86.0f ? -86.0f : x);   /* below -86, e^x < 5e-38: 1 + e^x == 1 */
    const float k = nearbyintf(x * 1.44269504088896341f);
    const float r = fmaf(k, -0.693359375f, fmaf(k, 2.12194440e-4f, x));
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)k << 23;
    memcpy(&p, &bits, 4);
    return p;
}

void op_swiglu(const float *g, const float *u, int64_t n, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = (g[i] < -88.3f ? g[i] * 0.0f : g[i] / (1.0f + ops_expf(-g[i]))) * u[i];
}

/* ---- packed arguments ------------------------------------------------------------------------ *
 * ctypes spends ~60 ns converting each argument and ~1 us on an array's .ctypes.data, so the
 * Python wrappers pack every argument into one byte string of 8-byte fields and call these. An
 * array field holds either its data's address (data_off < 0) or, under CPython, the array
 * object's address (id()) with data_off the offset of numpy's data pointer in the object (the
 * `data` field of PyArrayObject_fields, what PyArray_DATA reads; ops.py finds and checks it). */

static inline void *ops_data(uint64_t x, int64_t data_off) {
    if (data_off < 0 || x == 0) return (void *)(uintptr_t)x;
    void *p;
    memcpy(&p, (const char *)(uintptr_t)x + data_off, sizeof p);
    return p;
}

typedef struct {
    int64_t data_off;
    uint64_t q, k, v, k_cache, v_cache;
    int64_t kc_stride, vc_stride, kc_f16, vc_f16, M;
    uint64_t cells, tok_pos, tok_seq;
    int64_t N;
    uint64_t kv_pos, kv_seq;
    int64_t L, n_head, n_kv, head_dim;
    double scale;
    int64_t sliding_window;
    double softcap;
    uint64_t out;
} ops_attention_args;

int op_attention_packed(const void *args) {
    ops_attention_args a;
    memcpy(&a, args, sizeof a);
    const int64_t o = a.data_off;
    return op_attention((const float *)ops_data(a.q, o), (const float *)ops_data(a.k, o), (const float *)ops_data(a.v, o),
                        ops_data(a.k_cache, o), ops_data(a.v_cache, o), a.kc_stride, a.vc_stride, (int)a.kc_f16,
                        (int)a.vc_f16, a.M, (const int32_t *)ops_data(a.cells, o), (const int32_t *)ops_data(a.tok_pos, o),
                        (const int32_t *)ops_data(a.tok_seq, o), a.N, (const int32_t *)ops_data(a.kv_pos, o),
                        (const int32_t *)ops_data(a.kv_seq, o), a.L, a.n_head, a.n_kv, a.head_dim, (float)a.scale,
                        a.sliding_window, (float)a.softcap, (float *)ops_data(a.out, o));
}

typedef struct {
    int64_t data_off;
    uint64_t x, out, pos;
    int64_t N, width, head_dim, n_dims, mode;
    uint64_t inv_freq;   /* always an address */
} ops_rope_args;

void op_rope_packed(const void *args) {
    ops_rope_args a;
    memcpy(&a, args, sizeof a);
    const int64_t o = a.data_off;
    op_rope((const float *)ops_data(a.x, o), (float *)ops_data(a.out, o), (const int32_t *)ops_data(a.pos, o), a.N,
            a.width, a.head_dim, a.n_dims, (int)a.mode, (const double *)(uintptr_t)a.inv_freq);
}

typedef struct {
    int64_t data_off;
    uint64_t x;
    int64_t N, K;
    uint64_t w;   /* 0: no weight */
    double eps;
    uint64_t out;
} ops_rms_norm_args;

void op_rms_norm_mul_packed(const void *args) {
    ops_rms_norm_args a;
    memcpy(&a, args, sizeof a);
    const int64_t o = a.data_off;
    op_rms_norm_mul((const float *)ops_data(a.x, o), a.N, a.K, (const float *)ops_data(a.w, o), (float)a.eps,
                    (float *)ops_data(a.out, o));
}
