/* Elementwise kernels of bfloat16 blocks in one loop each, instead of one eager torch op (and one pass over a
 * block) per step: the weighted sums of linear, task arithmetic and passthrough, DARE's masked task vectors, and
 * RAM's and RAM+'s contributions, nearswap's step, and the rounding of a float64 or float32 block to bfloat16 (see hub_soup/native/__init__.py for how this is built).
 * Every step is the torch path's IEEE operation, in its order (no contraction into fused multiply-adds): the
 * soups are the torch path's bit for bit, as tests check. */
#include <stdint.h>
#include <string.h>

#define SPAN 1024 /* elements at a time: a few float64 rows that stay in the first-level cache */

static inline double widen(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return (double)value;
}

/* torch's bfloat16 of a float: round to nearest, ties to even (NaN is counted by the caller, who redoes it). */
static inline uint16_t narrow(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline int not_finite(uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u; }

/* out = acc in bfloat16 as torch's copy_ rounds a float64 (through float32, as c10::BFloat16 does); returns
 * how many results are inf or nan (the caller then redoes the block the torch way and looks at them). */
int64_t narrow_f64_bf16(uint16_t *restrict out, const double *restrict acc, int64_t n) {
    int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t k = 0; k < n; k++) {
        uint16_t bits = narrow((float)acc[k]);
        out[k] = bits;
        bad += not_finite(bits);
    }
    return bad;
}

/* As narrow_f64_bf16, from float32. */
int64_t narrow_f32_bf16(uint16_t *restrict out, const float *restrict acc, int64_t n) {
    int64_t bad = 0;
#pragma omp simd reduction(+ : bad)
    for (int64_t k = 0; k < n; k++) {
        uint16_t bits = narrow(acc[k]);
        out[k] = bits;
        bad += not_finite(bits);
    }
    return bad;
}

/* acc = w0 p0 + w1 p1 + ... (each product rounded, the sum in order: arithmetic.py's weighted_sum_), then
 * divided by `divisor` when `divide` is set. */
void weighted_sum_bf16(double *restrict acc, const uint16_t *const *parts, int64_t count, const double *weights,
                       int divide, double divisor, int64_t n) {
    for (int64_t start = 0; start < n; start += SPAN) {
        int64_t span = n - start < SPAN ? n - start : SPAN;
        double *a = acc + start;
        const uint16_t *p = parts[0] + start;
        double w = weights[0];
#pragma omp simd
        for (int64_t k = 0; k < span; k++) a[k] = widen(p[k]) * w;
        for (int64_t i = 1; i < count; i++) {
            p = parts[i] + start;
            w = weights[i];
#pragma omp simd
            for (int64_t k = 0; k < span; k++) a[k] = a[k] + widen(p[k]) * w;
        }
        if (divide) {
#pragma omp simd
            for (int64_t k = 0; k < span; k++) a[k] = a[k] / divisor;
        }
    }
}

/* a = rows[0] + rows[1] + ... (`count` rows, SPAN apart), summed in order as arithmetic.py's sum_. */
static void sum_rows(double *restrict a, const double *rows, int64_t count, int64_t span) {
#pragma omp simd
    for (int64_t k = 0; k < span; k++) a[k] = rows[k];
    for (int64_t i = 1; i < count; i++) {
        const double *row = rows + i * SPAN;
#pragma omp simd
        for (int64_t k = 0; k < span; k++) a[k] = a[k] + row[k];
    }
}

