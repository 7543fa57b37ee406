/* y = x @ w.T for a few rows of bfloat16 activations x and a bfloat16 weight w, accumulated in
 * float32 and rounded once, and the same for llama/quantize.py's int8 and int4 weights (their
 * stored layout as it is, below); loaded by llama/cpu_linear.py (which says when) with ctypes, and
 * built together with cpu_ops.cpp, the same as torch operators, where a C++ compiler is found.
 *
 * Decode is bound by reading the weights. torch's bf16 matrix-vector kernel converts both
 * operands for every output row, and its matrix-matrix kernel for a few rows is compute
 * bound on CPUs without native bf16 (AVX2): here the activations are converted once, each
 * weight row once per group of up to 6 activation rows, and R weight rows go through the
 * vector unit together, read as R streams that software prefetching keeps ahead (below): the
 * hardware prefetchers stop at page boundaries, and prefetching raised the rate of a
 * matrix-vector product from torch's 72-86% of a plain read (tensor.sum()) of the same bytes
 * to 101-123% (AMD EPYC, Zen 3, 1 and 2 threads). Threads (OpenMP, the same runtime as
 * torch's: one pool) take blocks of output features. Built with the machine's vector
 * extensions (cpu_linear.py's flags).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Instruction sets: the library is built for the baseline (AVX2 where present: cpu_linear.py's
 * flags), and the AVX-512 kernels beside the AVX2 ones carry their own target attribute, so one
 * build holds both and cpu_linear.py chooses per call (`isa`) from what the CPU has and
 * TP_LLAMA_CPU_ISA. Compilers too old for these targets build the AVX2 kernels alone. */
#if defined(__AVX2__) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define HAVE_AVX512 1
#include <immintrin.h>
#define TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define TARGET_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#else
#define HAVE_AVX512 0
#endif
enum { ISA_AVX2 = 0, ISA_AVX512 = 1 };

/* Whether the AVX-512 kernels were built (the CPU's own support is cpu_linear.py's to check). */
int has_avx512_kernels(void) { return HAVE_AVX512; }

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

/* Element i of p, bfloat16 (bf16) or float32, as float32. */
static inline float element_at(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Round to nearest even, as torch (c10::BFloat16) does; NaN stays NaN. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* Weight rows are read as R streams of memory, one per row of a pass, each walking S consecutive
 * rows (STREAM_BYTES) before moving on: pass p takes rows first(p) + r * S. Each stream
 * prefetches the same column R * S rows (R streams) ahead. The hardware prefetchers stop at page
 * boundaries; measured on int8 rows of 2 KiB (AMD EPYC, Zen 3, 2 threads), streams of one row
 * read at 72-79% of a plain read of the same bytes, streams of 8 KiB at 86-99%. */
#define STREAM_BYTES 8192

/* S: the rows of a stream, if the block [n0, n1) divides into whole passes of such streams
 * (else 1: the R rows of a pass are adjacent). */
static inline int64_t stream_rows(int64_t row_bytes, int64_t rows, int R) {
    int64_t S = row_bytes >= STREAM_BYTES ? 1 : STREAM_BYTES / row_bytes;
    return rows % (R * S) == 0 ? S : 1;
}

/* The first row of pass p (the others S, 2S, ... after it). */
static inline int64_t pass_row(int64_t n0, int64_t p, int R, int64_t S) { return n0 + p / S * R * S + p % S; }

/* Output features [n0, n1) of M activation rows (x: M x K, row stride K; y: row stride ldy),
 * R weight rows (row stride ldw) at a time; the remainder of K and of the rows one by one. */
#define KERNEL(M, R)                                                                                    \
    static void rows##M(const void *xv, int64_t K, const uint16_t *w, int64_t ldw, uint16_t *y, int64_t ldy, \
                        int64_t n0, int64_t n1) {                                                       \
        const float *x = xv;                                                                            \
        int64_t k8 = K / 8 * 8, S = stream_rows(ldw * 2, n1 - n0, R), p = 0;                           \
        for (int64_t n = n0; n + R <= n1; n += R, p++) {                                                \
            int64_t first = pass_row(n0, p, R, S);                                                      \
            const uint16_t *wr[R];                                                                      \
            for (int r = 0; r < R; r++) wr[r] = w + (first + r * S) * ldw;                              \
            v8f acc[R][M];                                                                              \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = (v8f){0};                                       \
            for (int64_t k = 0; k < k8; k += 8) {                                                       \
                v8f wv[R];                                                                              \
                for (int r = 0; r < R; r++) wv[r] = load_bf16(wr[r] + k);                               \
                if (k % 32 == 0) /* a cache line of each stream, R * S rows ahead */                    \
                    for (int r = 0; r < R; r++) __builtin_prefetch(wr[r] + R * S * ldw + k, 0, 0);      \
                for (int m = 0; m < M; m++) {                                                           \
                    v8f xv = load_f32(x + m * K + k);                                                   \
                    for (int r = 0; r < R; r++) acc[r][m] += wv[r] * xv;                                \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) {                                                           \
                    float s = sum8(acc[r][m]);                                                          \
                    for (int64_t k = k8; k < K; k++) s += bf16_to_f32(wr[r][k]) * x[m * K + k];         \
                    y[m * ldy + first + r * S] = f32_to_bf16(s);                                        \
                }                                                                                       \
        }                                                                                               \
        for (int64_t n = n0 + (n1 - n0) / R * R; n < n1; n++)                                           \
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

#if HAVE_AVX512
/* The same with avx512_bf16: vdpbf16ps multiplies 32 bf16 weights by 32 bf16 activations, as
 * they are stored, into 16 float32 sums in one instruction (each product exact, each sum
 * rounded as a float32 FMA's; denormals count as zero), where AVX2 takes 3 instructions per 8;
 * the K % 32 last columns through masked loads (zeros). Rows past n1 repeat a row of the pass
 * and are not stored. Weights are prefetched into L2 (prefetcht1), not with the non-temporal
 * hint: lines fetched a chunk ahead into L1 were evicted before use, as in the int4 kernel
 * (AMD EPYC Zen 4, one thread, a 128 MiB weight: 1 row 21.6 -> 27.6 GB/s, 2 rows 20.0 -> 26.9;
 * a llama3.2-1b decode step 133-136 -> 112-117 ms). */
#define BF16_KERNEL512(M, R)                                                                             \
    TARGET_AVX512_BF16 static void rows512_##M(const void *xv, int64_t K, const uint16_t *w, int64_t ldw,  \
                                              uint16_t *y, int64_t ldy, int64_t n0, int64_t n1) {      \
        const uint16_t *x = xv;                                                                         \
        int64_t k32 = K / 32 * 32, S = stream_rows(ldw * 2, n1 - n0, R), p = 0;                          \
        __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);                                            \
        for (int64_t n = n0; n < n1; n += R, p++) {                                                     \
            int rows = n + R <= n1 ? R : (int)(n1 - n);                                                  \
            int64_t first = pass_row(n0, p, R, S);                                                      \
            const uint16_t *wr[R];                                                                      \
            for (int r = 0; r < R; r++) wr[r] = w + (first + (r < rows ? r : 0) * S) * ldw;             \
            __m512 acc[R][M];                                                                           \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();                            \
            for (int64_t k = 0; k < K; k += 32) {                                                       \
                __mmask32 mask = k < k32 ? (__mmask32)~0u : tail;                                        \
                __m512bh wv[R];                                                                         \
                for (int r = 0; r < R; r++) {                                                           \
                    wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr[r] + k);                        \
                    __builtin_prefetch(wr[r] + R * S * ldw + k, 0, 2); /* a line, R * S rows ahead, into L2 */ \
                }                                                                                       \
                for (int m = 0; m < M; m++) {                                                           \
                    __m512bh xm = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);              \
                    for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xm);     \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < rows; r++)                                                              \
                for (int m = 0; m < M; m++) y[m * ldy + first + r * S] = f32_to_bf16(_mm512_reduce_add_ps(acc[r][m])); \
        }                                                                                               \
    }

BF16_KERNEL512(1, 4)
BF16_KERNEL512(2, 4)
BF16_KERNEL512(3, 2)
BF16_KERNEL512(4, 2)
BF16_KERNEL512(5, 2)
BF16_KERNEL512(6, 2)
#endif

/* The kernels for 1 to 6 activation rows (index 0 unused), by instruction set: AVX2's take the
 * activations as float32, AVX-512's as stored (bf16). */
typedef void (*bf16_rows_fn)(const void *, int64_t, const uint16_t *, int64_t, uint16_t *, int64_t, int64_t, int64_t);
static const bf16_rows_fn BF16_ROWS[][7] = {
    {0, rows1, rows2, rows3, rows4, rows5, rows6},
#if HAVE_AVX512
    {0, rows512_1, rows512_2, rows512_3, rows512_4, rows512_5, rows512_6},
#endif
};

/* Output features per unit of work: whole cache lines of output, a few hundred KiB of weight. */
#define BLOCK_ROWS 64
/* SCHEDULE: the products share out their blocks of rows `guided`: each thread first takes a long
 * run of consecutive blocks, then shorter ones, down to one block, so that its weights are one
 * stream that its prefetches run ahead of, while a thread the OS puts aside (another process
 * wanting the core) still delays only a short run at the end. Taken one block at a time
 * (`dynamic, 1`, as before), the threads alternated, and each prefetched the next block, the
 * other thread's, into its own L2. Measured on the AMD EPYC (Zen 4, 2 threads;
 * tools/cpu_kernels_revisions_ab.py --baseline a05357b^ --revision a05357b: the products of a
 * llama3.2-1b decode step, streamed from memory), the time against `dynamic, 1`'s: int4 at 1
 * activation row 0.94x while memory read ~37 GB/s, 0.73x (31.0 -> 42.1 GB/s) while it read ~63;
 * int8 0.90-0.97x; bf16 0.94-0.97x. With the other core busy (`yes`), int4 0.98x and bf16 1.21x,
 * their quartiles 0.87-1.11 and 0.77-1.75: too wide to tell. */

