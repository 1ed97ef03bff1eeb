/* MoBA, Mixture of Block Attention (Lu et al., arXiv:2502.13189), fused, for the CPU.
 *
 * Keys are cut into blocks of `block` (the last one may be shorter). Query i, at the aligned
 * position p = i + Nk - Nq, owns the key block holding p (clamped into [0, Nk); under the
 * causal rule a query with p < 0 owns none and sees nothing). It attends, with one softmax,
 * to its own block (keys <= p under the causal rule) and to the top_k - 1 blocks with the
 * highest gate q_i . mean(K_j) among the blocks wholly in its past (causal) or all other
 * blocks (non-causal); where at most top_k - 1 blocks are eligible it takes them all. The
 * same selection in PyTorch is attnlab.mechanisms.sparse.moba.moba_select (ties: the lower
 * block index wins here).
 *
 * Per (batch, query head), with the kv head of its group:
 *   1. the gate: block means of K, transposed, times the queries (a GEMM per 64 queries,
 *      causal: only the columns of past blocks), and the top blocks of each query by
 *      repeated vector maxima (the first of equal gates);
 *   2. the queries that chose each key block, as lists (CSR), in query order;
 *   3. key block by key block (its keys transposed once into [D, block], its values read in
 *      place): its own queries, then the queries that chose it, 64 at a time, gathered into
 *      a tile (scaled by scale * log2 e) and taken in bands of 4: S = Q K_j^T (under the
 *      causal rule only the columns the band sees), an online softmax per query in base 2
 *      (running max and sum per query, the running numerator accumulated in the output
 *      rows), then P V_j, all in L1; the next tile's rows are prefetched meanwhile;
 *   4. the division by each query's sum (rows that saw nothing are zero).
 * Heads are split over threads (each with its own scratch, flushing subnormals).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "simd.h"
#include "threads.h"

enum { TILE = 64, GATE_ROWS = 64 };

typedef struct {
    const float *q, *k, *v; /* q [heads, nq, d], k [kv heads, nk, d], v [kv heads, nk, dv] */
    float *out;             /* [heads, nq, dv] */
    int heads, hq, hkv, nq, nk, d, dv, block, top_k, causal, threads;
    int parts; /* each head's queries split in this many ranges (work items) */
    float scale;
} moba_args;

typedef struct {
    const moba_args *a;
    int first;
    int status;
} moba_worker;

/* Per-thread scratch. */
typedef struct {
    int nkb, nkbp, bp, slots;
    float *means_t; /* [d, nkbp]: block means, transposed */
    float *gate;    /* [GATE_ROWS, nkbp] */
    float *qpad;    /* [4, d]: the last rows of the gate when nq % 4 != 0 */
    float *m, *l;   /* [nq]: running max and sum */
    float *kt;      /* [d, bp]: one key block transposed */
    float *qt;      /* [TILE, d]: gathered queries, scaled */
    float *s;       /* [4, bp]: one band's scores, then probabilities */
    float *ot;      /* [4, dv]: one band's P V_j */
    float *alpha;   /* [TILE] */
    int *sel;       /* [nq, slots] */
    int *start;     /* [nkb + 1]: CSR offsets of the lists */
    int *fill;      /* [nkb] */
    int *list;      /* [nq * slots] */
    int *own_lo, *own_hi; /* [nkb]: the queries owning each block */
    int *rows, *cvis;     /* [TILE]: a tile's queries and their visible key counts */
} moba_scratch;

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

/* The block that query i owns (-1: none). */
static int own_block(const moba_args *a, int i) {
    long p = (long)i + a->nk - a->nq;
    if (p < 0) {
        if (a->causal) return -1;
        p = 0;
    }
    if (p > a->nk - 1) p = a->nk - 1;
    return (int)(p / a->block);
}

/* Whether any lane of a comparison is set. */
static inline int any16(i16v m) {
#ifdef __AVX512F__
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#else
    int32_t r = 0;
    for (int u = 0; u < 16; u++) r |= m[u];
    return r != 0;
#endif
}

/* The first set lane of a comparison (16: none). */
static inline int first_lane(i16v m) {
#ifdef __AVX512F__
    const unsigned bits = _mm512_test_epi32_mask((__m512i)m, (__m512i)m);
    return bits ? __builtin_ctz(bits) : 16;
#else
    int u = 0;
    while (u < 16 && !m[u]) u++;
    return u;
#endif
}

