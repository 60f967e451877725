/* A run of plan steps executed in one call (``rpcserver/program.py`` builds the records).
 *
 * A decode step is ~400 small kernel calls; through ctypes each costs 5-25 us of Python, more than
 * many of the kernels themselves. A program is the same kernels with every argument resolved
 * once: addresses in a fixed arena, the stored tensors' bytes, the shapes of one signature. The
 * records are int64 fields: [op, n_fields, fields...]. Every kernel called here is the one the
 * step-by-step executor calls for the same step, so both give the same bits.
 *
 * Nothing here trusts a value read at run time: token ids are checked against the table's rows,
 * cache cells by op_attention. Shapes and addresses were checked when the program was built. */
#include <stdint.h>
#include <string.h>

#include "common.h"

int op_attention(const float *q, const float *k, const float *v, void *k_cache, void *v_cache,
                 int64_t kc_stride, int64_t vc_stride, int kc_f16, int vc_f16, int64_t M,
                 const int32_t *cells, const int32_t *tok_pos, const int32_t *tok_seq, int64_t N,
                 const int32_t *kv_pos, const int32_t *kv_seq, int64_t L,
                 int64_t n_head, int64_t n_kv, int64_t D, float scale, int64_t sliding_window, float softcap,
                 float *out);
void op_rope(const float *x, float *out, const int32_t *pos, int64_t N, int64_t width, int64_t head_dim,
             int64_t n_dims, int mode, const double *inv_freq);
void op_rms_norm_mul(const float *x, int64_t N, int64_t K, const float *w, float eps, float *out);
void quantize_q8(const float *x, int64_t N, int64_t K, int8_t *xq, float *xd, float *xs16);
void op_swiglu(const float *g, const float *u, int64_t n, float *out);

enum {
    PR_GEMV = 1,        /* fn, raw, row_bytes, K, M, x, N, out */
    PR_GEMV_MULTI = 2,  /* fn, nw, raws*, ms*, row_bytes, K, x, N, outs* */
    PR_QUANT = 3,       /* x, N, K, xq, xd, xs */
    PR_GEMV_FAST = 4,   /* fn, raw, row_bytes, K, M, xq, xd, xs, N, out */
    PR_ATTENTION = 5,   /* q, k, v, k_cache, v_cache, kc_stride, vc_stride, kc_f16, vc_f16, M, cells, tok_pos,
                           tok_seq, N, kv_pos, kv_seq, L, n_head, n_kv, D, scale (f64 bits), window, softcap, out */
    PR_ROPE = 6,        /* x, out, pos, N, width, head_dim, n_dims, mode, inv_freq */
    PR_RMS = 7,         /* x, N, K, w (0: none), eps (f64 bits), out */
    PR_ADD = 8,         /* a, a_period, b, b_period, n, out: out[i] = a[i % ap] + b[i % bp] */
    PR_MUL = 9,         /* the same with * */
    PR_GATHER = 10,     /* fn, raw, row_bytes, K, rows, ids, n, out */
    PR_SWIGLU = 11,     /* gate, up, n, out */
};

typedef void (*gemv_fn)(const uint8_t *, int64_t, int64_t, int64_t, const float *, int64_t, float *);
typedef void (*multi_fn)(int64_t, const uint8_t *const *, const int64_t *, int64_t, int64_t, const float *, int64_t,
                         float *const *);
typedef void (*fast_fn)(const uint8_t *, int64_t, int64_t, int64_t, const int8_t *, const float *, const float *,
                        int64_t, float *);
typedef void (*gather_fn)(const uint8_t *, int64_t, int64_t, const int32_t *, int64_t, float *);

#define P(i) ((void *)(uintptr_t)f[i])

static inline double as_f64(int64_t bits) {
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* out = a op b where each operand is n values or a row of `period` values repeated (the builder
 * checks that a period divides n) */
static void binary(int op, const float *a, int64_t ap, const float *b, int64_t bp, int64_t n, float *out) {
    if (ap == n && bp == n) {
        if (op == PR_ADD) for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
        else for (int64_t i = 0; i < n; i++) out[i] = a[i] * b[i];
        return;
    }
    const int swap = ap != n;   /* the repeated row is b, or a (both ops commute bit for bit) */
    const float *x = swap ? b : a, *row = swap ? a : b;
    const int64_t w = swap ? ap : bp;
    for (int64_t r = 0; r < n; r += w) {
        if (op == PR_ADD) for (int64_t j = 0; j < w; j++) out[r + j] = x[r + j] + row[j];
        else for (int64_t j = 0; j < w; j++) out[r + j] = x[r + j] * row[j];
    }
}

/* 0 when every record ran; else (index of the failing record + 1) * 16 + a code:
 * 1 a token id outside the table, 2 a cache cell outside the cache, 3 no memory, 4 a bad record */
int64_t run_program(const int64_t *rec, int64_t n_fields) {
    int64_t at = 0, idx = 0;
    while (at < n_fields) {
        const int64_t op = rec[at], nf = rec[at + 1];
        const int64_t *f = rec + at + 2;
        idx++;
        switch (op) {
        case PR_GEMV:
            ((gemv_fn)P(0))(P(1), f[2], f[3], f[4], P(5), f[6], P(7));
            break;
        case PR_GEMV_MULTI:
            ((multi_fn)P(0))(f[1], P(2), P(3), f[4], f[5], P(6), f[7], P(8));
            break;
        case PR_QUANT:
            quantize_q8(P(0), f[1], f[2], P(3), P(4), P(5));
            break;
        case PR_GEMV_FAST:
            ((fast_fn)P(0))(P(1), f[2], f[3], f[4], P(5), P(6), P(7), f[8], P(9));
            break;
        case PR_ATTENTION: {
            const int rc = op_attention(P(0), P(1), P(2), P(3), P(4), f[5], f[6], (int)f[7], (int)f[8], f[9], P(10),
                                        P(11), P(12), f[13], P(14), P(15), f[16], f[17], f[18], f[19],
                                        (float)as_f64(f[20]), f[21], (float)as_f64(f[22]), P(23));
            if (rc == -2) return idx * 16 + 2;
            if (rc) return idx * 16 + 3;
            break;
        }
        case PR_ROPE:
            op_rope(P(0), P(1), P(2), f[3], f[4], f[5], f[6], (int)f[7], P(8));
            break;
        case PR_RMS:
            op_rms_norm_mul(P(0), f[1], f[2], P(3), (float)as_f64(f[4]), P(5));
            break;
        case PR_ADD:
        case PR_MUL:
            binary((int)op, P(0), f[1], P(2), f[3], f[4], P(5));
            break;
        case PR_GATHER: {
            const int32_t *ids = P(5);
            for (int64_t i = 0; i < f[6]; i++)
                if (ids[i] < 0 || ids[i] >= f[4]) return idx * 16 + 1;
            ((gather_fn)P(0))(P(1), f[2], f[3], ids, f[6], P(7));
            break;
        }
        case PR_SWIGLU:
            op_swiglu(P(0), P(1), f[2], P(3));
            break;
        default:
            return idx * 16 + 4;
        }
        at += 2 + nf;
    }
    return 0;
}
