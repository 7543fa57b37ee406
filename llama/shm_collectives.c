/* All-reduce (sum) and all-gather between processes of one host through a shared-memory
 * segment; loaded with ctypes by llama/shm_collectives.py, which documents the design.
 *
 * Segment: a header of one flag per rank (each on its own 128 bytes, so a rank's stores do
 * not evict its peers' lines, adjacent-line prefetch included), then two banks of one slot
 * per rank. A collective runs in rounds of at most a slot's bytes: each rank copies its
 * piece into its slot of bank (round & 1), publishes the round number in its flag (release),
 * waits until every flag reaches that round (acquire), then reads every slot. A rank can be
 * at most one round ahead of the slowest, so it never overwrites a bank still being read.
 */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define FLAG_STRIDE 128
#define HEADER_ALIGN 4096

/* Element types of the reduction, numbered as in shm_collectives.py. */
enum { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

/* Wait outcomes beyond 0 (success): the rank concerned is added to these. */
enum { PEER_DIED = 1000, PEER_LATE = 2000, PEER_DIFFERS = 3000 };

/* What a rank's current collective is, published with each round (one per bank, as the slots):
 * every rank checks its peers' against its own before it reads their slots, so ranks that
 * disagree (a bug) fail at once instead of mixing each other's data. */
typedef struct {
    int64_t op;        /* 1 all-reduce, 2 all-gather */
    int64_t dtype;     /* the all-reduce's element type; -1 for an all-gather */
    int64_t bytes;     /* of the whole call's input */
    int64_t row_bytes; /* the all-gather's rows; 0 for an all-reduce */
} Call;

typedef struct {
    int64_t round; /* the last round this rank has published */
    int64_t pid;   /* for the liveness check of ranks waited on */
    uint64_t nonce; /* rank 0 writes it; the others check they opened the same segment */
    Call call[2];   /* by bank: the call of the round published last in it */
} Flag;

static int64_t header_bytes(int n) {
    int64_t bytes = (int64_t)n * FLAG_STRIDE;
    return (bytes + HEADER_ALIGN - 1) / HEADER_ALIGN * HEADER_ALIGN;
}

int64_t shm_segment_bytes(int n, int64_t slot_bytes) { return header_bytes(n) + 2 * (int64_t)n * slot_bytes; }

static Flag *flag_of(char *base, int rank) { return (Flag *)(base + (int64_t)rank * FLAG_STRIDE); }

void shm_set_identity(char *base, int rank, int64_t pid, uint64_t nonce) {
    Flag *f = flag_of(base, rank);
    f->pid = pid;
    f->nonce = nonce;
    __atomic_store_n(&f->round, 0, __ATOMIC_RELEASE);
}

uint64_t shm_nonce(char *base) { return flag_of(base, 0)->nonce; }

static char *slot_of(char *base, int n, int64_t slot_bytes, int64_t round, int rank) {
    return base + header_bytes(n) + ((round & 1) * n + rank) * slot_bytes;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* False once `pid` has exited: gone (ESRCH), or a zombie its parent has not reaped yet. */
static int process_alive(int64_t pid) {
    if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) return 0;
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 1; /* no procfs: kill() has answered */
    size_t len = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    stat[len] = 0;
    char *end_of_name = strrchr(stat, ')'); /* the state follows "(command name) " */
    return !(end_of_name && end_of_name[1] == ' ' && (end_of_name[2] == 'Z' || end_of_name[2] == 'X'));
}

/* Spin briefly (the lowest latency when every rank has a core), then yield (ranks sharing
 * cores let each other run), then sleep (a long wait costs no CPU). The liveness of the
 * awaited rank is checked every 20 ms, the deadline at the same time. */
int shm_peer_alive(char *base, int rank) { return process_alive(flag_of(base, rank)->pid); }

static int wait_for_round(char *base, int n, int64_t round, double timeout_s) {
    double start = 0, checked = 0;
    for (int r = 0; r < n; r++) {
        Flag *f = flag_of(base, r);
        for (uint64_t spins = 0; __atomic_load_n(&f->round, __ATOMIC_ACQUIRE) < round; spins++) {
            if (spins < 2000) {
                cpu_relax();
                continue;
            }
            double t = now_s();
            if (start == 0) start = checked = t;
            if (t - start < 0.01) {
                sched_yield();
            } else {
                struct timespec nap = {0, 50000};
                nanosleep(&nap, NULL);
            }
            if (t - checked > 0.02) {
                checked = t;
                if (!process_alive(f->pid)) return PEER_DIED + r;
                if (t - start > timeout_s) return PEER_LATE + r;
            }
        }
    }
    return 0;
}

static int publish_and_wait(char *base, int rank, int n, int64_t round, Call call, double timeout_s) {
    flag_of(base, rank)->call[round & 1] = call;
    __atomic_store_n(&flag_of(base, rank)->round, round, __ATOMIC_RELEASE);
    int status = wait_for_round(base, n, round, timeout_s);
    for (int r = 0; r < n && !status; r++)
        if (memcmp(&flag_of(base, r)->call[round & 1], &call, sizeof call)) status = PEER_DIFFERS + r;
    return status;
}

/* The call `rank` published with round `round` (for the error message): op, dtype, bytes, row_bytes. */
void shm_peer_call(char *base, int rank, int64_t round, int64_t *out) {
    Call c = flag_of(base, rank)->call[round & 1];
    out[0] = c.op, out[1] = c.dtype, out[2] = c.bytes, out[3] = c.row_bytes;
}

int64_t shm_round(char *base, int rank) { return flag_of(base, rank)->round; }

/* Conversions as c10 does them (round to nearest even; c10's NaN encodings). */
static float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t bits_of_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bf16_to_f32(uint16_t h) { return f32_of_bits((uint32_t)h << 16); }

static float f16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normalized = f32_of_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denormalized = f32_of_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_of_bits(sign | bits_of_f32(two_w < (1u << 27) ? denormalized : normalized));
}

