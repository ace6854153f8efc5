/* specpipe's CPU decode kernels: a Llama-family forward pass over fp16 weights with fp32 activations.
 *
 * One call (`sp_forward`) runs every row of a pass through every layer, so a decode step costs one
 * call from Python instead of ~150 tensor ops. A decode step on one core is bound by reading the
 * weights, so each matrix is packed into panels of PANEL columns, stored so that one pass over a
 * panel streams it from memory once for all the rows of the pass (up to ROW_BLOCK rows per sweep).
 *
 * Losslessness rests on every row coming out bitwise the same whatever else shares its pass: a
 * one-token decode step, a verification window and a batch of sequences must agree. Here that holds
 * by construction: a row's sums are accumulated in their own registers in a fixed order, whatever
 * the row count, and its attention visits its visible keys in index order. Only IEEE-exact
 * operations (+, *, fma, /, sqrt) are used; exp is a fixed polynomial of them, so a row's result
 * depends on the binary and its inputs alone. Nothing here may be compiled with -ffast-math.
 *
 * Threads (sp_set_threads): a pass spreads over a persistent pool, the calling thread included. A matrix
 * product splits by output panels and attention by (row, KV head), so each output value is still computed
 * by one thread in the fixed order above: a row's bits do not depend on the thread count either.
 *
 * Built at first use with -march=native (workers/backends/cpu_native.py): AVX-512F, or AVX2 with
 * FMA and F16C, or plain C elsewhere.
 */

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define VLEN 16
typedef __m512 vf;
#define v_zero() _mm512_setzero_ps()
#define v_set1(a) _mm512_set1_ps(a)
#define v_load(p) _mm512_loadu_ps(p)
#define v_store(p, a) _mm512_storeu_ps(p, a)
#define v_add(a, b) _mm512_add_ps(a, b)
#define v_sub(a, b) _mm512_sub_ps(a, b)
#define v_mul(a, b) _mm512_mul_ps(a, b)
#define v_div(a, b) _mm512_div_ps(a, b)
#define v_max(a, b) _mm512_max_ps(a, b)
#define v_min(a, b) _mm512_min_ps(a, b)
#define v_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define v_load_half(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define v_round(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_to_int(a) _mm512_cvtps_epi32(a)
#define v_pow2i(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23))
typedef __m512i vi;
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define VLEN 8
typedef __m256 vf;
#define v_zero() _mm256_setzero_ps()
#define v_set1(a) _mm256_set1_ps(a)
#define v_load(p) _mm256_loadu_ps(p)
#define v_store(p, a) _mm256_storeu_ps(p, a)
#define v_add(a, b) _mm256_add_ps(a, b)
#define v_sub(a, b) _mm256_sub_ps(a, b)
#define v_mul(a, b) _mm256_mul_ps(a, b)
#define v_div(a, b) _mm256_div_ps(a, b)
#define v_max(a, b) _mm256_max_ps(a, b)
#define v_min(a, b) _mm256_min_ps(a, b)
#define v_fma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define v_load_half(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define v_round(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define v_to_int(a) _mm256_cvtps_epi32(a)
#define v_pow2i(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23))
typedef __m256i vi;
#else
/* Plain C: one lane, the same algorithm. */
#define VLEN 1
typedef float vf;
typedef int32_t vi;
#define v_zero() 0.0f
#define v_set1(a) (a)
#define v_load(p) (*(p))
#define v_store(p, a) (*(p) = (a))
#define v_add(a, b) ((a) + (b))
#define v_sub(a, b) ((a) - (b))
#define v_mul(a, b) ((a) * (b))
#define v_div(a, b) ((a) / (b))
#define v_max(a, b) ((a) > (b) ? (a) : (b))
#define v_min(a, b) ((a) < (b) ? (a) : (b))
#define v_fma(a, b, c) fmaf(a, b, c)
#define v_load_half(p) ((float)*(const _Float16 *)(p))
#define v_round(a) nearbyintf(a)
#define v_to_int(a) ((int32_t)(a))
static inline float v_pow2i(int32_t n) {
    union { uint32_t u; float f; } bits = {(uint32_t)(n + 127) << 23};
    return bits.f;
}
#endif

