/* Vector kernels for _sampling.pyx: block maxima of a row of logits, and sums of exponentials.
 *
 * These are the sampler's passes over all V logits. They use GCC/Clang vector extensions
 * because the compiler does not vectorise such loops on its own under the default IEEE
 * rules (-ftrapping-math forbids turning float compares into selects). Each kernel is built
 * with 4 lanes (SSE2, NEON) and, on x86-64, also with 8 lanes for AVX2, chosen at run time;
 * the two compute every element with the same operations, so they give it the same value
 * (sums can differ in their last bits, being added in other groups).
 */
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <Python.h>

#pragma GCC diagnostic ignored "-Wpsabi"   /* wide vectors only cross always-inline calls */

#define RINGLM_MAX_BLOCK 64    /* logits per block maximum */
#define RINGLM_SUM_BLOCK 256   /* logits per partial sum: float lanes within, double across */
#define RINGLM_INLINE static inline __attribute__((always_inline))

typedef float ringlm_f32x4 __attribute__((vector_size(16)));
typedef int32_t ringlm_i32x4 __attribute__((vector_size(16)));
typedef float ringlm_f32x8 __attribute__((vector_size(32)));
typedef int32_t ringlm_i32x8 __attribute__((vector_size(32)));

/* n logits from y as a vector, padded with `fill` past the end. */
template <class F>
RINGLM_INLINE F ringlm_load(const float* y, Py_ssize_t n, float fill) {
    const int lanes = sizeof(F) / sizeof(float);
    F v;
    if (n >= lanes) {
        memcpy(&v, y, sizeof v);
        return v;
    }
    for (int j = 0; j < lanes; j++) v[j] = j < n ? y[j] : fill;
    return v;
}

/* 2**t for t <= 0, within 2.5e-7 relative; 0 below 2**-126.5 and for -inf.
 * t = k + f with k an integer and |f| <= 1/2: 2**f from a degree-5 polynomial (a minimax fit
 * of relative error on [-1/2, 1/2] that keeps 2**0 exactly 1), 2**k written straight into
 * the exponent bits. */
template <class F, class I>
RINGLM_INLINE F ringlm_exp2(F t) {
    const F lowest = (F){} - 127.0f;          /* 2**-127 has no normal float: it becomes 0 */
    F c = t < lowest ? lowest : t;
    F k = (c + 12582912.0f) - 12582912.0f;    /* round to an integer: 12582912 = 1.5 * 2**23 */
    F f = c - k;
    F p = 1.0f + f * (0.6931470036506653f + f * (0.24022242426872253f + f * (0.05550733581185341f
        + f * (0.009671512991189957f + f * 0.001326472731307149f))));
    I exponent = (__builtin_convertvector(k, I) + 127) << 23;
    return p * (F)exponent;
}

/* The largest lane of v. */
template <class F>
RINGLM_INLINE float ringlm_largest(F v) {
    float lane[sizeof(F) / sizeof(float)];
    memcpy(lane, &v, sizeof v);
    float top = lane[0];
    for (size_t j = 1; j < sizeof(F) / sizeof(float); j++) top = lane[j] > top ? lane[j] : top;
    return top;
}

/* out[b] = largest non-NaN logit of block b (RINGLM_MAX_BLOCK logits, -inf if none); true if
 * the row holds a NaN. */
template <class F, class I>
RINGLM_INLINE bool ringlm_block_maxima_lanes(const float* y, Py_ssize_t n, float* out) {
    const int lanes = sizeof(F) / sizeof(float);
    I nan = {};
    for (Py_ssize_t start = 0; start < n; start += RINGLM_MAX_BLOCK) {
        F best = (F){} - INFINITY;
        if (n - start >= RINGLM_MAX_BLOCK) {   /* a whole block: a fixed count the compiler unrolls */
            for (int j = 0; j < RINGLM_MAX_BLOCK; j += lanes) {
                F v = ringlm_load<F>(y + start + j, lanes, 0.0f);
                best = v > best ? v : best;
                nan |= v != v;
            }
        } else {
            for (Py_ssize_t i = start; i < n; i += lanes) {
                F v = ringlm_load<F>(y + i, n - i, -INFINITY);
                best = v > best ? v : best;
                nan |= v != v;
            }
        }
        out[start / RINGLM_MAX_BLOCK] = ringlm_largest(best);
    }
    int32_t any = 0;
    for (int j = 0; j < lanes; j++) any |= nan[j];
    return any != 0;
}

/* 2**t for one t <= 0, computed as the vector lanes compute it. */
template <class F, class I>
RINGLM_INLINE float ringlm_exp2_one(float t) {
    return ringlm_exp2<F, I>((F){} + t)[0];
}

/* One pass over a row: its block maxima (as ringlm_block_maxima), its maximum *top, and
 * sum_i 2**((y_i - top) * scale), returned, with the sum of each RINGLM_SUM_BLOCK logits in
 * block_sums. The sums run against the maximum so far and are rescaled when it rises (as an
 * online softmax does), so the row is read once. *has_nan is set when a NaN turns up; the
 * sums mean nothing then, nor when *top is +inf. */