static uint16_t f32_to_f16(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    uint32_t w = bits_of_f32(f), shl1_w = w + w, sign = w & 0x80000000u, bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_of_bits((bias >> 1) + 0x07800000u) + base;
    uint32_t b = bits_of_f32(base);
    uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* Round a float to the nearest bfloat16 / float16 value, keeping it a float. */
static float round_bf16(float f) {
    uint32_t u = bits_of_f32(f);
    return f32_of_bits((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc00000u : (u + 0x7fffu + ((u >> 16) & 1)) & 0xffff0000u);
}

static float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

static uint16_t bf16_of_rounded(float f) { return (uint16_t)(bits_of_f32(f) >> 16); }

/* Built for AVX2 as well where the CPU has it (chosen when the library loads): the bfloat16
 * fold runs about 4x faster than with the baseline x86-64 instructions. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_TARGETS __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef VECTOR_TARGETS
#define VECTOR_TARGETS
#endif

/* out[i] = src[order[0]][i] + src[order[1]][i] + ..., left to right, rounding to the element
 * type after every addition as gloo's ring does; blocks of a float accumulator keep the
 * loops vectorizable. Called with n >= 2, so every stored value has been rounded. */
#define BLOCK 256
#define FOLD(NAME, T, ACC, TO_ACC, ROUND, FROM_ACC)                                                  \
    VECTOR_TARGETS static void NAME(void *out_, const void *const *src, const int *order, int n,     \
                                    int64_t count) {                                                 \
        T *out = (T *)out_;                                                                          \
        for (int64_t s = 0; s < count; s += BLOCK) {                                                 \
            int64_t m = count - s < BLOCK ? count - s : BLOCK;                                       \
            ACC acc[BLOCK];                                                                          \
            const T *first = (const T *)src[order[0]] + s;                                           \
            for (int64_t i = 0; i < m; i++) acc[i] = TO_ACC(first[i]);                               \
            for (int k = 1; k < n; k++) {                                                            \
                const T *x = (const T *)src[order[k]] + s;                                           \
                for (int64_t i = 0; i < m; i++) acc[i] = ROUND(TO_ACC(x[i]) + acc[i]);               \
            }                                                                                        \
            for (int64_t i = 0; i < m; i++) out[s + i] = FROM_ACC(acc[i]);                           \
        }                                                                                            \
    }
#define SAME(x) (x)
FOLD(fold_f32, float, float, SAME, SAME, SAME)
FOLD(fold_f64, double, double, SAME, SAME, SAME)
FOLD(fold_bf16, uint16_t, float, bf16_to_f32, round_bf16, bf16_of_rounded)
FOLD(fold_f16, uint16_t, float, f16_to_f32, round_f16, f32_to_f16)

static int64_t div_up(int64_t a, int64_t b) { return a / b + (a % b != 0); }

/* Elements of each rank's chunk in gloo's ring all-reduce (gloo/allreduce.cc): the input is
 * cut into a multiple of n segments, at least 2n, and rank c ends up holding the sum of chunk
 * c (segments c * per_rank ...), accumulated along the ring from rank c - 1 down to rank c. */
static int64_t ring_chunk_elements(int64_t numel, int element_size, int n, int64_t max_segment_bytes) {
    int64_t max_segment = element_size * (max_segment_bytes / element_size > 1 ? max_segment_bytes / element_size : 1);
    int64_t segments = div_up(numel * element_size, max_segment);
    if (segments < 2 * n) segments = 2 * n;
    segments = div_up(segments, n) * n;
    return segments / n * div_up(numel, segments);
}

/* Sum `in` (numel elements) over the n ranks into `out`, each element in the order gloo's
 * ring would add it, so results equal gloo's bit for bit and are identical on every rank.
 * Returns 0, PEER_DIED + rank, PEER_LATE + rank or PEER_DIFFERS + rank. */
int shm_all_reduce(char *base, int rank, int n, int64_t slot_bytes, const void *in, void *out,
                   int64_t numel, int dtype, int64_t max_segment_bytes, double timeout_s) {
    static const int sizes[] = {4, 8, 2, 2};
    void (*fold)(void *, const void *const *, const int *, int, int64_t) =
        dtype == F32 ? fold_f32 : dtype == F64 ? fold_f64 : dtype == BF16 ? fold_bf16 : fold_f16;
    int size = sizes[dtype];
    int64_t chunk = ring_chunk_elements(numel, size, n, max_segment_bytes);
    int64_t per_round = slot_bytes / size;
    const void *src[256];
    int order[256];
    for (int64_t start = 0; start < numel; start += per_round) {
        int64_t count = numel - start < per_round ? numel - start : per_round;
        int64_t r = flag_of(base, rank)->round + 1;
        memcpy(slot_of(base, n, slot_bytes, r, rank), (const char *)in + start * size, count * size);
        int status = publish_and_wait(base, rank, n, r, (Call){1, dtype, numel * size, 0}, timeout_s);
        if (status) return status;
        for (int p = 0; p < n; p++) src[p] = slot_of(base, n, slot_bytes, r, p);
        /* Split this round's elements where gloo's chunks (and so the orders) change. */
        for (int64_t i = start; i < start + count;) {
            int64_t c = i / chunk, end = (c + 1) * chunk < start + count ? (c + 1) * chunk : start + count;
            for (int k = 0; k < n; k++) order[k] = (int)(((c - 1 - k) % n + n) % n);
            const void *shifted[256];
            for (int p = 0; p < n; p++) shifted[p] = (const char *)src[p] + (i - start) * size;
            fold((char *)out + i * size, shifted, order, n, end - i);
            i = end;
        }
    }
    return 0;
}

/* Concatenate every rank's `rows` x `row_bytes` input along its rows' last dimension:
 * out is rows x (n * row_bytes), rank p's row i at out + (i * n + p) * row_bytes. */
int shm_all_gather(char *base, int rank, int n, int64_t slot_bytes, const void *in, void *out,
                   int64_t rows, int64_t row_bytes, double timeout_s) {
    int64_t total = rows * row_bytes;
    for (int64_t start = 0; start < total; start += slot_bytes) {
        int64_t count = total - start < slot_bytes ? total - start : slot_bytes;
        int64_t r = flag_of(base, rank)->round + 1;
        memcpy(slot_of(base, n, slot_bytes, r, rank), (const char *)in + start, count);
        int status = publish_and_wait(base, rank, n, r, (Call){2, -1, total, row_bytes}, timeout_s);
        if (status) return status;
        for (int p = 0; p < n; p++) {
            const char *slot = slot_of(base, n, slot_bytes, r, p);
            for (int64_t at = start; at < start + count;) {
                int64_t row = at / row_bytes, offset = at % row_bytes;
                int64_t len = row_bytes - offset < start + count - at ? row_bytes - offset : start + count - at;
                memcpy((char *)out + (row * n + p) * row_bytes + offset, slot + (at - start), len);
                at += len;
            }
        }
    }
    return 0;
}