/* Gate rows [r0, r0 + rows) of one head, the first `cols` columns: gate = q means^T. */
static void gate_rows(const moba_args *a, moba_scratch *w, const float *q, int r0, int rows, int cols) {
    const int d = a->d, full = rows / 4 * 4, ld = w->nkbp;
    if (full) gemm(full, cols, d, q + (size_t)r0 * d, d, w->means_t, ld, w->gate, ld, 0);
    if (full < rows) {
        memset(w->qpad, 0, sizeof(float) * 4 * d);
        memcpy(w->qpad, q + (size_t)(r0 + full) * d, sizeof(float) * (rows - full) * d);
        gemm(4, cols, d, w->qpad, d, w->means_t, ld, w->gate + (size_t)full * ld, ld, 0);
    }
}

/* Steps 1 and 2 for queries qa..qb-1: each one's other blocks, listed per key block. */
static void select_blocks(const moba_args *a, moba_scratch *w, const float *q, const float *k,
                          int qa, int qb) {
    const int d = a->d, nkb = w->nkb, nkbp = w->nkbp, slots = w->slots;
    for (int j = 0; j < nkb; j++) {
        w->own_lo[j] = qb;
        w->own_hi[j] = 0;
    }
    for (int i = qa; i < qb; i++) {
        int o = own_block(a, i);
        if (o < 0) continue;
        if (i < w->own_lo[o]) w->own_lo[o] = i;
        w->own_hi[o] = i + 1;
    }
    for (int j = 0; j <= nkb; j++) w->start[j] = 0;
    if (slots == 0) return;
    /* block means, transposed: means_t[e, j] */
    memset(w->means_t, 0, sizeof(float) * d * nkbp);
    for (int j = 0; j < nkb; j++) {
        const int k0 = j * a->block, len = a->nk - k0 < a->block ? a->nk - k0 : a->block;
        float *col = w->qt; /* [d] sum, reusing the tile buffer */
        memset(col, 0, sizeof(float) * d);
        for (int t = 0; t < len; t++) {
            const float *row = k + (size_t)(k0 + t) * d;
            for (int e = 0; e < d; e++) col[e] += row[e];
        }
        for (int e = 0; e < d; e++) w->means_t[(size_t)e * nkbp + j] = col[e] / (float)len;
    }
    for (int r0 = qa; r0 < qb; r0 += GATE_ROWS) {
        const int rows = qb - r0 < GATE_ROWS ? qb - r0 : GATE_ROWS;
        /* the gate is read where more blocks are eligible than slots: causal, the blocks
         * before the chunk's last own block (own blocks never decrease) */
        const int last = own_block(a, r0 + rows - 1);
        if ((a->causal ? last : nkb - 1) > slots)
            gate_rows(a, w, q, r0, rows, a->causal ? round_up(last, 16) : nkbp);
        for (int i = r0; i < r0 + rows; i++) {
            int *sel = w->sel + (size_t)i * slots, o = own_block(a, i), n = 0;
            if (o >= 0) {
                const int eligible = a->causal ? o : nkb - 1, end = a->causal ? o : nkb;
                float *g = w->gate + (size_t)(i - r0) * nkbp;
                if (eligible <= slots) {
                    for (int j = 0; j < end; j++)
                        if (j != o) sel[n++] = j;
                } else {
                    const int endp = round_up(end, 16);
                    for (int j = end; j < endp; j++) g[j] = -INFINITY;
                    if (!a->causal) g[o] = -INFINITY;
                    for (; n < slots; n++) { /* the largest left, the first of equals */
                        v16 vm = load16(g);
                        for (int u = 16; u < endp; u += 16) vm = vmax16(vm, load16(g + u));
                        const v16 top = splat16(hmax16(vm));
                        int j = 0;
                        while (j < endp && !any16(load16(g + j) == top)) j += 16;
                        if (j < endp) j += first_lane(load16(g + j) == top);
                        if (j >= end || j == o) break; /* NaN or infinite gates */
                        sel[n] = j;
                        g[j] = -INFINITY;
                    }
                }
            }
            for (int u = n; u < slots; u++) sel[u] = -1;
            for (int u = 0; u < n; u++) w->start[sel[u] + 1]++;
        }
    }
    for (int j = 0; j < nkb; j++) {
        w->start[j + 1] += w->start[j];
        w->fill[j] = w->start[j];
    }
    for (int i = qa; i < qb; i++)
        for (int u = 0; u < slots; u++) {
            const int j = w->sel[(size_t)i * slots + u];
            if (j >= 0) w->list[w->fill[j]++] = i;
        }
}

