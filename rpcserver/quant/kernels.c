/* Quantized matmul kernels that read GGUF blocks directly (compiled on the node by native.py).
 *
 * One small `unpack_<type>` per GGML type turns a block into int8 quants q[QK] with, per
 * sub-block of S values, a scale and an offset, so that  w[i] = sc[i / S] * q[i] + mn[i / S]
 * reproduces gguf-py's dequantize_blocks (the numpy reference) operation for operation. The
 * drivers below are written once and stamped out per type by DEFINE_KERNELS:
 *   <t>_dequant_rows  rows [r0, r1) -> float32 (the tile fed to BLAS for large batches, get_rows)
 *   <t>_gather_rows   rows ids[] -> float32
 *   <t>_gemv_exact    out[n, r] = x[n] . w[r] for a handful of activation rows: each weight row is
 *                     dequantized once into an L1-resident scratch and dotted with every x row
 *   <t>_gemv_fast     the same against 8-bit activations (x quantized per 32 values, as ggml's
 *                     q8 blocks): an integer dot per sub-block, scaled once
 * Rows are split over OpenMP threads. Every size and offset was checked by the Python caller.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif

#define MAX_QK 256

static inline float f16_to_f32(uint16_t h) {
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
}

static inline float rd16(const uint8_t *p) {
#if defined(__F16C__)
    return _cvtsh_ss((unsigned short)(p[0] | (p[1] << 8)));
#else
    return f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
#endif
}

/* ---- per type: block -> (q, sc, mn) ---------------------------------------------------------- */

static inline void unpack_q4_0(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    sc[0] = rd16(b); mn[0] = 0.0f;
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((b[2 + j] & 15) - 8);
        q[j + 16] = (int8_t)((b[2 + j] >> 4) - 8);
    }
}

static inline void unpack_q4_1(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    sc[0] = rd16(b); mn[0] = rd16(b + 2);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(b[4 + j] & 15);
        q[j + 16] = (int8_t)(b[4 + j] >> 4);
    }
}

static inline void unpack_q5_0(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    sc[0] = rd16(b); mn[0] = 0.0f;
    uint32_t qh = (uint32_t)b[2] | ((uint32_t)b[3] << 8) | ((uint32_t)b[4] << 16) | ((uint32_t)b[5] << 24);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
        q[j + 16] = (int8_t)(((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
}

static inline void unpack_q5_1(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    sc[0] = rd16(b); mn[0] = rd16(b + 2);
    uint32_t qh = (uint32_t)b[4] | ((uint32_t)b[5] << 8) | ((uint32_t)b[6] << 16) | ((uint32_t)b[7] << 24);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((b[8 + j] & 15) | (((qh >> j) & 1) << 4));
        q[j + 16] = (int8_t)((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
}

static inline void unpack_q8_0(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    sc[0] = rd16(b); mn[0] = 0.0f;
    memcpy(q, b + 2, 32);
}

/* Q2_K: scales[16] qs[64] d dmin; 16 sub-blocks of 16; w = d*(sc&15)*q - dmin*(sc>>4) */
static inline void unpack_q2_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    const float d = rd16(b + 80), dmin = rd16(b + 82);
    for (int i = 0; i < 16; i++) {
        sc[i] = d * (float)(b[i] & 15);
        mn[i] = -(dmin * (float)(b[i] >> 4));
    }
    const uint8_t *qs = b + 16;
    for (int k = 0; k < 8; k++) {          /* value idx = k*32 + j: byte (k/4)*32 + j, shift 2*(k%4) */
        const uint8_t *src = qs + (k >> 2) * 32;
        const int sh = 2 * (k & 3);
        for (int j = 0; j < 32; j++) q[k * 32 + j] = (int8_t)((src[j] >> sh) & 3);
    }
}

/* Q3_K: hmask[32] qs[64] scales[12] d; 16 sub-blocks of 16; w = d*(sc6-32)*(ql - 4*!hbit) */
static inline void unpack_q3_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    const uint8_t *hm = b, *qs = b + 32, *s = b + 96;
    const float d = rd16(b + 108);
    for (int i = 0; i < 16; i++) {
        int lo = i < 8 ? (s[i] & 15) : (s[i - 8] >> 4);
        int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
        sc[i] = d * (float)((int8_t)(lo | (hi << 4)) - 32);
        mn[i] = 0.0f;
    }
    for (int k = 0; k < 8; k++) {
        const uint8_t *src = qs + (k >> 2) * 32;
        const int sh = 2 * (k & 3);
        for (int j = 0; j < 32; j++) {
            int ql = (src[j] >> sh) & 3;
            int hb = (hm[j] >> k) & 1;
            q[k * 32 + j] = (int8_t)(ql - (hb ? 0 : 4));
        }
    }
}

static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 0x30);
        *m = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* Q4_K: d dmin scales[12] qs[128]; 8 sub-blocks of 32; w = d*sc*q - dmin*m */
static inline void unpack_q4_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    const float d = rd16(b), dmin = rd16(b + 2);
    for (int i = 0; i < 8; i++) {
        int s, m;
        k_scale_min(b + 4, i, &s, &m);
        sc[i] = d * (float)s;
        mn[i] = -(dmin * (float)m);
    }
    const uint8_t *qs = b + 16;
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < 32; j++) {
            q[g * 64 + j] = (int8_t)(qs[g * 32 + j] & 15);
            q[g * 64 + 32 + j] = (int8_t)(qs[g * 32 + j] >> 4);
        }
}

