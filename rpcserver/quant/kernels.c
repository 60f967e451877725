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
#include "common.h"

#define MAX_QK 256

/* threads every parallel region uses, whatever thread calls in (omp_set_num_threads would set
 * only the calling thread's count; the node computes on gRPC worker threads) */
static int g_threads = 0;
int llr_num_threads(void) {
#ifdef _OPENMP
    return g_threads > 0 ? g_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

static inline float rd16(const uint8_t *p) { return llr_f16_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

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

/* ---- AVX2: the same blocks, 32 values (a "chunk") at a time in vector registers -------------- *
 * <t>_chunk(block, c, s, m) returns chunk c's 32 quants as signed bytes, with the scale and
 * offset of its two halves (values 0-15 and 16-31): w = s[h] * q + m[h]. The drivers below are
 * shared by every type, as ggml's vec_dot: exact mode converts the chunk to floats and FMAs it
 * with the activations; fast mode multiplies bytes by 8-bit activations (maddubs) and scales the
 * integer sums once per half. Several activation rows share each decoded chunk.            */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1

static inline __m256i nib_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline __m256i nib_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
static inline __m256i shr_bits(__m256i v, int sh, int mask) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(sh)), _mm256_set1_epi8((char)mask));
}
static inline __m256i ld256(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 packed bytes -> 32 nibbles: low nibbles are values 0-15, high nibbles 16-31 */
static inline __m256i nibbles16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (ggml's bytes_from_bits_32) */
static inline __m256i bits32(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

#define SAME(s, m, sv, mv) (s[0] = s[1] = (sv), m[0] = m[1] = (mv))

static inline __m256i q4_0_chunk(const uint8_t *b, int c, float *s, float *m) {
    (void)c; SAME(s, m, rd16(b), 0.0f);
    return _mm256_sub_epi8(nibbles16(b + 2), _mm256_set1_epi8(8));
}
static inline __m256i q4_1_chunk(const uint8_t *b, int c, float *s, float *m) {
    (void)c; SAME(s, m, rd16(b), rd16(b + 2));
    return nibbles16(b + 4);
}
static inline __m256i q5_0_chunk(const uint8_t *b, int c, float *s, float *m) {
    (void)c; SAME(s, m, rd16(b), 0.0f);   /* nib | 0xF0 where the high bit is clear = nib + 16*bit - 16 */
    return _mm256_or_si256(nibbles16(b + 6), _mm256_andnot_si256(bits32(b + 2), _mm256_set1_epi8((char)0xF0)));
}
static inline __m256i q5_1_chunk(const uint8_t *b, int c, float *s, float *m) {
    (void)c; SAME(s, m, rd16(b), rd16(b + 2));
    return _mm256_or_si256(nibbles16(b + 8), _mm256_and_si256(bits32(b + 4), _mm256_set1_epi8(16)));
}
static inline __m256i q8_0_chunk(const uint8_t *b, int c, float *s, float *m) {
    (void)c; SAME(s, m, rd16(b), 0.0f);
    return ld256(b + 2);
}
static inline __m256i q2_k_chunk(const uint8_t *b, int c, float *s, float *m) {
    const float d = rd16(b + 80), dmin = rd16(b + 82);
    for (int h = 0; h < 2; h++) {
        s[h] = d * (float)(b[2 * c + h] & 15);
        m[h] = -(dmin * (float)(b[2 * c + h] >> 4));
    }
    return shr_bits(ld256(b + 16 + (c >> 2) * 32), 2 * (c & 3), 3);
}
static inline __m256i q3_k_chunk(const uint8_t *b, int c, float *s, float *m) {
    const uint8_t *sc = b + 96;
    const float d = rd16(b + 108);
    for (int h = 0; h < 2; h++) {
        const int i = 2 * c + h;
        const int lo = i < 8 ? (sc[i] & 15) : (sc[i - 8] >> 4), hi = (sc[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
        s[h] = d * (float)((lo | (hi << 4)) - 32);
        m[h] = 0.0f;
    }
    const __m256i ql = shr_bits(ld256(b + 32 + (c >> 2) * 32), 2 * (c & 3), 3);
    const __m256i hb = shr_bits(ld256(b), c, 1);   /* q = ql - 4 + 4 * hbit */
    return _mm256_sub_epi8(_mm256_add_epi8(ql, _mm256_slli_epi16(hb, 2)), _mm256_set1_epi8(4));
}
static inline __m256i q4_k_chunk(const uint8_t *b, int c, float *s, float *m) {
    int sc, mn;
    k_scale_min(b + 4, c, &sc, &mn);
    SAME(s, m, rd16(b) * (float)sc, -(rd16(b + 2) * (float)mn));
    const __m256i v = ld256(b + 16 + (c >> 1) * 32);
    return (c & 1) ? nib_hi(v) : nib_lo(v);
}
static inline __m256i q5_k_chunk(const uint8_t *b, int c, float *s, float *m) {
    int sc, mn;
    k_scale_min(b + 4, c, &sc, &mn);
    SAME(s, m, rd16(b) * (float)sc, -(rd16(b + 2) * (float)mn));
    const __m256i v = ld256(b + 48 + (c >> 1) * 32);
    const __m256i hb = shr_bits(ld256(b + 16), c, 1);
    return _mm256_or_si256((c & 1) ? nib_hi(v) : nib_lo(v), _mm256_slli_epi16(hb, 4));
}
static inline __m256i q6_k_chunk(const uint8_t *b, int c, float *s, float *m) {
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = rd16(b + 208);
    s[0] = d * (float)sc[2 * c]; s[1] = d * (float)sc[2 * c + 1]; m[0] = m[1] = 0.0f;
    const __m256i v = ld256(b + (c >> 2) * 64 + (c & 1) * 32);
    const __m256i lo = ((c >> 1) & 1) ? nib_hi(v) : nib_lo(v);
    const __m256i hi = shr_bits(ld256(b + 128 + (c >> 2) * 32), 2 * (c & 3), 3);
    return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
}

/* chunk -> 32 floats w = s * q + m */
static inline void chunk_floats(__m256i q, const float *s, const float *m, __m256 w[4]) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m256 s0 = _mm256_set1_ps(s[0]), s1 = _mm256_set1_ps(s[1]), m0 = _mm256_set1_ps(m[0]), m1 = _mm256_set1_ps(m[1]);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), s0, m0);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), s0, m0);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), s1, m1);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), s1, m1);
}

