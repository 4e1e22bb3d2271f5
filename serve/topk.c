/* Candidate rows of an int8 item table for exact top-K (serve/topk.py compiles and calls this).

   For each query b the row scores are approximated from an int8 copy of the query:
       approx[b, i] = alpha[i] * (qscale[b] * sum_j q8[b, j] * codes[i, j]) + beta[i] * qsum[b]
   which differs from the exact score by at most error = tile_bound[i / 16] * qerror[b] + slack[b]
   (serve/topk.py). Every row thus has a lower and an upper bound of its exact score; a row whose
   upper bound is below the k-th best lower bound so far cannot be in the exact top k, so only the
   other rows are kept as candidates, and the caller rescores them exactly.

   The integer dot products are the whole cost. With AVX-512 VNNI, 16 rows are transposed into 4-byte
   column groups once and every query adds one vpdpbusd per group (16 rows at a time, no horizontal
   sums); elsewhere a plain loop that the compiler vectorizes as it can. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && !defined(LMREC_PORTABLE)
#include <immintrin.h>
#define LMREC_VNNI 1
#endif

typedef struct {
    const int64_t *exclude; /* sorted rows never returned for this query */
    int64_t n_exclude;
    float *heap; /* min-heap of the k best approximations seen */
    int64_t heap_size;
    int64_t *rows; /* candidates, with the bounds of their exact scores */
    float *lower, *upper;
    int64_t count;
    float floor; /* the k-th best lower bound once k rows were seen */
    int overflow;
} Query;

static int excluded(const Query *q, int64_t row) {
    int64_t lo = 0, hi = q->n_exclude;
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (q->exclude[mid] < row)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < q->n_exclude && q->exclude[lo] == row;
}

static void sift_down(float *heap, int64_t n, int64_t at) {
    float value = heap[at];
    for (;;) {
        int64_t child = 2 * at + 1;
        if (child >= n) break;
        if (child + 1 < n && heap[child + 1] < heap[child]) child++;
        if (heap[child] >= value) break;
        heap[at] = heap[child];
        at = child;
    }
    heap[at] = value;
}

static void offer(Query *q, int64_t k, int64_t cap, int64_t row, float lower, float upper) {
    if (q->overflow || excluded(q, row)) return;
    if (q->heap_size < k) {
        int64_t at = q->heap_size++;
        while (at > 0 && q->heap[(at - 1) / 2] > lower) {
            q->heap[at] = q->heap[(at - 1) / 2];
            at = (at - 1) / 2;
        }
        q->heap[at] = lower;
        if (q->heap_size == k) q->floor = q->heap[0];
    } else if (lower > q->heap[0]) {
        q->heap[0] = lower;
        sift_down(q->heap, k, 0);
        q->floor = q->heap[0];
    }
    if (q->count == cap) {
        /* The floor has risen since most of these were kept: drop those now below it. */
        int64_t kept = 0;
        for (int64_t c = 0; c < q->count; c++) {
            if (q->upper[c] >= q->floor) {
                q->rows[kept] = q->rows[c];
                q->lower[kept] = q->lower[c];
                q->upper[kept++] = q->upper[c];
            }
        }
        q->count = kept;
        if (kept == cap) {
            q->overflow = 1;
            return;
        }
    }
    q->rows[q->count] = row;
    q->lower[q->count] = lower;
    q->upper[q->count++] = upper;
}

/* What every query of one call shares. */
typedef struct {
    const int8_t *q8; /* nq x q8_stride, zero past dim */
    int64_t q8_stride;
    const int32_t *q8_sum;
    const float *qscale, *qsum, *qerror, *slack;
    Query *queries;
    int64_t k, cap;
} Search;

#ifdef LMREC_VNNI
/* Query b's integer dot products with 16 rows (lane i: row first + i) to bounds and candidates. */
static inline __attribute__((always_inline)) void emit(const Search *s, int64_t b, __m512i dots, __m512 a, __m512 bias,
                                                       float bound, __mmask16 lanes, int64_t first) {
    const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(dots), _mm512_set1_ps(s->qscale[b]));
    const __m512 score = _mm512_fmadd_ps(a, dot, _mm512_mul_ps(bias, _mm512_set1_ps(s->qsum[b])));
    const float error = bound * s->qerror[b] + s->slack[b];
    Query *q = &s->queries[b];
    __mmask16 above =
        _mm512_mask_cmp_ps_mask(lanes, _mm512_add_ps(score, _mm512_set1_ps(error)), _mm512_set1_ps(q->floor), _CMP_GE_OQ);
    if (above) {
        float values[16];
        _mm512_storeu_ps(values, score);
        while (above) {
            const int lane = __builtin_ctz(above);
            above &= above - 1;
            offer(q, s->k, s->cap, first + lane, values[lane] - error, values[lane] + error);
        }
    }
}