/* y (M x N) = x (M x K) @ w (N x K, row stride ldw).T, all bfloat16, with the kernels of `isa`
 * (ISA_AVX512: avx512_bf16, which the caller has checked). Returns 0, or -1 if out of memory for
 * the float32 copy of x (AVX2). */
int bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t ldw, int64_t N, uint16_t *y,
                int threads, int isa) {
    if (isa >= (int)(sizeof BF16_ROWS / sizeof BF16_ROWS[0])) return -2;
    float *x32 = NULL;
    if (isa == ISA_AVX2) {
        x32 = malloc((size_t)(M * K) * sizeof(float));
        if (!x32) return -1;
        for (int64_t i = 0; i < M * K; i++) x32[i] = bf16_to_f32(x[i]);
    }
    /* Blocks of output features in runs (SCHEDULE), each thread's weights one stream. */
    int64_t blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for schedule(guided) num_threads(threads) /* SCHEDULE */
    for (int64_t b = 0; b < blocks; b++) {
        int64_t n0 = b * BLOCK_ROWS, n1 = n0 + BLOCK_ROWS < N ? n0 + BLOCK_ROWS : N;
        /* Up to 6 rows of activations in one pass over the weight; 7 and 8 in two (measured:
         * their activations outgrow the L1 cache, and two passes are then faster). */
        for (int64_t m = 0, rows; m < M; m += rows) {
            rows = M - m > 6 ? 4 : M - m;
            const void *xm = x32 ? (const void *)(x32 + m * K) : (const void *)(x + m * K);
            BF16_ROWS[isa][rows](xm, K, w, ldw, y + m * N, N, n0, n1);
        }
    }
    free(x32);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Decode attention: one query per cache row against keys 0..positions[b] of that row, in float32
 * (scores, softmax, weighted sum of values), as llama/model.py's one_query_attention computes it
 * with torch, which converts the whole cache to float32 and runs batched products over every
 * position, masked: 0.28-0.39 ms a layer at a 256-token cache on the AVX2 EPYC, the largest
 * part of a decode step's work besides the weights. Here each cached key and value is read once,
 * as stored, and only up to the row's position (the masked ones have weight exactly 0): 0.08 ms.
 */
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f select8(v8i mask, v8f a, v8f b) { return (v8f)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* e^x for x <= 0 (a softmax's exponents): Cephes' expf (range reduction by ln 2 and a degree-5
 * polynomial; within 2 ulp of torch's), and 0 below -87, where float32 underflows. */
static inline v8f exp_nonpositive(v8f x) {
    const v8f magic = (v8f){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v8i underflow = x < -87.0f;
    x = select8(underflow, (v8f){0} - 87.0f, x);
    v8f t = x * 1.44269504088896341f + magic, n = t - magic;
    v8f r = x - n * 0.693359375f - n * -2.12194440e-4f;
    v8f p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
             1.6666665459e-1f) * r + 5.0000001201e-1f;
    v8f y = p * r * r + r + 1.0f;
    v8i two_n = (((v8i)t - (v8i)magic) + 127) << 23; /* 2^n as float32 bits */
    return select8(underflow, (v8f){0}, y * (v8f)two_n);
}

/* A cache of blocks (blocks x KVH x BS x D): where position t of a sequence's key/value head
 * `head` starts, following the sequence's block table. */
typedef struct {
    const int64_t *table;
    int64_t KVH, BS, D, head;
} paged_head;

static inline int64_t position_offset(const paged_head *h, int64_t t) {
    return ((h->table[t / h->BS] * h->KVH + h->head) * h->BS + t % h->BS) * h->D;
}

/* Positions t0..t0+7 of a head's keys or values (bfloat16 or float32) into out (8 x D float32);
 * positions from `rows` on, past the sequence's position, as zeros. */
static void to_float_rows(const void *p, const paged_head *h, int64_t t0, int64_t rows, int bf16, float *out) {
    int64_t D = h->D;
    for (int64_t t = 0; t < 8; t++) {
        int64_t base = t0 + t < rows ? position_offset(h, t0 + t) : 0;
        for (int64_t d = 0; d < D; d += 8) {
            int64_t i = base + d;
            v8f f = t0 + t >= rows ? (v8f){0} : bf16 ? load_bf16((const uint16_t *)p + i) : load_f32((const float *)p + i);
            memcpy(out + t * D + d, &f, sizeof f);
        }
    }
}

/* The sums of d[0], ..., d[7], in order: a transposing reduction (21 shuffles and adds, where
 * eight separate sums take 56). */
static inline v8f sums8(const v8f d[8]) {
    v8f a[4], b[2];
    for (int i = 0; i < 4; i++)
        a[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 8, 1, 9, 2, 10, 3, 11) +
               __builtin_shufflevector(d[2 * i], d[2 * i + 1], 4, 12, 5, 13, 6, 14, 7, 15);
    for (int j = 0; j < 2; j++)
        b[j] = __builtin_shufflevector(a[2 * j], a[2 * j + 1], 0, 1, 8, 9, 2, 3, 10, 11) +
               __builtin_shufflevector(a[2 * j], a[2 * j + 1], 4, 5, 12, 13, 6, 7, 14, 15);
    return __builtin_shufflevector(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

#if HAVE_AVX512
/* The same attention with AVX-512 and avx512_bf16, for bfloat16 queries and cache and D of 64 or
 * 128 (every Llama's): the AVX2 path's result up to float32 rounding (its sums in another order),
 * except that vdpbf16ps reads subnormal bfloat16 as zero (no model's query or key is subnormal).
 * Profiled (perf, 1 thread), the AVX2 path spends a third of its time copying key and value rows
 * to float32 and much of the rest loading and storing sums. Here:
 * - scores: vdpbf16ps multiplies 32 bfloat16 pairs of a query head and of a key as stored (their
 *   products exact in float32), and 16 positions' partial sums become one vector of their 16
 *   scores in 15 shuffle-and-add steps (sums16);
 * - softmax over whole vectors;
 * - values: each position's row converted once and added into the float32 sums of up to 16 /
 *   (D / 16) query heads, which stay in registers over all positions;
 * - each 16 positions' keys and values prefetched while the 16 before are scored, their offsets
 *   found with one division.
 * Measured (`tools/cpu_kernels_revisions_ab.py --attention_positions`, the caches emptied before
 * each call as a decode step's weights empty them; AMD EPYC Zen 4, 2 threads), the time against
 * the AVX2 path's: llama3.2-1b's heads 0.67x at 128 positions, 0.55x at 512, 0.48x at 2048;
 * llama3-8b's 0.45x at 512, 0.43x at 2048; llama3-70b's 0.55x at 512. */
TARGET_AVX512_BF16 static inline __m512 pair_sums(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}

TARGET_AVX512_BF16 static inline __m512 quad_sums(__m512 a, __m512 b) {
    __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

TARGET_AVX512_BF16 static inline __m512 lane_sums(__m512 a, __m512 b) {
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xdd));
}

/* Lane t: the sum of p[t]'s 16 lanes. */
TARGET_AVX512_BF16 static inline __m512 sums16(const __m512 p[16]) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++) a[i] = pair_sums(p[2 * i], p[2 * i + 1]); /* per 128 bits: 2 of 4 */
    for (int i = 0; i < 4; i++) b[i] = quad_sums(a[2 * i], a[2 * i + 1]); /* 4 positions' quarters */
    return lane_sums(lane_sums(b[0], b[1]), lane_sums(b[2], b[3]));
}

/* Where positions t0..t0+15 start (those from L on: where t0 does, their scores masked), one
 * division for all. */
static inline void rows_offsets(const paged_head *h, int64_t t0, int64_t L, int64_t *offset) {
    int64_t block = t0 / h->BS, within = t0 % h->BS;
    for (int t = 0; t < 16; t++, within++) {
        if (within == h->BS) block++, within = 0;
        offset[t] = t0 + t < L ? ((h->table[block] * h->KVH + h->head) * h->BS + within) * h->D : offset[0];
    }
}

/* The keys (into L1) and values (into L2, read after all keys) of `count` (at most 16) rows at
 * these offsets: the cache is cold when attention reads it (the layer's weights streamed through
 * the caches since), and a block's rows of one head are too few for the hardware prefetchers. */
static inline void prefetch_rows16(const uint16_t *k, const uint16_t *v, const int64_t *offset, int64_t count,
                                   int64_t D) {
    for (int t = 0; t < 16 && t < count; t++)
        for (int64_t b = 0; b < 2 * D; b += 64) {
            __builtin_prefetch((const char *)(k + offset[t]) + b, 0, 3);
            __builtin_prefetch((const char *)(v + offset[t]) + b, 0, 2);
        }
}

TARGET_AVX512_BF16 static inline __m512 load_bf16_512(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

/* One key/value head's attention for its G query heads (q, out: G x D, contiguous), positions
 * 0..L-1; scores: G x Lp floats, Lp = L rounded up to 16. PER: D / 16. */
#define ATTENTION_HEAD512(PER)                                                                          \
    TARGET_AVX512_BF16 static void attention_head512_##PER(const uint16_t *q, const uint16_t *k,       \
                                                           const uint16_t *v, const paged_head *h,      \
                                                           int64_t G, int64_t L, float scale,           \
                                                           float *scores, int64_t Lp, uint16_t *out) { \
        enum { D = 16 * PER, HEADS = 16 / PER }; /* query heads whose sums fit 16 registers */        \
        int64_t offset[32]; /* of positions t0..t0+15, then of the next 16 (prefetched) */               \
        rows_offsets(h, 0, L, offset + 16);                                                             \
        prefetch_rows16(k, v, offset + 16, L, D);                                                       \
        for (int64_t t0 = 0; t0 < L; t0 += 16) {                                                        \
            memcpy(offset, offset + 16, 16 * sizeof *offset);                                           \
            if (t0 + 16 < L) {                                                                          \
                rows_offsets(h, t0 + 16, L, offset + 16);                                               \
                prefetch_rows16(k, v, offset + 16, L - t0 - 16, D);                                     \
            }                                                                                           \
            const uint16_t *key[16];                                                                    \
            for (int t = 0; t < 16; t++) key[t] = k + offset[t];                                        \
            for (int64_t g = 0; g < G; g++) {                                                           \
                __m512bh query[PER / 2];                                                                \
                for (int c = 0; c < PER / 2; c++) query[c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c); \
                __m512 p[16];                                                                           \
                for (int t = 0; t < 16; t++) {                                                          \
                    p[t] = _mm512_setzero_ps();                                                         \
                    for (int c = 0; c < PER / 2; c++)                                                   \
                        p[t] = _mm512_dpbf16_ps(p[t], query[c], (__m512bh)_mm512_loadu_si512(key[t] + 32 * c)); \
                }                                                                                       \
                _mm512_storeu_ps(scores + g * Lp + t0, _mm512_mul_ps(sums16(p), _mm512_set1_ps(scale))); \
            }                                                                                           \
        }                                                                                               \
        for (int64_t g = 0; g < G; g++) {                                                               \
            float *s = scores + g * Lp;                                                                 \
            for (int64_t t = L; t < Lp; t++) s[t] = -INFINITY; /* e^-inf = 0 */                         \
            __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps();                        \
            for (int64_t t = 0; t < Lp; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + t));      \
            v8f m = (v8f){0} + _mm512_reduce_max_ps(top);                                               \
            for (int64_t t = 0; t < Lp; t += 8) {                                                       \
                v8f e = exp_nonpositive(load_f32(s + t) - m);                                           \
                memcpy(s + t, &e, sizeof e);                                                            \
            }                                                                                           \
            for (int64_t t = 0; t < Lp; t += 16) total = _mm512_add_ps(total, _mm512_loadu_ps(s + t));  \
            __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(total));                                   \
            for (int64_t t = 0; t < Lp; t += 16) _mm512_storeu_ps(s + t, _mm512_div_ps(_mm512_loadu_ps(s + t), sum)); \
        }                                                                                               \
        for (int64_t g0 = 0; g0 < G; g0 += HEADS) {                                                    \
            int64_t n = G - g0 < HEADS ? G - g0 : HEADS;                                                \
            __m512 acc[HEADS][PER];                                                                     \
            for (int j = 0; j < HEADS; j++)                                                             \
                for (int c = 0; c < PER; c++) acc[j][c] = _mm512_setzero_ps();                          \
            for (int64_t t0 = 0; t0 < L; t0 += h->BS - t0 % h->BS) { /* a block's rows at a time */   \
                const uint16_t *row = v + position_offset(h, t0);                                       \
                int64_t end = t0 + h->BS - t0 % h->BS < L ? t0 + h->BS - t0 % h->BS : L;                \
                for (int64_t t = t0; t < end; t++, row += D) {                                          \
                    __m512 x[PER];                                                                      \
                    for (int c = 0; c < PER; c++) x[c] = load_bf16_512(row + 16 * c);                   \
                    for (int j = 0; j < HEADS; j++) { /* a bound the compiler knows: acc in registers */ \
                        if (j >= n) break;                                                              \
                        __m512 w = _mm512_set1_ps(scores[(g0 + j) * Lp + t]);                           \
                        for (int c = 0; c < PER; c++) acc[j][c] = _mm512_fmadd_ps(w, x[c], acc[j][c]);  \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int j = 0; j < n; j++) {                                                               \
                float sums[D];                                                                          \
                for (int c = 0; c < PER; c++) _mm512_storeu_ps(sums + 16 * c, acc[j][c]);               \
                for (int d = 0; d < D; d++) out[(g0 + j) * D + d] = f32_to_bf16(sums[d]);               \
            }                                                                                           \
        }                                                                                               \
    }

ATTENTION_HEAD512(4)
ATTENTION_HEAD512(8)
#endif

/* out (B x H x D) = attention of q (B x H x D) over the cache k and v (blocks x KVH x BS x D,
 * contiguous): sequence b's positions 0..positions[b] are in the blocks tables[b * W ...], BS
 * positions a block; query head h reads key/value head h / (H / KVH). q, out bfloat16 (qbf16)
 * or float32, the cache bfloat16 (cbf16) or float32. D a multiple of 8; positions[b] < W * BS.
 * isa ISA_AVX512 (avx512_bf16, which the caller has checked): the AVX-512 path where it applies.
 * Returns 0, or -1 if out of memory. */
int decode_attention(const void *q, int qbf16, const void *k, const void *v, int cbf16, int64_t B, int64_t H,
                     int64_t KVH, int64_t BS, int64_t D, const int64_t *positions, const int64_t *tables, int64_t W,
                     float scale, void *out, int threads, int isa) {
    int64_t G = H / KVH, failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) reduction(| : failed)
    for (int64_t task = 0; task < B * KVH; task++) {
        int64_t b = task / KVH, head = task % KVH;
        int64_t L = positions[b] < 0 ? 1 : positions[b] + 1, Lp = (L + 7) / 8 * 8;
        paged_head h = {tables + b * W, KVH, BS, D, head};
#if HAVE_AVX512
        if (isa == ISA_AVX512 && qbf16 && cbf16 && (D == 64 || D == 128)) {
            int64_t Lp16 = (L + 15) / 16 * 16, first = (b * H + head * G) * D;
            float *scores = malloc((size_t)(G * Lp16) * sizeof(float));
            if (!scores) {
                failed = 1;
                continue;
            }
            (D == 64 ? attention_head512_4 : attention_head512_8)((const uint16_t *)q + first, k, v, &h, G, L, scale,
                                                                 scores, Lp16, (uint16_t *)out + first);
            free(scores);
            continue;
        }
#endif
        /* queries, outputs, scores, 8 rows of keys or values */
        float *scratch = malloc((size_t)(G * (2 * D + Lp) + 8 * D) * sizeof(float));
        if (!scratch) {
            failed = 1;
            continue;
        }
        float *qf = scratch, *acc = qf + G * D, *scores = acc + G * D, *rows = scores + G * Lp;
        for (int64_t g = 0; g < G; g++)
            for (int64_t d = 0; d < D; d++) {
                int64_t i = (b * H + head * G + g) * D + d;
                qf[g * D + d] = element_at(q, i, qbf16);
                acc[g * D + d] = 0;
            }
        for (int64_t t0 = 0; t0 < Lp; t0 += 8) { /* 8 positions' scores at a time */
            to_float_rows(k, &h, t0, L, cbf16, rows); /* once for the G query heads */
            for (int64_t g = 0; g < G; g++) {
                v8f dot[8] = {{0}};
                for (int64_t d = 0; d < D; d += 8) { /* 8 independent sums: FMA latency is hidden */
                    v8f query = load_f32(qf + g * D + d);
                    for (int64_t t = 0; t < 8; t++) dot[t] += query * load_f32(rows + t * D + d);
                }
                v8f sums = sums8(dot) * scale;
                memcpy(scores + g * Lp + t0, &sums, sizeof sums);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *s = scores + g * Lp, top = s[0], total = 0;
            for (int64_t t = 1; t < L; t++) top = s[t] > top ? s[t] : top;
            for (int64_t t = L; t < Lp; t++) s[t] = -INFINITY; /* e^-inf = 0 */
            for (int64_t t = 0; t < L; t += 8) {
                v8f e = exp_nonpositive(load_f32(s + t) - top);
                memcpy(s + t, &e, sizeof e);
            }
            for (int64_t t = 0; t < L; t++) total += s[t];
            for (int64_t t = 0; t < L; t++) s[t] /= total;
        }
        for (int64_t t0 = 0; t0 < Lp; t0 += 8) {
            to_float_rows(v, &h, t0, L, cbf16, rows);
            for (int64_t g = 0; g < G; g++) {
                float weight[8]; /* local: the stores to acc below cannot change them */
                memcpy(weight, scores + g * Lp + t0, sizeof weight);
                for (int64_t d = 0; d < D; d += 8) {
                    v8f sum = load_f32(acc + g * D + d);
                    for (int64_t t = 0; t < 8; t++) sum += weight[t] * load_f32(rows + t * D + d);
                    memcpy(acc + g * D + d, &sum, sizeof sum);
                }
            }
        }
        for (int64_t g = 0; g < G; g++)
            for (int64_t d = 0; d < D; d++) {
                int64_t o = (b * H + head * G + g) * D + d;
                if (qbf16)
                    ((uint16_t *)out)[o] = f32_to_bf16(acc[g * D + d]);
                else
                    ((float *)out)[o] = acc[g * D + d];
            }
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Weight-only int8 and int4 (llama/quantize.py's stored layout), activations bfloat16 or float32.
 *
 * torch's CPU kernels for these are compute bound on AVX2 at 4-5 G weights/s a core, no faster
 * than streaming bf16, and so is converting each weight to float32 (3 instructions per 8
 * weights). Here the activations of each row are converted once per call to integers and the
 * weights are multiplied as integers into exact sums, with the float scales applied once per
 * row (int8) or group (int4) of sums. Built where the build has AVX2 (has_quantized_kernels()
 * says whether it was), with AVX-512 VNNI versions beside (below each AVX2 kernel).
 * - int8: activations as 16-bit integers with one scale per block of 32 columns (its largest
 *   magnitude / 32767: a rounding error below 2e-5 of the block's largest value, where bf16
 *   activations themselves carry 4e-3), weights widened to 16 bits, vpmaddwd: 3 instructions per
 *   16 weights. A block's scale is its own, so a row split between ranks at multiples of 32
 *   rounds each column as the whole row does and a split product is the whole one up to float
 *   sums (with one scale per row, each rank's own, the results moved with the TP degree). The
 *   weights' columns are reordered at load (int8_order) so that each AVX2 lane meets one block
 *   of 8: the scales of 8 blocks are applied together, one conversion and one FMA per 256
 *   columns and row. Scaling each block's sums in every lane (per 32 columns) ran at half the
 *   speed; against one scale per row this runs at 0.93-0.98x (AVX2) and 1.04-1.14x (AVX-512,
 *   which also lost a masked tail) on 2048-wide rows, 1 and 8 activation rows (AMD EPYC, Zen 4,
 *   1 thread, CPU time).
 * - int4: activations as 8-bit integers with one scale per group (the scheme of llama.cpp's Q4_0 x Q8_0 products and torchao's int8-activation int4
 *   weights), vpmaddubsw on the nibbles: 7 instructions per 64 weights, where 16-bit activations
 *   took 14; and the float work of 8 groups at once (a group's scale is one permutation, the
 *   offsets one FMA per 8 groups), where each group took 9 instructions. The rounding of the
 *   activations makes an error 7-9% the size of the weights' own rounding error in a product
 *   (measured: norms of the differences to float64 products, 256- to 8192-wide rows, every group
 *   size). Against the version with 16-bit activations, interleaved in one process (AMD EPYC,
 *   Zen 3, 2 threads), as a fraction of a plain read of the same bytes: one activation row
 *   0.83 -> 0.93-1.01, 4 rows 0.37 -> 0.56, 8 rows 0.17 -> 0.28.
 *
 * Scales and zeros are float32 or bfloat16 (sbf16), as loaded (no wider copy to read per step).
 * int8: w (N x K) int8 in int8_order's column order, scale (N): y = scale * sum_b (x_scale_b *
 * sum(q * xq) over block b).
 * int4: w (N x K/2) bytes, column 2j in the high nibble of byte j and 2j+1 in the low one; per
 * group g of G columns a scale s and a zero z (interleaved: N x groups x 2), so with the offset
 * o = z - 8 * s, w = q * s + o and y = sum_g (s_g * x_scale_g * sum(q * xq) + o_g * x_scale_g *
 * sum(xq)): exactly the dequantized weights times the rounded activations, up to float sums.
 */

/* int8's units: 8 blocks of 32 columns while 8 remain, then 4, 2 and 1 (8 % nb == 0 for each: an
 * AVX2 lane, 2 columns of each 16, always meets the same block). */
static inline int64_t int8_unit_blocks(int64_t blocks) {
    return blocks >= 8 ? 8 : (int64_t)1 << (63 - __builtin_clzll((unsigned long long)blocks));
}

/* The column of a row that each position of the kernel's int8 layout holds (order: K): within a
 * unit of nb blocks, pair of columns q holds pair q / nb of block q % nb, so that lane j of the
 * sums meets block j % nb only; columns after the last whole block stay in place. */
void int8_order(int64_t K, int64_t *order) {
    int64_t k0 = 0;
    for (int64_t nb; K - k0 >= 32; k0 += 32 * nb) {
        nb = int8_unit_blocks((K - k0) / 32);
        for (int64_t p = 0; p < 32 * nb; p++) order[k0 + p] = k0 + 32 * (p / 2 % nb) + 2 * (p / 2 / nb) + p % 2;
    }
    for (; k0 < K; k0++) order[k0] = k0;
}

#if defined(__AVX2__)
#include <immintrin.h>

int has_quantized_kernels(void) { return 1; }

static inline __m256i madd(__m256i w, const int16_t *x) {
    return _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)x));
}

static inline v8f to_float(__m256i v) { return (v8f)_mm256_cvtepi32_ps(v); }

/* Elements 0, 2, ..., 14 (shuffle 0x88) or 1, 3, ..., 15 (0xdd) of the 16 floats of a and b: the
 * shuffle picks them within 128-bit lanes, leaving their 64-bit quarters in the order 0 2 1 3. */
#define EVERY_OTHER8(a, b, imm) \
    _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, imm)), 0xd8))