#if defined(__AVX512F__)
/* the same 32 floats in two 512-bit registers: half the conversions and FMAs */
static inline void halves_floats16(__m128i lo, __m128i hi, const float *s, const float *m, __m512 w[2]) {
    const __m512 s0 = _mm512_set1_ps(s[0]), m0 = _mm512_set1_ps(m[0]);
    const __m512 s1 = s[1] == s[0] ? s0 : _mm512_set1_ps(s[1]), m1 = m[1] == m[0] ? m0 : _mm512_set1_ps(m[1]);
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), s0, m0);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), s1, m1);
}
static inline void chunk_floats16(__m256i q, const float *s, const float *m, __m512 w[2]) {
    halves_floats16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1), s, m, w);
}
/* the types whose halves are 16 bytes apart in memory, or nibbles of one 16-byte load, skip the
 * 256-bit chunk (its insert and extract cost two shuffle-port uops a block) */
#define FLOATS16_FROM_CHUNK(T)                                                                      \
static inline void T##_floats16(const uint8_t *b, int c, float *s, float *m, __m512 w[2]) {         \
    chunk_floats16(T##_chunk(b, c, s, m), s, m, w);                                                  \
}
static inline void nib_halves(const uint8_t *p, int bias, __m128i *lo, __m128i *hi) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), k = _mm_set1_epi8(15), d = _mm_set1_epi8((char)bias);
    *lo = _mm_sub_epi8(_mm_and_si128(v, k), d);
    *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), k), d);
}
static inline void q4_0_floats16(const uint8_t *b, int c, float *s, float *m, __m512 w[2]) {
    (void)c; SAME(s, m, rd16(b), 0.0f);
    __m128i lo, hi;
    nib_halves(b + 2, 8, &lo, &hi);
    halves_floats16(lo, hi, s, m, w);
}
static inline void q4_1_floats16(const uint8_t *b, int c, float *s, float *m, __m512 w[2]) {
    (void)c; SAME(s, m, rd16(b), rd16(b + 2));
    __m128i lo, hi;
    nib_halves(b + 4, 0, &lo, &hi);
    halves_floats16(lo, hi, s, m, w);
}
static inline void q8_0_floats16(const uint8_t *b, int c, float *s, float *m, __m512 w[2]) {
    (void)c; SAME(s, m, rd16(b), 0.0f);
    halves_floats16(_mm_loadu_si128((const __m128i *)(b + 2)), _mm_loadu_si128((const __m128i *)(b + 18)), s, m, w);
}
FLOATS16_FROM_CHUNK(q5_0) FLOATS16_FROM_CHUNK(q5_1) FLOATS16_FROM_CHUNK(q2_k) FLOATS16_FROM_CHUNK(q3_k)
FLOATS16_FROM_CHUNK(q4_k) FLOATS16_FROM_CHUNK(q5_k) FLOATS16_FROM_CHUNK(q6_k)

/* The 32-value types with one f16 scale (and min) at the head of each block: their exact rows take
 * the scales of up to SEG blocks out of the blocks first (scalar loads, 16 conversions in one
 * instruction), so the block loop broadcasts each from memory. The scalar conversion and the
 * register broadcasts it replaces were 4 of the ~14 shuffle/FP uops a block. Same sums, same
 * order: the results are those of ROW_EXACT_BODY bit for bit. */
