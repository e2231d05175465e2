/*
 * The learned step's per-edge pipeline on dense blocks, for the CPU.
 *
 * lopt/optim/fused/dense.py describes the layout and the maths; this file is its fused
 * form, four passes over memory per step:
 *
 *   ng_norms     sums of squares of params and grads per tensor, and whether
 *                every gradient is finite (read-only: a step that is skipped
 *                leaves everything as it was);
 *   (ng_trace    with step-size adaptation only: per tensor, the dot of the
 *                gradient with the recent path, and the trace updated);
 *   ng_moments   momenta and second moment updated in place, sums of squares
 *                of the momenta per tensor;
 *   ng_messages  features, edge encoder, FiLM messages, and each node's sums
 *                of messages and squared messages over its fan-in and fan-out;
 *   ng_update    features, edge encoder, edge update, edge head, the update,
 *                written into the parameters in place (ng_update_lean: the
 *                same for the lean rule, without the edge MLP and head MLP).
 *
 * Parameters and gradients are read (and parameters written) where they are,
 * through a table of tensor addresses in graph order; the momenta and second
 * moment are the optimizer's flat (channel, P) buffers.
 *
 * Everything per edge stays in registers. The innermost loops run over the
 * contiguous edges of one output row and are written so that the compiler
 * vectorises them: node values are pre-expanded per row, and exp is a
 * branch-free polynomial instead of a libm call.
 *
 * kc_all (D x kc_stride, row-major) holds each block's encoder constant per
 * position in its inner axis (kernel taps), block b's from column kc_off[b].
 *
 * Plain C with raw pointers, called through ctypes: no Python or torch
 * headers, so it builds in about a second with the system compiler.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Denormal inputs and results are flushed to zero while a kernel runs (and
   the caller's floating-point mode is restored after): on x86 each denormal
   costs about a hundred cycles, and a denormal update is a zero update. */
#if defined(__SSE2__)
#include <xmmintrin.h>
#define FTZ_BEGIN                                                              \
    const unsigned int saved_csr = _mm_getcsr();                               \
    _mm_setcsr(saved_csr | 0x8040u);
#define FTZ_END _mm_setcsr(saved_csr);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

#define D 4  /* edge and message width */
#define H 8  /* head hidden width */
#define F 10 /* features per scalar */
#define NM 4 /* momenta */

/* Packed rule weights (row-major), in this order; lopt/optim/fused/dense.py packs them. */
enum {
    W_ENC = 0,                  /* D x F   edge encoder (feature columns) */
    B_ENC = W_ENC + D * F,      /* D */
    W_FILM = B_ENC + D,         /* 2D x D  FiLM: gamma rows, then beta rows */
    B_FILM = W_FILM + 2 * D * D,
    W_EL = B_FILM + 2 * D,      /* D x D   edge update, edge input */
    B_EL = W_EL + D * D,
    W_EO = B_EL + D,            /* D x D   edge update, output */
    B_EO = W_EO + D * D,
    W_HE = B_EO + D,            /* H x D   head, embedding input */
    B_HE = W_HE + H * D,
    W_HF = B_HE + H,            /* H x F   head, feature input */
    W_HO = W_HF + H * F,        /* 2 x H   head output */
    B_HO = W_HO + 2 * H,
    W_HS = B_HO + 2,            /* 2 x F   head skip */
    W_SIZE = W_HS + 2 * F
};

/* The lean rule (edge_mlp=False, a linear edge head) shares the encoder and
   FiLM weights, and so ng_messages; its update reads these instead. */
enum {
    L_HO = B_FILM + 2 * D, /* 2 x D   head output, from the edge embedding */
    L_BO = L_HO + 2 * D,   /* 2 */
    L_HS = L_BO + 2,       /* 2 x F   head skip */
    L_SIZE = L_HS + 2 * F
};

int ng_weight_count(void) { return W_SIZE; }
int ng_lean_weight_count(void) { return L_SIZE; }

