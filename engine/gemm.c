/* gemm.c - batch-invariant C = A * B^T for the CPU engine.
 *
 * Why this exists: a sequence must give the same bits alone or in any batch,
 * and seeded generation the same text however many requests share its
 * batch.  OpenBLAS's sgemm changes the last bits of a row's result with M and
 * with the row's position (different micro-kernels, tails and small-matrix
 * paths), and a deep recurrent net amplifies that into visible logit drift.
 *
 * How the bits are fixed: every output element has its own 8-lane
 * accumulator.  Lane l sums A[i][k] * B[j][k] over k = l (mod 8) in
 * increasing k with fused multiply-add, which is exactly rounded, so the
 * FMA instruction and C's fmaf() agree.  The K tail is padded with zeros on
 * both sides (fma(0, 0, x) == x, or +0 for x == -0, in every path alike).
 * The lanes then meet in one fixed tree, s_l = lane_l + lane_(l+4), result =
 * (s0 + s2) + (s1 + s3), and with beta 1 the old C is added last.  Blocking,
 * threading and the instruction set only decide which element is computed
 * when and where, never the order of its operations, so C[i][j] depends only
 * on row i of A, row j of B and the old C[i][j].  The AVX-512 and AVX2
 * kernels and the portable scalar twin below must stay operation-for-
 * operation alike; the AVX-512 kernels get their doubled width from two
 * elements per register, not from wider lanes, for that reason.
 */
#include "gemm.h"
#include "pool.h"

#include <assert.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define GEMM_AVX2 1
#else
#define GEMM_AVX2 0
#endif

/* Extra precision in intermediate float expressions (x87) would make the
 * scalar twin's sums differ from the vector kernels'. */
_Static_assert(FLT_EVAL_METHOD == 0, "gemm.c needs float arithmetic evaluated in float");
#ifdef __FAST_MATH__
#error "gemm.c must not be built with -ffast-math: reassociation breaks batch invariance"
#endif

/* A task's rows of A: enough that one B panel's trip into L2 is paid back
 * (a multiple of both kernels' row blocks). */
#define TASK_M 192

/* Bytes of B held in L2 while every row block of A streams past it. */
#define PANEL_BYTES (192 * 1024)

/* The widest register block of any kernel, for the panel's row rounding. */
#define NR_MAX 8

struct job {
    int M, N, K, lda, ldb, ldc;
    const float *A, *B;
    float *C;
    int beta;
    int packed;   /* B is in gemm_pack's layout (ldb unused) */
    enum gemm_isa isa;
    int task_n;   /* rows of B per task */
    int tasks_m;  /* tasks along M */
};

/* Rows of B in one L2 panel, a multiple of NR. */
static int panel_rows(int K)
{
    size_t rows = PANEL_BYTES / ((size_t)(K > 0 ? K : 1) * sizeof(float)) / NR_MAX * NR_MAX;
    return rows < NR_MAX ? NR_MAX : rows > INT_MAX / 2 ? INT_MAX / 2 : (int)rows;
}

/* Rows of B in one group of the packed layout (gemm_pack). */
#define PACK_ROWS 8

/* Row j of B.  Plain: B + j * ldb, its k-th value at k.  Packed: groups of
 * PACK_ROWS rows, K padded with zeros to a multiple of 8, stored block of 8
 * by block of 8 ([N / 8][K / 8][8 rows][8]), so row j starts at its group
 * plus 8 * (j % 8) and its block at k (a multiple of 8) is at 8 * k. */
static const float *b_row(const struct job *jb, int j)
{
    if (!jb->packed)
        return jb->B + (size_t)j * jb->ldb;
    size_t kpad = ((size_t)jb->K + 7) / 8 * 8;
    return jb->B + (size_t)(j / PACK_ROWS) * PACK_ROWS * kpad + (size_t)(j % PACK_ROWS) * 8;
}

/* ------------------------------------------------------------------------ */
/* Portable scalar twin. */

static float reduce8(const float *lane)
{
    float s0 = lane[0] + lane[4], s1 = lane[1] + lane[5];
    float s2 = lane[2] + lane[6], s3 = lane[3] + lane[7];
    return (s0 + s2) + (s1 + s3);
}

