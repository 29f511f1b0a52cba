/* arcee_fusion's per-element work on bfloat16 rows, fused into one loop per row (see hub_soup/native/__init__.py
 * for how this is built, and hub_soup/merging/methods/arcee_fusion.py for the method).
 *
 * Every element's arithmetic is the torch path's, in IEEE float64: the importance |x - b| * divergence, its
 * first 16 bits as an order-preserving key (OrderStatistics.code), and the kernel's b + (x - b) * keep. Only a
 * row's divergence differs from torch's in its last bits: its softmaxes' and its KL divergence's sums run in
 * vector lanes, and exp and log are libmvec's (within 4 ulp), not SLEEF's.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* glibc's vector variants (libmvec), declared as its math.h declares them under -ffast-math. */
__attribute__((simd("notinbranch"))) double exp(double);
__attribute__((simd("notinbranch"))) double log(double);

#define FLOOR 1e-8 /* mergekit's floor on both softmaxes */
#define BINS 65536

static inline double widen(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return (double)value;
}

/* KL(softmax(x) + FLOOR || softmax(b) + FLOOR) of one row; xs and bs are width doubles of scratch each. */
static double divergence(const uint16_t *x, const uint16_t *b, int64_t width, double *xs, double *bs) {
    for (int64_t j = 0; j < width; j++) {
        xs[j] = widen(x[j]);
        bs[j] = widen(b[j]);
    }
    double top_x = -INFINITY, top_b = -INFINITY;
#pragma omp simd reduction(max : top_x, top_b)
    for (int64_t j = 0; j < width; j++) {
        top_x = xs[j] > top_x ? xs[j] : top_x;
        top_b = bs[j] > top_b ? bs[j] : top_b;
    }
    double sum_x = 0.0, sum_b = 0.0;
#pragma omp simd reduction(+ : sum_x, sum_b)
    for (int64_t j = 0; j < width; j++) {
        xs[j] = exp(xs[j] - top_x);
        bs[j] = exp(bs[j] - top_b);
        sum_x += xs[j];
        sum_b += bs[j];
    }
    double scale_x = 1.0 / sum_x, scale_b = 1.0 / sum_b, kl = 0.0;  /* as torch's softmax scales */
#pragma omp simd reduction(+ : kl)
    for (int64_t j = 0; j < width; j++) {
        double p = xs[j] * scale_x + FLOOR, q = bs[j] * scale_b + FLOOR;
        kl += p * log(p / q);
    }
    return kl;
}

/* A float64's first 16 bits as an order-preserving key (negative values' lower 63 bits flipped). */
static inline int16_t code_of(double value) {
    int64_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (int16_t)((bits ^ ((bits >> 63) & INT64_MAX)) >> 48);
}

/* The first pass over `rows` rows of `width` elements: each row's divergence into `divergence`, each element's
 * code into `codes` for the first `coded` elements (whole rows; the others' into `spare`, width int16), every
 * code counted into `counts` (BINS int64, by code + BINS / 2). `xs`, `bs`: width doubles each; `histograms`:
 * 4 * BINS int32 (four, so that neighbouring equal codes do not wait on each other's increments), for at most
 * 2^31 - 1 elements a call. */
void arcee_first_pass(const uint16_t *x, const uint16_t *b, int64_t rows, int64_t width, double *divergences,
                      int16_t *codes, int64_t coded, int16_t *spare, int64_t *counts, double *xs, double *bs,
                      int32_t *histograms) {
    memset(histograms, 0, 4 * BINS * sizeof *histograms);
    for (int64_t row = 0; row < rows; row++) {
        const uint16_t *xr = x + row * width, *br = b + row * width;
        double d = divergence(xr, br, width, xs, bs);
        divergences[row] = d;
        int16_t *out = (row + 1) * width <= coded ? codes + row * width : spare;
        for (int64_t j = 0; j < width; j++)
            out[j] = code_of(fabs(widen(xr[j]) - widen(br[j])) * d);
        int64_t j = 0;
        for (; j + 4 <= width; j += 4)
            for (int lane = 0; lane < 4; lane++) histograms[lane * BINS + out[j + lane] + BINS / 2]++;
        for (; j < width; j++) histograms[out[j] + BINS / 2]++;
    }
    for (int bin = 0; bin < BINS; bin++)
        counts[bin] += (int64_t)histograms[bin] + histograms[BINS + bin] + histograms[2 * BINS + bin]
                       + histograms[3 * BINS + bin];
}