/* Block descriptor: offset, out, sources, inner, dst, src (int64 each). */
#define BLK 6

/* Fixed-width channel loops are unrolled so the edge loops around them vectorise. */
#define UNROLL _Pragma("GCC unroll 16")

/* exp(x) for |x| < 87, about 2 ulp: 2^n * p(r), r in [-ln2/2, ln2/2]. */
static inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    /* round to nearest: adding 1.5 * 2^23 drops the fraction bits */
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {((int32_t)n + 127) << 23};
    return p * scale.f;
}

static inline float silu(float x) { return x / (1.0f + fast_exp(-x)); }

static inline float fast_tanh(float x) {
    /* 1 - 2 / (e^{2x} + 1); absolute error about 1e-7 */
    return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
}

/* torch.lerp's formula, so state matches the reference bit for bit. */
static inline float lerp(float a, float b, float w) {
    return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

/* The float32 tensor at address addr[i] (a table of tensor addresses, one
   per tensor in graph order: parameters and gradients are read, and new
   parameters written, where they are, with no flat copies). */
#define AT(addr, i) ((float *)(intptr_t)(addr)[i])

/* Pass 1 (read-only): per tensor, the sums of squares of params and grads.
   Returns 1, having written nothing else, when a gradient is not finite
   (inf or nan), so the caller can skip the step before any state moves. */
int ng_norms(const int64_t *restrict seg_off, int64_t nseg, const int64_t *restrict pa,
             const int64_t *restrict ga, double *restrict sums) {
    FTZ_BEGIN
    float bad = 0.0f;
    for (int64_t s = 0; s < nseg; ++s) {
        const float *restrict p = AT(pa, s), *restrict g = AT(ga, s);
        const int64_t n = seg_off[s + 1] - seg_off[s];
        double acc0 = 0.0, acc1 = 0.0;
        /* float partial sums over chunks (vectorised), added up in double */
        for (int64_t lo = 0; lo < n; lo += 4096) {
            const int64_t hi = lo + 4096 < n ? lo + 4096 : n;
            float a0 = 0.0f, a1 = 0.0f, z = 0.0f;
#pragma omp simd reduction(+ : a0, a1, z)
            for (int64_t k = lo; k < hi; ++k) {
                a0 += p[k] * p[k];
                a1 += g[k] * g[k];
                z += g[k] * 0.0f; /* nan once some g[k] is inf or nan */
            }
            acc0 += a0;
            acc1 += a1;
            bad += z;
        }
        sums[s * (2 + NM)] = acc0;
        sums[s * (2 + NM) + 1] = acc1;
    }
    FTZ_END
    return bad != bad;
}

/* Step-size control (rules whose StepSizeConfig has rate > 0), after ng_norms:
   per tensor, <g, p - trace> and |p - trace|^2 with the trace before this
   step, then the trace moved towards the parameters in place:
   trace = lerp(trace, p, w). trace is flat in graph order. */
void ng_trace(const int64_t *restrict seg_off, int64_t nseg, const int64_t *restrict pa,
              const int64_t *restrict ga, float *restrict trace, float w,
              double *restrict out) {
    FTZ_BEGIN
    for (int64_t s = 0; s < nseg; ++s) {
        const float *restrict p = AT(pa, s), *restrict g = AT(ga, s);
        float *restrict tr = trace + seg_off[s];
        const int64_t n = seg_off[s + 1] - seg_off[s];
        double acc0 = 0.0, acc1 = 0.0;
        for (int64_t lo = 0; lo < n; lo += 4096) {
            const int64_t hi = lo + 4096 < n ? lo + 4096 : n;
            float a0 = 0.0f, a1 = 0.0f;
#pragma omp simd reduction(+ : a0, a1)
            for (int64_t k = lo; k < hi; ++k) {
                const float d = p[k] - tr[k];
                a0 += g[k] * d;
                a1 += d * d;
                tr[k] = lerp(tr[k], p[k], w);
            }
            acc0 += a0;
            acc1 += a1;
        }
        out[2 * s] = acc0;
        out[2 * s + 1] = acc1;
    }
    FTZ_END
}

/* Pass 2: momenta and second moment updated in place, and per tensor the
   sums of squares of the new momenta. m and v are flat (P per channel). */
void ng_moments(const int64_t *restrict seg_off, int64_t nseg, int64_t P,
                const int64_t *restrict ga, float *restrict m, float *restrict v,
                const float *restrict betas, float beta2, double *restrict sums) {
    FTZ_BEGIN
    const float big = 3.40282346638528859812e+38f;
    float w[NM];
    UNROLL for (int i = 0; i < NM; ++i) w[i] = 1.0f - betas[i];
    const float w2 = 1.0f - beta2;
    for (int64_t s = 0; s < nseg; ++s) {
        const float *restrict g = AT(ga, s);
        const int64_t o0 = seg_off[s]; /* g[k - o0] is the gradient of m[k] */
        double acc[NM] = {0};
        for (int64_t lo = seg_off[s]; lo < seg_off[s + 1]; lo += 4096) {
            const int64_t hi = lo + 4096 < seg_off[s + 1] ? lo + 4096 : seg_off[s + 1];
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t k = lo; k < hi; ++k) {
                const float gk = g[k - o0], sq = gk * gk;
                const float m0 = lerp(m[k], gk, w[0]);
                const float m1 = lerp(m[P + k], gk, w[1]);
                const float m2 = lerp(m[2 * P + k], gk, w[2]);
                const float m3 = lerp(m[3 * P + k], gk, w[3]);
                m[k] = m0;
                m[P + k] = m1;
                m[2 * P + k] = m2;
                m[3 * P + k] = m3;
                v[k] = lerp(v[k], sq > big ? big : sq, w2);
                a0 += m0 * m0;
                a1 += m1 * m1;
                a2 += m2 * m2;
                a3 += m3 * m3;
            }
            acc[0] += a0;
            acc[1] += a1;
            acc[2] += a2;
            acc[3] += a3;
        }
        UNROLL for (int i = 0; i < NM; ++i) sums[s * (2 + NM) + 2 + i] = acc[i];
    }
    FTZ_END
}