/* 2^x for x <= 0 to ~2 ulp; below -126 it gives 2^-126 (never a subnormal). n = round(x),
 * r = x - n in [-1/2, 1/2], 2^r by its degree-6 Taylor polynomial (error < 1.3e-7), 2^n in
 * the exponent bits. Cheaper than vexp16: no upper clamp, no two-part reduction. */
static inline v16 vexp2_16(v16 x) {
    x = vmax16(x, splat16(-126.0f));
    const v16 magic = splat16(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const v16 n = (x + magic) - magic;
    const v16 r = x - n;
    v16 p = splat16(1.5403530393381609e-4f); /* ln2^6 / 6! */
    p = p * r + 1.3333558146428443e-3f;      /* ln2^5 / 5! */
    p = p * r + 9.6181291076284772e-3f;      /* ln2^4 / 4! */
    p = p * r + 5.5504108664821580e-2f;      /* ln2^3 / 3! */
    p = p * r + 2.4022650695910071e-1f;      /* ln2^2 / 2! */
    p = p * r + 6.9314718055994531e-1f;      /* ln2 */
    p = p * r + 1.0f;
    i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
    v16 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The running softmax of rows r0..r0+3 of a tile after their scores s (row stride bp), in
 * base 2 (the queries carry the factor log2 e): s becomes the probabilities 2^(s - m), zero
 * past each row's visible count (up to kmax), and alpha the factor that rescales what was
 * accumulated before. */
static void softmax_band(moba_scratch *w, float *s, int bp, int r0, int rows, int kmax) {
    const i16v lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16 ninf = splat16(-INFINITY);
    for (int r = r0; r < r0 + rows; r++) {
        float *row = s + (size_t)(r - r0) * bp;
        const int c = w->cvis[r], i = w->rows[r], cf = c / 16 * 16;
        const i16v tail = lane < (c - cf);
        v16 vm = ninf;
        for (int u = 0; u < cf; u += 16) vm = vmax16(vm, load16(row + u));
        if (cf < c) vm = vmax16(vm, vselect16(tail, load16(row + cf), ninf));
        const float mx = hmax16(vm), mo = w->m[i], mn = mo > mx ? mo : mx;
        const v16 vmn = splat16(mn);
        v16 vs = splat16(0.0f);
        for (int u = 0; u < cf; u += 16) {
            v16 p = vexp2_16(load16(row + u) - vmn);
            store16(row + u, p);
            vs += p;
        }
        if (cf < c) {
            v16 p = vselect16(tail, vexp2_16(load16(row + cf) - vmn), splat16(0.0f));
            store16(row + cf, p);
            vs += p;
        }
        for (int u = round_up(c, 16); u < kmax; u++) row[u] = 0.0f;
        float sum = 0.0f;
        for (int u = 0; u < 16; u++) sum += vs[u];
        const float al = mo == -INFINITY ? 0.0f : exp2f(mo - mn);
        w->alpha[r] = al;
        w->m[i] = mn;
        w->l[i] = w->l[i] * al + sum;
    }
}

/* One tile: queries w->rows[0..t) attend the first w->cvis[r] keys of the block in w->kt
 * (values vj), merged into the running softmax of each query. Band by band of 4 queries:
 * scores (only the columns the band sees), softmax, P V_j, all in L1. `next`/`nnext`: the
 * queries of the next tile, prefetched. */
static void attend_tile(const moba_args *a, moba_scratch *w, const float *q, const float *vj,
                        float *out, int t, const int *next, int nnext) {
    const int d = a->d, dv = a->dv, bp = w->bp, tp = round_up(t, 4);
    const float scale = a->scale * 1.4426950408889634f; /* log2 e: softmax in base 2 */
    const v16 sc = splat16(scale);
    for (int r = 0; r < t; r++) {
        const float *src = q + (size_t)w->rows[r] * d;
        float *dst = w->qt + (size_t)r * d;
        int e = 0;
        for (; e + 16 <= d; e += 16) store16(dst + e, load16(src + e) * sc);
        for (; e < d; e++) dst[e] = src[e] * scale;
    }
    if (tp > t) memset(w->qt + (size_t)t * d, 0, sizeof(float) * (tp - t) * d);
    const int per_band = (nnext + tp / 4 - 1) / (tp / 4); /* spread over the bands */
    for (int r0 = 0; r0 < t; r0 += 4) {
        const int rows = t - r0 < 4 ? t - r0 : 4;
        const int p0 = r0 / 4 * per_band, p1 = p0 + per_band < nnext ? p0 + per_band : nnext;
        for (int r = p0; r < p1; r++) {
            const char *qn = (const char *)(q + (size_t)next[r] * d);
            const char *on = (const char *)(out + (size_t)next[r] * dv);
            for (int e = 0; e < d * 4; e += 64) __builtin_prefetch(qn + e);
            for (int e = 0; e < dv * 4; e += 64) __builtin_prefetch(on + e, 1);
        }
        int kmax = 0;
        for (int r = r0; r < r0 + rows; r++) kmax = w->cvis[r] > kmax ? w->cvis[r] : kmax;
        gemm_rows4(round_up(kmax, 16), d, w->qt + (size_t)r0 * d, d, w->kt, bp, w->s, bp, 0);
        softmax_band(w, w->s, bp, r0, rows, kmax); /* padding rows: zero queries, zero scores */
        gemm_rows4(dv, kmax, w->s, bp, vj, dv, w->ot, dv, 0);
        for (int r = r0; r < r0 + rows; r++) {
            float *acc = out + (size_t)w->rows[r] * dv;
            const float *o = w->ot + (size_t)(r - r0) * dv;
            if (w->alpha[r] == 0.0f) {
                memcpy(acc, o, sizeof(float) * dv);
                continue;
            }
            const v16 al = splat16(w->alpha[r]);
            for (int e = 0; e < dv; e += 16) store16(acc + e, load16(acc + e) * al + load16(o + e));
        }
    }
}

/* Queries qa..qb-1 of one head. */
static void moba_head(const moba_args *a, moba_scratch *w, int head, int qa, int qb) {
    const int d = a->d, dv = a->dv, nq = a->nq, nk = a->nk, bp = w->bp;
    const int kvh = head / a->hq * a->hkv + head % a->hq / (a->hq / a->hkv);
    const float *q = a->q + (size_t)head * nq * d;
    const float *k = a->k + (size_t)kvh * nk * d, *v = a->v + (size_t)kvh * nk * dv;
    float *out = a->out + (size_t)head * nq * dv;
    select_blocks(a, w, q, k, qa, qb);
    for (int i = qa; i < qb; i++) {
        w->m[i] = -INFINITY;
        w->l[i] = 0.0f;
    }
    for (int j = 0; j < w->nkb; j++) {
        const int k0 = j * a->block, len = nk - k0 < a->block ? nk - k0 : a->block;
        const int lo = w->own_lo[j], hi = w->own_hi[j], others = w->start[j + 1] - w->start[j];
        if (lo >= hi && others == 0) continue;
        transpose_rows(w->kt, bp, k + (size_t)k0 * d, d, round_up(len, 16), len, d);
        const float *vj = v + (size_t)k0 * dv;
        for (int r0 = lo; r0 < hi; r0 += TILE) {
            const int t = hi - r0 < TILE ? hi - r0 : TILE;
            for (int r = 0; r < t; r++) {
                const long vis = (long)(r0 + r) + nk - nq - k0 + 1;
                w->rows[r] = r0 + r;
                w->cvis[r] = a->causal && vis < len ? (int)vis : len;
            }
            attend_tile(a, w, q, vj, out, t, NULL, 0);
        }
        const int *list = w->list + w->start[j];
        for (int r0 = 0; r0 < others; r0 += TILE) {
            const int t = others - r0 < TILE ? others - r0 : TILE;
            for (int r = 0; r < t; r++) {
                w->rows[r] = list[r0 + r];
                w->cvis[r] = len;
            }
            const int nn = others - r0 - t < TILE ? others - r0 - t : TILE;
            attend_tile(a, w, q, vj, out, t, list + r0 + t, nn);
        }
    }
    for (int i = qa; i < qb; i++) {
        float *acc = out + (size_t)i * dv;
        if (w->l[i] > 0.0f) {
            const v16 inv = splat16(1.0f / w->l[i]);
            for (int e = 0; e < dv; e += 16) store16(acc + e, load16(acc + e) * inv);
        } else {
            memset(acc, 0, sizeof(float) * dv);
        }
    }
}

static void *moba_rows(void *arg) {
    moba_worker *wk = arg;
    const moba_args *a = wk->a;
    moba_scratch w;
    w.nkb = (a->nk + a->block - 1) / a->block;
    w.nkbp = round_up(w.nkb, 16);
    w.bp = round_up(a->block < a->nk ? a->block : a->nk, 16);
    w.slots = a->top_k - 1 < w.nkb - 1 ? a->top_k - 1 : w.nkb - 1;
    if (w.slots < 0) w.slots = 0;
    const int d = a->d, dv = a->dv, nq = a->nq;
    const size_t floats = (size_t)d * w.nkbp + (size_t)GATE_ROWS * w.nkbp + 4 * (size_t)d + 2 * (size_t)nq +
                          (size_t)d * w.bp + (size_t)TILE * d + 4 * (size_t)w.bp + 4 * (size_t)dv + TILE;
    const size_t ints = 2 * (size_t)nq * w.slots + 4 * ((size_t)w.nkb + 1) + 2 * TILE;
    float *fbuf = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
    int *ibuf = malloc(ints * sizeof(int));
    if (!fbuf || !ibuf) {
        free(fbuf);
        free(ibuf);
        wk->status = 1;
        return NULL;
    }
    float *f = fbuf;
    w.means_t = f, f += (size_t)d * w.nkbp;
    w.gate = f, f += (size_t)GATE_ROWS * w.nkbp;
    w.qpad = f, f += 4 * (size_t)d;
    w.m = f, f += nq;
    w.l = f, f += nq;
    w.kt = f, f += (size_t)d * w.bp;
    w.qt = f, f += (size_t)TILE * d;
    w.s = f, f += 4 * (size_t)w.bp;
    w.ot = f, f += 4 * (size_t)dv;
    w.alpha = f;
    int *p = ibuf;
    w.sel = p, p += (size_t)nq * w.slots;
    w.list = p, p += (size_t)nq * w.slots;
    w.start = p, p += w.nkb + 1;
    w.fill = p, p += w.nkb + 1;
    w.own_lo = p, p += w.nkb + 1;
    w.own_hi = p, p += w.nkb + 1;
    w.rows = p, p += TILE;
    w.cvis = p;
    const unsigned int csr = attnlab_flush_subnormals();
    for (int item = wk->first; item < a->heads * a->parts; item += a->threads) {
        const int part = item % a->parts;
        const long nq = a->nq; /* the queries split evenly; under the causal rule the first
                                  ones have fewer eligible blocks, a small imbalance */
        moba_head(a, &w, item / a->parts, (int)(nq * part / a->parts), (int)(nq * (part + 1) / a->parts));
    }
    attnlab_restore_subnormals(csr);
    free(fbuf);
    free(ibuf);
    wk->status = 0;
    return NULL;
}

/* MoBA attention (see the top of this file) over `heads` = batch x hq query heads, kv head
 * of query head h: h / (hq / hkv) within its batch element. All arrays contiguous float32;
 * dv a multiple of 16. Returns 0, or a nonzero code: 1 no memory, 2 bad arguments. */
int attnlab_moba(const float *q, const float *k, const float *v, float *out, int heads, int hq,
                 int hkv, int nq, int nk, int d, int dv, int block, int top_k, int causal,
                 float scale, int threads) {
    if (dv % 16 || dv <= 0 || d <= 0 || heads < 1 || hq < 1 || hkv < 1 || hq % hkv ||
        heads % hq || nq < 1 || nk < 1 || block < 1 || top_k < 1)
        return 2;
    if (threads < 1) threads = 1;
    if (threads > ATTNLAB_MAX_THREADS) threads = ATTNLAB_MAX_THREADS;
    /* work items: heads x parts query ranges, as many per thread (parts = threads / gcd) */
    int g = heads, r = threads;
    while (r) {
        const int t = g % r;
        g = r;
        r = t;
    }
    int parts = threads / g;
    if (parts > nq) parts = nq;
    if (threads > heads * parts) threads = heads * parts;
    moba_args a = {q, k, v, out, heads, hq, hkv, nq, nk, d, dv, block, top_k, causal != 0, threads, parts, scale};
    moba_worker workers[ATTNLAB_MAX_THREADS];
    for (int t = 0; t < threads; t++) workers[t] = (moba_worker){&a, t, 0};
    attnlab_run_workers(moba_rows, workers, sizeof workers[0], threads);
    int status = 0;
    for (int t = 0; t < threads; t++)
        if (workers[t].status) status = workers[t].status;
    return status;
}
