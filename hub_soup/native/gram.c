/* Dot products of a few task vectors, for angles between whole tensors (hub_soup/merging/methods/angles.py; see
 * hub_soup/native/__init__.py for how this is built). Each element's difference and product are the torch
 * path's IEEE float64; the sums run in vector lanes, in another order than BLAS's ddot. */
#include <stdint.h>
#include <string.h>

#define SPAN 2048 /* elements widened at a time: a few float64 rows that stay in the first-level cache */

static inline double widen(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return (double)value;
}

/* Over `n` elements of `count` bfloat16 vectors (`vectors`: their addresses), each less `origin` where given
 * (NULL: none): every pair's dot product <v_i, v_j> for i <= j, added row by row into `dots` (count * (count + 1)
 * / 2 doubles). `rows`: count rows of scratch doubles, `stride` apart, each of min(n, SPAN) at least. */
void gram_bf16(const uint16_t *const *vectors, const uint16_t *origin, int64_t count, int64_t n, double *dots,
               double *rows, int64_t stride) {
    for (int64_t start = 0; start < n; start += SPAN) {
        int64_t span = n - start < SPAN ? n - start : SPAN;
        for (int64_t i = 0; i < count; i++) {
            const uint16_t *v = vectors[i] + start;
            double *row = rows + i * stride;
            if (origin) {
                const uint16_t *o = origin + start;
                for (int64_t k = 0; k < span; k++) row[k] = widen(v[k]) - widen(o[k]);
            } else {
                for (int64_t k = 0; k < span; k++) row[k] = widen(v[k]);
            }
        }
        int64_t pair = 0;
        for (int64_t i = 0; i < count; i++) {
            for (int64_t j = i; j < count; j++, pair++) {
                const double *a = rows + i * stride, *b = rows + j * stride;
                double sum = 0.0;
#pragma omp simd reduction(+ : sum)
                for (int64_t k = 0; k < span; k++) sum += a[k] * b[k];
                dots[pair] += sum;
            }
        }
    }
}