/* Queries b0 .. b0 + nb - 1 against one transposed tile. Eight independent accumulators whatever
   nb (1, 2, 4 or 8; a constant once inlined): a single chain of vpdpbusd would wait on its latency. */
static inline __attribute__((always_inline)) void score_tile(const Search *s, const __m512i *tile, int64_t groups,
                                                             int64_t b0, const int nb, __m512 a, __m512 bias,
                                                             float bound, __mmask16 lanes, int64_t first) {
    const int splits = 8 / nb;
    __m512i acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; g += splits) {
        for (int i = 0; i < splits; i++) {
            const __m512i codes = tile[g + i];
            for (int j = 0; j < nb; j++) {
                const int32_t *query = (const int32_t *)(s->q8 + (b0 + j) * s->q8_stride);
                acc[j * splits + i] = _mm512_dpbusd_epi32(acc[j * splits + i], codes, _mm512_set1_epi32(query[g + i]));
            }
        }
    }
    for (int j = 0; j < nb; j++) {
        __m512i dots = _mm512_set1_epi32(-128 * s->q8_sum[b0 + j]);
        for (int i = 0; i < splits; i++) dots = _mm512_add_epi32(dots, acc[j * splits + i]);
        emit(s, b0 + j, dots, a, bias, bound, lanes, first);
    }
}

/* Lane i of the result: the sum of v[i]'s 16 lanes. */
static inline __attribute__((always_inline)) __m512i sum_lanes(const __m512i v[16]) {
    __m512i pairs[8], quads[4];
    for (int i = 0; i < 8; i++)
        pairs[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                    _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    /* Each 128-bit lane of quads[m] holds its part of the sums of rows 4m .. 4m + 3. */
    for (int m = 0; m < 4; m++)
        quads[m] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * m], pairs[2 * m + 1]),
                                    _mm512_unpackhi_epi64(pairs[2 * m], pairs[2 * m + 1]));
    const __m512i low = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[0], quads[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                         _mm512_shuffle_i32x4(quads[0], quads[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512i high = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2], quads[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                          _mm512_shuffle_i32x4(quads[2], quads[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The mask of the bytes of 64-byte chunk c of a row of dim bytes. */
static inline __mmask64 chunk_bytes(int64_t dim, int64_t c) {
    const int64_t width = dim - c * 64 < 64 ? dim - c * 64 : 64;
    return width == 64 ? ~(__mmask64)0 : (((__mmask64)1 << width) - 1);
}

/* One query's dot products with 16 consecutive rows, as unsigned codes (code + 128): lane i, row i. */
static inline __attribute__((always_inline)) __m512i row_dots(const int8_t *rows, int64_t dim, int64_t chunks,
                                                              const int8_t *q8, __m512i flip) {
    __m512i acc[16];
    for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; c++) {
        const __mmask64 bytes = chunk_bytes(dim, c);
        const __m512i query = _mm512_loadu_si512(q8 + c * 64);
        const int8_t *row = rows + c * 64;
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++, row += dim)
            acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, row), flip), query);
    }
    return sum_lanes(acc);
}

/* 16 consecutive rows as unsigned codes, transposed into 4-byte column groups: tile[c * 16 + g],
   lane i holds bytes 4g .. 4g + 3 of chunk c of row i. */
static inline __attribute__((always_inline)) void transpose(const int8_t *rows, int64_t dim, int64_t chunks,
                                                            __m512i flip, __m512i *tile) {
    for (int64_t c = 0; c < chunks; c++) {
        const __mmask64 bytes = chunk_bytes(dim, c);
        __m512i r[16], t[16], u[16];
        const int8_t *row = rows + c * 64;
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++, row += dim) r[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bytes, row), flip);
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) {
            u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
            u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
            u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
            u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        /* u[4 * quad + m] holds column groups m, m + 4, m + 8, m + 12 of rows 4 * quad .. 4 * quad + 3. */
        for (int m = 0; m < 4; m++) {
            const __m512i v0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88);
            const __m512i v1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xDD);
            const __m512i v2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88);
            const __m512i v3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xDD);
            __m512i *out = tile + c * 16;
            out[m] = _mm512_shuffle_i32x4(v0, v2, 0x88);
            out[m + 8] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
            out[m + 4] = _mm512_shuffle_i32x4(v1, v3, 0x88);
            out[m + 12] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
        }
    }
}
#endif

#define PREFETCH_TILES 8 /* tiles read ahead of the one scored: a pass is bound by memory at batch 1 */