/* A panel is PANEL_VECTORS vectors wide, and a sweep of it keeps ROW_BLOCK rows x PANEL_VECTORS accumulators
 * in registers. AVX-512 (32 registers): 6 rows x 4 accumulators + 4 weights. AVX2 (16 registers): 6 rows x 2
 * accumulators + 2 weights + the broadcast x, the 6x16 tile of BLAS kernels on AVX2; its passes of 1 or 2 rows
 * sweep two panels at once, so that they too keep 4 or more FMAs in flight. */
#if VLEN == 8
#define PANEL_VECTORS 2
#else
#define PANEL_VECTORS 4
#endif
#define PANEL (PANEL_VECTORS * VLEN) /* columns per packed panel */
#define ROW_BLOCK (VLEN == 1 ? 2 : 6)
#define PAIRED_ROWS (PANEL_VECTORS == 2 ? 2 : 0) /* passes of at most this many rows sweep panel pairs */
#define PREFETCH_ROWS 16  /* panel rows ahead to prefetch (2 KB at PANEL 64, 512 bytes at PANEL 16) */

int sp_panel_width(void) { return PANEL; }
int sp_vector_width(void) { return VLEN; }

/* ---------------------------------------------------------------------------------------------- */
/* the thread pool                                                                                 */

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000 /* a helper's polls for the next job before it sleeps: a few tens of microseconds */

typedef void (*sp_task)(void *job, int thread, int threads);

static struct {
    int threads; /* the calling thread and threads - 1 helpers */
    pthread_t helpers[MAX_THREADS];
    sp_task task;
    void *job;
    atomic_uint generation; /* bumped once per job */
    unsigned started_at;    /* the generation when the helpers were started: the last job they must not run */
    atomic_int unfinished;  /* helpers still running the current job */
    atomic_int sleeping;    /* helpers waiting on `wake` */
    atomic_int stopping;
    pthread_mutex_t lock;
    pthread_cond_t wake;
} pool = {.threads = 1, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void pause_briefly(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *helper_loop(void *arg) {
    int thread = (int)(intptr_t)arg;
    unsigned seen = pool.started_at; /* not the generation now: a job may have been published already */
    for (;;) {
        for (int i = 0; i < SPIN_ROUNDS && atomic_load(&pool.generation) == seen; i++) pause_briefly();
        if (atomic_load(&pool.generation) == seen) {
            /* sleeping is raised before generation is read again, and the caller bumps generation before it
             * reads sleeping: one of the two sees the other, so no wake-up is lost */
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load(&pool.generation);
        if (atomic_load(&pool.stopping)) return NULL;
        pool.task(pool.job, thread, pool.threads);
        atomic_fetch_sub(&pool.unfinished, 1);
    }
}

static void publish(sp_task task, void *job) {
    pool.task = task;
    pool.job = job;
    atomic_store(&pool.unfinished, pool.threads - 1);
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleeping) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
}

/* Runs task(job, t, threads) for every t, the caller as thread 0, and returns when all are done. */
static void run_parallel(sp_task task, void *job) {
    if (pool.threads == 1) {
        task(job, 0, 1);
        return;
    }
    publish(task, job);
    task(job, 0, pool.threads);
    while (atomic_load(&pool.unfinished) > 0) pause_briefly();
}

static void stop_helpers(void) {
    if (pool.threads == 1) return;
    atomic_store(&pool.stopping, 1);
    publish(NULL, NULL);
    for (int t = 1; t < pool.threads; t++) pthread_join(pool.helpers[t], NULL);
    atomic_store(&pool.stopping, 0);
    pool.threads = 1;
}

/* A forked child has only the thread that forked: its passes run on that one. */
static void forget_helpers(void) {
    pool.threads = 1;
    atomic_store(&pool.sleeping, 0);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_helpers); }

/* Passes use `threads` threads from now on (the caller and threads - 1 helpers, which inherit its CPU
 * affinity); returns the count in effect. Not to be called while a pass runs. */
int sp_set_threads(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads == pool.threads) return threads;
    stop_helpers();
    pool.started_at = atomic_load(&pool.generation);
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&pool.helpers[t], NULL, helper_loop, (void *)(intptr_t)t) != 0) {
            pool.threads = t; /* as many as started */
            return t;
        }
        pool.threads = t + 1;
    }
    return pool.threads;
}

int sp_threads(void) { return pool.threads; }

/* [first, end) of `count` units for thread `t` of `threads`: contiguous, as even as they divide. */
static inline void share(int count, int t, int threads, int *first, int *end) {
    *first = (int)((int64_t)count * t / threads);
    *end = (int)((int64_t)count * (t + 1) / threads);
}