/* A block's source-node table and encoder constants, expanded to the edges
   of one output row, so that the row loops read them contiguously. */
static void expand_row(const float *restrict table, int64_t N, int64_t src,
                       const float *restrict kcb, int64_t kc_stride,
                       int64_t inner, int64_t row, float *restrict xs,
                       float *restrict xk) {
    UNROLL for (int d = 0; d < D; ++d)
        for (int64_t k = 0; k < row; ++k) {
            xs[d * row + k] = table[d * N + src + k / inner];
            xk[d * row + k] = kcb[d * kc_stride + k % inner];
        }
}

/* Per-row scratch: node values expanded to the row's edges. */
static float *scratch(int64_t n) {
    return (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
}

void ng_messages(const int64_t *restrict blocks, int64_t nb, int64_t P, const int64_t *restrict pa,
                 const int64_t *restrict ga, const float *restrict m, const float *restrict v,
                 const float *restrict inv_all, const float *restrict mcorr, float vcorr,
                 const float *restrict W, const float *restrict kc_all, const int64_t *restrict kc_off, int64_t kc_stride,
                 const float *restrict ts, const float *restrict td, int64_t N, float *restrict fan_in,
                 float *restrict fan_out) {
    FTZ_BEGIN
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t *restrict blk = blocks + b * BLK;
        const int64_t off = blk[0], out = blk[1], S = blk[2], inner = blk[3];
        const int64_t dst = blk[4], src = blk[5], row = S * inner;
        const float *restrict inv = inv_all + b * (2 + NM);
        const float *restrict kcb = kc_all + kc_off[b];
        /* src node table and encoder constant, expanded along a row */
        float *restrict xs = scratch(D * row), *xk = scratch(D * row);
        float *restrict fo = scratch(2 * D * row), *restrict msg = scratch(D * row);
        expand_row(ts, N, src, kcb, kc_stride, inner, row, xs, xk);
        memset(fo, 0, sizeof(float) * 2 * D * row);
        for (int64_t o = 0; o < out; ++o) {
            const int64_t base = off + o * row;
            float tdo[D];
            UNROLL for (int d = 0; d < D; ++d) tdo[d] = td[d * N + dst + o];
            const float *restrict pr = AT(pa, b) + o * row, *restrict gr = AT(ga, b) + o * row;
            const float *restrict vr = v + base, *restrict mr = m + base;
#pragma omp simd
            for (int64_t k = 0; k < row; ++k) {
                float f[F];
                f[0] = pr[k] * inv[0];
                f[1] = gr[k] * inv[1];
                const float rv = 1.0f / sqrtf(vr[k] * vcorr + 1e-16f);
                UNROLL for (int i = 0; i < NM; ++i) {
                    const float mi = mr[i * P + k];
                    f[2 + i] = mi * inv[2 + i];
                    f[2 + NM + i] = mi * mcorr[i] * rv;
                }
                float e0[D];
                UNROLL for (int d = 0; d < D; ++d) {
                    float acc = W[B_ENC + d] + xk[d * row + k];
                    UNROLL for (int c = 0; c < F; ++c) acc += W[W_ENC + d * F + c] * f[c];
                    e0[d] = acc;
                }
                UNROLL for (int d = 0; d < D; ++d) {
                    float gam = W[B_FILM + d], bet = W[B_FILM + D + d];
                    UNROLL for (int c = 0; c < D; ++c) {
                        gam += W[W_FILM + d * D + c] * e0[c];
                        bet += W[W_FILM + (D + d) * D + c] * e0[c];
                    }
                    msg[d * row + k] = gam * (xs[d * row + k] + tdo[d]) + bet;
                }
            }
            /* this row's messages: fan-in sums of its output node, and
               per-edge accumulators of the fan-out sums */
            for (int d = 0; d < D; ++d) {
                const float *restrict md = msg + d * row;
                float *restrict f1 = fo + d * row, *restrict f2 = fo + (D + d) * row;
                float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
                for (int64_t k = 0; k < row; ++k) {
                    const float x = md[k];
                    s1 += x;
                    s2 += x * x;
                    f1[k] += x;
                    f2[k] += x * x;
                }
                fan_in[d * N + dst + o] += s1;
                fan_in[(D + d) * N + dst + o] += s2;
            }
        }
        UNROLL for (int d = 0; d < 2 * D; ++d)
            for (int64_t k = 0; k < row; ++k)
                fan_out[d * N + src + k / inner] += fo[d * row + k];
        free(xs);
        free(xk);
        free(fo);
        free(msg);
    }
    FTZ_END
}

