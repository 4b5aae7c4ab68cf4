/* TIDE's CPU kernels for bf16 weights: the routed experts' SwiGLU FFN, for the few tokens per
 * expert a decoding step brings, and a plain linear for the rest of the model.
 *
 * Why: a step reads each expert's weights once for 1-64 tokens, so the work is bound by the
 * memory's read bandwidth. torch's bf16 matmul on a CPU without AVX-512 BF16 falls back to a
 * path that converts every weight once per token (a 2048x512 matrix at 16 tokens read at
 * 0.9 GB/s on the 2-core AVX2 VM, against 17.8 GB/s the memory reads). Here each weight row
 * is converted once and multiplied into every token of its block, in fp32, with FMA.
 *
 * Numbers: each stage is rounded to bf16 where torch's bf16 ops round (gate and up outputs,
 * silu, the product, the down output, a linear's output after its bias), so the FFN is
 * torch's op by op; only the order of a dot product's sum differs. Every weight row goes
 * through the same accumulation whatever shares its call, so a row's result never depends on
 * the other rows, tokens or threads of the call.
 *
 * Built at first use by runtime/cpu_kernel.py (cc -O3 -march=native -fopenmp), linked against
 * the libgomp torch has already loaded, so both share one thread pool. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

#define PF 1024    /* elements ahead a weight row is prefetched (2 KiB) */
#define TBLOCK 32  /* tokens per pass over a block's weights: they stay in L2 while the rows pass */
#define TT 6       /* tokens per register tile: a pair of rows x 6 tokens = 12 accumulators */

/* Packed tokens. A block of T fp32 tokens of K values is stored as tiles of TT tokens (the
 * last may have fewer); within a tile, chunk c of 16 values of every token in turn, each
 * chunk's even values first, then its odd ones; then the K % 16 tail values of each token.
 * So one pointer walks a tile, and one 256-bit load of 16 bf16 weights gives both halves of
 * the chunk with a shift and a mask, no shuffle. pk: where token t's value k goes. */
static inline int64_t pk(int64_t t, int64_t k, int64_t T, int64_t K) {
    const int64_t t0 = t / TT * TT, tt = T - t0 < TT ? T - t0 : TT, kc = K / 16 * 16;
    if (k >= kc) return t0 * K + kc * tt + (t - t0) * (K - kc) + (k - kc);
    const int64_t q = k & 15;
    return t0 * K + ((k >> 4) * tt + (t - t0)) * 16 + ((q & 1) << 3) + (q >> 1);
}

#ifdef __AVX2__
/* The sums of a, b, c and d, each ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)) whatever
 * shares the call: three horizontal adds for four sums. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}
#endif

/* y[r * TBLOCK + t] = dot(w[r], x_t) for rows r < R (1 or 2) and the T (<= TT) tokens of the
 * packed tile p. Inlined with R and T constants, so the R x T sums stay in registers: each
 * converted weight vector feeds T FMAs, each token load R. A sum's order depends on nothing
 * but K, so a row's numbers never depend on what shares its tile. */
static inline __attribute__((always_inline)) void tile_n(const uint16_t *const *w, const float *p, const int R,
                                                         const int T, int64_t K, float *y) {
    const int64_t kc = K / 16 * 16;
#ifdef __AVX2__
    __m256 acc[2][TT];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    const float *q = p;
    for (int64_t k = 0; k < kc; k += 16, q += 16 * T) {
        __m256i v[2];
        __m256 c[2];
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w[r] + k + PF), _MM_HINT_T0);
            v[r] = _mm256_loadu_si256((const __m256i *)(w[r] + k));
            c[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v[r], 16)); /* the even weights */
        }
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(q + 16 * t);
            __asm__("" : "+x"(xv)); /* one load feeds R FMAs: kept in a register, not folded R times */
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(c[r], xv, acc[r][t]);
        }
        for (int r = 0; r < R; r++) c[r] = _mm256_castsi256_ps(_mm256_and_si256(v[r], hi)); /* the odd ones */
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(q + 16 * t + 8);
            __asm__("" : "+x"(xv));
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(c[r], xv, acc[r][t]);
        }
    }
    const __m256 z = _mm256_setzero_ps();
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t += 4) {
            float s4[4];
            _mm_storeu_ps(s4, hsum4(acc[r][t], t + 1 < T ? acc[r][t + 1] : z, t + 2 < T ? acc[r][t + 2] : z,
                                    t + 3 < T ? acc[r][t + 3] : z));
            for (int u = 0; u < 4 && t + u < T; u++) y[r * TBLOCK + t + u] = s4[u];
        }
#else
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) {
            float s = 0.0f;
            for (int64_t k = 0; k < kc; k++) s += bf16_to_f32(w[r][k]) * p[pk(t, k, T, K)];
            y[r * TBLOCK + t] = s;
        }
#endif
    const float *tail = p + kc * T;
    for (int64_t k = kc; k < K; k++)
        for (int r = 0; r < R; r++) {
            const float wv = bf16_to_f32(w[r][k]);
            for (int t = 0; t < T; t++) y[r * TBLOCK + t] += wv * tail[t * (K - kc) + (k - kc)];
        }
}

