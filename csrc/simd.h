/* Shared building blocks of attnlab's compiled CPU kernels.
 *
 * 16-float vectors through GCC's vector extensions (one AVX-512 register in the avx512
 * build, two AVX2 ones in the avx2 baseline, plain SIMD or scalar code in the generic one:
 * the Makefile's NATIVE_ISA_* flags), a vectorised exp, and small
 * row-major matrix products C (+)= A B whose column count is a multiple of 16,
 * computed in register tiles of 4 rows x up to 64 columns. Everything is float32.
 */
#ifndef ATTNLAB_SIMD_H
#define ATTNLAB_SIMD_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16v __attribute__((vector_size(64)));

static inline v16 load16(const float *p) { return *(const v16u *)p; }
static inline void store16(float *p, v16 x) { *(v16u *)p = x; }
/* All lanes x; written out lane by lane, so that GCC broadcasts straight from memory
 * (`(v16){0} + x` compiles to an add and a shuffle on the FMA port: ~20% slower tiles). */
static inline v16 splat16(float x) { return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

/* Lanes of a where m is set (all bits), else of b: C has no ?: on vectors. */
static inline v16 vselect16(i16v m, v16 a, v16 b) {
    return (v16)(((i16v)a & m) | ((i16v)b & ~m));
}
/* Lane-wise maximum and minimum (b where a lane is NaN): one instruction with AVX-512, else a
 * compare and a select. */
static inline v16 vmax16(v16 a, v16 b) {
#ifdef __AVX512F__
    return (v16)_mm512_max_ps((__m512)a, (__m512)b);
#else
    return vselect16(a > b, a, b);
#endif
}
static inline v16 vmin16(v16 a, v16 b) {
#ifdef __AVX512F__
    return (v16)_mm512_min_ps((__m512)a, (__m512)b);
#else
    return vselect16(a < b, a, b);
#endif
}

/* exp(x) to ~2 ulp for x in [-87, 88.7]; smaller x give ~2e-38 (never a subnormal),
 * larger ones ~3.4e38. Range reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor
 * polynomial of e^r, and 2^n built in the exponent bits. */
static inline v16 vexp16(v16 x) {
    const v16 lo = splat16(-87.0f), hi = splat16(88.7f);
    x = vmin16(vmax16(x, lo), hi);
    const v16 magic = splat16(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v16 n = (x * 1.44269504088896341f + magic) - magic;
    v16 r = x - n * 0.693359375f; /* ln2 in two parts: exact high bits, then the rest */
    r = r - n * -2.12194440e-4f;
    v16 p = splat16(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
    v16 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Lanes l and l ^ 8, 4, 2, 1 exchanged (constant masks: one shuffle each). */
#define ATTNLAB_SWAP8(x) __builtin_shuffle(x, (i16v){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7})
#define ATTNLAB_SWAP4(x) __builtin_shuffle(x, (i16v){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11})
#define ATTNLAB_SWAP2(x) __builtin_shuffle(x, (i16v){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13})
#define ATTNLAB_SWAP1(x) __builtin_shuffle(x, (i16v){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14})

/* The sum and the largest of the 16 lanes. */
static inline float hsum16(v16 x) {
    x += ATTNLAB_SWAP8(x);
    x += ATTNLAB_SWAP4(x);
    x += ATTNLAB_SWAP2(x);
    x += ATTNLAB_SWAP1(x);
    return x[0];
}

static inline float hmax16(v16 x) {
    x = vmax16(x, ATTNLAB_SWAP8(x));
    x = vmax16(x, ATTNLAB_SWAP4(x));
    x = vmax16(x, ATTNLAB_SWAP2(x));
    x = vmax16(x, ATTNLAB_SWAP1(x));
    return x[0];
}

/* One step of the transpose: rows i and i + b (i & b == 0) exchange their off-diagonal
 * blocks of b lanes. */
static inline void transpose_stage(v16 r[16], int b, i16v lo, i16v hi) {
    for (int i = 0; i < 16; i++)
        if (!(i & b)) {
            v16 x = r[i], y = r[i + b];
            r[i] = __builtin_shuffle(x, y, lo);
            r[i + b] = __builtin_shuffle(x, y, hi);
        }
}

/* r[0..15] transposed in registers: swap the off-diagonal blocks of 8, then of 4, 2, 1. */
static inline void transpose16x16(v16 r[16]) {
    transpose_stage(r, 8, (i16v){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                    (i16v){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
    transpose_stage(r, 4, (i16v){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                    (i16v){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    transpose_stage(r, 2, (i16v){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                    (i16v){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
    transpose_stage(r, 1, (i16v){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                    (i16v){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

/* dst[e * ldd + j] = src[j * lds + e] for j < rows (zeros for rows .. 16), e < 16. */
static inline void transpose_block16(const float *src, int lds, int rows, float *dst, int ldd) {
    v16 r[16];
    for (int j = 0; j < 16; j++) r[j] = j < rows ? load16(src + (size_t)j * lds) : splat16(0.0f);
    transpose16x16(r);
    for (int e = 0; e < 16; e++) store16(dst + (size_t)e * ldd, r[e]);
}

/* dst[e * ldd + j] = src[j * lds + e] for j < c (a multiple of 16; zeros from j = rows
 * on) and e < d: c tokens' rows transposed, in blocks of 16 x 16. */
static inline void transpose_rows(float *dst, int ldd, const float *src, int lds, int c, int rows,
                                  int d) {
    for (int j0 = 0; j0 < c; j0 += 16) {
        const int r = rows - j0 < 0 ? 0 : rows - j0 < 16 ? rows - j0 : 16;
        const float *sj = src + (size_t)j0 * lds;
        int e0 = 0;
        for (; e0 + 16 <= d; e0 += 16) transpose_block16(sj + e0, lds, r, dst + (size_t)e0 * ldd + j0, ldd);
        for (; e0 < d; e0++)
            for (int j = 0; j < 16; j++) dst[(size_t)e0 * ldd + j0 + j] = j < r ? sj[(size_t)j * lds + e0] : 0.0f;
    }
}

/* Register tiles C[4 x 16*NV] (+)= A B over K, row-major B and C (leading dimensions ldb,
 * ldc); A's element (r, k) is A[AT], AT an expression of r, k and lda:
 * ATTNLAB_ROW_MAJOR (A row-major) or ATTNLAB_TRANSPOSED (A given as its transpose, lda the
 * stride of its rows k). ATTNLAB_TILE(NAME, NV, AT) defines one as a static function. */
#define ATTNLAB_ROW_MAJOR (size_t)r * lda + k
#define ATTNLAB_TRANSPOSED (size_t)k * lda + r
#define ATTNLAB_TILE(NAME, NV, AT)                                                         \
    static inline void NAME(int K, const float *A, int lda, const float *B, int ldb,       \
                            float *C, int ldc, int accumulate) {                           \
        v16 c[4][NV];                                                                      \
        for (int r = 0; r < 4; r++)                                                        \
            for (int u = 0; u < NV; u++)                                                   \
                c[r][u] = accumulate ? load16(C + r * ldc + 16 * u) : splat16(0.0f);       \
        for (int k = 0; k < K; k++) {                                                      \
            v16 b[NV];                                                                     \
            for (int u = 0; u < NV; u++) b[u] = load16(B + (size_t)k * ldb + 16 * u);      \
            for (int r = 0; r < 4; r++) {                                                  \
                v16 a = splat16(A[AT]);                                                    \
                for (int u = 0; u < NV; u++) c[r][u] += a * b[u];                          \
            }                                                                              \
        }                                                                                  \
        for (int r = 0; r < 4; r++)                                                        \
            for (int u = 0; u < NV; u++) store16(C + r * ldc + 16 * u, c[r][u]);           \
    }
ATTNLAB_TILE(tile4x1, 1, ATTNLAB_ROW_MAJOR)
ATTNLAB_TILE(tile4x2, 2, ATTNLAB_ROW_MAJOR)
ATTNLAB_TILE(tile4x3, 3, ATTNLAB_ROW_MAJOR)
ATTNLAB_TILE(tile4x4, 4, ATTNLAB_ROW_MAJOR)

/* C[4 x N] (+)= A[4 x K] B[K x N] for one band of 4 rows, N a multiple of 16. */
static inline void gemm_rows4(int N, int K, const float *A, int lda, const float *B, int ldb,
                              float *C, int ldc, int accumulate) {
    int j = 0;
    for (; j + 64 <= N; j += 64) tile4x4(K, A, lda, B + j, ldb, C + j, ldc, accumulate);
    switch ((N - j) / 16) {
    case 3: tile4x3(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 2: tile4x2(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    case 1: tile4x1(K, A, lda, B + j, ldb, C + j, ldc, accumulate); break;
    default: break;
    }
}

/* C[M x N] (+)= A[M x K] B[K x N]; M a multiple of 4, N a multiple of 16. */
static inline void gemm(int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                        float *C, int ldc, int accumulate) {
    for (int i = 0; i < M; i += 4)
        gemm_rows4(N, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, accumulate);
}

#endif