void ng_update(const int64_t *restrict blocks, int64_t nb, int64_t P, const int64_t *restrict pa,
               const int64_t *restrict ga, const float *restrict m, const float *restrict v,
               const float *restrict inv_all, const float *restrict mcorr, float vcorr,
               const float *restrict W, const float *restrict kc_all, const int64_t *restrict kc_off, int64_t kc_stride,
               const float *restrict es, const float *restrict ed, int64_t N, const float *restrict lr,
               const float *restrict wd, float step_scale, float magnitude_scale,
               float clip) {
    FTZ_BEGIN
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t *restrict blk = blocks + b * BLK;
        const int64_t off = blk[0], out = blk[1], S = blk[2], inner = blk[3];
        const int64_t dst = blk[4], src = blk[5], row = S * inner;
        const float *restrict inv = inv_all + b * (2 + NM);
        const float *restrict kcb = kc_all + kc_off[b];
        const float lrb = lr[b], decay = step_scale * wd[b];
        float *restrict xs = scratch(D * row), *restrict xk = scratch(D * row);
        /* Row buffers: the loop over a row's edges is split into phases so
           that few values are live at once (one fused loop spills registers
           and runs several times slower). They stay in the L1/L2 cache. */
        float *restrict fr = scratch(F * row), *restrict er = scratch(D * row);
        float *restrict o0 = scratch(row), *restrict o1 = scratch(row);
        expand_row(es, N, src, kcb, kc_stride, inner, row, xs, xk);
        for (int64_t o = 0; o < out; ++o) {
            const int64_t base = off + o * row;
            float edo[D];
            UNROLL for (int d = 0; d < D; ++d) edo[d] = ed[d * N + dst + o] + W[B_EL + d];
            /* the parameters are updated in place */
            float *restrict pr = AT(pa, b) + o * row;
            const float *restrict gr = AT(ga, b) + o * row;
            const float *restrict vr = v + base;
            const float *restrict mr = m + base;
            /* phase 1: features, encoder, edge update, head skip path; each
               feature is used as soon as it is made */
#pragma omp simd
            for (int64_t k = 0; k < row; ++k) {
                const float rv = 1.0f / sqrtf(vr[k] * vcorr + 1e-16f);
                float e0[D], s0 = W[B_HO], s1 = W[B_HO + 1];
                UNROLL for (int d = 0; d < D; ++d) e0[d] = W[B_ENC + d] + xk[d * row + k];
                UNROLL for (int c = 0; c < F; ++c) {
                    float fc;
                    if (c == 0) fc = pr[k] * inv[0];
                    else if (c == 1) fc = gr[k] * inv[1];
                    else if (c < 2 + NM) fc = mr[(c - 2) * P + k] * inv[c];
                    else fc = mr[(c - 2 - NM) * P + k] * mcorr[c - 2 - NM] * rv;
                    fr[c * row + k] = fc;
                    UNROLL for (int d = 0; d < D; ++d) e0[d] += W[W_ENC + d * F + c] * fc;
                    s0 += W[W_HS + c] * fc;
                    s1 += W[W_HS + F + c] * fc;
                }
                float a[D];
                UNROLL for (int d = 0; d < D; ++d) {
                    float acc = edo[d] + xs[d * row + k];
                    UNROLL for (int c = 0; c < D; ++c) acc += W[W_EL + d * D + c] * e0[c];
                    a[d] = silu(acc);
                }
                UNROLL for (int d = 0; d < D; ++d) {
                    float acc = W[B_EO + d] + e0[d];
                    UNROLL for (int c = 0; c < D; ++c) acc += W[W_EO + d * D + c] * a[c];
                    er[d * row + k] = acc;
                }
                o0[k] = s0;
                o1[k] = s1;
            }
            /* phase 2: the head's hidden layer and the update */
#pragma omp simd
            for (int64_t k = 0; k < row; ++k) {
                float acc[H];
                UNROLL for (int h = 0; h < H; ++h) acc[h] = W[B_HE + h];
                UNROLL for (int c = 0; c < D; ++c) {
                    const float x = er[c * row + k];
                    UNROLL for (int h = 0; h < H; ++h) acc[h] += W[W_HE + h * D + c] * x;
                }
                UNROLL for (int c = 0; c < F; ++c) {
                    const float x = fr[c * row + k];
                    UNROLL for (int h = 0; h < H; ++h) acc[h] += W[W_HF + h * F + c] * x;
                }
                float s0 = o0[k], s1 = o1[k];
                UNROLL for (int h = 0; h < H; ++h) {
                    const float sh = silu(acc[h]);
                    s0 += W[W_HO + h] * sh;
                    s1 += W[W_HO + H + h] * sh;
                }
                const float log_scale = clip * fast_tanh(magnitude_scale * s1 / clip);
                const float upd = -step_scale * s0 * fast_exp(log_scale);
                pr[k] += lrb * (upd - decay * pr[k]);
            }
        }
        free(xs);
        free(xk);
        free(fr);
        free(er);
        free(o0);
        free(o1);
    }
    FTZ_END
}

