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
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

/* below this many multiply-adds an op stays on the calling thread (a fork costs a few us) */
#define OPS_PAR_WORK (1 << 15)

static inline int ops_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* ---- IEEE half <-> float ------------------------------------------------------------------- */

static inline float ops_h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

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

/* ---- small vector helpers -------------------------------------------------------------------- */

static inline float ops_dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[0:n] += a * x[0:n] */
static inline void ops_axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* ---- attention ----------------------------------------------------------------------------- */

/* q [N, n_head*D], k/v [N, n_kv*D] float32, contiguous. Caches: row c of k_cache starts at element
 * c*kc_stride (float32, or IEEE half when kc_f16), likewise v_cache. Writes k[t]/v[t] at row
 * cells[t] (in token order: a repeated cell keeps the last row), then out [N, n_head*D] float32.
 * Returns 0; -2 when a cell is outside [0, M) (nothing written); -1 when scratch memory ran out. */
int op_attention(const float *q, const float *k, const float *v, void *k_cache, void *v_cache,
                 int64_t kc_stride, int64_t vc_stride, int kc_f16, int vc_f16, int64_t M,
                 const int32_t *cells, const int32_t *tok_pos, const int32_t *tok_seq, int64_t N,
                 const int32_t *kv_pos, const int32_t *kv_seq, int64_t L,
                 int64_t n_head, int64_t n_kv, int64_t D, float scale, int64_t sliding_window, float softcap,
                 float *out) {
    const int64_t kvw = n_kv * D, qw = n_head * D;
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
    const int64_t n_sub = g / hp, items = N * n_kv * n_sub;
    const uint16_t *kc16 = (const uint16_t *)k_cache, *vc16 = (const uint16_t *)v_cache;
    const float *kc32 = (const float *)k_cache, *vc32 = (const float *)v_cache;
    int err = 0;

#pragma omp parallel if (par)
    {
        /* per thread: scores [hp, L], visible cells [L], one converted f16 row [D] */
        float *sc = (float *)malloc(sizeof(float) * (size_t)(hp * L + D + 1));
        int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(L + 1));
        float *row = sc ? sc + hp * L : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!sc || !idx) {
#pragma omp atomic write
                err = -1;
                continue;
            }
            const int64_t t = it / (n_kv * n_sub), rem = it % (n_kv * n_sub);
            const int64_t hk = rem / n_sub, h0 = hk * g + (rem % n_sub) * hp;
            const int32_t pos = tok_pos[t], seq = tok_seq[t];
            int64_t nv = 0;
            for (int64_t c = 0; c < L; c++) {
                const int32_t p = kv_pos[c];
                if (kv_seq[c] == seq && p >= 0 && p <= pos && (sliding_window <= 0 || (int64_t)pos - p < sliding_window))
                    idx[nv++] = (int32_t)c;
            }
            float *o = out + t * qw + h0 * D;   /* the hp heads' outputs are adjacent */
            memset(o, 0, sizeof(float) * (size_t)(hp * D));
            if (nv == 0) continue;
            const float *qt = q + t * qw + h0 * D;
            for (int64_t i = 0; i < nv; i++) {
                const float *kr;
                if (kc_f16) {
                    ops_h2f_row(kc16 + idx[i] * kc_stride + hk * D, row, D);
                    kr = row;
                } else {
                    kr = kc32 + idx[i] * kc_stride + hk * D;
                }
                for (int64_t j = 0; j < hp; j++) {
                    float s = ops_dot(qt + j * D, kr, D) * scale;
                    if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                    sc[j * L + i] = s;
                }
            }
            for (int64_t j = 0; j < hp; j++) {
                float *sj = sc + j * L, mx = sj[0], sum = 0.0f;
                for (int64_t i = 1; i < nv; i++) mx = sj[i] > mx ? sj[i] : mx;
                for (int64_t i = 0; i < nv; i++) {
                    sj[i] = expf(sj[i] - mx);
                    sum += sj[i];
                }
                for (int64_t i = 0; i < nv; i++) sj[i] /= sum;
            }
            for (int64_t i = 0; i < nv; i++) {
                const float *vr;
                if (vc_f16) {
                    ops_h2f_row(vc16 + idx[i] * vc_stride + hk * D, row, D);
                    vr = row;
                } else {
                    vr = vc32 + idx[i] * vc_stride + hk * D;
                }
                for (int64_t j = 0; j < hp; j++) ops_axpy(o + j * D, sc[j * L + i], vr, D);
            }
        }
        free(sc);
        free(idx);
    }
    return err;
}

/* ---- rope ---------------------------------------------------------------------------------- */

/* x, out [N, width] float32 (out may be x), width a multiple of head_dim; n_dims even, <= head_dim.
 * inv_freq [n_dims/2] float64 = freq_scale * base^(-2i/n_dims) (the caller's, as the reference's).
 * theta = pos * inv_freq in float64, cos/sin in float64 rounded to float32, rotation in float32. */
void op_rope(const float *x, float *out, const int32_t *pos, int64_t N, int64_t width, int64_t head_dim,
             int64_t n_dims, int mode, const double *inv_freq) {
    const int64_t half = n_dims / 2, H = width / head_dim;
#pragma omp parallel for if (N > 1 && N * width >= OPS_PAR_WORK && ops_threads() > 1)
    for (int64_t t = 0; t < N; t++) {
        float cs[half + 1], sn[half + 1];
        const double p = (double)pos[t];
        for (int64_t i = 0; i < half; i++) {
            const double th = p * inv_freq[i];
            cs[i] = (float)cos(th);
            sn[i] = (float)sin(th);
        }
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + t * width + h * head_dim;
            float *o = out + t * width + h * head_dim;
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
}

/* ---- rms_norm ------------------------------------------------------------------------------ */

/* out [N, K] = x / sqrt(mean(x*x) + eps) [* w] row by row; the mean in float64; out may be x */
void op_rms_norm_mul(const float *x, int64_t N, int64_t K, const float *w, float eps, float *out) {
#pragma omp parallel for if (N > 1 && N * K >= OPS_PAR_WORK && ops_threads() > 1)
    for (int64_t r = 0; r < N; r++) {
        const float *xr = x + r * K;
        float *o = out + r * K;
        double s = 0.0;
        for (int64_t i = 0; i < K; i++) s += (double)xr[i] * (double)xr[i];
        const float ms = (float)(s / (double)K), d = sqrtf(ms + eps);
        if (w) {
            for (int64_t i = 0; i < K; i++) o[i] = (xr[i] / d) * w[i];
        } else {
            for (int64_t i = 0; i < K; i++) o[i] = xr[i] / d;
        }
    }
}