#define SEG 64
static inline void q4_0_qhalves(const uint8_t *b, __m128i *lo, __m128i *hi) { nib_halves(b + 2, 8, lo, hi); }
static inline void q4_1_qhalves(const uint8_t *b, __m128i *lo, __m128i *hi) { nib_halves(b + 4, 0, lo, hi); }
static inline void q8_0_qhalves(const uint8_t *b, __m128i *lo, __m128i *hi) {
    *lo = _mm_loadu_si128((const __m128i *)(b + 2));
    *hi = _mm_loadu_si128((const __m128i *)(b + 18));
}
static inline void q5_0_qhalves(const uint8_t *b, __m128i *lo, __m128i *hi) {
    const __m256i q = _mm256_or_si256(nibbles16(b + 6), _mm256_andnot_si256(bits32(b + 2), _mm256_set1_epi8((char)0xF0)));
    *lo = _mm256_castsi256_si128(q); *hi = _mm256_extracti128_si256(q, 1);
}
static inline void q5_1_qhalves(const uint8_t *b, __m128i *lo, __m128i *hi) {
    const __m256i q = _mm256_or_si256(nibbles16(b + 8), _mm256_and_si256(bits32(b + 4), _mm256_set1_epi8(16)));
    *lo = _mm256_castsi256_si128(q); *hi = _mm256_extracti128_si256(q, 1);
}
#define NO_QHALVES(T) static inline void T##_qhalves(const uint8_t *b, __m128i *lo, __m128i *hi) { (void)b; (void)lo; (void)hi; }
NO_QHALVES(q2_k) NO_QHALVES(q3_k) NO_QHALVES(q4_k) NO_QHALVES(q5_k) NO_QHALVES(q6_k)
/* -1: not a simple type; else the byte offset of the block's min (0: no min) */
enum { q4_0_SIMPLE = 0, q4_1_SIMPLE = 2, q5_0_SIMPLE = 0, q5_1_SIMPLE = 2, q8_0_SIMPLE = 0,
       q2_k_SIMPLE = -1, q3_k_SIMPLE = -1, q4_k_SIMPLE = -1, q5_k_SIMPLE = -1, q6_k_SIMPLE = -1 };

/* scales (and mins) of blocks [b0, b0 + n) of R rows as floats: sc[r * SEG + i]. Sixteen blocks
 * at a time: one gather of their first 4 bytes (scale, and the min where it follows), two
 * conversions; lanes past n are not read. */
static inline void simple_scales(const uint8_t *row, int64_t row_bytes, int64_t bytes, int moff, int R,
                                 int64_t b0, int64_t n, float *sc, float *mn) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32((int)bytes));
    for (int r = 0; r < R; r++) {
        const uint8_t *p = row + r * row_bytes + b0 * bytes;
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, idx, p + i * bytes, 1);
            _mm512_storeu_ps(sc + r * SEG + i, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)));
            if (moff == 2)
                _mm512_storeu_ps(mn + r * SEG + i, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16))));
            else
                _mm512_storeu_ps(mn + r * SEG + i, _mm512_setzero_ps());
        }
    }
}
#define ROW_EXACT_SIMPLE_BODY(T, BYTES)                                                              \
    __m512 acc[4][8], acc2[4][8];                                                                    \
    for (int r = 0; r < R; r++)                                                                      \
        for (int i = 0; i < nr; i++) acc[r][i] = acc2[r][i] = _mm512_setzero_ps();                   \
    float sc[4 * SEG], mn[4 * SEG];                                                                  \
    for (int64_t b0 = 0; b0 < nb; b0 += SEG) {                                                       \
        const int64_t n = nb - b0 < SEG ? nb - b0 : SEG;                                             \
        simple_scales(row, row_bytes, BYTES, T##_SIMPLE, R, b0, n, sc, mn);                          \
        for (int64_t bi = 0; bi < n; bi++) {                                                         \
            const int64_t b = b0 + bi, k = b * 32;                                                   \
            for (int r = 0; r < R; r++) {                                                            \
                __m128i lo, hi;                                                                      \
                T##_qhalves(row + r * row_bytes + b * BYTES, &lo, &hi);                              \
                const __m512 s0 = _mm512_set1_ps(sc[r * SEG + bi]), m0 = _mm512_set1_ps(mn[r * SEG + bi]); \
                const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), s0, m0); \
                const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), s0, m0); \
                for (int i = 0; i < nr; i++) {                                                       \
                    acc[r][i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr[i] + k), acc[r][i]);          \
                    acc2[r][i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr[i] + k + 16), acc2[r][i]);   \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    for (int r = 0; r < R; r++)                                                                      \
        for (int i = 0; i < nr; i++) res[r * 8 + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i], acc2[r][i]));
