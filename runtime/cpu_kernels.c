/* TIDE's CPU expert kernel: the routed experts' SwiGLU FFN with bf16 weights, for the few
 * tokens per expert a decoding step brings.
 *
 * Why: a step reads each expert's weights once for 1-64 tokens, so the work is bound by the
 * memory's read bandwidth. torch's bf16 matmul on a CPU without AVX-512 BF16 falls back to a
 * path that converts every weight once per token (a 2048x512 matrix at 16 tokens read at
 * 0.9 GB/s on the 2-core AVX2 VM, against 17.8 GB/s the memory reads). Here each weight row
 * is converted once and multiplied into every token of its expert, in fp32, with FMA.
 *
 * Numbers: each stage is rounded to bf16 where torch's bf16 ops round (gate and up outputs,
 * silu, the product, the down output), so the FFN is torch's op by op; only the order of a
 * dot product's sum differs (a row's result never depends on the other rows of its call).
 *
 * Built at first use by runtime/cpu_kernel.py (cc -O3 -march=native -fopenmp), linked against
 * the libgomp torch has already loaded, so both share one thread pool. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
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
#define TBLOCK 32 /* tokens of an expert per pass over its weights */
#define TB 8 /* tokens per pass over a weight row: 8 accumulators + the row + one token in registers */

/* y[t] = dot(w[0:K] (bf16), x[t][0:K] (fp32, rows ldx apart)) for t < T (T <= TB). Inlined
 * with T a constant (see dots), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dots_n(const uint16_t *w, const float *x, int64_t ldx,
                                                         const int T, int K, float *y) {
    int k = 0;
#ifdef __AVX2__
    __m256 acc[TB];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        _mm_prefetch((const char *)(w + k + PF), _MM_HINT_T0);
        __m128i h = _mm_loadu_si128((const __m128i *)(w + k));
        __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        for (int t = 0; t < T; t++) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * ldx + k), acc[t]);
    }
    for (int t = 0; t < T; t++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        y[t] = _mm_cvtss_f32(s);
    }
#else
    for (int t = 0; t < T; t++) y[t] = 0.0f;
#endif
    for (; k < K; k++) {
        float wk = bf16_to_f32(w[k]);
        for (int t = 0; t < T; t++) y[t] += wk * x[t * ldx + k];
    }
}

static void dots(const uint16_t *w, const float *x, int64_t ldx, int T, int K, float *y) {
    switch (T) {
    case 1: dots_n(w, x, ldx, 1, K, y); break;
    case 2: dots_n(w, x, ldx, 2, K, y); break;
    case 3: dots_n(w, x, ldx, 3, K, y); break;
    case 4: dots_n(w, x, ldx, 4, K, y); break;
    case 5: dots_n(w, x, ldx, 5, K, y); break;
    case 6: dots_n(w, x, ldx, 6, K, y); break;
    case 7: dots_n(w, x, ldx, 7, K, y); break;
    default: dots_n(w, x, ldx, 8, K, y); break;
    }
}

/* The gate and up rows of one intermediate unit against T (<= TB2) tokens in one pass: each
 * token load feeds two FMAs. */