/* The (scale, zero) pairs of 8 consecutive int4 groups from element i of so (count of them, the
 * others 0): their scales and their zeros. bfloat16 pairs are 32 bits each, the scale in the low
 * half (shifted up: its float32 value) and the zero in the high half. */
static inline void scale_pairs8(const void *so, int64_t i, int count, int sbf16, v8f *scale, v8f *zero) {
    size_t size = sbf16 ? 2 : 4;
    char tail[64] = {0};
    const char *p = (const char *)so + i * size;
    if (count < 8) p = memcpy(tail, p, 2 * count * size);
    if (sbf16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *scale = (v8f)_mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *zero = (v8f)_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    } else {
        __m256 a = _mm256_loadu_ps((const float *)p), b = _mm256_loadu_ps((const float *)p + 8);
        *scale = (v8f)EVERY_OTHER8(a, b, 0x88);
        *zero = (v8f)EVERY_OTHER8(a, b, 0xdd);
    }
}

#define INT8_KERNEL(M, R)                                                                               \
    static void int8_rows##M(const int16_t *x, const float *lanes, int64_t U, int64_t K, const int8_t *w, int64_t ldw, \
                             const void *scale, int sbf16, float *y, int64_t ldy, int64_t n0, int64_t n1) {         \
        int64_t S = stream_rows(ldw, n1 - n0, R), p = 0;                                                \
        for (int64_t n = n0; n < n1; n += R, p++) {                                                     \
            int rows = n + R <= n1 ? R : (int)(n1 - n);                                                  \
            int64_t first = pass_row(n0, p, R, S);                                                      \
            const int8_t *wr[R];                                                                        \
            for (int r = 0; r < R; r++) wr[r] = w + (first + (r < rows ? r : 0) * S) * ldw;             \
            __m256 acc[R][M];                                                                           \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();                            \
            for (int64_t k0 = 0, u = 0, end; k0 < K; k0 = end, u++) {                                   \
                end = k0 + 32 * int8_unit_blocks((K - k0) / 32);                                        \
                __m256i sum[R][M];                                                                      \
                for (int r = 0; r < R; r++)                                                             \
                    for (int m = 0; m < M; m++) sum[r][m] = _mm256_setzero_si256();                     \
                for (int64_t k = k0; k < end; k += 16) {                                                \
                    __m256i wv[R];                                                                      \
                    for (int r = 0; r < R; r++)                                                         \
                        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wr[r] + k)));    \
                    if (k % 64 == 0) /* a cache line of each stream, R * S rows ahead */                \
                        for (int r = 0; r < R; r++) __builtin_prefetch(wr[r] + R * S * ldw + k, 0, 0);  \
                    for (int m = 0; m < M; m++)                                                         \
                        for (int r = 0; r < R; r++)                                                     \
                            sum[r][m] = _mm256_add_epi32(sum[r][m], madd(wv[r], x + m * K + k));        \
                }                                                                                       \
                for (int m = 0; m < M; m++) {                                                           \
                    __m256 s = _mm256_loadu_ps(lanes + (m * U + u) * 8);                                \
                    for (int r = 0; r < R; r++)                                                         \
                        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][m]), s, acc[r][m]);       \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < rows; r++)                                                              \
                for (int m = 0; m < M; m++) {                                                           \
                    int64_t row = first + r * S;                                                        \
                    y[m * ldy + row] = sum8((v8f)acc[r][m]) * element_at(scale, row, sbf16);            \
                }                                                                                       \
        }                                                                                               \
    }