template <class F, class I>
RINGLM_INLINE double ringlm_scan_lanes(const float* y, Py_ssize_t n, float scale, float* block_max,
                                       double* block_sums, float* top, int* has_nan) {
    const int lanes = sizeof(F) / sizeof(float);
    const int inner = RINGLM_SUM_BLOCK / RINGLM_MAX_BLOCK;
    float m = -INFINITY;
    double total = 0.0;
    for (Py_ssize_t start = 0; start < n; start += RINGLM_SUM_BLOCK) {
        Py_ssize_t stop = start + RINGLM_SUM_BLOCK < n ? start + RINGLM_SUM_BLOCK : n;
        float* maxima = block_max + start / RINGLM_MAX_BLOCK;
        *has_nan |= ringlm_block_maxima_lanes<F, I>(y + start, stop - start, maxima);
        float rise = m;
        for (int b = 0; b < inner && start + b * RINGLM_MAX_BLOCK < stop; b++)
            rise = maxima[b] > rise ? maxima[b] : rise;
        if (rise > m) {
            float shrink = ringlm_exp2_one<F, I>((m - rise) * scale);
            total *= shrink;
            for (Py_ssize_t b = 0; b < start / RINGLM_SUM_BLOCK; b++) block_sums[b] *= shrink;
            m = rise;
        }
        block_sums[start / RINGLM_SUM_BLOCK] = 0.0;
        if (m == -INFINITY) continue;   /* nothing but -inf so far: no weight */
        F acc = {};
        for (Py_ssize_t i = start; i < stop; i += lanes)
            acc += ringlm_exp2<F, I>((ringlm_load<F>(y + i, stop - i, -INFINITY) - m) * scale);
        float lane[sizeof(F) / sizeof(float)];
        memcpy(lane, &acc, sizeof acc);
        float part = 0.0f;
        for (int j = 0; j < lanes; j++) part += lane[j];
        block_sums[start / RINGLM_SUM_BLOCK] = part;
        total += part;
    }
    *top = m;
    return total;
}

/* out[i] = 2**((y_i - m) * scale) for y_i <= m. */
template <class F, class I>
RINGLM_INLINE void ringlm_exp_lanes(const float* y, Py_ssize_t n, float m, float scale, float* out) {
    const int lanes = sizeof(F) / sizeof(float);
    for (Py_ssize_t i = 0; i < n; i += lanes) {
        F e = ringlm_exp2<F, I>((ringlm_load<F>(y + i, n - i, -INFINITY) - m) * scale);
        if (n - i >= lanes)
            memcpy(out + i, &e, sizeof e);
        else
            for (int j = 0; j < n - i; j++) out[i + j] = e[j];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define RINGLM_AVX2 __attribute__((target("avx2")))
static RINGLM_AVX2 bool ringlm_block_maxima_avx2(const float* y, Py_ssize_t n, float* out) {
    return ringlm_block_maxima_lanes<ringlm_f32x8, ringlm_i32x8>(y, n, out);
}
static RINGLM_AVX2 double ringlm_scan_avx2(const float* y, Py_ssize_t n, float scale, float* block_max,
                                           double* block_sums, float* top, int* has_nan) {
    return ringlm_scan_lanes<ringlm_f32x8, ringlm_i32x8>(y, n, scale, block_max, block_sums, top, has_nan);
}
static RINGLM_AVX2 void ringlm_exp_avx2(const float* y, Py_ssize_t n, float m, float scale, float* out) {
    ringlm_exp_lanes<ringlm_f32x8, ringlm_i32x8>(y, n, m, scale, out);
}
static bool ringlm_has_avx2(void) {
    static const bool yes = __builtin_cpu_supports("avx2");
    return yes;
}
#endif

static bool ringlm_block_maxima(const float* y, Py_ssize_t n, float* out) {
#ifdef RINGLM_AVX2
    if (ringlm_has_avx2()) return ringlm_block_maxima_avx2(y, n, out);
#endif
    return ringlm_block_maxima_lanes<ringlm_f32x4, ringlm_i32x4>(y, n, out);
}

static double ringlm_scan(const float* y, Py_ssize_t n, float scale, float* block_max,
                          double* block_sums, float* top, int* has_nan) {
#ifdef RINGLM_AVX2
    if (ringlm_has_avx2()) return ringlm_scan_avx2(y, n, scale, block_max, block_sums, top, has_nan);
#endif
    return ringlm_scan_lanes<ringlm_f32x4, ringlm_i32x4>(y, n, scale, block_max, block_sums, top, has_nan);
}

static void ringlm_exp(const float* y, Py_ssize_t n, float m, float scale, float* out) {
#ifdef RINGLM_AVX2
    if (ringlm_has_avx2()) return ringlm_exp_avx2(y, n, m, scale, out);
#endif
    ringlm_exp_lanes<ringlm_f32x4, ringlm_i32x4>(y, n, m, scale, out);
}