/* Q5_K: d dmin scales[12] qh[32] qs[128]; 8 sub-blocks of 32 */
static inline void unpack_q5_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    const float d = rd16(b), dmin = rd16(b + 2);
    for (int i = 0; i < 8; i++) {
        int s, m;
        k_scale_min(b + 4, i, &s, &m);
        sc[i] = d * (float)s;
        mn[i] = -(dmin * (float)m);
    }
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int g = 0; g < 4; g++)
        for (int j = 0; j < 32; j++) {
            int k0 = 2 * g, k1 = 2 * g + 1;
            q[k0 * 32 + j] = (int8_t)((qs[g * 32 + j] & 15) | (((qh[j] >> k0) & 1) << 4));
            q[k1 * 32 + j] = (int8_t)((qs[g * 32 + j] >> 4) | (((qh[j] >> k1) & 1) << 4));
        }
}

/* Q6_K: ql[128] qh[64] scales[16] (int8) d; 16 sub-blocks of 16; w = d*sc*(q - 32) */
static inline void unpack_q6_k(const uint8_t *b, int8_t *q, float *sc, float *mn) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *s = (const int8_t *)(b + 192);
    const float d = rd16(b + 208);
    for (int i = 0; i < 16; i++) {
        sc[i] = d * (float)s[i];
        mn[i] = 0.0f;
    }
    for (int g = 0; g < 2; g++)
        for (int r = 0; r < 128; r++) {
            int lo = (ql[g * 64 + (r & 63)] >> (4 * (r >> 6))) & 15;
            int hi = (qh[g * 32 + (r & 31)] >> (2 * (r >> 5))) & 3;
            q[g * 128 + r] = (int8_t)((lo | (hi << 4)) - 32);
        }
}

/* ---- drivers, one set per type ---------------------------------------------------------------- */

static inline void deq_block(const int8_t *q, const float *sc, const float *mn, int qk, int s, float *w) {
    for (int u = 0; u < qk / s; u++) {
        const float a = sc[u], c = mn[u];
        for (int i = 0; i < s; i++) w[u * s + i] = a * (float)q[u * s + i] + c;
    }
}

static inline float dot_f32(const float *restrict a, const float *restrict b, int64_t n) {
    float acc = 0.0f;
    for (int64_t k = 0; k < n; k++) acc += a[k] * b[k];
    return acc;
}

static inline int32_t dot_i8(const int8_t *restrict a, const int8_t *restrict b, int n) {
    int32_t acc = 0;
    for (int k = 0; k < n; k++) acc += (int16_t)a[k] * (int16_t)b[k];
    return acc;
}

#define DEFINE_KERNELS(T, QK, S, BYTES)                                                             \
static inline void T##_deq_row(const uint8_t *row, int64_t nb, float *w) {                          \
    int8_t q[QK]; float sc[QK / S], mn[QK / S];                                                      \
    for (int64_t b = 0; b < nb; b++) {                                                               \
        unpack_##T(row + b * BYTES, q, sc, mn);                                                      \
        deq_block(q, sc, mn, QK, S, w + b * QK);                                                     \
    }                                                                                                \
}                                                                                                    \
void T##_dequant_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t r0, int64_t r1,      \
                      float *out) {                                                                  \
    _Pragma("omp parallel for schedule(static) if ((r1 - r0) * K > 65536)")                         \
    for (int64_t r = r0; r < r1; r++) T##_deq_row(raw + r * row_bytes, K / QK, out + (r - r0) * K);  \
}                                                                                                    \
void T##_gather_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, const int32_t *ids,          \
                     int64_t n, float *out) {                                                        \
    _Pragma("omp parallel for schedule(static) if (n * K > 65536)")                                 \
    for (int64_t i = 0; i < n; i++) T##_deq_row(raw + (int64_t)ids[i] * row_bytes, K / QK, out + i * K); \
}                                                                                                    \
void T##_gemv_exact(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,                    \
                    const float *x, int64_t N, float *out) {                                         \
    _Pragma("omp parallel")                                                                          \
    {                                                                                                \
        float *w = (float *)malloc(sizeof(float) * K);                                               \
        _Pragma("omp for schedule(static)")                                                          \
        for (int64_t r = 0; r < M; r++) {                                                            \
            T##_deq_row(raw + r * row_bytes, K / QK, w);                                             \
            for (int64_t n = 0; n < N; n++) out[n * M + r] = dot_f32(w, x + n * K, K);               \
        }                                                                                            \
        free(w);                                                                                     \
    }                                                                                                \
}                                                                                                    \
void T##_gemv_fast(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,                     \
                   const int8_t *xq, const float *xd, const float *xs16, int64_t N, float *out) {    \
    const int64_t nb = K / QK, nsub = K / S;                                                         \
    _Pragma("omp parallel")                                                                          \
    {                                                                                                \
        int8_t *q = (int8_t *)malloc(K);                                                             \
        float *sc = (float *)malloc(sizeof(float) * 2 * nsub), *mn = sc + nsub;                      \
        _Pragma("omp for schedule(static)")                                                          \
        for (int64_t r = 0; r < M; r++) {                                                            \
            const uint8_t *row = raw + r * row_bytes;                                                \
            for (int64_t b = 0; b < nb; b++)                                                         \
                unpack_##T(row + b * BYTES, q + b * QK, sc + b * (QK / S), mn + b * (QK / S));       \
            for (int64_t n = 0; n < N; n++) {                                                        \
                const int8_t *xn = xq + n * K;                                                       \
                const float *dn = xd + n * (K / 32), *sn = xs16 + n * (K / 16);                      \
                float acc = 0.0f;                                                                    \
                for (int64_t u = 0; u < nsub; u++) {                                                 \
                    const int32_t is = dot_i8(q + u * S, xn + u * S, S);                             \
                    const float xsum = S == 16 ? sn[u] : sn[2 * u] + sn[2 * u + 1];                  \
                    acc += sc[u] * dn[(u * S) / 32] * (float)is + mn[u] * xsum;                      \
                }                                                                                    \
                out[n * M + r] = acc;                                                                \
            }                                                                                        \
        }                                                                                            \
        free(q); free(sc);                                                                           \
    }                                                                                                \
}