/* ---------------------------------------------------------------------------------------------- */
/* packing                                                                                        */

/* A matrix as a checkpoint stores it, [out][in] (dtype: 0 float32, 1 bfloat16, 2 float16), possibly as several
 * stored matrices whose rows follow one another (q, k and v; gate and up): parts[i] holds rows[i] of them. Each
 * input k is scaled by scale[k] (NULL: none). -> panels [ceil(out/PANEL)][in][PANEL], the last panel's missing
 * columns zero: the fusion, the layout, the fold of a norm's gain and the rounding to fp16 (to nearest even, as
 * torch's .to(float16)) in one pass, with no concatenated or [in][out] float copy. */
void sp_pack_parts(const void *const *parts, const int32_t *rows, int n_parts, int dtype, const float *scale, int in,
                   uint16_t *panels) {
    int out = 0;
    for (int i = 0; i < n_parts; i++) out += rows[i];
    int n_panels = (out + PANEL - 1) / PANEL, part = 0, part_first = 0;
    for (int p = 0; p < n_panels; p++) {
        uint16_t *dst = panels + (size_t)p * in * PANEL;
        for (int c = 0; c < PANEL; c++) {
            int row = p * PANEL + c;
            if (row >= out) {
                for (int k = 0; k < in; k++) dst[(size_t)k * PANEL + c] = 0;
                continue;
            }
            while (row >= part_first + rows[part]) part_first += rows[part++];
            const void *w = parts[part];
            for (int k = 0; k < in; k++) {
                size_t at = (size_t)(row - part_first) * in + k;
                float v;
                if (dtype == 1) {
                    uint32_t bits = (uint32_t)((const uint16_t *)w)[at] << 16;
                    memcpy(&v, &bits, sizeof v);
                } else if (dtype == 2) {
                    v = (float)((const _Float16 *)w)[at];
                } else {
                    v = ((const float *)w)[at];
                }
                if (scale) v *= scale[k];
                _Float16 half = (_Float16)v;
                memcpy(&dst[(size_t)k * PANEL + c], &half, sizeof half);
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* the matrix product                                                                              */

typedef struct {
    const uint16_t *panels; /* sp_pack_parts' layout */
    const float *bias;      /* [out] or NULL */
    int32_t in, out;
} sp_matrix;

/* `rows` (<= ROW_BLOCK) rows over `panels` (1, or 2 adjacent) panels: acc[r] = x[r] . W[:, their columns],
 * in k order. Inlined into a call per shape (sweep), so that the accumulators live in registers. Prefetches
 * `ahead` + k * `ahead_step` (and as far into the second panel) at row k of the panel. */
static inline __attribute__((always_inline)) void sweep_rows(const float *x, const int rows, int in,
                                                              const uint16_t *panel, const int panels,
                                                              const char *ahead, size_t ahead_step,
                                                              float out[ROW_BLOCK][2 * PANEL]) {
    const size_t second = (size_t)in * PANEL; /* the next panel, in halves */
    vf acc[ROW_BLOCK][2 * PANEL_VECTORS];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < panels * PANEL_VECTORS; c++) acc[r][c] = v_zero();
    for (int k = 0; k < in; k++) {
        const uint16_t *wk = panel + (size_t)k * PANEL;
#if VLEN > 1
#pragma GCC unroll 2
        for (int q = 0; q < panels; q++) {
            __builtin_prefetch(ahead + k * ahead_step + q * second * sizeof(uint16_t));
            if (PANEL_VECTORS == 4) __builtin_prefetch(ahead + k * ahead_step + q * second * sizeof(uint16_t) + PANEL);
        }
#endif
        vf w[2 * PANEL_VECTORS];
#pragma GCC unroll 8
        for (int c = 0; c < panels * PANEL_VECTORS; c++)
            w[c] = v_load_half(wk + (c / PANEL_VECTORS) * second + (c % PANEL_VECTORS) * VLEN);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            vf xr = v_set1(x[(size_t)r * in + k]);
#pragma GCC unroll 8
            for (int c = 0; c < panels * PANEL_VECTORS; c++) acc[r][c] = v_fma(xr, w[c], acc[r][c]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < panels * PANEL_VECTORS; c++) v_store(&out[r][c * VLEN], acc[r][c]);
}

static void sweep(const float *x, int rows, int in, const uint16_t *panel, int panels, const char *ahead,
                  size_t ahead_step, float out[ROW_BLOCK][2 * PANEL]) {
#define SWEEP(n, q) sweep_rows(x, n, in, panel, q, ahead, ahead_step, out)
    if (panels == 2) {
#if PAIRED_ROWS
        if (rows == 1) SWEEP(1, 2); else SWEEP(2, 2);
#endif
        return;
    }
    switch (rows) {
    case 1: SWEEP(1, 1); break;
    case 2: SWEEP(2, 1); break;
#if ROW_BLOCK > 2
    case 3: SWEEP(3, 1); break;
    case 4: SWEEP(4, 1); break;
    case 5: SWEEP(5, 1); break;
    case 6: SWEEP(6, 1); break;
#endif
    }
#undef SWEEP
}

/* Sweeps of a panel that `rows` rows take, ROW_BLOCK at most each. */
static inline int sweeps_for(int rows) { return (rows + ROW_BLOCK - 1) / ROW_BLOCK; }

/* The rows of the next sweep, of `left` still to do: blocks as even as ROW_BLOCK allows (8 rows sweep as
 * 4 + 4, not 6 + 2), since a sweep of 1 or 2 rows has too few accumulators to hide the FMAs' latency. */
static inline int sweep_rows_of(int left) {
    int sweeps = sweeps_for(left);
    return (left + sweeps - 1) / sweeps;
}

/* y [rows][ldy] = x [rows][in] @ W (+ bias), or y += that when `accumulate` (a residual), for the panels
 * [first, end) (units of `panels` panels: a thread's share). */
static void matmul_panels(const sp_matrix *m, const float *x, int rows, float *y, int ldy, int accumulate,
                          int first_unit, int end_unit) {
    float block[ROW_BLOCK][2 * PANEL];
    int n_panels = (m->out + PANEL - 1) / PANEL;
    int panels = rows <= PAIRED_ROWS ? 2 : 1; /* per step; a pair's last panel may be alone */
    int sweeps = sweeps_for(rows);
    size_t panel_bytes = (size_t)m->in * PANEL * sizeof(uint16_t);
    int end_panel = end_unit * panels < n_panels ? end_unit * panels : n_panels;
    /* panel by panel (or pair by pair), then its rows block by block: a panel (PANEL x in fp16, 16 KB at 512
     * inputs on AVX2) comes from memory once, and the sweeps for further row blocks find it in cache */
    for (int p = first_unit * panels; p < end_panel; p += panels) {
        const uint16_t *panel = m->panels + (size_t)p * m->in * PANEL;
        int here = n_panels - p < panels ? n_panels - p : panels;
        for (int first = 0, left = rows, s = 0; left > 0; s++) {
            int count = sweep_rows_of(left);
            const char *ahead = (const char *)(panel + PREFETCH_ROWS * PANEL);
            size_t step = PANEL * sizeof(uint16_t);
            if (sweeps > 1 && p + 1 < end_panel) {
                /* each sweep fetches its share of the next panel, so that memory works while the FMAs do
                 * (otherwise the sweeps after the first, FMA-bound on a cached panel, leave it idle) */
                ahead = (const char *)panel + panel_bytes + s * panel_bytes / sweeps;
                step /= sweeps;
            }
            sweep(x + (size_t)first * m->in, count, m->in, panel, here, ahead, step, block);
            int col = p * PANEL, width = m->out - col < here * PANEL ? m->out - col : here * PANEL;
            for (int r = 0; r < count; r++) {
                float *yr = y + (size_t)(first + r) * ldy + col;
                for (int c = 0; c < width; c++) {
                    float v = m->bias ? block[r][c] + m->bias[col + c] : block[r][c];
                    yr[c] = accumulate ? yr[c] + v : v;
                }
            }
            first += count;
            left -= count;
        }
    }
}

static inline int panel_units(const sp_matrix *m, int rows) {
    int n_panels = (m->out + PANEL - 1) / PANEL, panels = rows <= PAIRED_ROWS ? 2 : 1;
    return (n_panels + panels - 1) / panels;
}

typedef struct {
    const sp_matrix *m;
    const float *x;
    int rows, ldy, accumulate;
    float *y;
} matmul_job;

static void matmul_task(void *job, int t, int threads) {
    const matmul_job *j = job;
    int first, end;
    share(panel_units(j->m, j->rows), t, threads, &first, &end);
    matmul_panels(j->m, j->x, j->rows, j->y, j->ldy, j->accumulate, first, end);
}

/* The product over every thread of the pool, each taking a contiguous share of the panels. */
static void matmul(const sp_matrix *m, const float *x, int rows, float *y, int ldy, int accumulate) {
    matmul_job job = {m, x, rows, ldy, accumulate, y};
    run_parallel(matmul_task, &job);
}

void sp_matmul(const sp_matrix *m, const float *x, int rows, float *y) { matmul(m, x, rows, y, m->out, 0); }

/* ---------------------------------------------------------------------------------------------- */
/* element-wise pieces                                                                             */

static inline float sum_lanes(vf a) { /* a fixed tree of additions */
#if VLEN == 16
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)); /* AVX-512F alone */
    __m256 half = _mm256_add_ps(_mm512_castps512_ps256(a), high);
#elif VLEN == 8
    __m256 half = a;
#endif
#if VLEN > 1
    __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    return _mm_cvtss_f32(quarter);
#else
    return a;
#endif
}

static inline float dot(const float *a, const float *b, int n) { /* n a multiple of VLEN */
    vf acc = v_zero();
    for (int i = 0; i < n; i += VLEN) acc = v_fma(v_load(a + i), v_load(b + i), acc);
    return sum_lanes(acc);
}

/* e^x, for x in [-87, 88] (clamped there): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial. */
static inline vf v_exp(vf x) {
    x = v_min(v_max(x, v_set1(-87.0f)), v_set1(88.0f));
    vf n = v_round(v_mul(x, v_set1(1.44269504088896341f)));
    vf r = v_fma(n, v_set1(-0.693359375f), x); /* ln2 in two parts, Cody-Waite */
    r = v_fma(n, v_set1(2.12194440e-4f), r);
    vf p = v_set1(1.3888949e-3f);
    p = v_fma(p, r, v_set1(8.3334519e-3f));
    p = v_fma(p, r, v_set1(4.1665795e-2f));
    p = v_fma(p, r, v_set1(1.6666665e-1f));
    p = v_fma(p, r, v_set1(5.0000001e-1f));
    p = v_fma(p, r, v_set1(1.0f));
    p = v_fma(p, r, v_set1(1.0f));
    return v_mul(p, v_pow2i(v_to_int(n)));
}

/* x * 1/sqrt(sum(x^2) + eps*d): RMSNorm without its gain or 1/sqrt(d), both folded into the next matrix. */
static void normalize(const float *x, float *out, int d, float eps_times_dim) {
    float scale = 1.0f / sqrtf(dot(x, x, d) + eps_times_dim);
    vf s = v_set1(scale);
    for (int i = 0; i < d; i += VLEN) v_store(out + i, v_mul(v_load(x + i), s));
}

/* RoPE on one head, in place: x*cos + rotate_half(x)*sin, the signs of rotate_half in the sin table. */
static void rotate(float *x, const float *cos, const float *sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = fmaf(b, sin[i], a * cos[i]);
        x[i + half] = fmaf(a, sin[i + half], b * cos[i + half]);
    }
}

/* silu(gate) * up = gate / (1 + e^-gate) * up, over n values (a multiple of VLEN). */
static void swiglu(const float *gate, const float *up, float *out, int n) {
    vf one = v_set1(1.0f), zero = v_zero();
    for (int i = 0; i < n; i += VLEN) {
        vf g = v_load(gate + i);
        vf silu = v_div(g, v_add(one, v_exp(v_sub(zero, g))));
        v_store(out + i, v_mul(silu, v_load(up + i)));
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* the model                                                                                       */

typedef struct {
    sp_matrix qkv, o, gate_up, down;
    float *k_cache, *v_cache; /* [slots][kv_heads][max_seq][head_dim] */
} sp_layer;

typedef struct {
    int32_t n_layers, d, n_heads, n_kv_heads, head_dim, ffn, vocab, max_seq;
    float eps_times_dim, attn_scale;
    const float *embed;          /* [vocab][d] */
    const float *cos, *sin;      /* [max_seq][head_dim] */
    const sp_layer *layers;
    sp_matrix head;              /* the LM head, the final norm's gain folded in */
} sp_model;

/* One row of a pass, as the caller lays it out: five int32 per row. */
enum { ROW_TOKEN, ROW_SLOT, ROW_POSITION, ROW_INDEX, ROW_END, ROW_FIELDS };

typedef struct {
    int32_t token, slot;
    int32_t position; /* rotary position */
    int32_t index;    /* cache index its keys and values go to */
    int32_t end;      /* it attends to cache indices [0, end) ... */
    const uint8_t *mask; /* ... where mask[j] is nonzero, or all of them when NULL */
} sp_row;

/* The layout of the structs the caller builds (cpu_native.py's ctypes copies check theirs against it at load):
 * per struct its size, then per field its offset, in declaration order. */
typedef struct {
    const char *name; /* "struct" or "struct.field" */
    int64_t value;    /* sizeof the struct, or offsetof the field */
} sp_layout_entry;

#define LAYOUT_STRUCT(T) {#T, (int64_t)sizeof(T)}
#define LAYOUT_FIELD(T, f) {#T "." #f, (int64_t)offsetof(T, f)}
static const sp_layout_entry layout[] = {
    LAYOUT_STRUCT(sp_matrix), LAYOUT_FIELD(sp_matrix, panels), LAYOUT_FIELD(sp_matrix, bias),
    LAYOUT_FIELD(sp_matrix, in), LAYOUT_FIELD(sp_matrix, out),
    LAYOUT_STRUCT(sp_layer), LAYOUT_FIELD(sp_layer, qkv), LAYOUT_FIELD(sp_layer, o), LAYOUT_FIELD(sp_layer, gate_up),
    LAYOUT_FIELD(sp_layer, down), LAYOUT_FIELD(sp_layer, k_cache), LAYOUT_FIELD(sp_layer, v_cache),
    LAYOUT_STRUCT(sp_model), LAYOUT_FIELD(sp_model, n_layers), LAYOUT_FIELD(sp_model, d),
    LAYOUT_FIELD(sp_model, n_heads), LAYOUT_FIELD(sp_model, n_kv_heads), LAYOUT_FIELD(sp_model, head_dim),
    LAYOUT_FIELD(sp_model, ffn), LAYOUT_FIELD(sp_model, vocab), LAYOUT_FIELD(sp_model, max_seq),
    LAYOUT_FIELD(sp_model, eps_times_dim), LAYOUT_FIELD(sp_model, attn_scale), LAYOUT_FIELD(sp_model, embed),
    LAYOUT_FIELD(sp_model, cos), LAYOUT_FIELD(sp_model, sin), LAYOUT_FIELD(sp_model, layers),
    LAYOUT_FIELD(sp_model, head),
};
#undef LAYOUT_STRUCT
#undef LAYOUT_FIELD

/* The layout table: its entries' count, and their address in *entries. */
int sp_struct_layout(const sp_layout_entry **entries) {
    *entries = layout;
    return (int)(sizeof(layout) / sizeof(layout[0]));
}

/* A thread's attention scores: a row of max_seq + VLEN floats per query head of a KV head. */
static inline size_t scores_floats(const sp_model *m) {
    return (size_t)(m->max_seq + VLEN) * (m->n_heads / m->n_kv_heads);
}

/* The floats of scratch one pass of `rows` rows needs (whatever the thread count: scores for MAX_THREADS;
 * pages a pass never touches cost nothing). */
size_t sp_scratch_floats(const sp_model *m, int rows) {
    size_t q = (size_t)m->n_heads * m->head_dim, kv = (size_t)m->n_kv_heads * m->head_dim;
    return (size_t)rows * (2 * m->d + q + 2 * kv + q + 3 * (size_t)m->ffn) + MAX_THREADS * scores_floats(m);
}

/* One row's attention, every query head of one KV head at once (they share its keys and values).
 * scores: group rows of max_seq + VLEN floats. */
static void attend(const sp_model *m, const sp_row *row, const float *q, const float *keys, const float *values,
                   float *out, float *scores) {
    int hd = m->head_dim, group = m->n_heads / m->n_kv_heads, end = row->end;
    int padded = (end + VLEN - 1) / VLEN * VLEN;
    for (int g = 0; g < group; g++) {
        float *s = scores + (size_t)g * (m->max_seq + VLEN);
        const float *qg = q + (size_t)g * hd;
        float best = -INFINITY;
        for (int j = 0; j < end; j++) {
            s[j] = (row->mask && !row->mask[j]) ? -INFINITY : dot(qg, keys + (size_t)j * hd, hd) * m->attn_scale;
            best = s[j] > best ? s[j] : best;
        }
        for (int j = end; j < padded; j++) s[j] = -INFINITY;
        /* e^(s - best), every lane alike; hidden keys then weigh exactly 0 */
        vf top = v_set1(best);
        for (int j = 0; j < padded; j += VLEN) v_store(s + j, v_exp(v_sub(v_load(s + j), top)));
        float total = 0.0f;
        for (int j = 0; j < end; j++) {
            if (row->mask && !row->mask[j]) s[j] = 0.0f;
            total += s[j];
        }
        float *og = out + (size_t)g * hd;
        for (int i = 0; i < hd; i += VLEN) {
            vf acc = v_zero();
            if (row->mask) { /* hidden keys' values may be stale scratch: skipped, not multiplied by 0 */
                for (int j = 0; j < end; j++)
                    if (row->mask[j]) acc = v_fma(v_set1(s[j]), v_load(values + (size_t)j * hd + i), acc);
            } else {
                for (int j = 0; j < end; j++) acc = v_fma(v_set1(s[j]), v_load(values + (size_t)j * hd + i), acc);
            }
            v_store(og + i, v_div(acc, v_set1(total)));
        }
    }
}

typedef struct {
    const sp_model *m;
    const sp_layer *L;
    const sp_row *rows;
    int count;
    const float *qkv;
    float *attn, *scores;
} attention_job;

/* Thread t's share of the (row, KV head) pairs, each attended with the thread's own scores. */
static void attention_task(void *job, int t, int threads) {
    const attention_job *j = job;
    const sp_model *m = j->m;
    int hd = m->head_dim, n_kv = m->n_kv_heads, group = m->n_heads / n_kv;
    int q_width = m->n_heads * hd, qkv_width = q_width + 2 * n_kv * hd;
    size_t slot_stride = (size_t)n_kv * m->max_seq * hd, head_stride = (size_t)m->max_seq * hd;
    float *scores = j->scores + (size_t)t * scores_floats(m);
    int first, end;
    share(j->count * n_kv, t, threads, &first, &end);
    for (int unit = first; unit < end; unit++) {
        int r = unit / n_kv, g = unit % n_kv;
        size_t at = j->rows[r].slot * slot_stride + g * head_stride;
        attend(m, &j->rows[r], j->qkv + (size_t)r * qkv_width + (size_t)g * group * hd, j->L->k_cache + at,
               j->L->v_cache + at, j->attn + (size_t)r * q_width + (size_t)g * group * hd, scores);
    }
}

typedef struct {
    const float *gate_up;
    float *act;
    int count, f;
} swiglu_job;

static void swiglu_task(void *job, int t, int threads) {
    const swiglu_job *j = job;
    int first, end;
    share(j->count, t, threads, &first, &end);
    for (int r = first; r < end; r++)
        swiglu(j->gate_up + (size_t)r * 2 * j->f, j->gate_up + (size_t)r * 2 * j->f + j->f, j->act + (size_t)r * j->f,
               j->f);
}

static void layer_forward(const sp_model *m, const sp_layer *L, const sp_row *rows, int count, float *x,
                          float *scratch) {
    int d = m->d, hd = m->head_dim, n_kv = m->n_kv_heads;
    int q_width = m->n_heads * hd, kv_width = n_kv * hd, qkv_width = q_width + 2 * kv_width, f = m->ffn;
    float *h = scratch;                          /* [count][d] */
    float *qkv = h + (size_t)count * d;          /* [count][qkv_width] */
    float *attn = qkv + (size_t)count * qkv_width; /* [count][q_width] */
    float *gate_up = attn + (size_t)count * q_width; /* [count][2f] */
    float *act = gate_up + (size_t)count * 2 * f;  /* [count][f] */
    float *scores = act + (size_t)count * f;       /* [MAX_THREADS][group][max_seq + VLEN] */

    for (int r = 0; r < count; r++) normalize(x + (size_t)r * d, h + (size_t)r * d, d, m->eps_times_dim);
    matmul(&L->qkv, h, count, qkv, qkv_width, 0);
    size_t slot_stride = (size_t)n_kv * m->max_seq * hd, head_stride = (size_t)m->max_seq * hd;
    for (int r = 0; r < count; r++) { /* rotate q and k, then store k and v: every row's before any attends */
        float *row_qkv = qkv + (size_t)r * qkv_width;
        const float *cos = m->cos + (size_t)rows[r].position * hd, *sin = m->sin + (size_t)rows[r].position * hd;
        for (int head = 0; head < m->n_heads + n_kv; head++) rotate(row_qkv + (size_t)head * hd, cos, sin, hd);
        for (int g = 0; g < n_kv; g++) {
            size_t at = rows[r].slot * slot_stride + g * head_stride + (size_t)rows[r].index * hd;
            memcpy(L->k_cache + at, row_qkv + q_width + (size_t)g * hd, hd * sizeof(float));
            memcpy(L->v_cache + at, row_qkv + q_width + kv_width + (size_t)g * hd, hd * sizeof(float));
        }
    }
    attention_job attention = {m, L, rows, count, qkv, attn, scores};
    run_parallel(attention_task, &attention);
    matmul(&L->o, attn, count, x, d, 1);
    for (int r = 0; r < count; r++) normalize(x + (size_t)r * d, h + (size_t)r * d, d, m->eps_times_dim);
    matmul(&L->gate_up, h, count, gate_up, 2 * f, 0);
    swiglu_job activation = {gate_up, act, count, f};
    run_parallel(swiglu_task, &activation);
    matmul(&L->down, act, count, x, d, 1);
}

/* Every row through every layer (writing each row's keys and values), then logits [n_logits][vocab] for
 * the rows listed in logit_rows. fields: [count][ROW_FIELDS] int32; masks: [count] mask rows (a NULL entry,
 * or masks NULL: the row sees all of [0, end)); scratch: sp_scratch_floats(m, count) floats; x: [count][d]. */
void sp_forward(const sp_model *m, const int32_t *fields, const uint8_t *const *masks, int count,
                const int32_t *logit_rows, int n_logits, float *logits, float *x, float *scratch) {
    int d = m->d;
    sp_row rows[count];
    for (int r = 0; r < count; r++) {
        const int32_t *f = fields + (size_t)r * ROW_FIELDS;
        rows[r] = (sp_row){f[ROW_TOKEN], f[ROW_SLOT], f[ROW_POSITION], f[ROW_INDEX], f[ROW_END],
                           masks ? masks[r] : NULL};
        memcpy(x + (size_t)r * d, m->embed + (size_t)rows[r].token * d, d * sizeof(float));
    }
    for (int i = 0; i < m->n_layers; i++) layer_forward(m, &m->layers[i], rows, count, x, scratch);
    float *h = scratch;
    for (int i = 0; i < n_logits; i++) normalize(x + (size_t)logit_rows[i] * d, h + (size_t)i * d, d, m->eps_times_dim);
    matmul(&m->head, h, n_logits, logits, m->vocab, 0);
}

/* Reads `count` floats (a multiple of 4 * VLEN) and returns their sum, so that no read can be skipped: the
 * memory bandwidth a decode step is bound by (scripts/profile_step.py). */
float sp_read(const float *p, size_t count) {
    vf a = v_zero(), b = v_zero(), c = v_zero(), e = v_zero();
    for (size_t i = 0; i < count; i += 4 * VLEN) {
        a = v_add(a, v_load(p + i));
        b = v_add(b, v_load(p + i + VLEN));
        c = v_add(c, v_load(p + i + 2 * VLEN));
        e = v_add(e, v_load(p + i + 3 * VLEN));
    }
    return sum_lanes(v_add(v_add(a, b), v_add(c, e)));
}

/* Every matrix of the model once for one row, in a step's order, and nothing else: the products' share of a
 * decode step (scripts/profile_step.py). x: max(widest input) floats, y: max(widest output) floats. */
void sp_products(const sp_model *m, const float *x, float *y) {
    for (int i = 0; i < m->n_layers; i++) {
        const sp_layer *L = &m->layers[i];
        matmul(&L->qkv, x, 1, y, L->qkv.out, 0);
        matmul(&L->o, x, 1, y, L->o.out, 0);
        matmul(&L->gate_up, x, 1, y, L->gate_up.out, 0);
        matmul(&L->down, x, 1, y, L->down.out, 0);
    }
    matmul(&m->head, x, 1, y, m->vocab, 0);
}