INT8_KERNEL(1, 4)
INT8_KERNEL(2, 4)
INT8_KERNEL(3, 2)
INT8_KERNEL(4, 2)

#if HAVE_AVX512
/* The same with AVX-512 VNNI: 32 weights widened to 16 bits and multiplied into their sums by
 * vpdpwssd (2 instructions per 32 weights, where AVX2 takes 6). Lane j of a sum holds columns 2j
 * and 2j + 1 of each 32, lane j + 8 those of its last 16: adding the two (exact integers) gives
 * AVX2's lane j, the same block's, so the same integers meet the same scales in the same float
 * operations, and the outputs are AVX2's bit for bit. Weights are prefetched into L2, as in the
 * bf16 kernel (with it, a llama3.2-1b int8 decode step 74-78 -> 60-63 ms, one thread, Zen 4). */
#define INT8_KERNEL512(M, R)                                                                            \
    TARGET_AVX512_VNNI static void int8_rows512_##M(const int16_t *x, const float *lanes, int64_t U, int64_t K, \
                                                    const int8_t *w, int64_t ldw, const void *scale, int sbf16, \
                                                    float *y, int64_t ldy, int64_t n0, int64_t n1) {        \
        int64_t S = stream_rows(ldw, n1 - n0, R), p = 0;                                                \
        for (int64_t n = n0; n < n1; n += R, p++) {                                                     \
            int rows = n + R <= n1 ? R : (int)(n1 - n);                                                  \
            int64_t first = pass_row(n0, p, R, S);                                                      \
            const int8_t *wr[R];                                                                        \
            for (int r = 0; r < R; r++) wr[r] = w + (first + (r < rows ? r : 0) * S) * ldw;             \
            __m256 acc[R][M];                                                                           \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();                            \
            for (int64_t k0 = 0, u = 0, end; k0 < K; k0 = end, u++) {                                   \
                end = k0 + 32 * int8_unit_blocks((K - k0) / 32);                                        \
                __m512i sum[R][M];                                                                      \
                for (int r = 0; r < R; r++)                                                             \
                    for (int m = 0; m < M; m++) sum[r][m] = _mm512_setzero_si512();                     \
                for (int64_t k = k0; k < end; k += 32) {                                                \
                    __m512i wv[R];                                                                      \
                    for (int r = 0; r < R; r++) {                                                       \
                        wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr[r] + k))); \
                        if (k % 64 == 0) __builtin_prefetch(wr[r] + R * S * ldw + k, 0, 2); /* L2 */     \
                    }                                                                                   \
                    for (int m = 0; m < M; m++) {                                                       \
                        __m512i xm = _mm512_loadu_si512(x + m * K + k);                                 \
                        for (int r = 0; r < R; r++) sum[r][m] = _mm512_dpwssd_epi32(sum[r][m], wv[r], xm); \
                    }                                                                                   \
                }                                                                                       \
                for (int m = 0; m < M; m++) {                                                           \
                    __m256 s = _mm256_loadu_ps(lanes + (m * U + u) * 8);                                \
                    for (int r = 0; r < R; r++) {                                                       \
                        __m256i halves = _mm256_add_epi32(_mm512_castsi512_si256(sum[r][m]),            \
                                                          _mm512_extracti64x4_epi64(sum[r][m], 1));     \
                        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(halves), s, acc[r][m]);          \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < rows; r++)                                                              \
                for (int m = 0; m < M; m++) {                                                           \
                    int64_t row = first + r * S;                                                        \
                    y[m * ldy + row] = sum8((v8f)acc[r][m]) * element_at(scale, row, sbf16);            \
                }                                                                                       \
        }                                                                                               \
    }