#define TB2 4
static inline __attribute__((always_inline)) void dots2_n(const uint16_t *wg, const uint16_t *wu, const float *x,
                                                          int64_t ldx, const int T, int K, float *yg, float *yu) {
    int k = 0;
#ifdef __AVX2__
    __m256 ag[TB2], au[TB2];
    for (int t = 0; t < T; t++) ag[t] = au[t] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        _mm_prefetch((const char *)(wg + k + PF), _MM_HINT_T0);
        _mm_prefetch((const char *)(wu + k + PF), _MM_HINT_T0);
        __m256 g = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wg + k))), 16));
        __m256 u = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(wu + k))), 16));
        for (int t = 0; t < T; t++) {
            __m256 xv = _mm256_loadu_ps(x + t * ldx + k);
            ag[t] = _mm256_fmadd_ps(g, xv, ag[t]);
            au[t] = _mm256_fmadd_ps(u, xv, au[t]);
        }
    }
    for (int t = 0; t < T; t++) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(ag[t]), _mm256_extractf128_ps(ag[t], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        yg[t] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
        s = _mm_add_ps(_mm256_castps256_ps128(au[t]), _mm256_extractf128_ps(au[t], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        yu[t] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
#else
    for (int t = 0; t < T; t++) yg[t] = yu[t] = 0.0f;
#endif
    for (; k < K; k++) {
        float g = bf16_to_f32(wg[k]), u = bf16_to_f32(wu[k]);
        for (int t = 0; t < T; t++) {
            yg[t] += g * x[t * ldx + k];
            yu[t] += u * x[t * ldx + k];
        }
    }
}

static void dots2(const uint16_t *wg, const uint16_t *wu, const float *x, int64_t ldx, int T, int K, float *yg, float *yu) {
    switch (T) {
    case 1: dots2_n(wg, wu, x, ldx, 1, K, yg, yu); break;
    case 2: dots2_n(wg, wu, x, ldx, 2, K, yg, yu); break;
    case 3: dots2_n(wg, wu, x, ldx, 3, K, yg, yu); break;
    default: dots2_n(wg, wu, x, ldx, 4, K, yg, yu); break;
    }
}

/* Two consecutive weight rows (w, w + K) against T tokens, in chunks of TB2 (each token load
 * feeds both rows); y0 and y1 get the rows' results. */
static void dots_pair(const uint16_t *w, const float *x, int64_t ldx, int T, int K, float *y0, float *y1) {
    for (int t0 = 0; t0 < T; t0 += TB2) {
        int tb = T - t0 < TB2 ? T - t0 : TB2;
        dots2(w, w + K, x + t0 * ldx, ldx, tb, K, y0 + t0, y1 + t0);
    }
}

/* One expert's FFN on rows r0 .. r0 + T: gate and up rows i0 .. i1, then down rows j0 .. j1 (a
 * thread's share when threads split an expert; all of them when a thread runs it alone). */
static void up_part(const float *x, const uint16_t *G, const uint16_t *U, int64_t r0, int64_t T, int64_t H,
                    int64_t I, int64_t i0, int64_t i1, float *scratch) {
    float g[TB2], u[TB2];
    for (int64_t i = i0; i < i1; i++) {
        for (int64_t t0 = 0; t0 < T; t0 += TB2) {
            int tb = (int)(T - t0 < TB2 ? T - t0 : TB2);
            dots2(G + i * H, U + i * H, x + (r0 + t0) * H, H, tb, (int)H, g, u);
            for (int t = 0; t < tb; t++) {
                float h = round_bf16(g[t]);
                float s = round_bf16(h / (1.0f + expf(-h)));
                scratch[(r0 + t0 + t) * I + i] = round_bf16(s * round_bf16(u[t]));
            }
        }
    }
}

static void down_part(const float *scratch, const uint16_t *D, uint16_t *out, int64_t r0, int64_t T, int64_t H,
                      int64_t I, int64_t j0, int64_t j1) {
    float y0[TBLOCK], y1[TBLOCK], g[TB];
    for (int64_t j = j0; j < j1; j += 2) {
        if (j + 1 < j1) {
            dots_pair(D + j * I, scratch + r0 * I, I, (int)T, (int)I, y0, y1);
            for (int t = 0; t < T; t++) {
                out[(r0 + t) * H + j] = f32_to_bf16(y0[t]);
                out[(r0 + t) * H + j + 1] = f32_to_bf16(y1[t]);
            }
        } else {
            for (int64_t t0 = 0; t0 < T; t0 += TB) {
                int tb = (int)(T - t0 < TB ? T - t0 : TB);
                dots(D + j * I, scratch + (r0 + t0) * I, I, tb, (int)I, g);
                for (int t = 0; t < tb; t++) out[(r0 + t0 + t) * H + j] = f32_to_bf16(g[t]);
            }
        }
    }
}

/* The SwiGLU FFN of n experts. Expert e's rows start[e]..start[e]+rows[e] of x (fp32 [N, H],
 * rows already in expert order) go through the weights at slot[e] of the stacks gate and up
 * ([S, I, H] bf16) and down ([S, H, I] bf16); results into out (bf16 [N, H]). scratch: fp32
 * [N, I]. With several experts per thread each thread runs whole experts (no barriers: each
 * streams its own weights); with fewer, threads split each matrix's rows. Either way a row's
 * numbers are the same, and the weights are read once per block of TBLOCK tokens. */
void tide_experts_bf16(const float *x, uint16_t *out, const int64_t *start, const int64_t *rows,
                       const int64_t *slot, int64_t n, const uint16_t *gate, const uint16_t *up,
                       const uint16_t *down, int64_t H, int64_t I, float *scratch, int threads) {
    const int whole = n >= 4 * (int64_t)threads;
#pragma omp parallel num_threads(threads)
    {
        if (whole) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t e = 0; e < n; e++) {
                const uint16_t *G = gate + slot[e] * I * H, *U = up + slot[e] * I * H, *D = down + slot[e] * H * I;
                for (int64_t b0 = start[e]; b0 < start[e] + rows[e]; b0 += TBLOCK) {
                    const int64_t T = start[e] + rows[e] - b0 < TBLOCK ? start[e] + rows[e] - b0 : TBLOCK;
                    up_part(x, G, U, b0, T, H, I, 0, I, scratch);
                    down_part(scratch, D, out, b0, T, H, I, 0, H);
                }
            }
        } else {
            int nt = omp_get_num_threads(), me = omp_get_thread_num();
            for (int64_t e = 0; e < n; e++) {
                const uint16_t *G = gate + slot[e] * I * H, *U = up + slot[e] * I * H, *D = down + slot[e] * H * I;
                for (int64_t b0 = start[e]; b0 < start[e] + rows[e]; b0 += TBLOCK) {
                    /* a block of the expert's tokens, small enough to stay in L2 while every
                     * weight row of the expert passes (the expert's weights then come from L3) */
                    const int64_t T = start[e] + rows[e] - b0 < TBLOCK ? start[e] + rows[e] - b0 : TBLOCK;
                    int64_t ci = (I + nt - 1) / nt, ch = ((H + nt - 1) / nt + 1) / 2 * 2;  /* pairs of down rows */
                    up_part(x, G, U, b0, T, H, I, me * ci < I ? me * ci : I, (me + 1) * ci < I ? (me + 1) * ci : I, scratch);
#pragma omp barrier
                    down_part(scratch, D, out, b0, T, H, I, me * ch < H ? me * ch : H, (me + 1) * ch < H ? (me + 1) * ch : H);
#pragma omp barrier
                }
            }
        }
    }
}