#endif

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* 32 unsigned weight bytes . 32 signed activation bytes -> 8 int32 lanes (lanes 0-3: values
 * 0-15, lanes 4-7: values 16-31): one VNNI instruction where the CPU has it, else maddubs + madd */
static inline __m256i dot32_u8i8(__m256i u, __m256i x) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

/* The exact body: R weight rows (stride row_bytes) by nr activation rows, res[r * 8 + i]. Each
 * (weight row, activation row) pair has two accumulators, for values 0-15 and 16-31 of a chunk:
 * two independent FMA chains. A row's sums are in the same order whatever R and nr are, so a
 * result never depends on which rows were computed together. */
#if defined(__AVX512F__)
#define ROW_EXACT_BODY(T, QK, BYTES)                                                                \
    __m512 acc[4][8], acc2[4][8];                                                                    \
    for (int r = 0; r < R; r++)                                                                      \
        for (int i = 0; i < nr; i++) acc[r][i] = acc2[r][i] = _mm512_setzero_ps();                   \
    float s[2], m[2]; __m512 w[2];                                                                   \
    for (int64_t b = 0; b < nb; b++)                                                                 \
        for (int c = 0; c < QK / 32; c++) {                                                          \
            const int64_t k = b * QK + c * 32;                                                       \
            for (int r = 0; r < R; r++) {                                                            \
                T##_floats16(row + r * row_bytes + b * BYTES, c, s, m, w);                           \
                for (int i = 0; i < nr; i++) {                                                       \
                    acc[r][i] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr[i] + k), acc[r][i]);        \
                    acc2[r][i] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr[i] + k + 16), acc2[r][i]); \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    for (int r = 0; r < R; r++)                                                                      \
        for (int i = 0; i < nr; i++) res[r * 8 + i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i], acc2[r][i]));
#else
#define ROW_EXACT_BODY(T, QK, BYTES)                                                                \
    __m256 acc[4][8], acc2[4][8];                                                                    \
    for (int r = 0; r < R; r++)                                                                      \
        for (int i = 0; i < nr; i++) acc[r][i] = acc2[r][i] = _mm256_setzero_ps();                   \
    float s[2], m[2]; __m256 w[4];                                                                   \
    for (int64_t b = 0; b < nb; b++)                                                                 \
        for (int c = 0; c < QK / 32; c++) {                                                          \
            const int64_t k = b * QK + c * 32;                                                       \
            for (int r = 0; r < R; r++) {                                                            \
                chunk_floats(T##_chunk(row + r * row_bytes + b * BYTES, c, s, m), s, m, w);          \
                for (int i = 0; i < nr; i++) {                                                       \
                    acc[r][i] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xr[i] + k), acc[r][i]);        \
                    acc2[r][i] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xr[i] + k + 16), acc2[r][i]); \
                    acc[r][i] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xr[i] + k + 8), acc[r][i]);    \
                    acc2[r][i] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xr[i] + k + 24), acc2[r][i]); \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    for (int r = 0; r < R; r++)                                                                      \
        for (int i = 0; i < nr; i++) res[r * 8 + i] = hsum8(_mm256_add_ps(acc[r][i], acc2[r][i]));
#endif

/* below this many multiply-adds a matmul stays on the calling thread (measured: a 192x576 matvec
 * took as long on two threads as on one) */
#define GEMV_PAR_WORK 200000

/* The body of both drivers for `nr` activation rows at once (called with a constant nr: 1 or 4,
 * so the compiler keeps the accumulators in registers). */
