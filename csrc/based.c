/* Based, the chunked causal form, fused, for the CPU.
 *
 * Based (Arora et al., "Simple linear attention language models balance the
 * recall-throughput tradeoff", arXiv:2402.18668, sec. 4): keys inside the last W positions
 * of query i get the exact softmax weight e^(s - M), s = q.k scale; keys further back get
 * the 2nd-order Taylor weight (1 + t + t^2/2) e^-M of e^t, t = q~.k~ the projected
 * (d' dims, scale^1/2 folded into the projection) dot product; one normaliser over both,
 * all weights relative to M = max(0, the largest window score) so nothing overflows.
 *
 * Per (batch, kv head) row, chunk by chunk of C query tokens at t0 (G query heads share
 * the row's keys, values and state):
 *   span   the keys t0 - H .. t0 + C - 1 (H = W - 1 rounded up to 16; zeros before 0):
 *          transposed keys, values and projected keys, kept in cache and shifted by C
 *   local  scores of each band of 4 queries over its window columns only; the Taylor
 *          weights of the span's keys beyond the window from the d'-dim projections;
 *          then weights P [C x span] and P V_span (banded: columns up to the band's end)
 *   far    S = sum phi(k)^T v and z = sum phi(k) over the keys before the span,
 *          phi(x) = [1, x, x_a^2 (1/2 for queries), x_a x_b (a < b)] so that
 *          phi(q).phi(k) = 1 + t + t^2/2; read as phi(q) S e^-M, phi(q).z e^-M
 *   out    (P V + phi(q) S e^-M) / (rowsum P + phi(q).z e^-M)
 * and the C keys that leave the span enter S and z. The same sums in PyTorch are
 * attnlab.mechanisms.linear.based.Based._chunked, which the tests compare; the worker
 * threads flush subnormals (they would slow every product many times over).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "simd.h"
#include "threads.h"

typedef struct {
    const float *q, *k, *v; /* q [rows, g, n, d], k [rows, n, d], v [rows, n, dv] */
    const float *pt;        /* the projection transposed [dp4 x d], zero rows after dp */
    float *out;             /* [rows, g, n, dv] */
    int *next_row;          /* the next row a worker takes (rows go to whoever is free) */
    int rows, g, n, d, dv, dp, window, chunk, threads;
    float scale;
} based_args;

typedef struct {
    const based_args *a;
    int status;
} based_worker;

static inline int based_up(int x, int m) { return (x + m - 1) / m * m; }

/* csrc/simd.h's register tiles of 80 columns, and of up to 80 with A given transposed. */
ATTNLAB_TILE(based_nn5, 5, ATTNLAB_ROW_MAJOR)
ATTNLAB_TILE(based_tn1, 1, ATTNLAB_TRANSPOSED)
ATTNLAB_TILE(based_tn2, 2, ATTNLAB_TRANSPOSED)
ATTNLAB_TILE(based_tn3, 3, ATTNLAB_TRANSPOSED)
ATTNLAB_TILE(based_tn4, 4, ATTNLAB_TRANSPOSED)
ATTNLAB_TILE(based_tn5, 5, ATTNLAB_TRANSPOSED)

/* C[4 x N] (+)= A B for one band of 4 rows, N a multiple of 16 (tiles of up to 80
 * columns); tn: A given transposed, the band's rows its columns. */
