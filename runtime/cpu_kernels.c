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

#ifndef PF
#define PF 512 /* elements ahead a weight row is prefetched (1 KiB) */
#endif
#define TBLOCK 32 /* tokens per pass over a block's weights: they stay in L2 while the rows pass */
#define TB2 4     /* tokens per pass over two weight rows: 8 accumulators in registers */

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline __m256 load_bf16x8(const uint16_t *w) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}
#endif

/* y0[t] = dot(w0, x[t]) and y1[t] = dot(w1, x[t]) over K for t < T (T <= TB2): bf16 weight rows,
 * fp32 tokens ldx apart. Each token load feeds both rows. Inlined with T a constant (see
 * dots2), so the accumulators stay in registers. One row alone: w1 = w0. */
static inline __attribute__((always_inline)) void dots2_n(const uint16_t *w0, const uint16_t *w1, const float *x,
                                                          int64_t ldx, const int T, int K, float *y0, float *y1) {
    int k = 0;
#ifdef __AVX2__
    __m256 a0[TB2], a1[TB2];
    for (int t = 0; t < T; t++) a0[t] = a1[t] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        _mm_prefetch((const char *)(w0 + k + PF), _MM_HINT_T0);
        _mm_prefetch((const char *)(w1 + k + PF), _MM_HINT_T0);
        __m256 g = load_bf16x8(w0 + k), u = load_bf16x8(w1 + k);
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
            a0[t] = _mm256_fmadd_ps(g, xv, a0[t]);
            a1[t] = _mm256_fmadd_ps(u, xv, a1[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        y0[t] = hsum8(a0[t]);
        y1[t] = hsum8(a1[t]);
    }
#else
    for (int t = 0; t < T; t++) y0[t] = y1[t] = 0.0f;
#endif
    for (; k < K; k++) {
        float g = bf16_to_f32(w0[k]), u = bf16_to_f32(w1[k]);
        for (int t = 0; t < T; t++) {
            y0[t] += g * x[t * ldx + k];
            y1[t] += u * x[t * ldx + k];
        }
    }
}

static void dots2(const uint16_t *w0, const uint16_t *w1, const float *x, int64_t ldx, int T, int K, float *y0, float *y1) {
    switch (T) {
    case 1: dots2_n(w0, w1, x, ldx, 1, K, y0, y1); break;
    case 2: dots2_n(w0, w1, x, ldx, 2, K, y0, y1); break;
    case 3: dots2_n(w0, w1, x, ldx, 3, K, y0, y1); break;
    default: dots2_n(w0, w1, x, ldx, 4, K, y0, y1); break;
    }
}

/* Two weight rows against T (<= TBLOCK) tokens with rows K apart, TB2 tokens at a time. */
static void rows2(const uint16_t *w0, const uint16_t *w1, const float *x, int T, int K, float *y0, float *y1) {
    for (int t0 = 0; t0 < T; t0 += TB2) {
        int tb = T - t0 < TB2 ? T - t0 : TB2;
        dots2(w0, w1, x + (int64_t)t0 * K, K, tb, K, y0 + t0, y1 + t0);
    }
}

/* out[t][j] = bf16(dot(W[j], x[t]) (+ bias[j])) for rows j0 .. j1 of W [., K] and T (<= TBLOCK)
 * fp32 tokens x [T, K]; out rows ldo apart. Two rows per pass (an odd last row with itself). */
static void rows_bf16(const uint16_t *W, int64_t K, int64_t j0, int64_t j1, const uint16_t *bias, const float *x,
                      int T, uint16_t *out, int64_t ldo) {
    float y0[TBLOCK], y1[TBLOCK];
    for (int64_t j = j0; j < j1; j += 2) {
        const int pair = j + 1 < j1;
        rows2(W + j * K, W + (j + pair) * K, x, T, (int)K, y0, y1);
        for (int t = 0; t < T; t++) {
            out[t * ldo + j] = f32_to_bf16(bias ? y0[t] + bf16_to_f32(bias[j]) : y0[t]);
            if (pair) out[t * ldo + j + 1] = f32_to_bf16(bias ? y1[t] + bf16_to_f32(bias[j + 1]) : y1[t]);
        }
    }
}

/* scratch[t][i] = bf16(bf16(silu(bf16(gate_i . x_t))) * bf16(up_i . x_t)) for units i0 .. i1 and
 * T tokens x [T, H]: the gate and up rows of a unit in one pass. */
static void up_part(const float *x, const uint16_t *G, const uint16_t *U, int64_t T, int64_t H, int64_t I,
                    int64_t i0, int64_t i1, float *scratch) {
    float g[TB2], u[TB2];
    for (int64_t i = i0; i < i1; i++) {
        for (int64_t t0 = 0; t0 < T; t0 += TB2) {
            int tb = (int)(T - t0 < TB2 ? T - t0 : TB2);
            dots2(G + i * H, U + i * H, x + t0 * H, H, tb, (int)H, g, u);
            for (int t = 0; t < tb; t++) {
                float h = round_bf16(g[t]);
                float s = round_bf16(h / (1.0f + expf(-h)));
                scratch[(t0 + t) * I + i] = round_bf16(s * round_bf16(u[t]));
            }
        }
    }
}

/* One expert's rows r0 .. r0 + T (fp32 tokens xs [., H]) in blocks of TBLOCK tokens: gate and up
 * units i0 .. i1, then down rows j0 .. j1 (all of them when a thread runs the expert alone; its
 * share, with the team's barriers between the halves, when threads split it). */
static void expert_rows(const float *xs, uint16_t *out, int64_t r0, int64_t T, int64_t slot, const uint16_t *gate,
                        const uint16_t *up, const uint16_t *down, int64_t H, int64_t I, int64_t i0, int64_t i1,
                        int64_t j0, int64_t j1, float *scratch, int shared) {
    const uint16_t *G = gate + slot * I * H, *U = up + slot * I * H, *D = down + slot * H * I;
    for (int64_t b0 = r0; b0 < r0 + T; b0 += TBLOCK) {
        const int Tb = (int)(r0 + T - b0 < TBLOCK ? r0 + T - b0 : TBLOCK);
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

/* xs = x as fp32 (n values), the work split among the calling team's threads. */
static void to_f32(const uint16_t *x, float *xs, int64_t n) {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) xs[i] = bf16_to_f32(x[i]);
}

/* The SwiGLU FFN of n experts. Expert e's rows start[e]..start[e]+rows[e] of x (bf16 [N, H],
 * rows already in expert order) go through the weights at slot[e] of the stacks gate and up
 * ([S, I, H] bf16) and down ([S, H, I] bf16); results into the same rows of out (bf16 [N, H]).
 * xs: fp32 [N, H] scratch (the tokens, converted once); scratch: fp32 [N, I]. With several
 * experts per thread each thread runs whole experts (no barriers: each streams its own
 * weights); with fewer, threads split each matrix's rows. Either way a row's numbers are the
 * same, and the weights are read once per block of TBLOCK tokens. */
void tide_experts_bf16(const uint16_t *x, uint16_t *out, const int64_t *start, const int64_t *rows,
                       const int64_t *slot, int64_t n, const uint16_t *gate, const uint16_t *up,
                       const uint16_t *down, int64_t N, int64_t H, int64_t I, float *xs, float *scratch, int threads) {
    const int whole = n >= 4 * (int64_t)threads;
#pragma omp parallel num_threads(threads)
    {
        to_f32(x, xs, N * H); /* ends in a barrier */
        if (whole) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t e = 0; e < n; e++) expert_rows(xs, out, start[e], rows[e], slot[e], gate, up, down, H, I,
                                                         0, I, 0, H, scratch, 0);
        } else {
            int nt = omp_get_num_threads(), me = omp_get_thread_num();
            int64_t ci = (I + nt - 1) / nt, ch = ((H + nt - 1) / nt + 1) / 2 * 2; /* a thread's units; pairs of down rows */
            for (int64_t e = 0; e < n; e++)
                expert_rows(xs, out, start[e], rows[e], slot[e], gate, up, down, H, I, me * ci < I ? me * ci : I,
                            (me + 1) * ci < I ? (me + 1) * ci : I, me * ch < H ? me * ch : H,
                            (me + 1) * ch < H ? (me + 1) * ch : H, scratch, 1);
        }
    }
}

/* y = x W^T + bias for bf16 tokens x [T, K], weights W [N, K] and bias [N] (NULL: none), into
 * bf16 y [T, N]: the sum in fp32, the bias added, rounded once (as torch's bf16 linear). The
 * model's other linears on the CPU (attention, dense MLPs, shared experts, the head over the
 * vocabulary). xs: fp32 scratch [T, K] for the tokens, converted once. */
void tide_linear_bf16(const uint16_t *x, int64_t T, const uint16_t *W, int64_t N, int64_t K, const uint16_t *bias,
                      uint16_t *y, float *xs, int threads) {
#pragma omp parallel num_threads(threads)
    {
        to_f32(x, xs, T * K);  /* ends in a barrier */
        for (int64_t b0 = 0; b0 < T; b0 += TBLOCK) {
            const int Tb = (int)(T - b0 < TBLOCK ? T - b0 : TBLOCK);
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n += 2)
                rows_bf16(W, K, n, n + 2 < N ? n + 2 : N, bias, xs + b0 * K, Tb, y + b0 * N, N);
        }
    }
}