/* tile_n with R rows and tt tokens as constants (tt: 1 .. TT). */
#define TILE(R, N) case N: tile_n(w, p, R, N, K, yt); break;
#define TILES(R) switch (tt) { TILE(R, 1) TILE(R, 2) TILE(R, 3) TILE(R, 4) TILE(R, 5) TILE(R, 6) }

/* y[r * TBLOCK + t] = dot(w[r], x_t) for rows w[0..R) (R: 1 or 2) and a block of T (<= TBLOCK)
 * tokens x packed in tiles of TT: the pair's rows stay in L1 while the tiles pass. */
static void pair(const uint16_t *const *w, int R, const float *x, int T, int64_t K, float *y) {
    for (int t0 = 0; t0 < T; t0 += TT) {
        const float *p = x + (int64_t)t0 * K;
        float *yt = y + t0;
        const int tt = T - t0 < TT ? T - t0 : TT;
        if (R == 2) {
            TILES(2)
        } else {
            TILES(1)
        }
    }
}

/* out[t][j] = bf16(dot(W[j], x_t) (+ bias[j])) for rows j0 .. j1 of W [., K] and a block of T
 * (<= TBLOCK) packed tokens x; out rows ldo apart. Rows go in pairs (an odd last one alone). */
static void rows_bf16(const uint16_t *W, int64_t K, int64_t j0, int64_t j1, const uint16_t *bias, const float *x,
                      int T, uint16_t *out, int64_t ldo) {
    float y[2 * TBLOCK];
    for (int64_t j = j0; j < j1; j += 2) {
        const int R = j + 1 < j1 ? 2 : 1;
        const uint16_t *w[2] = {W + j * K, W + (j + R - 1) * K};
        pair(w, R, x, T, K, y);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++)
                out[t * ldo + j + r] = f32_to_bf16(bias ? y[r * TBLOCK + t] + bf16_to_f32(bias[j + r]) : y[r * TBLOCK + t]);
    }
}

/* The down projection's input, packed: scratch at pk(t, i) =
 * bf16(bf16(silu(bf16(gate_i . x_t))) * bf16(up_i . x_t)) for units i0 .. i1 and a block of T
 * packed tokens x [T, H]: a unit's gate and up rows are a pair. */
static void up_part(const float *x, const uint16_t *G, const uint16_t *U, int64_t T, int64_t H, int64_t I,
                    int64_t i0, int64_t i1, float *scratch) {
    float y[2 * TBLOCK];
    for (int64_t i = i0; i < i1; i++) {
        const uint16_t *w[2] = {G + i * H, U + i * H};
        pair(w, 2, x, (int)T, H, y);
        for (int t = 0; t < T; t++) {
            float h = round_bf16(y[t]);
            float s = round_bf16(h / (1.0f + expf(-h)));
            scratch[pk(t, i, T, I)] = round_bf16(s * round_bf16(y[TBLOCK + t]));
        }
    }
}

/* Block b0 .. b0 + T of bf16 tokens x (rows of K) as fp32, packed, into xs at b0 * K; rows
 * r0 .. r1 of the block (a thread's share, or all). */
static void pack(const uint16_t *x, float *xs, int64_t b0, int64_t T, int64_t K, int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; t++)
        for (int64_t k = 0; k < K; k++) xs[b0 * K + pk(t, k, T, K)] = bf16_to_f32(x[(b0 + t) * K + k]);
}

/* One expert's rows r0 .. r0 + T (bf16 tokens x [., H]) in blocks of TBLOCK tokens: the block
 * packed into xs, gate and up units i0 .. i1 into scratch, then down rows j0 .. j1 (all of them
 * when a thread runs the expert alone; its share, with the team's barriers, when threads split it). */
static void expert_rows(const uint16_t *x, float *xs, uint16_t *out, int64_t r0, int64_t T, int64_t slot,
                        const uint16_t *gate, const uint16_t *up, const uint16_t *down, int64_t H, int64_t I,
                        int64_t i0, int64_t i1, int64_t j0, int64_t j1, float *scratch, int shared) {
    const uint16_t *G = gate + slot * I * H, *U = up + slot * I * H, *D = down + slot * H * I;
    for (int64_t b0 = r0; b0 < r0 + T; b0 += TBLOCK) {
        const int Tb = (int)(r0 + T - b0 < TBLOCK ? r0 + T - b0 : TBLOCK);
        if (shared) {
            const int nt = omp_get_num_threads(), me = omp_get_thread_num(), per = (Tb + nt - 1) / nt;
            pack(x, xs, b0, Tb, H, me * per < Tb ? me * per : Tb, (me + 1) * per < Tb ? (me + 1) * per : Tb);
#pragma omp barrier
        } else {
            pack(x, xs, b0, Tb, H, 0, Tb);
        }
        up_part(xs + b0 * H, G, U, Tb, H, I, i0, i1, scratch + b0 * I);
        if (shared) {
#pragma omp barrier
        }
        rows_bf16(D, I, j0, j1, 0, scratch + b0 * I, Tb, out + b0 * H, H);
        if (shared) {
#pragma omp barrier
        }
    }
}