/* The kernel on `rows` rows: out = b + (x - b) * (|x - b| * divergence >= threshold), in float64. */
void arcee_kernel(const uint16_t *x, const uint16_t *b, int64_t rows, int64_t width, const double *divergences,
                  double threshold, double *out) {
    for (int64_t row = 0; row < rows; row++) {
        double d = divergences[row];
        for (int64_t j = row * width; j < (row + 1) * width; j++) {
            double base = widen(b[j]), change = widen(x[j]) - base;
            out[j] = change * (fabs(change) * d >= threshold ? 1.0 : 0.0) + base;
        }
    }
}

/* Count or gather one key (see arcee_later_pass). */
static inline void tally_key(int64_t key, const int64_t *prefixes, int64_t count, int shift, int64_t *counts,
                             int64_t **keys, int64_t *filled) {
    int64_t high = key >> (shift + 16);
    for (int64_t k = 0; k < count; k++) {
        if (high != prefixes[k]) continue;
        if (counts)
            counts[k * BINS + ((key >> shift) & (BINS - 1))]++;
        else
            keys[k][filled[k]++] = key;
    }
}

/* A later pass over `rows` rows: each element whose code is one of the `tops` (the codes the ranks' prefixes
 * begin with, at most 4) has its importance computed and its order-preserving key tallied against the
 * `count` `prefixes` (OrderStatistics.digit): where the key's bits above `shift + 16` are a prefix, the 16
 * bits above `shift` are counted into that prefix's histogram (`counts`: count * BINS int64), or, gathering
 * (`counts` NULL), the key is appended to that prefix's keys (`keys`: count arrays, `filled`: how many each
 * holds; the caller leaves room for every element of the call). The codes are `codes`' where the first pass kept them (each candidate's importance
 * then computed alone), else (`codes` NULL) each importance's own. `scratch`: width doubles; `marks`: width
 * int32. A row's codes are compared in vector lanes, then the candidates' positions packed without branches. */
void arcee_later_pass(const uint16_t *x, const uint16_t *b, int64_t rows, int64_t width, const double *divergences,
                      const int16_t *codes, const int16_t *tops, int64_t top_count, const int64_t *prefixes,
                      int64_t count, int64_t shift, int64_t *counts, int64_t **keys, int64_t *filled,
                      double *scratch, int32_t *marks) {
    int16_t t[4];
    for (int i = 0; i < 4; i++) t[i] = tops[i < top_count ? i : top_count - 1];
    for (int64_t row = 0; row < rows; row++) {
        double d = divergences[row];
        const uint16_t *xr = x + row * width, *br = b + row * width;
        int64_t picked = 0;
        if (codes) {
            const int16_t *cr = codes + row * width;
            for (int64_t j = 0; j < width; j++)
                marks[j] = (cr[j] == t[0]) | (cr[j] == t[1]) | (cr[j] == t[2]) | (cr[j] == t[3]);
            for (int64_t j = 0; j < width; j++) {  /* in place: a mark is read before its slot is written */
                int32_t mark = marks[j];
                marks[picked] = (int32_t)j;
                picked += mark;
            }
            for (int64_t k = 0; k < picked; k++)
                scratch[k] = fabs(widen(xr[marks[k]]) - widen(br[marks[k]])) * d;
        } else {
            for (int64_t j = 0; j < width; j++) {
                double importance = fabs(widen(xr[j]) - widen(br[j])) * d;
                int16_t code = code_of(importance);
                marks[j] = (code == t[0]) | (code == t[1]) | (code == t[2]) | (code == t[3]);
                scratch[j] = importance;
            }
            for (int64_t j = 0; j < width; j++) {  /* in place, as above */
                int32_t mark = marks[j];
                scratch[picked] = scratch[j];
                picked += mark;
            }
        }
        for (int64_t k = 0; k < picked; k++) {
            int64_t bits;
            memcpy(&bits, &scratch[k], sizeof bits);
            tally_key(bits ^ ((bits >> 63) & INT64_MAX), prefixes, count, (int)shift, counts, keys, filled);
        }
    }
}