/* y = x W^T + bias for bf16 tokens x [T, K], weights W [N, K] and bias [N] (NULL: none), into
 * bf16 y [T, N]: the sum in fp32, the bias added, rounded once (as torch's bf16 linear). The
 * model's other linears on the CPU (attention, dense MLPs, shared experts, the head over the
 * vocabulary): the same bound as the experts, a weight row converted once for a block of
 * tokens. xs: fp32 scratch [T, K] for the tokens, converted once. */
void tide_linear_bf16(const uint16_t *x, int64_t T, const uint16_t *W, int64_t N, int64_t K, const uint16_t *bias,
                      uint16_t *y, float *xs, int threads) {
#pragma omp parallel num_threads(threads)
    {
        float acc[TB], y0[TBLOCK], y1[TBLOCK];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < T * K; i++) xs[i] = bf16_to_f32(x[i]);
        for (int64_t b0 = 0; b0 < T; b0 += TBLOCK) {
            const int64_t Tb = T - b0 < TBLOCK ? T - b0 : TBLOCK;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n += 2) {
                if (n + 1 < N) {
                    dots_pair(W + n * K, xs + b0 * K, K, (int)Tb, (int)K, y0, y1);
                    float c0 = bias ? bf16_to_f32(bias[n]) : 0.0f, c1 = bias ? bf16_to_f32(bias[n + 1]) : 0.0f;
                    for (int t = 0; t < Tb; t++) {
                        y[(b0 + t) * N + n] = f32_to_bf16(y0[t] + c0);
                        y[(b0 + t) * N + n + 1] = f32_to_bf16(y1[t] + c1);
                    }
                } else {
                    float c0 = bias ? bf16_to_f32(bias[n]) : 0.0f;
                    for (int64_t t0 = 0; t0 < Tb; t0 += TB) {
                        int tb = (int)(Tb - t0 < TB ? Tb - t0 : TB);
                        dots(W + n * K, xs + (b0 + t0) * K, K, tb, (int)K, acc);
                        for (int t = 0; t < tb; t++) y[(b0 + t0 + t) * N + n] = f32_to_bf16(acc[t] + c0);
                    }
                }
            }
        }
    }
}