#if defined(__AVX512F__)
#define EXACT_DISPATCH(T, QK, BYTES)                                                                \
    if (T##_SIMPLE >= 0) { ROW_EXACT_SIMPLE_BODY(T, BYTES) } else { ROW_EXACT_BODY(T, QK, BYTES) }
#else
#define EXACT_DISPATCH(T, QK, BYTES) ROW_EXACT_BODY(T, QK, BYTES)
#endif
#define AVX2_ROW_BODIES(T, QK, BYTES, BIAS, HALVES_SAME)                                            \
static inline __attribute__((always_inline)) void T##_row_exact(                                    \
        const uint8_t *row, int64_t row_bytes, int64_t nb, const float *const *xr, const int nr,     \
        const int R, float *res) {                                                                   \
    EXACT_DISPATCH(T, QK, BYTES)                                                                     \
}                                                                                                    \
static inline __attribute__((always_inline)) void T##_row_fast(                                     \
        const uint8_t *row, int64_t nb, const int8_t *const *xq, const float *const *xd,             \
        const float *const *xs, const int nr, float *res) {                                          \
    /* u = q + BIAS >= 0 is what the byte dot takes; the bias moves into the offsets: */            \
    /* w = s*u + (m - s*BIAS), and the offset term needs only each half's activation sum. */         \
    /* Even and odd chunks go to separate accumulators: two independent FMA chains a row. */        \
    __m256 acc[2][4];                                                                                \
    float macc[2][4];                                                                                \
    for (int e = 0; e < 2; e++)                                                                      \
        for (int i = 0; i < 4; i++) { acc[e][i] = _mm256_setzero_ps(); macc[e][i] = 0.0f; }          \
    const int64_t nkb = nb * (QK / 32);                                                              \
    for (int64_t kb0 = 0; kb0 < nkb; kb0 += 2)                                                       \
        for (int e = 0; e < 2 && kb0 + e < nkb; e++) {                                               \
            const int64_t kb = kb0 + e;                                                              \
            float s[2], m[2];                                                                        \
            const __m256i u = _mm256_add_epi8(T##_chunk(row + (kb / (QK / 32)) * BYTES, (int)(kb % (QK / 32)), s, m), \
                                              _mm256_set1_epi8((char)BIAS));                         \
            const float m0 = m[0] - s[0] * (float)BIAS, m1 = m[1] - s[1] * (float)BIAS;              \
            for (int i = 0; i < nr; i++) {                                                           \
                const __m256i p = dot32_u8i8(u, ld256((const uint8_t *)(xq[i] + 32 * kb)));          \
                const float d = xd[i][kb];                                                           \
                if (HALVES_SAME) {   /* one scale for the 32 values: no per-half vector */           \
                    acc[e][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s[0] * d), acc[e][i]); \
                    macc[e][i] += m0 * (xs[i][2 * kb] + xs[i][2 * kb + 1]);                          \
                } else {                                                                             \
                    const __m256 sv = _mm256_set_m128(_mm_set1_ps(s[1] * d), _mm_set1_ps(s[0] * d)); \
                    acc[e][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, acc[e][i]);               \
                    macc[e][i] += m0 * xs[i][2 * kb] + m1 * xs[i][2 * kb + 1];                       \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    for (int i = 0; i < nr; i++) res[i] = hsum8(_mm256_add_ps(acc[0][i], acc[1][i])) + (macc[0][i] + macc[1][i]); \
}

#define EXACT_GROUP 16
/* rows [r0, r1) of one weight by all N activation rows: up to 8 activation rows per pass, and for
 * 1-4 of them 4 or 2 weight rows at once (a short row's fixed costs shared, each x load reused) */
#define T_EXACT_RANGE(T, NR, RR)                                                                    \
    do {                                                                                             \
        int64_t r = r0;                                                                              \
        for (; r + RR <= r1; r += RR) {                                                              \
            T##_row_exact(raw + r * row_bytes, row_bytes, nb, xr, NR, RR, res);                      \
            for (int rr = 0; rr < RR; rr++)                                                          \
                for (int i = 0; i < NR; i++) out[(n + i) * ldo + r + rr] = res[rr * 8 + i];          \
        }                                                                                            \
        for (; r < r1; r++) {                                                                        \
            T##_row_exact(raw + r * row_bytes, row_bytes, nb, xr, NR, 1, res);                       \
            for (int i = 0; i < NR; i++) out[(n + i) * ldo + r] = res[i];                            \
        }                                                                                            \
    } while (0)
#define DEFINE_EXACT_RANGE(T)                                                                       \
static void T##_exact_range(const uint8_t *raw, int64_t row_bytes, int64_t nb, int64_t K, const float *x, \
                            int64_t N, float *out, int64_t ldo, int64_t r0, int64_t r1) {            \
    float res[4 * 8];                                                                                \
    for (int64_t n = 0; n < N; n += 8) {                                                             \
        const int64_t nr = N - n < 8 ? N - n : 8;                                                    \
        const float *xr[8];                                                                          \
        for (int64_t i = 0; i < 8; i++) xr[i] = x + (n + (i < nr ? i : 0)) * K;                      \
        switch (nr) {                                                                                \
            case 1: T_EXACT_RANGE(T, 1, 4); break;                                                   \
            case 2: T_EXACT_RANGE(T, 2, 4); break;                                                   \
            case 3: T_EXACT_RANGE(T, 3, 2); break;                                                   \
            case 4: T_EXACT_RANGE(T, 4, 2); break;                                                   \
            case 5: T_EXACT_RANGE(T, 5, 1); break;                                                   \
            case 6: T_EXACT_RANGE(T, 6, 1); break;                                                   \
            case 7: T_EXACT_RANGE(T, 7, 1); break;                                                   \
            default: T_EXACT_RANGE(T, 8, 1); break;                                                  \
        }                                                                                            \
    }                                                                                                \
}

#define DEFINE_AVX2_KERNELS(T, QK, BYTES, BIAS, HALVES_SAME)                                        \
AVX2_ROW_BODIES(T, QK, BYTES, BIAS, HALVES_SAME)                                                     \
static inline void T##_deq_row_avx2(const uint8_t *row, int64_t nb, float *w) {                     \
    float s[2], m[2]; __m256 v[4];                                                                   \
    for (int64_t b = 0; b < nb; b++)                                                                 \
        for (int c = 0; c < QK / 32; c++) {                                                          \
            chunk_floats(T##_chunk(row + b * BYTES, c, s, m), s, m, v);                              \
            float *o = w + b * QK + c * 32;                                                          \
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + 8 * i, v[i]);                           \
        }                                                                                            \
}                                                                                                    \
DEFINE_EXACT_RANGE(T)                                                                                \
/* the parallel loops hand out groups of EXACT_GROUP rows */                                         \
static void T##_gemv_exact_avx2(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,        \
                                const float *x, int64_t N, float *out) {                             \
    const int64_t nb = K / QK, ng = (M + EXACT_GROUP - 1) / EXACT_GROUP;                             \
    _Pragma("omp parallel for schedule(static) if (M * K * N > GEMV_PAR_WORK) num_threads(llr_num_threads())") \
    for (int64_t g = 0; g < ng; g++) {                                                               \
        const int64_t r0 = g * EXACT_GROUP, r1 = r0 + EXACT_GROUP < M ? r0 + EXACT_GROUP : M;        \
        T##_exact_range(raw, row_bytes, nb, K, x, N, out, M, r0, r1);                                \
    }                                                                                                \
}                                                                                                    \
/* several weights of this type by the same x in one parallel region (q/k/v, gate/up) */            \
static void T##_gemv_exact_multi_avx2(int64_t nw, const uint8_t *const *raws, const int64_t *ms,     \
                                      int64_t row_bytes, int64_t K, const float *x, int64_t N,       \
                                      float *const *outs) {                                          \
    const int64_t nb = K / QK;                                                                       \
    int64_t total = 0, ng = 0;                                                                       \
    for (int64_t w = 0; w < nw; w++) { total += ms[w]; ng += (ms[w] + EXACT_GROUP - 1) / EXACT_GROUP; } \
    _Pragma("omp parallel for schedule(static) if (total * K * N > GEMV_PAR_WORK) num_threads(llr_num_threads())") \
    for (int64_t g = 0; g < ng; g++) {                                                               \
        int64_t w = 0, h = g;                                                                        \
        while (h >= (ms[w] + EXACT_GROUP - 1) / EXACT_GROUP) h -= (ms[w++] + EXACT_GROUP - 1) / EXACT_GROUP; \
        const int64_t r0 = h * EXACT_GROUP, r1 = r0 + EXACT_GROUP < ms[w] ? r0 + EXACT_GROUP : ms[w]; \
        T##_exact_range(raws[w], row_bytes, nb, K, x, N, outs[w], ms[w], r0, r1);                    \
    }                                                                                                \
}                                                                                                    \
static void T##_gemv_fast_avx2(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,         \
                               const int8_t *xq, const float *xd, const float *xs16, int64_t N,      \
                               float *out) {                                                         \
    const int64_t nb = K / QK;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(llr_num_threads())")                                                     \
    for (int64_t r = 0; r < M; r++) {                                                                \
        const uint8_t *row = raw + r * row_bytes;                                                    \
        float res[4];                                                                                \
        int64_t n = 0;                                                                               \
        for (; n + 4 <= N; n += 4) {                                                                 \
            const int8_t *q[4]; const float *d[4], *s[4];                                            \
            for (int i = 0; i < 4; i++) {                                                            \
                q[i] = xq + (n + i) * K; d[i] = xd + (n + i) * (K / 32); s[i] = xs16 + (n + i) * (K / 16); \
            }                                                                                        \
            T##_row_fast(row, nb, q, d, s, 4, res);                                                  \
            for (int i = 0; i < 4; i++) out[(n + i) * M + r] = res[i];                               \
        }                                                                                            \
        const int64_t rem = N - n;                                                                   \
        if (rem) {                                                                                   \
            const int8_t *q[4]; const float *d[4], *s[4];                                            \
            for (int64_t i = 0; i < 4; i++) {                                                        \
                const int64_t j = n + (i < rem ? i : 0);                                             \
                q[i] = xq + j * K; d[i] = xd + j * (K / 32); s[i] = xs16 + j * (K / 16);             \
            }                                                                                        \
            if (rem == 1) T##_row_fast(row, nb, q, d, s, 1, res);                                    \
            else if (rem == 2) T##_row_fast(row, nb, q, d, s, 2, res);                               \
            else T##_row_fast(row, nb, q, d, s, 3, res);                                             \
            for (int64_t i = 0; i < rem; i++) out[(n + i) * M + r] = res[i];                         \
        }                                                                                            \
    }                                                                                                \
}

DEFINE_AVX2_KERNELS(q4_0, 32, 18, 8, 1)
DEFINE_AVX2_KERNELS(q4_1, 32, 20, 0, 1)
DEFINE_AVX2_KERNELS(q5_0, 32, 22, 16, 1)
DEFINE_AVX2_KERNELS(q5_1, 32, 24, 0, 1)
DEFINE_AVX2_KERNELS(q8_0, 32, 34, 128, 1)
DEFINE_AVX2_KERNELS(q2_k, 256, 84, 0, 0)
DEFINE_AVX2_KERNELS(q3_k, 256, 110, 4, 0)
DEFINE_AVX2_KERNELS(q4_k, 256, 144, 0, 1)
DEFINE_AVX2_KERNELS(q5_k, 256, 176, 0, 1)
DEFINE_AVX2_KERNELS(q6_k, 256, 210, 32, 0)
#endif

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

#ifdef HAVE_AVX2
#define AVX2_OR(call) do { call; return; } while (0)
#else
#define AVX2_OR(call) do { } while (0)
#endif

#define DEFINE_KERNELS(T, QK, S, BYTES)                                                             \
static inline void T##_deq_row(const uint8_t *row, int64_t nb, float *w) {                          \
    AVX2_OR(T##_deq_row_avx2(row, nb, w));                                                           \
    int8_t q[QK]; float sc[QK / S], mn[QK / S];                                                      \
    for (int64_t b = 0; b < nb; b++) {                                                               \
        unpack_##T(row + b * BYTES, q, sc, mn);                                                      \
        deq_block(q, sc, mn, QK, S, w + b * QK);                                                     \
    }                                                                                                \
}                                                                                                    \
void T##_dequant_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t r0, int64_t r1,      \
                      float *out) {                                                                  \
    _Pragma("omp parallel for schedule(static) if ((r1 - r0) * K > 65536) num_threads(llr_num_threads())")                         \
    for (int64_t r = r0; r < r1; r++) T##_deq_row(raw + r * row_bytes, K / QK, out + (r - r0) * K);  \
}                                                                                                    \
void T##_gather_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, const int32_t *ids,          \
                     int64_t n, float *out) {                                                        \
    _Pragma("omp parallel for schedule(static) if (n * K > 65536) num_threads(llr_num_threads())")                                 \
    for (int64_t i = 0; i < n; i++) T##_deq_row(raw + (int64_t)ids[i] * row_bytes, K / QK, out + i * K); \
}                                                                                                    \
void T##_gemv_exact(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,                    \
                    const float *x, int64_t N, float *out) {                                         \
    AVX2_OR(T##_gemv_exact_avx2(raw, row_bytes, K, M, x, N, out));                                   \
    _Pragma("omp parallel num_threads(llr_num_threads())")                                                                          \
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
void T##_gemv_exact_multi(int64_t nw, const uint8_t *const *raws, const int64_t *ms, int64_t row_bytes, \
                          int64_t K, const float *x, int64_t N, float *const *outs) {                \
    AVX2_OR(T##_gemv_exact_multi_avx2(nw, raws, ms, row_bytes, K, x, N, outs));                      \
    for (int64_t w = 0; w < nw; w++) T##_gemv_exact(raws[w], row_bytes, K, ms[w], x, N, outs[w]);    \
}                                                                                                    \
void T##_gemv_fast(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,                     \
                   const int8_t *xq, const float *xd, const float *xs16, int64_t N, float *out) {    \
    AVX2_OR(T##_gemv_fast_avx2(raw, row_bytes, K, M, xq, xd, xs16, N, out));                         \
    const int64_t nb = K / QK, nsub = K / S;                                                         \
    _Pragma("omp parallel num_threads(llr_num_threads())")                                                                          \
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
    _Pragma("omp parallel for schedule(static) if ((r1 - r0) * K > 65536) num_threads(llr_num_threads())")                         \
    for (int64_t r = r0; r < r1; r++) T##_row(raw + r * row_bytes, K, out + (r - r0) * K);           \
}                                                                                                    \
void T##_gather_rows(const uint8_t *raw, int64_t row_bytes, int64_t K, const int32_t *ids,          \
                     int64_t n, float *out) {                                                        \
    _Pragma("omp parallel for schedule(static) if (n * K > 65536) num_threads(llr_num_threads())")                                 \
    for (int64_t i = 0; i < n; i++) T##_row(raw + (int64_t)ids[i] * row_bytes, K, out + i * K);      \
}                                                                                                    \
void T##_gemv_exact(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M,                    \
                    const float *x, int64_t N, float *out) {                                         \
    _Pragma("omp parallel num_threads(llr_num_threads())")                                                                          \
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

/* ---- large batches: tiles of dequantized rows through BLAS sgemm ----------------------------- *
 * Every thread dequantizes its own tile of weight rows into an L2-sized scratch and multiplies it
 * with the whole activation batch by a single-threaded sgemm (numpy's OpenBLAS, whose address
 * native.py hands over): one pool of threads for all of a node's heavy work, so kernel threads
 * and BLAS threads never compete for the cores.                                               */
typedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                          const float *, int64_t, float, float *, int64_t);
typedef void (*sgemm32_t)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                          float, float *, int);
typedef void (*blas_threads_t)(int);
static void *g_sgemm = NULL;
static int g_ilp64 = 0;
static blas_threads_t g_blas_local_threads = NULL;