/* lowbias32 (C. Wellons), sparsify.py's mix_: logical shifts, products modulo 2**32. */
static inline uint32_t mix(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* How an ingredient's task vector is trimmed in generalized_bf16. */
enum { KEEP = 0, DROP = 1, RANDOM = 2, MAGNITUDE = 3 };

/* One block of generalized.py's kernel, from element `offset` of the tensor on: each ingredient's task vector
 * (p_i - base) kept whole (KEEP), zeroed (DROP), masked by its keyed hash as sparsify.py's RandomMasks
 * (RANDOM: kept below `limits[i]`) and rescaled (divided by `densities[i]`) or not, or kept where its magnitude
 * is above `lower[i]` and below `upper[i]` (MAGNITUDE, each bound as keep_above_ and Breadcrumbs' trim_ apply
 * it; nan: no bound); weighted; then summed, or (`consensus`) their elected sign's agreeing ones summed; divided
 * (`normalize`: by `divisor`, or by the agreeing weights), scaled by `lambda` where it is not 1, the base added;
 * `count` at most 16 (the rows of a span, on the stack: 144 KiB). The ops and their order are generalized.py's,
 * bit for bit. */
void generalized_bf16(double *restrict acc, const uint16_t *const *parts, const uint16_t *base, int64_t count,
                      const double *weights, const int64_t *modes, const double *densities, const int64_t *limits,
                      const double *lower, const double *upper, const uint32_t *keys, uint32_t element_key,
                      int rescale, int consensus, int normalize, double divisor, double lambda, int64_t offset,
                      int64_t n) {
    double rows[(count + 2) * SPAN];
    double *wide = rows, *sum = rows + SPAN, *deltas = rows + 2 * SPAN;
    uint32_t hashes[SPAN];
    int random = 0;
    for (int64_t i = 0; i < count; i++) random |= modes[i] == RANDOM;
    for (int64_t start = 0; start < n; start += SPAN) {
        int64_t span = n - start < SPAN ? n - start : SPAN;
        const uint16_t *b = base + start;
#pragma omp simd
        for (int64_t k = 0; k < span; k++) wide[k] = widen(b[k]);
        if (random) {
#pragma omp simd
            for (int64_t k = 0; k < span; k++) hashes[k] = mix((uint32_t)(offset + start + k) ^ element_key);
        }
        for (int64_t i = 0; i < count; i++) {
            const uint16_t *p = parts[i] + start;
            double *d = deltas + i * SPAN;
            double w = weights[i];
            if (modes[i] == KEEP) {
#pragma omp simd
                for (int64_t k = 0; k < span; k++) d[k] = (widen(p[k]) - wide[k]) * w;
                continue;
            }
            if (modes[i] == DROP) { /* zero_() then the weight: 0 times w, signed as w */
#pragma omp simd
                for (int64_t k = 0; k < span; k++) d[k] = 0.0 * w;
                continue;
            }
            if (modes[i] == MAGNITUDE) { /* sign(max(|d| - lower, 0)), then sign(max(upper - |d|, 0)) */
                double low = lower[i], high = upper[i];
                int has_low = low == low, has_high = high == high;
#pragma omp simd
                for (int64_t k = 0; k < span; k++) {
                    double t = widen(p[k]) - wide[k];
                    if (has_low) t = t * (double)(__builtin_fabs(t) - low > 0.0);
                    if (has_high) t = t * (double)(high - __builtin_fabs(t) > 0.0);
                    d[k] = t * w;
                }
                continue;
            }
            uint32_t key = keys[i];
            int32_t limit = (int32_t)limits[i];
            double drop = -densities[i], negated = -w;
            if (rescale) {
#pragma omp simd
                for (int64_t k = 0; k < span; k++) {
                    int32_t draw = (int32_t)(mix(hashes[k] ^ key) >> 8);
                    double mask = (double)((draw - limit) >> 31); /* -1 kept, 0 dropped */
                    d[k] = (widen(p[k]) - wide[k]) * mask / drop * w;
                }
            } else {
#pragma omp simd
                for (int64_t k = 0; k < span; k++) {
                    int32_t draw = (int32_t)(mix(hashes[k] ^ key) >> 8);
                    double mask = (double)((draw - limit) >> 31);
                    d[k] = (widen(p[k]) - wide[k]) * mask * negated;
                }
            }
        }
        double *a = acc + start;
        sum_rows(a, deltas, count, span);
        if (consensus) {
            /* e = +1 where the sum is >= 0, else -1; the agreeing d are those with d * e > 0 (clamped: -0.0 and
             * nan stay, as torch's clamp_ keeps them); their weights summed by sign (torch's: nan is 0). */
#pragma omp simd
            for (int64_t k = 0; k < span; k++) sum[k] = (double)(a[k] >= 0.0) * 2.0 - 1.0;
            for (int64_t i = 0; i < count; i++) {
                const double *d = deltas + i * SPAN;
                double w = weights[i];
#pragma omp simd
                for (int64_t k = 0; k < span; k++) {
                    double agreeing = d[k] * sum[k];
                    agreeing = agreeing < 0.0 ? 0.0 : agreeing;
                    a[k] = i ? a[k] + agreeing : agreeing;
                    if (normalize) {
                        double vote = (double)(agreeing > 0.0) * w;
                        deltas[i * SPAN + k] = vote;
                    }
                }
            }
            if (normalize) {
                /* the agreeing weights, in order, where the votes were kept in the deltas' rows */
#pragma omp simd
                for (int64_t k = 0; k < span; k++) {
                    double total = deltas[k];
                    for (int64_t i = 1; i < count; i++) total = total + deltas[i * SPAN + k];
                    double none = -(double)(total != 0.0 && total == total ? 1 : 0) + 1.0;
                    a[k] = a[k] * sum[k] / (total + none);
                }
            } else {
#pragma omp simd
                for (int64_t k = 0; k < span; k++) a[k] = a[k] * sum[k];
            }
        } else if (normalize) {
#pragma omp simd
            for (int64_t k = 0; k < span; k++) a[k] = a[k] / divisor;
        }
        if (lambda != 1.0) {
#pragma omp simd
            for (int64_t k = 0; k < span; k++) a[k] = a[k] * lambda;
        }
#pragma omp simd
        for (int64_t k = 0; k < span; k++) a[k] = a[k] + wide[k];
    }
}

/* ram.py's contributions of one span: the base widened into `wide`; each ingredient's task vector, zeroed where
 * its magnitude is not above `epsilon` (torch's sign of a nan is 0: a nan change is kept and not counted), into
 * `taus` (SPAN apart); how many contribute to each element into `counts`. */
static void contributions(const uint16_t *const *parts, const uint16_t *base, int64_t count, double epsilon,
                          int64_t start, int64_t span, double *wide, double *taus, double *counts) {
    const uint16_t *b = base + start;
#pragma omp simd
    for (int64_t k = 0; k < span; k++) wide[k] = widen(b[k]);
    for (int64_t i = 0; i < count; i++) {
        const uint16_t *p = parts[i] + start;
        double *tau = taus + i * SPAN;
#pragma omp simd
        for (int64_t k = 0; k < span; k++) {
            double t = widen(p[k]) - wide[k];
            double contributes = (double)(__builtin_fabs(t) - epsilon > 0.0);
            tau[k] = t * contributes;
            counts[k] = i ? counts[k] + contributes : contributes;
        }
    }
}

/* One block of ram.py's kernel, or (`factors` given) of ramplus_tl.py's: the contributions summed, divided by
 * their count (1 where none), where one ingredient alone contributes its change times its factor, the base
 * added; `count` at most 16. (torch's addcmul_ fuses the scaled sum's multiply-adds; only elements with one
 * contribution keep that sum, whose other terms are 0, so fused or not it is the same.) */
void ram_bf16(double *restrict acc, const uint16_t *const *parts, const uint16_t *base, int64_t count,
              double epsilon, const double *factors, int64_t n) {
    double rows[(count + 3) * SPAN];
    double *wide = rows, *counts = rows + SPAN, *scaled = rows + 2 * SPAN, *taus = rows + 3 * SPAN;
    for (int64_t start = 0; start < n; start += SPAN) {
        int64_t span = n - start < SPAN ? n - start : SPAN;
        contributions(parts, base, count, epsilon, start, span, wide, taus, counts);
        double *a = acc + start;
        sum_rows(a, taus, count, span);
        if (!factors) {
#pragma omp simd
            for (int64_t k = 0; k < span; k++) a[k] = a[k] / (counts[k] < 1.0 ? 1.0 : counts[k]) + wide[k];
            continue;
        }
#pragma omp simd
        for (int64_t k = 0; k < span; k++) scaled[k] = taus[k] * factors[0];
        for (int64_t i = 1; i < count; i++) {
            const double *tau = taus + i * SPAN;
            double factor = factors[i];
#pragma omp simd
            for (int64_t k = 0; k < span; k++) scaled[k] = scaled[k] + tau[k] * factor;
        }
#pragma omp simd
        for (int64_t k = 0; k < span; k++) {
            double c = counts[k];
            double unique = (double)(c == 1.0);
            double shared = a[k] / (c < 1.0 ? 1.0 : c);
            a[k] = shared * (-unique + 1.0) + scaled[k] * unique + wide[k];
        }
    }
}

/* ramplus_tl.py's counting pass over one block: per ingredient, the elements it contributes to with another
 * (counted[2 i]) and alone (counted[2 i + 1]), added in. */
void ram_counts_bf16(const uint16_t *const *parts, const uint16_t *base, int64_t count, double epsilon, int64_t n,
                     int64_t *counted) {
    double rows[(count + 2) * SPAN];
    double *wide = rows, *counts = rows + SPAN, *taus = rows + 2 * SPAN;
    for (int64_t start = 0; start < n; start += SPAN) {
        int64_t span = n - start < SPAN ? n - start : SPAN;
        contributions(parts, base, count, epsilon, start, span, wide, taus, counts);
        for (int64_t i = 0; i < count; i++) {
            const double *tau = taus + i * SPAN;
            int64_t together = 0, alone = 0;
#pragma omp simd reduction(+ : together, alone)
            for (int64_t k = 0; k < span; k++) {
                int64_t changed = tau[k] != 0.0;
                int64_t only = changed & (counts[k] == 1.0);
                together += changed - only;
                alone += only;
            }
            counted[2 * i] += together;
            counted[2 * i + 1] += alone;
        }
    }
}

/* nearswap.py's kernel where t >= 1e-6: a + clamp(b - a, -t, t), `a` the base (a nan difference stays nan, as
 * torch's clamp_ keeps it). */
void nearswap_bf16(double *restrict acc, const uint16_t *other, const uint16_t *base, double t, int64_t n) {
#pragma omp simd
    for (int64_t k = 0; k < n; k++) {
        double a = widen(base[k]);
        double d = widen(other[k]) - a;
        d = d < -t ? -t : (d > t ? t : d);
        acc[k] = a + d;
    }
}