/* Returns the number of queries whose candidates did not fit in cap (their count is set to -1). */
int64_t lmrec_topk_candidates(const int8_t *codes, int64_t dim, int64_t start, int64_t stop, const float *alpha,
                              const float *beta, const float *tile_bound, int64_t nq, const int8_t *q8,
                              int64_t q8_stride, const int32_t *q8_sum, const float *qscale, const float *qsum,
                              const float *qerror, const float *slack, int64_t k, const int64_t *exclude,
                              const int64_t *exclude_offsets, float *heaps, int64_t *cand_rows, float *cand_lower,
                              float *cand_upper, int64_t cap, int64_t *cand_count) {
    Query *queries = (Query *)calloc((size_t)nq, sizeof(Query));
    if (!queries) return -1;
    for (int64_t b = 0; b < nq; b++) {
        Query *q = &queries[b];
        q->exclude = exclude + exclude_offsets[b];
        q->n_exclude = exclude_offsets[b + 1] - exclude_offsets[b];
        q->heap = heaps + b * k;
        q->rows = cand_rows + b * cap;
        q->lower = cand_lower + b * cap;
        q->upper = cand_upper + b * cap;
        q->floor = -INFINITY;
    }
#ifdef LMREC_VNNI
    const Search search = {q8, q8_stride, q8_sum, qscale, qsum, qerror, slack, queries, k, cap};
    /* q8_stride is a multiple of 64: the query bytes past dim are zero. */
    const int64_t chunks = q8_stride / 64, groups = chunks * 16;
    __m512i *tile = (__m512i *)aligned_alloc(64, (size_t)groups * sizeof(__m512i));
    int8_t *partial = (int8_t *)malloc((size_t)(16 * dim)); /* a tile cut by start or stop, the rest zero */
    if (!tile || !partial) {
        free(tile);
        free(partial);
        free(queries);
        return -1;
    }
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    /* Tiles are the table's own 16-row tiles (tile_bound's), the rows outside [start, stop) masked. */
    for (int64_t first = start & ~(int64_t)15; first < stop; first += 16) {
        const int64_t skip = start > first ? start - first : 0, n = stop - first < 16 ? stop - first : 16;
        const __mmask16 lanes = (__mmask16)(((1u << n) - 1u) & ~((1u << skip) - 1u));
        const int8_t *rows = codes + first * dim;
        if (lanes != 0xFFFF) {
            memset(partial, 0, (size_t)(16 * dim));
            memcpy(partial + skip * dim, rows + skip * dim, (size_t)((n - skip) * dim));
            rows = partial;
        } else if (first + 16 * PREFETCH_TILES < stop) {
            const char *ahead = (const char *)(rows + 16 * PREFETCH_TILES * dim);
            for (int64_t offset = 0; offset < 16 * dim; offset += 64) _mm_prefetch(ahead + offset, _MM_HINT_T0);
        }
        const __m512 a = _mm512_maskz_loadu_ps(lanes, alpha + first);
        const __m512 bias = _mm512_maskz_loadu_ps(lanes, beta + first);
        const float bound = tile_bound[first / 16];
        if (nq == 1) {
            /* One query: row-wise dot products summed across lanes; no transpose to share. */
            /* Width 64 (the common one) spelled out: constants let the compiler keep everything in registers. */
            const __m512i dots = dim == 64 ? row_dots(rows, 64, 1, q8, flip) : row_dots(rows, dim, chunks, q8, flip);
            emit(&search, 0, _mm512_add_epi32(dots, _mm512_set1_epi32(-128 * q8_sum[0])), a, bias, bound, lanes, first);
            continue;
        }
        if (dim == 64)
            transpose(rows, 64, 1, flip, tile);
        else
            transpose(rows, dim, chunks, flip, tile);
        int64_t b = 0;
        for (; b + 8 <= nq; b += 8) score_tile(&search, tile, groups, b, 8, a, bias, bound, lanes, first);
        if (b + 4 <= nq) {
            score_tile(&search, tile, groups, b, 4, a, bias, bound, lanes, first);
            b += 4;
        }
        if (b + 2 <= nq) {
            score_tile(&search, tile, groups, b, 2, a, bias, bound, lanes, first);
            b += 2;
        }
        if (b < nq) score_tile(&search, tile, groups, b, 1, a, bias, bound, lanes, first);
    }
    free(tile);
    free(partial);
#else
    for (int64_t row = start; row < stop; row++) {
        const int8_t *codes_row = codes + row * dim;
        for (int64_t b = 0; b < nq; b++) {
            const int8_t *query = q8 + b * q8_stride;
            int32_t acc = 0;
            for (int64_t j = 0; j < dim; j++) acc += (int32_t)query[j] * (int32_t)codes_row[j];
            const float score = alpha[row] * ((float)acc * qscale[b]) + beta[row] * qsum[b];
            const float error = tile_bound[row / 16] * qerror[b] + slack[b];
            if (score + error >= queries[b].floor) offer(&queries[b], k, cap, row, score - error, score + error);
        }
    }
#endif
    int64_t overflowed = 0;
    for (int64_t b = 0; b < nq; b++) {
        cand_count[b] = queries[b].overflow ? -1 : queries[b].count;
        overflowed += queries[b].overflow;
    }
    free(queries);
    return overflowed;
}