void set_blas(void *sgemm, int ilp64, void *local_threads) {
    g_sgemm = sgemm;
    g_ilp64 = ilp64;
    g_blas_local_threads = (blas_threads_t)local_threads;
}

#define K_SLICE 256
static void sgemm_nt(int64_t n, int64_t r, int64_t k, const float *x, const float *t, float *out, int64_t ldc) {
    /* out[n, r] (row stride ldc) = x[n, k] . t[r, k]^T ; CblasRowMajor, NoTrans, Trans. K goes in
     * slices added up one after another: BLAS sums each output along K in one running sum, which
     * rounds twice as badly as the gemv kernels' lane-wise sums (measured); slices keep the batch
     * path as accurate as decode, so a prompt and its tokens one by one give the same logits. */
    for (int64_t k0 = 0; k0 < k; k0 += K_SLICE) {
        const int64_t kc = k - k0 < K_SLICE ? k - k0 : K_SLICE;
        const float beta = k0 ? 1.0f : 0.0f;
        if (g_ilp64)
            ((sgemm64_t)g_sgemm)(101, 111, 112, n, r, kc, 1.0f, x + k0, k, t + k0, k, beta, out, ldc);
        else
            ((sgemm32_t)g_sgemm)(101, 111, 112, (int)n, (int)r, (int)kc, 1.0f, x + k0, (int)k, t + k0, (int)k, beta,
                                 out, (int)ldc);
    }
}

