/* y = x @ w.T for a few rows of bfloat16 activations x and a bfloat16 weight w, accumulated in
 * float32 and rounded once; loaded with ctypes by llama/cpu_linear.py, which says when.
 *
 * Decode is bound by reading the weights. torch's bf16 matrix-vector kernel converts both
 * operands for every output row, and its matrix-matrix kernel for a few rows is compute
 * bound on CPUs without native bf16 (AVX2): here the activations are converted once, each
 * weight row once per group of up to 6 activation rows, and R weight rows go through the
 * vector unit together, while the next R rows are prefetched: the hardware prefetchers stop
 * at page boundaries (a 2048-wide bf16 row is one 4 KiB page), and prefetching the next
 * rows raised the rate of a matrix-vector product from torch's 72-86% of a plain read
 * (tensor.sum()) of the same bytes to 101-123% (AMD EPYC, Zen 3, 1 and 2 threads). Threads (OpenMP, the same runtime as torch's:
 * one pool) take blocks of output features. Built with the machine's vector extensions
 * (cpu_linear.py's flags).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f load_bf16(const uint16_t *p) {
    v8h h;
    memcpy(&h, p, sizeof h);
    v8u u = __builtin_convertvector(h, v8u) << 16;
    v8f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline v8f load_f32(const float *p) {
    v8f f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline float sum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch (c10::BFloat16) does; NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* Output features [n0, n1) of M activation rows (x: M x K, row stride K; y: row stride ldy),
 * R weight rows (row stride ldw) at a time; the remainder of K and of the rows one by one. */
#define KERNEL(M, R)                                                                                    \
    static void rows##M(const float *x, int64_t K, const uint16_t *w, int64_t ldw, uint16_t *y, int64_t ldy, \
                        int64_t n0, int64_t n1) {                                                       \
        int64_t k8 = K / 8 * 8, n = n0;                                                                 \
        for (; n + R <= n1; n += R) {                                                                   \
            v8f acc[R][M];                                                                              \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = (v8f){0};                                       \
            for (int64_t k = 0; k < k8; k += 8) {                                                       \
                v8f wv[R];                                                                              \
                for (int r = 0; r < R; r++) wv[r] = load_bf16(w + (n + r) * ldw + k);                   \
                if (k % 32 == 0) /* a cache line of each of the next R rows, at the same column */       \
                    for (int r = 0; r < R; r++) __builtin_prefetch(w + (n + R + r) * ldw + k, 0, 0);    \
                for (int m = 0; m < M; m++) {                                                           \
                    v8f xv = load_f32(x + m * K + k);                                                   \
                    for (int r = 0; r < R; r++) acc[r][m] += wv[r] * xv;                                \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) {                                                           \
                    float s = sum8(acc[r][m]);                                                          \
                    for (int64_t k = k8; k < K; k++) s += bf16_to_f32(w[(n + r) * ldw + k]) * x[m * K + k]; \
                    y[m * ldy + n + r] = f32_to_bf16(s);                                                \
                }                                                                                       \
        }                                                                                               \
        for (; n < n1; n++)                                                                             \
            for (int m = 0; m < M; m++) {                                                               \
                float s = 0;                                                                            \
                for (int64_t k = 0; k < K; k++) s += bf16_to_f32(w[n * ldw + k]) * x[m * K + k];        \
                y[m * ldy + n] = f32_to_bf16(s);                                                       \
            }                                                                                           \
    }

KERNEL(1, 4)
KERNEL(2, 4)
KERNEL(3, 2)
KERNEL(4, 2)
KERNEL(5, 2)
KERNEL(6, 2)

/* Output features per unit of work: whole cache lines of output, a few hundred KiB of weight. */
#define BLOCK_ROWS 64

/* y (M x N) = x (M x K) @ w (N x K, row stride ldw).T, all bfloat16. Returns 0, or -1 if out
 * of memory for the float32 copy of x. */
int bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t ldw, int64_t N, uint16_t *y,
                int threads) {
    float *x32 = malloc((size_t)(M * K) * sizeof(float));
    if (!x32) return -1;
    for (int64_t i = 0; i < M * K; i++) x32[i] = bf16_to_f32(x[i]);
    /* Blocks of output features taken one at a time by whichever thread is free: a thread the
     * OS puts aside (another process wanting the core) delays one block, not a fixed share. */
    int64_t blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * BLOCK_ROWS, n1 = n0 + BLOCK_ROWS < N ? n0 + BLOCK_ROWS : N;
        /* Up to 6 rows of activations in one pass over the weight; 7 and 8 in two (measured:
         * their activations outgrow the L1 cache, and two passes are then faster). */
        for (int64_t m = 0, rows; m < M; m += rows) {
            rows = M - m > 6 ? 4 : M - m;
            const float *xm = x32 + m * K;
            uint16_t *ym = y + m * N;
            switch (rows) {
            case 1: rows1(xm, K, w, ldw, ym, N, n0, n1); break;
            case 2: rows2(xm, K, w, ldw, ym, N, n0, n1); break;
            case 3: rows3(xm, K, w, ldw, ym, N, n0, n1); break;
            case 4: rows4(xm, K, w, ldw, ym, N, n0, n1); break;
            case 5: rows5(xm, K, w, ldw, ym, N, n0, n1); break;
            default: rows6(xm, K, w, ldw, ym, N, n0, n1); break;
            }
        }
    }
    free(x32);
    return 0;
}