static inline void based_rows4(int tn, int N, int K, const float *A, int lda, const float *B,
                               int ldb, float *C, int ldc, int accumulate) {
    int j = 0;
    for (; N - j > 80; j += 64)
        (tn ? based_tn4 : tile4x4)(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
    switch ((N - j) / 16) {
    case 5: (tn ? based_tn5 : based_nn5)(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 4: (tn ? based_tn4 : tile4x4)(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 3: (tn ? based_tn3 : tile4x3)(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 2: (tn ? based_tn2 : tile4x2)(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 1: (tn ? based_tn1 : tile4x1)(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    default: break;
    }
}

/* C[M x N] (+)= A B, M a multiple of 4, N of 16; tn: A given transposed, At [K x M]. */
static void based_gemm(int tn, int M, int N, int K, const float *A, int lda, const float *B,
                       int ldb, float *C, int ldc, int accumulate) {
    for (int i = 0; i < M; i += 4)
        based_rows4(tn, N, K, tn ? A + i : A + (size_t)i * lda, lda, B, ldb, C + (size_t)i * ldc,
                    ldc, accumulate);
}

/* The Taylor features of c tokens (c a multiple of 16) as rows ph [F x c], from the
 * projections as rows yt [dp x c] (row stride ldy): 1, y_a, y_a^2 * sq, y_a y_b (a < b);
 * 16 tokens at a time, their projections held in registers. With z (not NULL) also
 * den[j] = phi_j . z, the features' dot product with z, while they are at hand. */
static void taylor_rows(float *ph, int c, const float *yt, int ldy, int dp, float sq,
                        const float *z, float *den) {
    v16 y[dp];
    for (int j = 0; j < c; j += 16) {
        for (int a = 0; a < dp; a++) y[a] = load16(yt + (size_t)a * ldy + j);
        float *col = ph + j;
        v16 dot = splat16(0.0f);
        int e = 0;
#define BASED_EMIT(value)                                                \
    do {                                                                 \
        const v16 v_ = (value);                                          \
        store16(col + (size_t)e * c, v_);                                \
        if (z) dot += v_ * splat16(z[e]);                           \
        e++;                                                             \
    } while (0)
        BASED_EMIT(splat16(1.0f));
        for (int a = 0; a < dp; a++) BASED_EMIT(y[a]);
        for (int a = 0; a < dp; a++) BASED_EMIT(y[a] * y[a] * sq);
        for (int a = 0; a < dp; a++)
            for (int b = a + 1; b < dp; b++) BASED_EMIT(y[a] * y[b]);
#undef BASED_EMIT
        if (z) store16(den + j, dot);
    }
}

/* Rows p0 .. p0 + count of v [n x dv]: in place, or copied into tmp with zeros for the
 * positions before 0 or from n on. */
static const float *based_vrows(const float *v, int n, int dv, int p0, int count, float *tmp) {
    if (p0 >= 0 && p0 + count <= n) return v + (size_t)p0 * dv;
    for (int j = 0; j < count; j++) {
        const int p = p0 + j;
        if (p >= 0 && p < n)
            memcpy(tmp + (size_t)j * dv, v + (size_t)p * dv, sizeof(float) * dv);
        else
            memset(tmp + (size_t)j * dv, 0, sizeof(float) * dv);
    }
    return tmp;
}

/* The weights of a band of 4 query rows whose windows lie wholly at key positions >= 0
 * and span whole vectors (w a multiple of 16, at most 128): row r's window is the w
 * columns from top0 + r - w + 1 to top0 + r (top0 = the first row's last key) and its
 * Taylor columns the ones from jmin to just before. The rows' weights are computed side by
 * side (their maxima, exponentials and sums are independent chains), in place of the
 * scores sc [4 x ld] (Taylor's t in tt), zeros up to kend; the rows of ob (phi(q) S) are
 * scaled by e^-M and den (phi(q).z) becomes the normaliser. A window's scores are read
 * before the Taylor columns, whose last vector reaches into it, are written. */
static inline void band_weights(float *sc, const float *tt, int ld, int top0, int w, int jmin,
                                int kend, float scale, float *den, float *ob, int dv) {
    const int nv = w / 16;
    v16 x[4][8], iota;
    float top[4];
    for (int u = 0; u < 16; u++) iota[u] = (float)u;
    for (int r = 0; r < 4; r++) {
        const float *si = sc + (size_t)r * ld + top0 + r - w + 1;
        v16 mv = splat16(0.0f); /* M = max(0, the window's scores) */
        for (int u = 0; u < nv; u++) {
            x[r][u] = load16(si + 16 * u) * scale;
            mv = vmax16(mv, x[r][u]);
        }
        top[r] = hmax16(mv);
    }
    v16 shrink = splat16(0.0f); /* e^-M of the 4 rows */
    for (int r = 0; r < 4; r++) shrink[r] = -top[r];
    shrink = vexp16(shrink);
    for (int r = 0; r < 4; r++) {
        float *si = sc + (size_t)r * ld;
        const float *ti = tt + (size_t)r * ld;
        const int wlo = top0 + r - w + 1;
        const float fjmin = (float)jmin, fthi = (float)(wlo - 1);
        const v16 half_shrink = splat16(0.5f * shrink[r]);
        v16 sum = splat16(0.0f);
        for (int jb = jmin / 16 * 16; jb < wlo; jb += 16) {
            v16 jj = iota + (float)jb, t = load16(ti + jb) + 1.0f; /* ((1 + t)² + 1)/2 */
            v16 wv = vselect16((jj >= fjmin) & (jj <= fthi), (t * t + 1.0f) * half_shrink, splat16(0.0f));
            store16(si + jb, wv);
            sum += wv;
        }
        for (int u = 0; u < nv; u++) {
            v16 e = vexp16(x[r][u] - top[r]);
            store16(si + wlo + 16 * u, e);
            sum += e;
        }
        for (int j = top0 + r + 1; j < kend; j++) si[j] = 0.0f;
        den[r] = den[r] * shrink[r] + hsum16(sum);
        const v16 sh = splat16(shrink[r]);
        for (int e = 0; e < dv; e += 16) store16(ob + (size_t)r * dv + e, load16(ob + (size_t)r * dv + e) * sh);
    }
}

typedef struct {
    int c, h, span, cap, w, dp4, dp16, f, fp, fp16;
} based_dims;

static based_dims dims_of(const based_args *a) {
    based_dims m;
    m.c = a->chunk;
    m.w = a->window;
    m.h = based_up(m.w - 1, 16);
    m.span = m.h + m.c;
    m.cap = m.span + 4 * m.c; /* the span slides over 5 chunks' columns, then moves back */
    m.dp4 = based_up(a->dp, 4);
    m.dp16 = based_up(a->dp, 16);
    m.f = 1 + a->dp + a->dp * (a->dp + 1) / 2;
    m.fp = based_up(m.f, 4);
    m.fp16 = based_up(m.f, 16);
    return m;
}

static size_t buffer_floats(const based_args *a, based_dims m) {
    return (size_t)a->d * m.cap + (size_t)m.span * a->dv + (size_t)m.dp4 * m.cap +
           2 * (size_t)m.c * a->d + (size_t)m.c * m.dp16 + (size_t)m.fp16 * m.c +
           2 * (size_t)m.c * m.span + (size_t)m.c * a->dv + m.c + (size_t)m.fp * a->dv + m.fp16;
}

static void based_row(const based_args *a, based_dims m, int row, float *buf) {
    const int n = a->n, d = a->d, dv = a->dv, dp = a->dp, g = a->g;
    const int c = m.c, h = m.h, span = m.span, w = m.w, dp16 = m.dp16, f = m.f, fp = m.fp;
    const float scale = a->scale;
    const int cap = m.cap;
    float *kt = buf, *vs = kt + (size_t)d * cap, *ykt = vs + (size_t)span * dv;
    float *qb = ykt + (size_t)m.dp4 * cap, *qt = qb + (size_t)c * d, *yqt = qt + (size_t)c * d;
    float *ph = yqt + (size_t)dp16 * c, *sc = ph + (size_t)m.fp16 * c, *tt = sc + (size_t)c * span;
    float *ob = tt + (size_t)c * span, *den = ob + (size_t)c * dv, *s = den + c, *z = s + (size_t)fp * dv;
    memset(buf, 0, sizeof(float) * buffer_floats(a, m));
    const float *kr = a->k + (size_t)row * n * d, *vr = a->v + (size_t)row * n * dv;
    v16 iota;
    for (int u = 0; u < 16; u++) iota[u] = (float)u;
    const int ncols = based_up(w + 3, 16); /* a band's window columns, whole vectors */
    const int fast = w % 16 == 0 && w <= 128; /* windows of whole vectors (see the weights) */

    int base = 0; /* the span's first column in kt and ykt (row stride cap) */
    for (int t0 = 0; t0 < n; t0 += c) {
        const int ct = n - t0 < c ? n - t0 : c;
        if (t0 > 0) {
            /* the span's first c keys (positions t0 - c - h + j) leave it for the state */
            int first = h + c - t0; /* columns before it are positions < 0: no keys */
            if (first < c) {
                if (first < 0) first = 0;
                taylor_rows(ph, c, ykt + base, cap, dp, 1.0f, NULL, NULL);
                /* z += the rows' sums, 16 at a time, the last rows written first (in L1) */
                for (int e0 = (f - 1) / 16 * 16; e0 >= 0; e0 -= 16) {
                    v16 acc[16];
                    for (int u = 0; u < 16; u++) {
                        acc[u] = load16(ph + (size_t)(e0 + u) * c);
                        for (int j = 16; j < c; j += 16) acc[u] += load16(ph + (size_t)(e0 + u) * c + j);
                    }
                    transpose16x16(acc);
                    for (int u = 1; u < 16; u++) acc[0] += acc[u];
                    store16(z + e0, load16(z + e0) + acc[0]);
                }
                const float *vleft = based_vrows(vr, n, dv, t0 - c - h, c, vs);
                based_gemm(0, fp, dv, c, ph, c, vleft, dv, s, dv, 1);
                z[0] -= (float)first; /* the constant feature of no keys */
            }
            base += c;
            if (base + span > cap) {
                for (int r = 0; r < d; r++)
                    memmove(kt + (size_t)r * cap, kt + (size_t)r * cap + base, sizeof(float) * h);
                for (int r = 0; r < dp; r++)
                    memmove(ykt + (size_t)r * cap, ykt + (size_t)r * cap + base, sizeof(float) * h);
                base = 0;
            }
        }
        float *kb = kt + base, *ykb = ykt + base;
        /* the chunk's keys (transposed), values and projected keys at columns h .. span */
        transpose_rows(kb + h, cap, kr + (size_t)t0 * d, d, c, ct, d);
        const float *vsp = based_vrows(vr, n, dv, t0 - h, span, vs); /* the span's values */
        based_gemm(0, m.dp4, c, d, a->pt, d, kb + h, cap, ykb + h, cap, 0);
        const int jmin = h - t0 > 0 ? h - t0 : 0; /* span columns of positions >= 0 */

        for (int hq = 0; hq < g; hq++) {
            const size_t at = ((size_t)row * g + hq) * n + t0;
            const float *qp = a->q + at * d;
            if (ct < c) {
                memcpy(qb, qp, sizeof(float) * ct * d);
                memset(qb + (size_t)ct * d, 0, sizeof(float) * (c - ct) * d);
                qp = qb;
            }
            /* the projections as rows, yq^T = P^T q^T: the queries transposed, then a product
             * of whole tiles (a product with 16 columns per row keeps too few sums going) */
            transpose_rows(qt, c, qp, d, c, c, d);
            based_gemm(0, m.dp4, c, d, a->pt, d, qt, c, yqt, c, 0);
            taylor_rows(ph, c, yqt, c, dp, 0.5f, z, den); /* phi(q), phi(q).z */
            based_gemm(1, c, dv, f, ph, c, s, dv, ob, dv, 0); /* phi(q) S */
            for (int i0 = 0; i0 < c; i0 += 4) {
                int cs = i0 + h - w + 1;
                if (cs > span - ncols) cs = span - ncols;
                based_rows4(0, ncols, d, qp + (size_t)i0 * d, d, kb + cs, cap, sc + (size_t)i0 * span + cs, span, 0);
                const int te = i0 + h - w + 4; /* Taylor columns of the band: j < te */
                if (te > jmin) {
                    int nt = based_up(te, 16);
                    if (nt > span) nt = span;
                    based_rows4(1, nt, dp, yqt + i0, c, ykb, cap, tt + (size_t)i0 * span, span, 0);
                }
                const int kend = i0 + h + 4; /* the band's keys: columns < kend */
                if (fast && i0 + h - w + 1 >= jmin) {
                    band_weights(sc + (size_t)i0 * span, tt + (size_t)i0 * span, span, i0 + h, w, jmin,
                                 kend, scale, den + i0, ob + (size_t)i0 * dv, dv);
                } else {
                    for (int i = i0; i < i0 + 4; i++) {
                        float *si = sc + (size_t)i * span;
                        const float *ti = tt + (size_t)i * span;
                        const int whi = i + h, thi = i + h - w; /* inclusive ends */
                        const int wlo = i + h - w + 1 > jmin ? i + h - w + 1 : jmin;
                        const float fwlo = (float)wlo, fwhi = (float)whi, fthi = (float)thi;
                        const float fjmin = (float)jmin;
                        v16 mv = splat16(0.0f); /* M = max(0, the window's scores) */
                        for (int jb = wlo / 16 * 16; jb <= whi; jb += 16) {
                            v16 jj = iota + (float)jb;
                            v16 x = load16(si + jb) * scale;
                            mv = vmax16(mv, vselect16((jj >= fwlo) & (jj <= fwhi), x, splat16(0.0f)));
                        }
                        const float top = hmax16(mv);
                        const float shrink = vexp16(splat16(-top))[0]; /* e^-M */
                        const v16 half_shrink = splat16(0.5f * shrink);
                        v16 sum = splat16(0.0f);
                        for (int jb = 0; jb < kend; jb += 16) {
                            v16 jj = iota + (float)jb, wv = splat16(0.0f);
                            if (jb + 15 >= wlo && jb <= whi) {
                                v16 e = vexp16(load16(si + jb) * scale - top);
                                wv = vselect16((jj >= fwlo) & (jj <= fwhi), e, wv);
                            }
                            if (thi >= jmin && jb + 15 >= jmin && jb <= thi) {
                                v16 t = load16(ti + jb) + 1.0f; /* (1 + t + t²/2) = ((1 + t)² + 1)/2 */
                                wv = vselect16((jj >= fjmin) & (jj <= fthi), (t * t + 1.0f) * half_shrink, wv);
                            }
                            store16(si + jb, wv);
                            sum += wv;
                        }
                        den[i] = den[i] * shrink + hsum16(sum);
                        v16 sh = splat16(shrink);
                        for (int e = 0; e < dv; e += 16) store16(ob + (size_t)i * dv + e, load16(ob + (size_t)i * dv + e) * sh);
                    }
                }
                based_rows4(0, dv, kend - jmin, sc + (size_t)i0 * span + jmin, span, vsp + (size_t)jmin * dv, dv,
                           ob + (size_t)i0 * dv, dv, 1);
            }
            float *o = a->out + at * dv;
            for (int i = 0; i < ct; i++) {
                v16 inv = splat16(1.0f / den[i]);
                for (int e = 0; e < dv; e += 16) store16(o + (size_t)i * dv + e, load16(ob + (size_t)i * dv + e) * inv);
            }
        }
    }
}

static void *based_rows(void *arg) {
    based_worker *wk = arg;
    const based_args *a = wk->a;
    const based_dims m = dims_of(a);
    float *buf = aligned_alloc(64, (buffer_floats(a, m) * sizeof(float) + 63) / 64 * 64);
    if (!buf) {
        wk->status = 1;
        return NULL;
    }
    const unsigned int csr = attnlab_flush_subnormals();
    for (int row; (row = __atomic_fetch_add(a->next_row, 1, __ATOMIC_RELAXED)) < a->rows;)
        based_row(a, m, row, buf);
    attnlab_restore_subnormals(csr);
    free(buf);
    wk->status = 0;
    return NULL;
}

/* Based's causal attention over `rows` independent (batch, kv head) rows of n tokens, see
 * the top of this file. proj [d x dp] is the projection to the Taylor map's inputs, scale^1/2
 * included; all arrays contiguous float32; dv a multiple of 16, chunk a multiple of 16 in
 * 16 .. 256, 1 <= dp <= d, window >= 1. Returns 0, or a nonzero code: 1 no memory, 2 bad
 * arguments. */
int attnlab_based(const float *q, const float *k, const float *v, const float *proj, float *out,
                  int rows, int g, int n, int d, int dv, int dp, int window, int chunk, float scale,
                  int threads) {
    if (dv % 16 || dv <= 0 || d <= 0 || dp < 1 || dp > d || window < 1 || chunk % 16 || chunk < 16 ||
        chunk > 256 || g < 1 || rows < 1 || n < 0)
        return 2;
    if (n == 0) return 0;
    if (window > n) window = n; /* keys further back than n - 1 do not exist */
    float *pt = calloc((size_t)based_up(dp, 4) * d, sizeof(float));
    if (!pt) return 1;
    for (int e = 0; e < d; e++)
        for (int u = 0; u < dp; u++) pt[(size_t)u * d + e] = proj[(size_t)e * dp + u];
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows;
    if (threads > ATTNLAB_MAX_THREADS) threads = ATTNLAB_MAX_THREADS;
    int next_row = 0; /* a core busy elsewhere (another runtime's spinning thread) delays
                       * only the rows it takes */
    based_args a = {q, k, v, pt, out, &next_row, rows, g, n, d, dv, dp, window, chunk, threads, scale};
    based_worker workers[ATTNLAB_MAX_THREADS];
    for (int t = 0; t < threads; t++) workers[t] = (based_worker){&a, 0};
    attnlab_run_workers(based_rows, workers, sizeof workers[0], threads);
    int status = 0;
    for (int t = 0; t < threads; t++)
        if (workers[t].status) status = workers[t].status;
    free(pt);
    return status;
}