#define DEFINE_GEMM(T, ROW)                                                                         \
int T##_gemm(const uint8_t *raw, int64_t row_bytes, int64_t K, int64_t M, const float *x, int64_t N, \
             float *out, int64_t tile_rows) {                                                        \
    if (!g_sgemm) return -1;                                                                         \
    const int64_t n_tiles = (M + tile_rows - 1) / tile_rows;                                         \
    _Pragma("omp parallel num_threads(llr_num_threads())")                                                                          \
    {                                                                                                \
        if (g_blas_local_threads) g_blas_local_threads(1);                                           \
        float *tile = (float *)malloc(sizeof(float) * tile_rows * K);                                \
        _Pragma("omp for schedule(dynamic, 1)")                                                      \
        for (int64_t t = 0; t < n_tiles; t++) {                                                      \
            const int64_t r0 = t * tile_rows, r1 = r0 + tile_rows < M ? r0 + tile_rows : M;          \
            for (int64_t r = r0; r < r1; r++) ROW(raw + r * row_bytes, K, tile + (r - r0) * K);      \
            sgemm_nt(N, r1 - r0, K, x, tile, out + r0, M);                                           \
        }                                                                                            \
        free(tile);                                                                                  \
    }                                                                                                \
    return 0;                                                                                        \
}
#define QROW(T, QK) static inline void T##_qrow(const uint8_t *row, int64_t K, float *w) { T##_deq_row(row, K / QK, w); }
QROW(q4_0, 32) QROW(q4_1, 32) QROW(q5_0, 32) QROW(q5_1, 32) QROW(q8_0, 32)
QROW(q2_k, 256) QROW(q3_k, 256) QROW(q4_k, 256) QROW(q5_k, 256) QROW(q6_k, 256)
DEFINE_GEMM(q4_0, q4_0_qrow) DEFINE_GEMM(q4_1, q4_1_qrow) DEFINE_GEMM(q5_0, q5_0_qrow)
DEFINE_GEMM(q5_1, q5_1_qrow) DEFINE_GEMM(q8_0, q8_0_qrow) DEFINE_GEMM(q2_k, q2_k_qrow)
DEFINE_GEMM(q3_k, q3_k_qrow) DEFINE_GEMM(q4_k, q4_k_qrow) DEFINE_GEMM(q5_k, q5_k_qrow)
DEFINE_GEMM(q6_k, q6_k_qrow) DEFINE_GEMM(f16, f16_row) DEFINE_GEMM(bf16, bf16_row)

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

void set_threads(int n) { g_threads = n > 0 ? n : 1; }

int get_threads(void) { return llr_num_threads(); }