/* ng_update for the lean rule: e' = e + (src and dst node terms), and
   (direction, log-magnitude) = W e' + b + skip(features). One loop per row,
   about a third of ng_update's arithmetic. Same arguments as ng_update. */
void ng_update_lean(const int64_t *restrict blocks, int64_t nb, int64_t P, const int64_t *restrict pa,
                    const int64_t *restrict ga, const float *restrict m, const float *restrict v,
                    const float *restrict inv_all, const float *restrict mcorr, float vcorr,
                    const float *restrict W, const float *restrict kc_all, const int64_t *restrict kc_off,
                    int64_t kc_stride, const float *restrict es, const float *restrict ed, int64_t N,
                    const float *restrict lr, const float *restrict wd, float step_scale,
                    float magnitude_scale, float clip) {
    FTZ_BEGIN
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t *restrict blk = blocks + b * BLK;
        const int64_t off = blk[0], out = blk[1], S = blk[2], inner = blk[3];
        const int64_t dst = blk[4], src = blk[5], row = S * inner;
        const float *restrict inv = inv_all + b * (2 + NM);
        const float *restrict kcb = kc_all + kc_off[b];
        const float lrb = lr[b], decay = step_scale * wd[b];
        float *restrict xs = scratch(D * row), *restrict xk = scratch(D * row);
        expand_row(es, N, src, kcb, kc_stride, inner, row, xs, xk);
        for (int64_t o = 0; o < out; ++o) {
            const int64_t base = off + o * row;
            /* the row's constant part of the head: its dst node term */
            float c0 = W[L_BO], c1 = W[L_BO + 1];
            UNROLL for (int d = 0; d < D; ++d) {
                const float t = ed[d * N + dst + o] + W[B_ENC + d];
                c0 += W[L_HO + d] * t;
                c1 += W[L_HO + D + d] * t;
            }
            float *restrict pr = AT(pa, b) + o * row; /* updated in place */
            const float *restrict gr = AT(ga, b) + o * row;
            const float *restrict vr = v + base;
            const float *restrict mr = m + base;
#pragma omp simd
            for (int64_t k = 0; k < row; ++k) {
                const float rv = 1.0f / sqrtf(vr[k] * vcorr + 1e-16f);
                float e[D], s0 = c0, s1 = c1;
                UNROLL for (int d = 0; d < D; ++d) e[d] = xk[d * row + k] + xs[d * row + k];
                UNROLL for (int c = 0; c < F; ++c) {
                    float fc;
                    if (c == 0) fc = pr[k] * inv[0];
                    else if (c == 1) fc = gr[k] * inv[1];
                    else if (c < 2 + NM) fc = mr[(c - 2) * P + k] * inv[c];
                    else fc = mr[(c - 2 - NM) * P + k] * mcorr[c - 2 - NM] * rv;
                    UNROLL for (int d = 0; d < D; ++d) e[d] += W[W_ENC + d * F + c] * fc;
                    s0 += W[L_HS + c] * fc;
                    s1 += W[L_HS + F + c] * fc;
                }
                UNROLL for (int d = 0; d < D; ++d) {
                    s0 += W[L_HO + d] * e[d];
                    s1 += W[L_HO + D + d] * e[d];
                }
                const float log_scale = clip * fast_tanh(magnitude_scale * s1 / clip);
                const float upd = -step_scale * s0 * fast_exp(log_scale);
                pr[k] += lrb * (upd - decay * pr[k]);
            }
        }
        free(xs);
        free(xk);
    }
    FTZ_END
}