/* b is a row of B; its k-th block of 8 starts at b + kmul * k (1 plain, 8
 * packed; see b_row). */
static float dot_scalar(const float *a, const float *b, int kmul, int K)
{
    float lane[8] = {0};
    int k = 0;
    for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; l++)
            lane[l] = fmaf(a[k + l], b[kmul * k + l], lane[l]);
    if (k < K)
        for (int l = 0; l < 8; l++) {
            float x = k + l < K ? a[k + l] : 0.0f;
            float y = k + l < K ? b[kmul * k + l] : 0.0f;
            lane[l] = fmaf(x, y, lane[l]);
        }
    return reduce8(lane);
}

static void block_scalar(const struct job *jb, int m0, int m1, int n0, int n1)
{
    for (int i = m0; i < m1; i++) {
        const float *a = jb->A + (size_t)i * jb->lda;
        float *c = jb->C + (size_t)i * jb->ldc;
        for (int j = n0; j < n1; j++) {
            float d = dot_scalar(a, b_row(jb, j), jb->packed ? PACK_ROWS : 1, jb->K);
            c[j] = jb->beta ? d + c[j] : d;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Register-blocked kernels.  Each computes an mr x nr block of C for rows
 * of A at a and rows of B at b, mr and nr constants at every call site (one
 * function per shape, so that the guards below fold away). */

typedef void kernel_fn(int K, const float *a, size_t lda, const float *b, size_t ldb, int beta, float *c,
                       size_t ldc);

/* In the kernels, B's row q starts at b + q * ldb (ldb is PACK_ROWS for a
 * packed B) and its block of 8 at k lies at kmul * k: kmul is 1 for a plain
 * B and 8 for a packed one, a constant in each function. */

/* A kernel family: its largest block and one function per (mr, nr) and
 * layout of B, the function for mr x nr at fn[packed][(mr - 1) * nr_max +
 * nr - 1]. */
struct kernels {
    int mr_max, nr_max;
    kernel_fn *const *fn[2];
};

#if GEMM_AVX2
/* AVX2 + FMA: 3 rows of A times 4 rows of B, 12 ymm accumulators plus 3 A
 * vectors and 1 B vector, which fills the 16 ymm registers. */
#define AVX2_FN __attribute__((target("avx2,fma")))

/* The four outputs of one row of A from the 8-lane accumulators e0..e3 of
 * four elements: the tree of reduce8 for all four at once.  Adding the
 * halves gives s0..s3 of each element; after the transpose t[l] holds s_l of
 * all four.  Only the first nr are stored. */
static inline __attribute__((always_inline)) AVX2_FN void store4(int nr, int beta, float *c, __m256 e0,
                                                                  __m256 e1, __m256 e2, __m256 e3)
{
    __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(e0), _mm256_extractf128_ps(e0, 1));
    __m128 t1 = _mm_add_ps(_mm256_castps256_ps128(e1), _mm256_extractf128_ps(e1, 1));
    __m128 t2 = _mm_add_ps(_mm256_castps256_ps128(e2), _mm256_extractf128_ps(e2, 1));
    __m128 t3 = _mm_add_ps(_mm256_castps256_ps128(e3), _mm256_extractf128_ps(e3, 1));
    _MM_TRANSPOSE4_PS(t0, t1, t2, t3);
    __m128 d = _mm_add_ps(_mm_add_ps(t0, t2), _mm_add_ps(t1, t3));
    if (nr >= 4) {
        if (beta)
            d = _mm_add_ps(d, _mm_loadu_ps(c));
        _mm_storeu_ps(c, d);
        return;
    }
    float out[4];
    _mm_storeu_ps(out, d);
    for (int q = 0; q < nr; q++)
        c[q] = beta ? out[q] + c[q] : out[q];
}

/* One k step of 8 for the block: B row q's vector meets each A row's.
 * Accumulators are named variables, not arrays, so that every compiler
 * keeps all of them in registers. */
#define FMA_COL(q, LOAD)                                                                                     \
    if (nr > q) {                                                                                            \
        __m256 y = LOAD(b##q + kmul * k);                                                                    \
        c0##q = _mm256_fmadd_ps(x0, y, c0##q);                                                               \
        if (mr > 1)                                                                                          \
            c1##q = _mm256_fmadd_ps(x1, y, c1##q);                                                           \
        if (mr > 2)                                                                                          \
            c2##q = _mm256_fmadd_ps(x2, y, c2##q);                                                           \
    }
#define K_STEP(LOAD)                                                                                         \
    do {                                                                                                     \
        __m256 x0 = LOAD(a0 + k);                                                                            \
        __m256 x1 = mr > 1 ? LOAD(a1 + k) : x0;                                                              \
        __m256 x2 = mr > 2 ? LOAD(a2 + k) : x0;                                                              \
        FMA_COL(0, LOAD)                                                                                     \
        FMA_COL(1, LOAD)                                                                                     \
        FMA_COL(2, LOAD)                                                                                     \
        FMA_COL(3, LOAD)                                                                                     \
    } while (0)
#define LOAD_FULL(p) _mm256_loadu_ps(p)
#define LOAD_TAIL(p) _mm256_maskload_ps((p), tail)

/* Pointers to rows past mr or nr stay on row 0, in bounds, and are never
 * loaded. */
static inline __attribute__((always_inline)) AVX2_FN void kernel_avx2(int mr, int nr, int kmul, int K,
                                                                      const float *a, size_t lda,
                                                                      const float *b, size_t ldb, int beta,
                                                                      float *c, size_t ldc)
{
    const float *a0 = a, *a1 = mr > 1 ? a + lda : a, *a2 = mr > 2 ? a + 2 * lda : a;
    const float *b0 = b, *b1 = nr > 1 ? b + ldb : b, *b2 = nr > 2 ? b + 2 * ldb : b;
    const float *b3 = nr > 3 ? b + 3 * ldb : b;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
    __m256 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m256 c20 = c00, c21 = c00, c22 = c00, c23 = c00;
    int k = 0;
    for (; k + 8 <= K; k += 8)
        K_STEP(LOAD_FULL);
    if (k < K) {
        /* Lanes at or past K load as 0 and add 0*0, as the scalar twin does. */
        const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(K - k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        K_STEP(LOAD_TAIL);
    }
    store4(nr, beta, c, c00, c01, c02, c03);
    if (mr > 1)
        store4(nr, beta, c + ldc, c10, c11, c12, c13);
    if (mr > 2)
        store4(nr, beta, c + 2 * ldc, c20, c21, c22, c23);
}

/* Two functions per block shape: avx2_MxN for a plain B, avx2p_MxN for a
 * packed one. */
#define AVX2_KERNEL(mr, nr)                                                                                   \
    static AVX2_FN void avx2_##mr##x##nr(int K, const float *a, size_t lda, const float *b, size_t ldb,    \
                                         int beta, float *c, size_t ldc)                                 \
    {                                                                                                    \
        kernel_avx2(mr, nr, 1, K, a, lda, b, ldb, beta, c, ldc);                                         \
    }                                                                                                    \
    static AVX2_FN void avx2p_##mr##x##nr(int K, const float *a, size_t lda, const float *b, size_t ldb,   \
                                          int beta, float *c, size_t ldc)                                \
    {                                                                                                    \
        kernel_avx2(mr, nr, PACK_ROWS, K, a, lda, b, ldb, beta, c, ldc);                                 \
    }
#define AVX2_ROW(mr) AVX2_KERNEL(mr, 1) AVX2_KERNEL(mr, 2) AVX2_KERNEL(mr, 3) AVX2_KERNEL(mr, 4)
AVX2_ROW(1) AVX2_ROW(2) AVX2_ROW(3)

#define AVX2_NAMES(p, mr) avx2##p##_##mr##x1, avx2##p##_##mr##x2, avx2##p##_##mr##x3, avx2##p##_##mr##x4
static kernel_fn *const avx2_fn[] = {AVX2_NAMES(, 1), AVX2_NAMES(, 2), AVX2_NAMES(, 3)};
static kernel_fn *const avx2p_fn[] = {AVX2_NAMES(p, 1), AVX2_NAMES(p, 2), AVX2_NAMES(p, 3)};
static const struct kernels avx2_kernels = {3, 4, {avx2_fn, avx2p_fn}};

/* AVX-512: 6 rows of A times 8 rows of B.  A zmm register holds the 8-lane
 * accumulators of two elements side by side (B rows 2q and 2q+1 in its
 * halves, the A row broadcast to both), so every element keeps exactly the
 * operations of the AVX2 and scalar paths while each instruction does twice
 * the work: 24 zmm accumulators, 6 A vectors and 1 B pair, 31 of the 32
 * registers (a 4-row block reached 68% of one core's FMA peak, this one
 * 78%). */
#define AVX512_FN __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))

#define FMA_PAIR(q, LOAD)                                                                                    \
    if (nr > 2 * q) {                                                                                        \
        __m512 y = kmul == PACK_ROWS ? _mm512_loadu_ps(b##q##l + kmul * k)                                 \
                                     : _mm512_insertf32x8(_mm512_castps256_ps512(LOAD(b##q##l + k)),          \
                                                          LOAD(b##q##h + k), 1);                              \
        c0##q = _mm512_fmadd_ps(x0, y, c0##q);                                                               \
        if (mr > 1)                                                                                          \
            c1##q = _mm512_fmadd_ps(x1, y, c1##q);                                                           \
        if (mr > 2)                                                                                          \
            c2##q = _mm512_fmadd_ps(x2, y, c2##q);                                                           \
        if (mr > 3)                                                                                          \
            c3##q = _mm512_fmadd_ps(x3, y, c3##q);                                                           \
        if (mr > 4)                                                                                          \
            c4##q = _mm512_fmadd_ps(x4, y, c4##q);                                                           \
        if (mr > 5)                                                                                          \
            c5##q = _mm512_fmadd_ps(x5, y, c5##q);                                                           \
    }
#define K_STEP_PAIRS(LOAD)                                                                                   \
    do {                                                                                                     \
        __m512 x0 = _mm512_broadcast_f32x8(LOAD(a0 + k));                                                    \
        __m512 x1 = mr > 1 ? _mm512_broadcast_f32x8(LOAD(a1 + k)) : x0;                                      \
        __m512 x2 = mr > 2 ? _mm512_broadcast_f32x8(LOAD(a2 + k)) : x0;                                      \
        __m512 x3 = mr > 3 ? _mm512_broadcast_f32x8(LOAD(a3 + k)) : x0;                                      \
        __m512 x4 = mr > 4 ? _mm512_broadcast_f32x8(LOAD(a4 + k)) : x0;                                      \
        __m512 x5 = mr > 5 ? _mm512_broadcast_f32x8(LOAD(a5 + k)) : x0;                                      \
        FMA_PAIR(0, LOAD)                                                                                    \
        FMA_PAIR(1, LOAD)                                                                                    \
        FMA_PAIR(2, LOAD)                                                                                    \
        FMA_PAIR(3, LOAD)                                                                                    \
    } while (0)
#define LOAD_TAIL512(p) _mm256_maskz_loadu_ps(tail, (p))

/* The outputs of one row of A from its four pair accumulators: the tree
 * of reduce8 for all eight elements at once, each addition with the
 * operands in reduce8's order, in 12 vector operations (the four-element
 * transposes of store4 took three times as many, a tenth of the product's
 * time at K = 512).  A 128-bit chunk holds 4 lanes; p_q is
 * [e_2q lanes 0-3, e_2q 4-7, e_2q+1 0-3, e_2q+1 4-7]. */
static inline __attribute__((always_inline)) AVX512_FN void store8(int nr, int beta, float *c, __m512 p0,
                                                                    __m512 p1, __m512 p2, __m512 p3)
{
    /* s_l = lane_l + lane_l+4: chunk k of s03 is element k's s0..s3, and of
     * s47 element k + 4's. */
    __m512 s03 = _mm512_add_ps(_mm512_shuffle_f32x4(p0, p1, 0x88), _mm512_shuffle_f32x4(p0, p1, 0xdd));
    __m512 s47 = _mm512_add_ps(_mm512_shuffle_f32x4(p2, p3, 0x88), _mm512_shuffle_f32x4(p2, p3, 0xdd));
    /* Chunk k: [s0 + s2, s1 + s3] of element k, then of element k + 4. */
    __m512 x = _mm512_add_ps(_mm512_shuffle_ps(s03, s47, 0x44), _mm512_shuffle_ps(s03, s47, 0xee));
    /* (s0 + s2) + (s1 + s3) at positions 0 and 2 of each chunk. */
    __m512 y = _mm512_add_ps(x, _mm512_permute_ps(x, 0xb1));
    __m256 d = _mm512_castps512_ps256(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), y));
    const __mmask8 keep = (__mmask8)((1u << nr) - 1);
    if (beta)
        d = _mm256_add_ps(d, _mm256_maskz_loadu_ps(keep, c));
    _mm256_mask_storeu_ps(c, keep, d);
}

/* Rows of B past nr point at row 0 (in bounds): the upper half of an odd
 * last pair loads it again and its sums are never stored. */
static inline __attribute__((always_inline)) AVX512_FN void kernel_avx512(int mr, int nr, int kmul, int K,
                                                                          const float *a, size_t lda,
                                                                          const float *b, size_t ldb, int beta,
                                                                          float *c, size_t ldc)
{
    const float *a0 = a, *a1 = mr > 1 ? a + lda : a, *a2 = mr > 2 ? a + 2 * lda : a;
    const float *a3 = mr > 3 ? a + 3 * lda : a, *a4 = mr > 4 ? a + 4 * lda : a;
    const float *a5 = mr > 5 ? a + 5 * lda : a;
    const float *b0l = b, *b0h = nr > 1 ? b + ldb : b, *b1l = nr > 2 ? b + 2 * ldb : b;
    const float *b1h = nr > 3 ? b + 3 * ldb : b, *b2l = nr > 4 ? b + 4 * ldb : b;
    const float *b2h = nr > 5 ? b + 5 * ldb : b, *b3l = nr > 6 ? b + 6 * ldb : b;
    const float *b3h = nr > 7 ? b + 7 * ldb : b;
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00;
    __m512 c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00;
    __m512 c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    __m512 c40 = c00, c41 = c00, c42 = c00, c43 = c00;
    __m512 c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    int k = 0;
    for (; k + 8 <= K; k += 8)
        K_STEP_PAIRS(LOAD_FULL);
    if (k < K) {
        /* As in the AVX2 kernel: lanes at or past K load as 0 (masked loads
         * never touch the memory of a masked-off lane). */
        const __mmask8 tail = (__mmask8)((1u << (K - k)) - 1);
        K_STEP_PAIRS(LOAD_TAIL512);
    }
    store8(nr, beta, c, c00, c01, c02, c03);
    if (mr > 1)
        store8(nr, beta, c + ldc, c10, c11, c12, c13);
    if (mr > 2)
        store8(nr, beta, c + 2 * ldc, c20, c21, c22, c23);
    if (mr > 3)
        store8(nr, beta, c + 3 * ldc, c30, c31, c32, c33);
    if (mr > 4)
        store8(nr, beta, c + 4 * ldc, c40, c41, c42, c43);
    if (mr > 5)
        store8(nr, beta, c + 5 * ldc, c50, c51, c52, c53);
}

#define AVX512_KERNEL(mr, nr)                                                                                 \
    static AVX512_FN void avx512_##mr##x##nr(int K, const float *a, size_t lda, const float *b,           \
                                             size_t ldb, int beta, float *c, size_t ldc)                 \
    {                                                                                                    \
        kernel_avx512(mr, nr, 1, K, a, lda, b, ldb, beta, c, ldc);                                       \
    }                                                                                                    \
    static AVX512_FN void avx512p_##mr##x##nr(int K, const float *a, size_t lda, const float *b,          \
                                              size_t ldb, int beta, float *c, size_t ldc)                \
    {                                                                                                    \
        kernel_avx512(mr, nr, PACK_ROWS, K, a, lda, b, ldb, beta, c, ldc);                               \
    }
#define AVX512_ROW(mr)                                                                                        \
    AVX512_KERNEL(mr, 1) AVX512_KERNEL(mr, 2) AVX512_KERNEL(mr, 3) AVX512_KERNEL(mr, 4)                     \
    AVX512_KERNEL(mr, 5) AVX512_KERNEL(mr, 6) AVX512_KERNEL(mr, 7) AVX512_KERNEL(mr, 8)
AVX512_ROW(1) AVX512_ROW(2) AVX512_ROW(3) AVX512_ROW(4) AVX512_ROW(5) AVX512_ROW(6)

#define AVX512_NAMES(p, mr)                                                                                   \
    avx512##p##_##mr##x1, avx512##p##_##mr##x2, avx512##p##_##mr##x3, avx512##p##_##mr##x4,                 \
        avx512##p##_##mr##x5, avx512##p##_##mr##x6, avx512##p##_##mr##x7, avx512##p##_##mr##x8
static kernel_fn *const avx512_fn[] = {AVX512_NAMES(, 1), AVX512_NAMES(, 2), AVX512_NAMES(, 3),
                                      AVX512_NAMES(, 4), AVX512_NAMES(, 5), AVX512_NAMES(, 6)};
static kernel_fn *const avx512p_fn[] = {AVX512_NAMES(p, 1), AVX512_NAMES(p, 2), AVX512_NAMES(p, 3),
                                       AVX512_NAMES(p, 4), AVX512_NAMES(p, 5), AVX512_NAMES(p, 6)};
static const struct kernels avx512_kernels = {6, 8, {avx512_fn, avx512p_fn}};
#endif

/* Rows n0..n1 of B in L2-sized panels; within a panel each row block of A
 * stays in L1 while the panel's rows stream past it. */
static void block_kernels(const struct job *jb, const struct kernels *ks, int m0, int m1, int n0, int n1)
{
    size_t lda = (size_t)jb->lda, ldb = jb->packed ? PACK_ROWS : (size_t)jb->ldb, ldc = (size_t)jb->ldc;
    kernel_fn *const *fn = ks->fn[jb->packed];
    int panel = panel_rows(jb->K);
    for (int p0 = n0, p1; p0 < n1; p0 = p1) {
        p1 = n1 - p0 < panel ? n1 : p0 + panel;
        /* A packed B's pairs of rows must not straddle two groups. */
        assert(!jb->packed || ks->nr_max < PACK_ROWS || p0 % PACK_ROWS == 0);
        for (int i = m0, mr; i < m1; i += mr) {
            /* One row more than a block goes as two smaller blocks: a 1-row
             * kernel is load-bound and would cost as much as a full one. */
            int rest = m1 - i;
            mr = rest == ks->mr_max + 1 ? (rest + 1) / 2 : rest < ks->mr_max ? rest : ks->mr_max;
            const float *a = jb->A + (size_t)i * lda;
            float *c = jb->C + (size_t)i * ldc;
            for (int j = p0, nr; j < p1; j += nr) {
                nr = p1 - j < ks->nr_max ? p1 - j : ks->nr_max;
                fn[(mr - 1) * ks->nr_max + nr - 1](jb->K, a, lda, b_row(jb, j), ldb, jb->beta, c + j, ldc);
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Tasks: blocks of the product, run on the worker pool (pool.h). */

static atomic_int isa_limit = GEMM_AVX512;
static enum gemm_isa cpu_isa = GEMM_SCALAR;

static void run_task(const struct job *jb, int t)
{
    int tn = t / jb->tasks_m, tm = t % jb->tasks_m;
    int m0 = tm * TASK_M, m1 = jb->M - m0 < TASK_M ? jb->M : m0 + TASK_M;
    int n0 = tn * jb->task_n, n1 = jb->N - n0 < jb->task_n ? jb->N : n0 + jb->task_n;
#if GEMM_AVX2
    if (jb->isa != GEMM_SCALAR) {
        block_kernels(jb, jb->isa == GEMM_AVX512 ? &avx512_kernels : &avx2_kernels, m0, m1, n0, n1);
        return;
    }
#endif
    block_scalar(jb, m0, m1, n0, n1);
}

/* The widest kernels this CPU runs, looked up once. */
static pthread_once_t cpu_once = PTHREAD_ONCE_INIT;

static void cpu_init(void)
{
#if GEMM_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        cpu_isa = GEMM_AVX2;
    if (cpu_isa == GEMM_AVX2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl"))
        cpu_isa = GEMM_AVX512;
#endif
}

static enum gemm_isa isa_in_use(void)
{
    pthread_once(&cpu_once, cpu_init);
    enum gemm_isa limit = (enum gemm_isa)atomic_load(&isa_limit);
    return cpu_isa < limit ? cpu_isa : limit;
}

static void pool_task(void *ctx, int task, int worker)
{
    (void)worker;
    run_task(ctx, task);
}

enum gemm_isa gemm_nt_limit_isa(enum gemm_isa widest)
{
    atomic_store(&isa_limit, (int)widest);
    return isa_in_use();
}

/* The whole product on the calling thread. */
static void run_serial(struct job *jb)
{
    jb->task_n = jb->N;
    jb->tasks_m = jb->M / TASK_M + (jb->M % TASK_M != 0);
    for (int t = 0; t < jb->tasks_m; t++)
        run_task(jb, t);
}

/* The product on the worker pool, or serially when small. */
static void run_job(struct job *jb)
{
    int M = jb->M, N = jb->N, K = jb->K;
    if (M <= 0 || N <= 0)
        return;
    jb->isa = isa_in_use();
    if (pool_threads() < 2 || 2.0 * M * N * K < POOL_MIN_FLOPS) {
        run_serial(jb);
        return;
    }

    /* Tasks: TASK_M rows of A times task_n rows of B, task_n a multiple of
     * NR_MAX giving each thread a few tasks so a slow one is not waited for. */
    jb->tasks_m = M / TASK_M + (M % TASK_M != 0);
    int per = N / (4 * pool_threads()) + 1;
    if (jb->tasks_m > 1 || per > panel_rows(K))
        per = panel_rows(K);
    jb->task_n = (per + NR_MAX - 1) / NR_MAX * NR_MAX;
    int64_t tasks = (int64_t)(N / jb->task_n + (N % jb->task_n != 0)) * jb->tasks_m;
    if (tasks > INT_MAX) {
        run_serial(jb);
        return;
    }
    pool_run((int)tasks, pool_task, jb);
}

void gemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
             int ldc)
{
    assert(beta == 0.0f || beta == 1.0f);
    assert(M >= 0 && N >= 0 && K >= 0 && lda >= K && ldb >= K && ldc >= N);
    struct job jb = {
        .M = M, .N = N, .K = K, .lda = lda, .ldb = ldb, .ldc = ldc, .A = A, .B = B, .C = C,
        .beta = beta != 0.0f,
    };
    run_job(&jb);
}

size_t gemm_pack_floats(int N, int K)
{
    assert(N >= 0 && K >= 0);
    return ((size_t)N + PACK_ROWS - 1) / PACK_ROWS * PACK_ROWS * (((size_t)K + 7) / 8 * 8);
}

void gemm_pack(int N, int K, const float *B, int ldb, float *packed)
{
    assert(N >= 0 && K >= 0 && ldb >= K);
    memset(packed, 0, gemm_pack_floats(N, K) * sizeof(float));
    struct job jb = {.N = N, .K = K, .B = packed, .packed = 1};
    for (int j = 0; j < N; j++) {
        float *row = (float *)b_row(&jb, j);
        for (int k = 0; k < K; k++)
            row[k / 8 * 8 * PACK_ROWS + k % 8] = B[(size_t)j * ldb + k];
    }
}

void gemm_nt_packed(int M, int N, int K, const float *A, int lda, const float *packed, float beta, float *C,
                    int ldc)
{
    assert(beta == 0.0f || beta == 1.0f);
    assert(M >= 0 && N >= 0 && K >= 0 && lda >= K && ldc >= N);
    struct job jb = {
        .M = M, .N = N, .K = K, .lda = lda, .ldc = ldc, .A = A, .B = packed, .C = C,
        .beta = beta != 0.0f,
        .packed = 1,
    };
    run_job(&jb);
}
