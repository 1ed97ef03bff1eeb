/* The chunked causal scan of linear attention, fused, for the CPU.
 *
 * For one (batch, kv head) row with G query heads sharing its state, chunk by chunk of
 * C tokens (Katharopoulos et al., arXiv:2006.16236, eq. 4-9; the decayed, blocked
 * evaluation of Lightning Attention-2, Qin et al., arXiv:2401.04658, Algorithm 1):
 *
 *   fq = phi(q), fk = phi(k) of the chunk (elu+1, silu or identity)
 *   A  = tril(fq fk^T) * lambda^(i-j)                      the chunk's own scores
 *   o  = A v + (lambda^(i+1) fq) S                          S, z: the state entering the chunk
 *   o /= rowsum(A) + (lambda^(i+1) fq) . z                  (normalised form only)
 *   S  = lambda^C S + (lambda^(C-1-j) fk)^T v,  z = lambda^C z + sum_j lambda^(C-1-j) fk_j
 *
 * with lambda = exp(log_decay) of the row (1 without decay). The chunk's features, scores
 * and the state stay in cache; rows are split over threads. Decay weights below
 * FLT_MIN/FLT_EPSILON are zero and the worker threads flush subnormals, which would slow
 * every product many times over (the same rule as attnlab.core.scan._exp_normal).
 * The same sum in PyTorch is attnlab.core.scan._scan_blocks, which the tests compare.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "simd.h"
#include "threads.h"

enum { FEATURE_IDENTITY = 0, FEATURE_ELU1 = 1, FEATURE_SILU = 2 };

typedef struct {
    const float *q, *k, *v; /* q [rows, g, n, f], k [rows, n, f], v [rows, n, dv] */
    float *out;             /* [rows, g, n, dv] */
    float *s, *z;           /* state in and out: [rows, f, dv], [rows, f] (z NULL: no normaliser) */
    const float *log_decay; /* [rows] or NULL */
    int rows, g, n, f, dv, chunk, feature, threads;
} scan_args;

typedef struct {
    const scan_args *a;
    int first;
    int status;
} scan_worker;

/* dst[rows x f] = phi(src[rows x f]); f a multiple of 16. */
static void feature_map(float *dst, const float *src, int count, int feature) {
    for (int i = 0; i < count; i += 16) {
        v16 x = load16(src + i);
        if (feature == FEATURE_ELU1)
            x = vselect16(x > splat16(0.0f), x + 1.0f, vexp16(x));
        else if (feature == FEATURE_SILU)
            x = x / (1.0f + vexp16(-x));
        store16(dst + i, x);
    }
}

static float decay_weight(double log_w) {
    double w = exp(log_w);
    return w < (double)FLT_MIN / FLT_EPSILON ? 0.0f : (float)w;
}