/* The SwiGLU FFN of n experts. Expert e's rows start[e]..start[e]+rows[e] of x (bf16 [N, H],
 * rows already in expert order) go through the weights at slot[e] of the stacks gate and up
 * ([S, I, H] bf16) and down ([S, H, I] bf16); results into the same rows of out (bf16 [N, H]).
 * xs: fp32 [N, H] scratch (the tokens, converted and packed once a block); scratch: fp32
 * [N, I]. With several experts per thread each thread runs whole experts (no barriers: each
 * streams its own weights); with fewer, threads split each matrix's rows. Either way a row's
 * numbers are the same, and the weights are read once per block of TBLOCK tokens. */
void tide_experts_bf16(const uint16_t *x, uint16_t *out, const int64_t *start, const int64_t *rows,
                       const int64_t *slot, int64_t n, const uint16_t *gate, const uint16_t *up,
                       const uint16_t *down, int64_t H, int64_t I, float *xs, float *scratch, int threads) {
    const int whole = n >= 4 * (int64_t)threads;
#pragma omp parallel num_threads(threads)
    {
        if (whole) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t e = 0; e < n; e++) expert_rows(x, xs, out, start[e], rows[e], slot[e], gate, up, down, H, I,
                                                         0, I, 0, H, scratch, 0);
        } else {
            int nt = omp_get_num_threads(), me = omp_get_thread_num();
            int64_t ci = (I + nt - 1) / nt, ch = ((H + nt - 1) / nt + 1) / 2 * 2; /* a thread's units; pairs of down rows */
            for (int64_t e = 0; e < n; e++)
                expert_rows(x, xs, out, start[e], rows[e], slot[e], gate, up, down, H, I, me * ci < I ? me * ci : I,
                            (me + 1) * ci < I ? (me + 1) * ci : I, me * ch < H ? me * ch : H,
                            (me + 1) * ch < H ? (me + 1) * ch : H, scratch, 1);
        }
    }
}

/* y = x W^T + bias for bf16 tokens x [T, K], weights W [N, K] and bias [N] (NULL: none), into
 * bf16 y [T, N]: the sum in fp32, the bias added, rounded once (as torch's bf16 linear). The
 * model's other linears on the CPU (attention, dense MLPs, shared experts, the head over the
 * vocabulary). xs: fp32 scratch [T, K] for the tokens, converted and packed once. */
void tide_linear_bf16(const uint16_t *x, int64_t T, const uint16_t *W, int64_t N, int64_t K, const uint16_t *bias,
                      uint16_t *y, float *xs, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t b0 = 0; b0 < T; b0 += TBLOCK) {
            const int64_t Tb = T - b0 < TBLOCK ? T - b0 : TBLOCK;
            pack(x, xs, b0, Tb, K, 0, Tb);
        }
        for (int64_t b0 = 0; b0 < T; b0 += TBLOCK) {
            const int Tb = (int)(T - b0 < TBLOCK ? T - b0 : TBLOCK);
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n += 8)
                rows_bf16(W, K, n, n + 8 < N ? n + 8 : N, bias, xs + b0 * K, Tb, y + b0 * N, N);
        }
    }
}

/* The CPU's multiply-add rate, the compute roof the kernels are measured against: each
 * thread runs 12 independent chains of n vector FMAs (enough to cover the FMA latency on
 * both pipes), nothing loaded. Returns the flops done (2 a lane a multiply-add). A matmul
 * library's rate can sit well under it (MKL on AMD: 102 against 180 GFLOP/s on the 2-core VM). */
double tide_fma_flops(int threads, int64_t n) {
    double done = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : done)
    {
#if defined(__AVX512F__)
        __m512 a[12];
        const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
        for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
        for (int64_t k = 0; k < n; k++)
            for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
        for (int i = 1; i < 12; i++) a[0] = _mm512_add_ps(a[0], a[i]);
        done = 2.0 * 16 * 12 * (double)n + 0.0f * _mm512_reduce_add_ps(a[0]);
#elif defined(__AVX2__)
        __m256 a[12];
        const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
        for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
        for (int64_t k = 0; k < n; k++)
            for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
        float s[8];
        for (int i = 1; i < 12; i++) a[0] = _mm256_add_ps(a[0], a[i]);
        _mm256_storeu_ps(s, a[0]);
        done = 2.0 * 8 * 12 * (double)n + 0.0f * s[0]; /* s: the chains are kept */
#else
        float a[12];
        for (int i = 0; i < 12; i++) a[i] = (float)i;
        for (int64_t k = 0; k < n; k++)
            for (int i = 0; i < 12; i++) a[i] = fmaf(a[i], 0.999f, 1e-3f);
        done = 2.0 * 12 * (double)n + 0.0f * a[0];
#endif
    }
    return done;
}