DEFINE_KERNELS(q4_0, 32, 32, 18)
DEFINE_KERNELS(q4_1, 32, 32, 20)
DEFINE_KERNELS(q5_0, 32, 32, 22)
DEFINE_KERNELS(q5_1, 32, 32, 24)
DEFINE_KERNELS(q8_0, 32, 32, 34)
DEFINE_KERNELS(q2_k, 256, 16, 84)
DEFINE_KERNELS(q3_k, 256, 16, 110)
DEFINE_KERNELS(q4_k, 256, 32, 144)
DEFINE_KERNELS(q5_k, 256, 32, 176)
DEFINE_KERNELS(q6_k, 256, 16, 210)

/* ---- float weights: F16 and BF16 (F32 goes straight to BLAS) ------------------------------- */

static inline void f16_row(const uint8_t *row, int64_t K, float *w) {
    for (int64_t k = 0; k < K; k++) w[k] = rd16(row + 2 * k);
}

static inline void bf16_row(const uint8_t *row, int64_t K, float *w) {
    for (int64_t k = 0; k < K; k++) {
        uint32_t bits = ((uint32_t)row[2 * k] | ((uint32_t)row[2 * k + 1] << 8)) << 16;
        memcpy(w + k, &bits, 4);
    }
}

#define DEFINE_FLOAT_KERNELS(T)                                                                     \
void T##_dequant_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t r0, int64_t r1,      \
                      float *out) {                                                                  \
    _Pragma("omp parallel for schedule(static) if ((r1 - r0) * K > 65536)")                         \
    for (int64_t r = r0; r < r1; r++) T##_row(raw + r * row_bytes, K, out + (r - r0) * K);           \
}                                                                                                    \
void T##_gather_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, const int32_t *ids,          \
                     int64_t n, float *out) {                                                        \
    _Pragma("omp parallel for schedule(static) if (n * K > 65536)")                                 \
    for (int64_t i = 0; i < n; i++) T##_row(raw + (int64_t)ids[i] * row_bytes, K, out + i * K);      \
}                                                                                                    \
void T##_gemv_exact(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,                    \
                    const float *x, int64_t N, float *out) {                                         \
    _Pragma("omp parallel")                                                                          \
    {                                                                                                \
        float *w = (float *)malloc(sizeof(float) * K);                                               \
        _Pragma("omp for schedule(static)")                                                          \
        for (int64_t r = 0; r < M; r++) {                                                            \
            T##_row(raw + r * row_bytes, K, w);                                                      \
            for (int64_t n = 0; n < N; n++) out[n * M + r] = dot_f32(w, x + n * K, K);               \
        }                                                                                            \
        free(w);                                                                                     \
    }                                                                                                \
}

DEFINE_FLOAT_KERNELS(f16)
DEFINE_FLOAT_KERNELS(bf16)

/* ---- activations: x[N, K] -> int8 per 32 values, their scales, and per-16 sums of d*q -------- */

void quantize_q8(const float *x, int64_t N, int64_t K, int8_t *xq, float *xd, float *xs16) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < K / 32; b++) {
            const float *v = x + n * K + b * 32;
            float amax = 0.0f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t *o = xq + n * K + b * 32;
            int32_t s0 = 0, s1 = 0;
            for (int j = 0; j < 32; j++) {
                o[j] = (int8_t)roundf(v[j] * id);
                if (j < 16) s0 += o[j]; else s1 += o[j];
            }
            xd[n * (K / 32) + b] = d;
            xs16[n * (K / 16) + 2 * b] = d * (float)s0;
            xs16[n * (K / 16) + 2 * b + 1] = d * (float)s1;
        }
}

void set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n > 0 ? n : 1);
#else
    (void)n;
#endif
}

int get_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