INT8_KERNEL512(1, 4)
INT8_KERNEL512(2, 4)
INT8_KERNEL512(3, 2)
INT8_KERNEL512(4, 2)
#endif

typedef void (*int8_rows_fn)(const int16_t *, const float *, int64_t, int64_t, const int8_t *, int64_t, const void *,
                             int, float *, int64_t, int64_t, int64_t);
static const int8_rows_fn INT8_ROWS[][5] = {
    {0, int8_rows1, int8_rows2, int8_rows3, int8_rows4},
#if HAVE_AVX512
    {0, int8_rows512_1, int8_rows512_2, int8_rows512_3, int8_rows512_4},
#endif
};

/* The integer sums of 64 columns of R weight rows (wp[r]: 32 bytes of nibbles) with M activation
 * rows (xp + m * K: their 64 reordered int8 values): the 16-bit lanes of each (r, m) pair. */
#define INT4_PRODUCTS64(M, R, wp, xp, K, out)                                                          \
    do {                                                                                                \
        const __m256i nibble = _mm256_set1_epi8(15);                                                    \
        __m256i hi_[R], lo_[R];                                                                         \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256i bytes = _mm256_loadu_si256((const __m256i *)(wp)[r]);                              \
            hi_[r] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);                             \
            lo_[r] = _mm256_and_si256(bytes, nibble);                                                   \
        }                                                                                               \
        for (int m = 0; m < M; m++) {                                                                   \
            __m256i even = _mm256_loadu_si256((const __m256i *)((xp) + m * (K)));                       \
            __m256i odd = _mm256_loadu_si256((const __m256i *)((xp) + m * (K) + 32));                   \
            for (int r = 0; r < R; r++)                                                                 \
                out[r][m] = _mm256_add_epi16(_mm256_maddubs_epi16(hi_[r], even),                        \
                                             _mm256_maddubs_epi16(lo_[r], odd));                        \
        }                                                                                               \
    } while (0)

/* int4 takes its activations as int8, one scale per group (xq: M x K,
 * reordered as below; xscale, xsum: M x P floats, P = groups rounded up to a multiple of 8, zeros
 * after the last group), so that vpmaddubsw multiplies 32 unsigned nibbles by 32 signed bytes in
 * one instruction. A unit of U = max(G, 64) columns keeps its integer sums in 16 bits (at most
 * 4 * 2 * 2 * 15 * 127 < 2^15 per lane at G = 256) until its end, when they become 8 float
 * lanes that cover its columns in order (at G = 32: lanes 0-3 its first group, 4-7 its second).
 * The scales of 8 groups are read and multiplied by the activations' scales together, and a
 * unit picks its own from them with one permutation; the offsets of 8 groups meet the
 * activations' group sums in one FMA, in an accumulator of their own. The weight rows and the
 * activations are walked by pointer, 128 columns (a cache line of each row) a step where U allows:
 * against indexing every 64 columns from the row's start, with the weight in L2 (one thread)
 * 1 activation row computes -4% to +14% more weights a second (median of six runs +11%), 2 rows
 * 11-21% more; streaming from memory (2 threads) 1 row the same, 2 rows 8-11% more (AMD EPYC,
 * Zen 3, alternating in one process). */
#define INT4_KERNEL(M, R)                                                                               \
    static void int4_rows##M(const int8_t *x, const float *xscale, const float *xsum, int64_t K, int64_t G,         \
                             const uint8_t *w, int64_t ldw, const void *so, int sbf16, float *y, int64_t ldy,       \
                             int64_t n0, int64_t n1) {                                                  \
        int64_t U = G < 64 ? 64 : G, groups = K / G, P = (groups + 7) / 8 * 8;                           \
        int64_t S = stream_rows(ldw, n1 - n0, R), p = 0, ahead = R * S * ldw;                           \
        const __m256i ones = _mm256_set1_epi16(1);                                                      \
        const __m256i first = G < 64 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1) : _mm256_setzero_si256(); \
        const __m256i step = _mm256_set1_epi32(G < 64 ? 2 : 1);                                         \
        for (int64_t n = n0; n < n1; n += R, p++) {                                                     \
            int rows = n + R <= n1 ? R : (int)(n1 - n);                                                  \
            int64_t row[R];                                                                             \
            const uint8_t *wp[R];                                                                       \
            for (int r = 0; r < R; r++) {                                                               \
                row[r] = pass_row(n0, p, R, S) + (r < rows ? r : 0) * S;                                \
                wp[r] = w + row[r] * ldw;                                                               \
            }                                                                                           \
            const int8_t *xp = x;                                                                       \
            v8f acc[R][M];                                                                              \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = (v8f){0};                                       \
            for (int64_t g0 = 0; g0 < groups; g0 += 8) {                                                \
                int count = groups - g0 < 8 ? (int)(groups - g0) : 8;                                   \
                v8f scale[R][M];                                                                        \
                for (int r = 0; r < R; r++) {                                                           \
                    v8f s, z;                                                                           \
                    scale_pairs8(so, (row[r] * groups + g0) * 2, count, sbf16, &s, &z);                  \
                    for (int m = 0; m < M; m++) {                                                       \
                        scale[r][m] = s * load_f32(xscale + m * P + g0);                                \
                        acc[r][m] += (z - 8 * s) * load_f32(xsum + m * P + g0);                         \
                    }                                                                                   \
                }                                                                                       \
                __m256i lanes = first;                                                                  \
                for (int64_t u = count * G / U; u > 0; u--, lanes = _mm256_add_epi32(lanes, step)) {    \
                    __m256i sum[R][M], part[R][M];                                                      \
                    if (U == 64) { /* half a cache line of each row: prefetch on every other unit */    \
                        if ((xp - x) % 128 == 0)                                                        \
                            for (int r = 0; r < R; r++) __builtin_prefetch(wp[r] + ahead, 0, 0);       \
                        INT4_PRODUCTS64(M, R, wp, xp, K, sum);                                          \
                        for (int r = 0; r < R; r++) wp[r] += 32;                                        \
                        xp += 64;                                                                       \
                    } else { /* 128 columns a step: a cache line of each row */                         \
                        for (int64_t c = 0; c < U; c += 128) {                                          \
                            for (int r = 0; r < R; r++) __builtin_prefetch(wp[r] + ahead, 0, 0);        \
                            INT4_PRODUCTS64(M, R, wp, xp, K, part);                                     \
                            for (int r = 0; r < R; r++) {                                               \
                                wp[r] += 32;                                                            \
                                for (int m = 0; m < M; m++)                                             \
                                    sum[r][m] = c ? _mm256_add_epi16(sum[r][m], part[r][m]) : part[r][m]; \
                            }                                                                           \
                            INT4_PRODUCTS64(M, R, wp, xp + 64, K, part);                                \
                            for (int r = 0; r < R; r++) {                                               \
                                wp[r] += 32;                                                            \
                                for (int m = 0; m < M; m++) sum[r][m] = _mm256_add_epi16(sum[r][m], part[r][m]); \
                            }                                                                           \
                            xp += 128;                                                                  \
                        }                                                                               \
                    }                                                                                   \
                    for (int r = 0; r < R; r++)                                                         \
                        for (int m = 0; m < M; m++)                                                     \
                            acc[r][m] += to_float(_mm256_madd_epi16(sum[r][m], ones)) *                 \
                                         (v8f)_mm256_permutevar8x32_ps((__m256)scale[r][m], lanes);     \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < rows; r++)                                                              \
                for (int m = 0; m < M; m++) y[m * ldy + row[r]] = sum8(acc[r][m]);                      \
        }                                                                                               \
    }