static void scan_row(const scan_args *a, int row, float *buf) {
    const int n = a->n, f = a->f, dv = a->dv, g = a->g, c = a->chunk;
    const int cp = (c + 15) / 16 * 16; /* chunk rows padded to whole vectors */
    float *fk = buf, *fkt = fk + cp * f, *fkt_out = fkt + f * cp, *vbuf = fkt_out + f * cp;
    float *fq = vbuf + cp * dv, *sc = fq + cp * f, *obuf = sc + cp * cp, *den = obuf + cp * dv;
    float *lam = den + cp;
    float *s = a->s + (size_t)row * f * dv;
    float *z = a->z ? a->z + (size_t)row * f : NULL;
    const int decay = a->log_decay != NULL;
    for (int t = 0; t <= cp; t++) lam[t] = decay ? decay_weight(t * (double)a->log_decay[row]) : 1.0f;

    for (int t0 = 0; t0 < n; t0 += c) {
        const int ct = n - t0 < c ? n - t0 : c;
        const int full = ct == cp;
        feature_map(fk, a->k + ((size_t)row * n + t0) * f, ct * f, a->feature);
        memset(fk + ct * f, 0, sizeof(float) * (cp - ct) * f);
        transpose_rows(fkt, cp, fk, f, cp, cp, f);
        const float *vb = a->v + ((size_t)row * n + t0) * dv;
        if (!full) {
            memcpy(vbuf, vb, sizeof(float) * ct * dv);
            memset(vbuf + ct * dv, 0, sizeof(float) * (cp - ct) * dv);
            vb = vbuf;
        }
        for (int h = 0; h < g; h++) {
            const size_t at = ((size_t)row * g + h) * n + t0;
            feature_map(fq, a->q + at * f, ct * f, a->feature);
            memset(fq + ct * f, 0, sizeof(float) * (cp - ct) * f);
            /* scores, lower triangle only: rows i0..i0+3 need columns j <= i0 + 3 */
            for (int i0 = 0; i0 < cp; i0 += 4) {
                int cols = (i0 + 4 + 15) / 16 * 16;
                gemm_rows4(cols, f, fq + i0 * f, f, fkt, cp, sc + i0 * cp, cp, 0);
                for (int i = i0; i < i0 + 4; i++) {
                    float *row_sc = sc + i * cp, sum = 0.0f;
                    for (int j = 0; j <= i; j++) {
                        row_sc[j] *= lam[i - j];
                        sum += row_sc[j];
                    }
                    for (int j = i + 1; j < cols; j++) row_sc[j] = 0.0f;
                    den[i] = sum;
                }
            }
            float *o = full ? a->out + at * dv : obuf;
            for (int i0 = 0; i0 < cp; i0 += 4)
                gemm_rows4(dv, i0 + 4, sc + i0 * cp, cp, vb, dv, o + i0 * dv, dv, 0);
            if (decay)
                for (int i = 0; i < cp; i++) {
                    v16 w = splat16(lam[i + 1]);
                    for (int e = 0; e < f; e += 16) store16(fq + i * f + e, load16(fq + i * f + e) * w);
                }
            gemm(cp, dv, f, fq, f, s, dv, o, dv, 1);
            if (z) {
                for (int i = 0; i < ct; i++) {
                    v16 acc = splat16(0.0f);
                    for (int e = 0; e < f; e += 16) acc += load16(fq + i * f + e) * load16(z + e);
                    float d = den[i];
                    for (int u = 0; u < 16; u++) d += acc[u];
                    v16 inv = splat16(1.0f / (d > FLT_MIN ? d : FLT_MIN));
                    for (int e = 0; e < dv; e += 16) store16(o + i * dv + e, load16(o + i * dv + e) * inv);
                }
            }
            if (!full) memcpy(a->out + at * dv, obuf, sizeof(float) * ct * dv);
        }
        const float *kt = fkt;
        if (decay) {
            v16 w = splat16(lam[ct]);
            for (int e = 0; e < f * dv; e += 16) store16(s + e, load16(s + e) * w);
            if (z)
                for (int e = 0; e < f; e++) z[e] *= lam[ct];
            for (int e = 0; e < f; e++)
                for (int j = 0; j < cp; j++) fkt_out[e * cp + j] = j < ct ? fkt[e * cp + j] * lam[ct - 1 - j] : 0.0f;
            kt = fkt_out;
        }
        gemm(f, dv, cp, kt, cp, vb, dv, s, dv, 1);
        if (z)
            for (int e = 0; e < f; e++) {
                float sum = 0.0f;
                for (int j = 0; j < ct; j++) sum += kt[e * cp + j];
                z[e] += sum;
            }
    }
}

static void *scan_rows(void *arg) {
    scan_worker *w = arg;
    const scan_args *a = w->a;
    const int cp = (a->chunk + 15) / 16 * 16;
    const size_t floats = (size_t)cp * a->f * 4 + (size_t)cp * a->dv * 2 + (size_t)cp * cp + 2 * cp + 1;
    float *buf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    if (!buf) {
        w->status = 1;
        return NULL;
    }
    const unsigned int csr = attnlab_flush_subnormals();
    for (int row = w->first; row < a->rows; row += a->threads) scan_row(a, row, buf);
    attnlab_restore_subnormals(csr);
    free(buf);
    w->status = 0;
    return NULL;
}

/* Chunked causal linear attention over `rows` independent (batch, kv head) rows, see the
 * top of this file. All arrays are contiguous float32; f and dv multiples of 16,
 * 1 <= chunk <= 256. s (and z) hold the entering state and receive the final one.
 * Returns 0, or a nonzero code: 1 no memory, 2 bad arguments. */
int attnlab_causal_scan(const float *q, const float *k, const float *v, float *out, float *s,
                        float *z, const float *log_decay, int rows, int g, int n, int f, int dv,
                        int chunk, int feature, int threads) {
    if (f % 16 || dv % 16 || f <= 0 || dv <= 0 || chunk < 1 || chunk > 256 || g < 1 || rows < 1 ||
        n < 0 || feature < FEATURE_IDENTITY || feature > FEATURE_SILU)
        return 2;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows;
    scan_args a = {q, k, v, out, s, z, log_decay, rows, g, n, f, dv, chunk, feature, threads};
    scan_worker workers[ATTNLAB_MAX_THREADS];
    if (threads > ATTNLAB_MAX_THREADS) a.threads = threads = ATTNLAB_MAX_THREADS;
    for (int t = 0; t < threads; t++) workers[t] = (scan_worker){&a, t, 0};
    attnlab_run_workers(scan_rows, workers, sizeof workers[0], threads);
    int status = 0;
    for (int t = 0; t < threads; t++)
        if (workers[t].status) status = workers[t].status;
    return status;
}