INT4_KERNEL(1, 2)
INT4_KERNEL(2, 2)
INT4_KERNEL(3, 1)
INT4_KERNEL(4, 1)

#if HAVE_AVX512
/* The same with AVX-512 VNNI, 128 columns (64 bytes, a cache line, of each weight row) a block:
 * vpdpbusd multiplies the 64 high nibbles by the block's 64 even activations and the 64 low ones
 * by its odd ones, each into 16 int32 sums (lane j: columns 8j..8j+7 of the block), so the
 * activations come reordered per 128 columns (int4_blocks128: the even ones of both 64-column
 * halves, then their odd ones). A group's blocks (G >= 128) or a block's groups (G < 128) keep
 * their sums as integers (at most 2 * 8 * 15 * 127 per lane and block) until their end, when they
 * meet their scales (weight's times activations', 8 groups' at a time, kept on the stack): at
 * G >= 128 one for all 16 lanes, which the FMA broadcasts from memory itself; at G < 128 a lane's
 * own picked by one permutation (vpermps). The last 64 columns (K % 128 = 64, only at G < 128)
 * are read with a mask, outside the loop. The same integer sums as AVX2's, the float ones in
 * another order: the outputs differ from AVX2's by float32 rounding.
 *
 * A block costs each weight row a load, a prefetch and 7 vector instructions: a shift and two
 * ANDs (the nibbles), two vpdpbusd, and at G = 128 a conversion and an FMA, which Zen 4 runs as
 * 14 halves of 256 bits on its 4 vector pipes (3.5 cycles at best). Measured on the AMD EPYC
 * (Zen 4, 3.65 GHz; 1 thread, CPU time, this kernel alone on 512 x 2048 weights in L2, group 128,
 * 1 activation row, alternating with the version before): 5.2 cycles per block and row (4.4
 * without each row's scales and final sums), where the version before took 7.3: 16.4 -> 11.6 us.
 * What it took:
 * - whole blocks without masks or per-block bound checks (the masked tail apart), the rows walked
 *   by one offset, each weight line loaded once (GCC otherwise reads it again for each use), the
 *   group's scale broadcast from memory instead of permuted: 16.4 -> 14.0 us.
 * - prefetcht1 (into L2) instead of prefetchnta: lines prefetched a chunk (R * S rows) ahead
 *   into L1 are evicted from it before they are used. In cache 14.0 -> 12.4 us; streaming 64 MiB
 *   from memory 16.5 -> 20.7 GB/s (medians of 6). With prefetchnta, prefetching 1 or 2 passes
 *   ahead, every other line, or each page's first 16 lines only streamed at 14.5-15.7 GB/s, no
 *   prefetching at 15.9-16.6.
 * - the integer activations on a cache line (quantized_linear; they were 4- or 8-byte aligned,
 *   and a vector of them spanned two lines): a call with 2 activation rows 31.8 -> 25.9 us.
 * Not kept: 2, 3, 5, 6 or 8 weight rows a pass instead of 4 (1 activation row: 10-24% slower; 2
 * rows with 2, 3 or 6: 7-35% slower); one transposing reduction of 4 rows' sums at the end (8%
 * slower); GFNI's vgf2p8affineqb for the high nibbles (one instruction for two: 5-12% slower);
 * unrolling 2 groups (2% faster at best). Fewer instructions need another weight layout
 * (llama.cpp's interleaves rows, so that one group's float work serves 16 of them). */
/* One block: 128 columns (a cache line of each weight row, at byte offset c) into sum[r][m]. */
#define INT4_BLOCK512(M, R, wr, c, xp, K, sum)                                                          \
    do {                                                                                                \
        __m512i hi_[R], lo_[R];                                                                         \
        for (int r = 0; r < R; r++) {                                                                   \
            __m512i bytes = _mm512_loadu_si512((wr)[r] + (c));                                          \
            __asm__("" : "+v"(bytes)); /* one load, not one per use */                                  \
            __builtin_prefetch((wr)[r] + (c) + ahead, 0, 2); /* into L2: see above */                   \
            hi_[r] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);                             \
            lo_[r] = _mm512_and_si512(bytes, nibble);                                                   \
        }                                                                                               \
        for (int m = 0; m < M; m++) {                                                                   \
            __m512i even = _mm512_loadu_si512((xp) + m * (K) + 2 * (c));                                \
            __m512i odd = _mm512_loadu_si512((xp) + m * (K) + 2 * (c) + 64);                            \
            for (int r = 0; r < R; r++)                                                                 \
                sum[r][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum[r][m], hi_[r], even), lo_[r], odd); \
        }                                                                                               \
    } while (0)

/* acc[r][m] += sum[r][m] (integers) times scale, an expression of r and m. */
#define INT4_SCALED512(M, R, sum, scale, acc)                                                           \
    for (int r = 0; r < R; r++)                                                                         \
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][m]), scale, acc[r][m])

#define INT4_KERNEL512(M, R)                                                                            \
    TARGET_AVX512_VNNI static void int4_rows512_##M(const int8_t *x, const float *xscale, const float *xsum, \
                                                    int64_t K, int64_t G, const uint8_t *w, int64_t ldw,    \
                                                    const void *so, int sbf16, float *y, int64_t ldy,       \
                                                    int64_t n0, int64_t n1) {                               \
        int64_t groups = K / G, P = (groups + 7) / 8 * 8, per = G / 128; /* blocks a group */            \
        int64_t S = stream_rows(ldw, n1 - n0, R), p = 0, ahead = R * S * ldw;                           \
        const __m512i nibble = _mm512_set1_epi8(15);                                                    \
        const __m512i first = G == 32 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)    \
                                      : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);   \
        const __m512i step = _mm512_set1_epi32(G < 128 ? (int)(128 / G) : 0);                           \
        for (int64_t n = n0; n < n1; n += R, p++) {                                                     \
            int rows = n + R <= n1 ? R : (int)(n1 - n);                                                  \
            int64_t row[R];                                                                             \
            const uint8_t *wr[R];                                                                       \
            for (int r = 0; r < R; r++) {                                                               \
                row[r] = pass_row(n0, p, R, S) + (r < rows ? r : 0) * S;                                \
                wr[r] = w + row[r] * ldw;                                                               \
            }                                                                                           \
            __m512 acc[R][M];                                                                           \
            v8f offsets[R][M];                                                                          \
            for (int r = 0; r < R; r++)                                                                 \
                for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps(), offsets[r][m] = (v8f){0};  \
            for (int64_t g0 = 0; g0 < groups; g0 += 8) {                                                \
                int count = groups - g0 < 8 ? (int)(groups - g0) : 8;                                   \
                float scale[R][M][8] __attribute__((aligned(32)));                                      \
                for (int r = 0; r < R; r++) {                                                           \
                    v8f s, z;                                                                           \
                    scale_pairs8(so, (row[r] * groups + g0) * 2, count, sbf16, &s, &z);                  \
                    for (int m = 0; m < M; m++) {                                                       \
                        v8f both = s * load_f32(xscale + m * P + g0);                                   \
                        memcpy(scale[r][m], &both, sizeof both);                                        \
                        offsets[r][m] += (z - 8 * s) * load_f32(xsum + m * P + g0);                     \
                    }                                                                                   \
                }                                                                                       \
                int64_t c = g0 * G / 2, end = (g0 + count) * G / 2; /* bytes of each row */             \
                if (G >= 128) { /* a group's blocks, then their sums to float: a scale broadcast */     \
                    for (int j = 0; j < count; j++) {                                                   \
                        __m512i sum[R][M];                                                              \
                        for (int r = 0; r < R; r++)                                                     \
                            for (int m = 0; m < M; m++) sum[r][m] = _mm512_setzero_si512();             \
                        for (int64_t i = 0; i < per; i++, c += 64)                                      \
                            INT4_BLOCK512(M, R, wr, c, x, K, sum);                                      \
                        INT4_SCALED512(M, R, sum, _mm512_set1_ps(scale[r][m][j]), acc);                 \
                    }                                                                                   \
                } else { /* a block's groups: a lane's scale picked by one permutation */               \
                    __m512 scales[R][M];                                                                \
                    for (int r = 0; r < R; r++)                                                         \
                        for (int m = 0; m < M; m++)                                                     \
                            scales[r][m] = _mm512_castps256_ps512(_mm256_load_ps(scale[r][m]));         \
                    __m512i lanes = first;                                                              \
                    for (; c + 64 <= end; c += 64, lanes = _mm512_add_epi32(lanes, step)) {             \
                        __m512i sum[R][M];                                                              \
                        for (int r = 0; r < R; r++)                                                     \
                            for (int m = 0; m < M; m++) sum[r][m] = _mm512_setzero_si512();             \
                        INT4_BLOCK512(M, R, wr, c, x, K, sum);                                          \
                        INT4_SCALED512(M, R, sum, _mm512_permutexvar_ps(lanes, scales[r][m]), acc);     \
                    }                                                                                   \
                    if (c < end) { /* the last 64 columns (K % 128 = 64), read with a mask */           \
                        const __mmask64 mask = 0xffffffffu;                                             \
                        __m512i sum[R][M];                                                              \
                        for (int r = 0; r < R; r++) {                                                   \
                            __m512i bytes = _mm512_maskz_loadu_epi8(mask, wr[r] + c);                   \
                            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);         \
                            __m512i lo = _mm512_and_si512(bytes, nibble);                               \
                            for (int m = 0; m < M; m++) {                                               \
                                __m512i even = _mm512_maskz_loadu_epi8(mask, x + m * K + 2 * c);        \
                                __m512i odd = _mm512_maskz_loadu_epi8(mask, x + m * K + 2 * c + 32);    \
                                sum[r][m] = _mm512_dpbusd_epi32(                                        \
                                    _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, even), lo, odd);    \
                            }                                                                           \
                        }                                                                               \
                        INT4_SCALED512(M, R, sum, _mm512_permutexvar_ps(lanes, scales[r][m]), acc);     \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            for (int r = 0; r < rows; r++)                                                              \
                for (int m = 0; m < M; m++) y[m * ldy + row[r]] = _mm512_reduce_add_ps(acc[r][m]) + sum8(offsets[r][m]); \
        }                                                                                               \
    }

INT4_KERNEL512(1, 4)
INT4_KERNEL512(2, 4)
INT4_KERNEL512(3, 1)
INT4_KERNEL512(4, 1)

/* int4_activations' order (per 64 columns: 32 even, 32 odd) -> per 128 columns: the even ones of
 * both halves, then the odd ones (a last 64 columns stay as they are). */
static void int4_blocks128(int8_t *q, int64_t K) {
    for (int64_t k = 0; k + 128 <= K; k += 128) {
        int8_t odd0[32];
        memcpy(odd0, q + k + 32, 32);
        memcpy(q + k + 32, q + k + 64, 32);
        memcpy(q + k + 64, odd0, 32);
    }
}
#endif

typedef void (*int4_rows_fn)(const int8_t *, const float *, const float *, int64_t, int64_t, const uint8_t *, int64_t,
                             const void *, int, float *, int64_t, int64_t, int64_t);
static const int4_rows_fn INT4_ROWS[][5] = {
    {0, int4_rows1, int4_rows2, int4_rows3, int4_rows4},
#if HAVE_AVX512
    {0, int4_rows512_1, int4_rows512_2, int4_rows512_3, int4_rows512_4},
#endif
};

static inline void store_row(const float *src, int64_t n, int bf16, void *dst) {
    if (bf16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = f32_to_bf16(src[i]);
    else
        memcpy(dst, src, (size_t)n * sizeof(float));
}

static float largest_magnitude(const float *x, int64_t K) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 top = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude));
    float out = 0, lanes[8];
    _mm256_storeu_ps(lanes, top);
    for (int i = 0; i < 8; i++) out = lanes[i] > out ? lanes[i] : out;
    for (; k < K; k++) out = fabsf(x[k]) > out ? fabsf(x[k]) : out;
    return out;
}

/* q = x * inverse_scale rounded to the nearest integer (ties to even, as lrintf); |q| <= 32767. */
static void round_to_int16(const float *x, int64_t K, float inverse_scale, int16_t *q) {
    const __m256 s = _mm256_set1_ps(inverse_scale);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), s));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), s));
        /* packs interleaves the two by 128-bit lanes; the permutation puts them back in order */
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    for (; k < K; k++) q[k] = (int16_t)lrintf(x[k] * inverse_scale);
}

/* The same to 8 bits (|q| <= 127), K a multiple of 32. */
static void round_to_int8(const float *x, int64_t K, float inverse_scale, int8_t *q) {
    const __m256 s = _mm256_set1_ps(inverse_scale);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t k = 0; k < K; k += 32) {
        __m256i v[4];
        for (int i = 0; i < 4; i++) v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8 * i), s));
        /* the packs (within 128-bit lanes) leave the first 4 of v[0], v[1], v[2], v[3] and then
         * their last 4; the permutation puts them back in order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(packed, order));
    }
}

/* The sum of n (a multiple of 16) 8-bit integers: the sum of each plus 128 (vpsadbw's unsigned
 * bytes) less 128 n. */
static inline int32_t sum_int8(const int8_t *p, int64_t n) {
    const __m128i bias = _mm_set1_epi8((char)0x80), zero = _mm_setzero_si128();
    __m128i total = zero;
    for (int64_t i = 0; i < n; i += 16) {
        __m128i unsigned_bytes = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(p + i)), bias);
        total = _mm_add_epi64(total, _mm_sad_epu8(unsigned_bytes, zero));
    }
    return (int32_t)(_mm_cvtsi128_si64(total) + _mm_extract_epi64(total, 1) - 128 * n);
}

/* int8: row m of x as 16-bit integers, one scale per block of 32 columns, in int8_order's order,
 * and the scales that each unit's 8 lanes meet (lane j: block j % nb's), U units a row. */
static void int8_activations(const void *x, int64_t m, int64_t K, int bf16, int64_t U, float *row, int16_t *xq,
                             float *lanes) {
    float *ordered = row + K; /* the next row's space (quantized_linear keeps one to spare) */
    for (int64_t k = 0; k < K; k++) row[k] = element_at(x, m * K + k, bf16);
    float *lane = lanes + m * U * 8;
    for (int64_t k0 = 0, nb; k0 < K; k0 += 32 * nb, lane += 8) {
        nb = int8_unit_blocks((K - k0) / 32);
        for (int64_t b = 0; b < nb; b++) { /* each block scaled to [-32767, 32767] */
            float *block = row + k0 + 32 * b, amax = largest_magnitude(block, 32), scale = amax > 0 ? amax / 32767 : 1;
            float inverse = 1 / scale;
            for (int i = 0; i < 32; i++) block[i] *= inverse;
            for (int64_t j = b; j < 8; j += nb) lane[j] = scale;
        }
        for (int64_t i = 0; i < 16; i++) /* pair i of each block, in the unit's order */
            for (int64_t b = 0; b < nb; b++) memcpy(ordered + k0 + 2 * (i * nb + b), row + k0 + 32 * b + 2 * i, 8);
    }
    round_to_int16(ordered, K, 1, xq + m * K);
}

/* int4: row m of x as 8-bit integers, one scale per group of G columns (so that a row split
 * between ranks in whole groups rounds each column as the whole row does: results do not depend
 * on the TP degree), reordered to match the nibbles: within each 64 columns the 32 even ones and
 * then the 32 odd ones, so that the high and the low nibbles of 32 bytes of weight meet their
 * columns in order; each group's scale and sum (xscale, xsum: P floats for row m, zeros after the
 * last group). llama/cpu_linear.py's round_int4_activations is the same rounding in torch. */
static void int4_activations(const void *x, int64_t m, int64_t K, int bf16, int64_t G, float *row, int8_t *xq,
                             float *xscale, float *xsum) {
    int64_t groups = K / G, P = (groups + 7) / 8 * 8;
    for (int64_t g = groups; g < P; g++) xscale[m * P + g] = xsum[m * P + g] = 0;
    for (int64_t g = 0; g < groups; g++) { /* each group scaled to [-127, 127], in the original order */
        float *part = row + g * G;
        for (int64_t k = 0; k < G; k++) part[k] = element_at(x, m * K + g * G + k, bf16);
        float amax = largest_magnitude(part, G), scale = amax > 0 ? amax / 127 : 1, inverse = 1 / scale;
        for (int64_t k = 0; k < G; k++) part[k] *= inverse;
        xscale[m * P + g] = scale;
    }
    int8_t *q = xq + m * K;
    float *reordered = row + K; /* the next row's space (quantized_linear keeps one to spare) */
    for (int64_t k = 0; k < K; k += 16) { /* columns k..k+15: 8 even ones, 8 odd ones */
        __m256 a = _mm256_loadu_ps(row + k), b = _mm256_loadu_ps(row + k + 8);
        float *even = reordered + (k & ~(int64_t)63) + (k & 63) / 2;
        _mm256_storeu_ps(even, EVERY_OTHER8(a, b, 0x88));
        _mm256_storeu_ps(even + 32, EVERY_OTHER8(a, b, 0xdd));
    }
    round_to_int8(reordered, K, 1, q);
    /* The groups' sums of the rounded activations, so that the offsets multiply the same
     * activations as the nibbles (with the exact sums, the error of the rounding grows with the
     * nibbles' distance from the zero rather than with the weights: measured 4x). Sums of whole
     * groups do not depend on the order; at G = 32, each 64 columns' first group is its 16 first
     * even and 16 first odd columns. */
    for (int64_t g = 0; g < groups; g++) {
        int32_t total;
        if (G == 32) {
            const int8_t *unit = q + g / 2 * 64 + g % 2 * 16;
            total = sum_int8(unit, 16) + sum_int8(unit + 32, 16);
        } else {
            total = sum_int8(q + g * G, G);
        }
        xsum[m * P + g] = total * xscale[m * P + g];
    }
}

/* y (M x N) = x (M x K) @ dequantized(w).T, x and y bfloat16 (bf16 = 1) or float32 (0); group
 * is 0 for int8 (w in int8_order's order, K a multiple of 32), else int4's group size (a multiple
 * of 32; K a multiple of 64). At most 4 activation rows per pass over the weight. Returns 0, or
 * -1 if out of memory. */
int quantized_linear(const void *x, int64_t M, int64_t K, int bf16, const void *w, int64_t ldw, const void *scales,
                     int sbf16, int64_t group, int64_t N, void *y, int threads, int isa) {
    if (isa >= (int)(sizeof INT8_ROWS / sizeof INT8_ROWS[0])) return -2;
    int64_t P = group ? (K / group + 7) / 8 * 8 : 0; /* int4's groups, in whole vectors */
    int64_t U = group ? 0 : K / 256 + __builtin_popcountll((unsigned long long)(K / 32 % 8)); /* int8's units */
    /* AVX-512's integer activations start a cache line (a vector of them is one line, not two:
     * 2 rows' calls 1.2x as fast); AVX2's follow the floats, as before (on a line, its 1-row
     * kernel streamed weights from memory 3-5% slower, for reasons unknown) */
    size_t floats = (size_t)(2 * M * P + 8 * M * U + M * (K + N) + K) * sizeof(float);
    if (isa == ISA_AVX512) floats = (floats + 63) / 64 * 64;
    size_t bytes = floats + (size_t)(M * K) * sizeof(int16_t);
    char *buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!buffer) return -1;
    float *xscale = (float *)buffer, *xsum = xscale + M * P, *lanes = xsum + M * P;
    float *x32 = lanes + 8 * M * U, *y32 = x32 + (M + 1) * K; /* x32: a row to spare */
    void *xq = buffer + floats;
    for (int64_t m = 0; m < M; m++) {
        if (group) {
            int4_activations(x, m, K, bf16, group, x32 + m * K, xq, xscale, xsum);
#if HAVE_AVX512
            if (isa == ISA_AVX512) int4_blocks128((int8_t *)xq + m * K, K);
#endif
        } else {
            int8_activations(x, m, K, bf16, U, x32 + m * K, xq, lanes);
        }
    }
    int64_t work = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for schedule(guided) num_threads(threads) /* SCHEDULE */
    for (int64_t b = 0; b < work; b++) {
        int64_t n0 = b * BLOCK_ROWS, n1 = n0 + BLOCK_ROWS < N ? n0 + BLOCK_ROWS : N;
        for (int64_t m = 0, rows; m < M; m += rows) {
            rows = M - m > 4 ? 4 : M - m;
            float *ym = y32 + m * N;
            if (group)
                INT4_ROWS[isa][rows]((const int8_t *)xq + m * K, xscale + m * P, xsum + m * P, K, group, w, ldw, scales,
                                sbf16, ym, N, n0, n1);
            else
                INT8_ROWS[isa][rows]((const int16_t *)xq + m * K, lanes + 8 * m * U, U, K, w, ldw, scales, sbf16, ym,
                                     N, n0, n1);
        }
    }
    for (int64_t m = 0; m < M; m++)
        store_row(y32 + m * N, N, bf16, (char *)y + m * N * (bf16 ? 2 : 4));
    free(buffer);
    return 0;
}
#else
int has_quantized_kernels(void) { return 0; }
#endif

/* Row n of the float32 weight that int8 (group 0) or int4 stored values stand for, into o. */
static void dequantize_row(const void *w, int64_t ldw, const void *scales, int sbf16, int64_t group, int64_t K,
                           int64_t n, float *o) {
    if (!group) {
        const int8_t *row = (const int8_t *)w + n * ldw;
        float scale = element_at(scales, n, sbf16);
        for (int64_t k = 0; k < K; k++) o[k] = row[k] * scale;
        return;
    }
    const uint8_t *row = (const uint8_t *)w + n * ldw;
    for (int64_t g = 0, groups = K / group; g < groups; g++) {
        float scale = element_at(scales, (n * groups + g) * 2, sbf16);
        float offset = element_at(scales, (n * groups + g) * 2 + 1, sbf16) - 8 * scale;
        const uint8_t *bytes = row + g * group / 2;
        float *og = o + g * group;
        for (int64_t j = 0; j < group / 2; j++) {
            og[2 * j] = (bytes[j] >> 4) * scale + offset;
            og[2 * j + 1] = (bytes[j] & 15) * scale + offset;
        }
    }
}

#if HAVE_AVX512
/* dequantize_row rounded to bf16, 32 columns at a time (vcvtne2ps2bf16 rounds as f32_to_bf16
 * does): the same values as dequantize_row then f32_to_bf16, without the float32 row between.
 * The products of a 128-token prefill of llama3.2-1b (`tools/cpu_kernels_revisions_ab.py --rows
 * 128`, AMD EPYC Zen 4, 2 threads) took 0.90x the time in int4 and in int8. */
TARGET_AVX512_BF16 static void dequantize_row_bf16(const void *w, int64_t ldw, const void *scales, int sbf16,
                                                   int64_t group, int64_t K, int64_t n, uint16_t *o) {
    if (!group) {
        const int8_t *row = (const int8_t *)w + n * ldw;
        float s = element_at(scales, n, sbf16);
        __m512 scale = _mm512_set1_ps(s);
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(row + k))));
            __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(row + k + 16))));
            _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(b, scale), _mm512_mul_ps(a, scale)));
        }
        for (; k < K; k++) o[k] = f32_to_bf16(row[k] * s);
        return;
    }
    const uint8_t *row = (const uint8_t *)w + n * ldw;
    const __m128i nibble = _mm_set1_epi8(15);
    for (int64_t g = 0, groups = K / group; g < groups; g++) {
        float s = element_at(scales, (n * groups + g) * 2, sbf16);
        __m512 scale = _mm512_set1_ps(s), offset = _mm512_set1_ps(element_at(scales, (n * groups + g) * 2 + 1, sbf16) - 8 * s);
        for (int64_t j = 0; j < group / 2; j += 16) { /* 16 bytes: 32 columns, the high nibble first */
            __m128i bytes = _mm_loadu_si128((const void *)(row + g * group / 2 + j));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), lo = _mm_and_si128(bytes, nibble);
            __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)));
            __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)));
            _mm512_storeu_si512(o + g * group + 2 * j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(b, scale, offset),
                                                                                   _mm512_fmadd_ps(a, scale, offset)));
        }
    }
}
#endif

/* Rows [n0, n1) of that weight into out (row stride K), float32 or rounded to bf16 (out_bf16):
 * the blocks a GEMM multiplies for products of many rows. isa ISA_AVX512 (avx512_bf16, which the
 * caller has checked): bf16 rows without a float32 one between. Returns 0, or -1 if out of memory. */
int dequantize_rows(const void *w, int64_t ldw, const void *scales, int sbf16, int64_t group, int64_t K, int64_t n0,
                    int64_t n1, void *out, int out_bf16, int threads, int isa) {
    int failed = 0;
#if HAVE_AVX512
    if (out_bf16 && isa == ISA_AVX512) {
#pragma omp parallel for num_threads(threads)
        for (int64_t n = n0; n < n1; n++)
            dequantize_row_bf16(w, ldw, scales, sbf16, group, K, n, (uint16_t *)out + (n - n0) * K);
        return 0;
    }
#endif
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *row = out_bf16 ? malloc((size_t)K * sizeof(float)) : NULL;
        failed = out_bf16 && !row;
#pragma omp for
        for (int64_t n = n0; n < n1; n++) {
            if (!out_bf16) {
                dequantize_row(w, ldw, scales, sbf16, group, K, n, (float *)out + (n - n0) * K);
            } else if (row) {
                dequantize_row(w, ldw, scales, sbf16, group, K, n, row);
                uint16_t *o = (uint16_t *)out + (n - n0) * K;
                for (int64_t k = 0; k < K; k++) o[k] = f32_to_bf16(row[k]);
            }
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* Reads `bytes` (whole 64-byte lines) from p with `threads` threads, each its own contiguous part,
 * prefetching as the products do (STREAM_BYTES ahead): the rate at which the kernels can stream
 * their weights, the benchmark's bandwidth ceiling. Returns the XOR of the 64-bit words, so that
 * the reads are not optimized away. */
uint64_t read_memory(const void *p, int64_t bytes, int threads) {
    typedef uint64_t v4q __attribute__((vector_size(32)));
    int64_t lines = bytes / 64;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
        int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const char *q = (const char *)p + lines * t / T * 64, *end = (const char *)p + lines * (t + 1) / T * 64;
        v4q acc[4] = {{0}};
        for (; q + 128 <= end; q += 128) { /* two lines a step */
            __builtin_prefetch(q + STREAM_BYTES, 0, 0);
            __builtin_prefetch(q + STREAM_BYTES + 64, 0, 0);
            for (int i = 0; i < 4; i++) {
                v4q v;
                memcpy(&v, q + 32 * i, sizeof v);
                acc[i] ^= v;
            }
        }
        for (; q < end; q += 32) {
            v4q v;
            memcpy(&v, q, sizeof v);
            acc[0] ^= v;
        }
        v4q all = (acc[0] ^ acc[1]) ^ (acc[2] ^ acc[3]);
        total = all[0] ^ all[1] ^ all[2] ^ all[3];
    }
    return total;
}
