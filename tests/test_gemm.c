/* test_gemm.c - gemm_nt: accuracy, the exact arithmetic it promises, and
 * batch invariance; and the CPU backend's other products, OpenBLAS's split
 * over the pool (test_backend_products_and_their_bits).
 *
 * gemm_nt replaces BLAS because a row's result must not depend on the batch
 * around it.  Besides checking results against a double-precision reference
 * over odd shapes, strides and misaligned pointers, these tests check the
 * bits: every element must equal the documented 8-lane FMA sum computed
 * here independently, whatever M, the row's position, its neighbours, the
 * thread count or the code path (AVX-512, AVX2 or the scalar twin).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "backend.h"
#include "gemm.h"
#include "pool.h"
#include "support/filter.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 32);
}

/* Mostly O(1) values, with some exact zeros, negative zeros and values a
 * thousand times larger or smaller, so rounding differs between orders. */
static float rnd_value(void)
{
    uint32_t r = rng();
    float x = (float)(r >> 8) / (float)(1u << 24) - 0.5f;
    switch (r & 31) {
    case 0:
        return 0.0f;
    case 1:
        return -0.0f;
    case 2:
        return x * 1000.0f;
    case 3:
        return x / 1000.0f;
    default:
        return x;
    }
}

static void fill(float *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        p[i] = rnd_value();
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    assert_non_null(p);
    return p;
}

/* The arithmetic gemm.h promises, written out independently. */
static float spec_dot(const float *a, const float *b, int K)
{
    float lane[8] = {0};
    for (int k = 0; k < (K + 7) / 8 * 8; k++) {
        float x = k < K ? a[k] : 0.0f, y = k < K ? b[k] : 0.0f;
        lane[k % 8] = fmaf(x, y, lane[k % 8]);
    }
    float s[4];
    for (int l = 0; l < 4; l++)
        s[l] = lane[l] + lane[l + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
}

static int same_bits(float x, float y)
{
    return memcmp(&x, &y, sizeof x) == 0;
}

/* A matrix of rows x cols inside a buffer with leading dimension ld, its
 * first element `off` floats past an aligned malloc. */
struct mat {
    float *buf, *p;
    int rows, cols, ld;
};

static struct mat mat_new(int rows, int cols, int ld, int off)
{
    struct mat m = {.rows = rows, .cols = cols, .ld = ld};
    m.buf = xmalloc(((size_t)rows * ld + off) * sizeof(float));
    m.p = m.buf + off;
    fill(m.buf, (size_t)rows * ld + off);
    return m;
}

/* Runs one gemm_nt of the given shape and checks every element against the
 * spec bitwise and a double reference within rounding error, and that
 * nothing outside C's M x N elements was written; then the same product
 * with B packed (gemm_pack) must leave C's buffer with the same bytes. */
static void check_case(int M, int N, int K, int pad, int off, float beta)
{
    struct mat A = mat_new(M, K, K + pad, off), B = mat_new(N, K, K + pad, off);
    struct mat C = mat_new(M, N, N + pad, off);
    size_t csize = (size_t)M * C.ld + off;
    float *old = xmalloc(csize * sizeof(float));
    if (beta == 0.0f)
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++)
                C.p[(size_t)i * C.ld + j] = NAN;
    memcpy(old, C.buf, csize * sizeof(float));

    gemm_nt(M, N, K, A.p, A.ld, B.p, B.ld, beta, C.p, C.ld);

    float *packed = xmalloc(gemm_pack_floats(N, K) * sizeof(float)), *C2 = xmalloc(csize * sizeof(float));
    gemm_pack(N, K, B.p, B.ld, packed);
    memcpy(C2, old, csize * sizeof(float));
    gemm_nt_packed(M, N, K, A.p, A.ld, packed, beta, C2 + off, C.ld);
    if (memcmp(C2, C.buf, csize * sizeof(float)) != 0)
        fail_msg("M=%d N=%d K=%d pad=%d off=%d beta=%g: packed B gives other bytes", M, N, K, pad, off,
                 (double)beta);
    free(packed);
    free(C2);

    for (size_t e = 0; e < csize; e++) {
        size_t rel = e - (size_t)off;
        int inside = e >= (size_t)off && (int)(rel % (size_t)C.ld) < N;
        if (!inside)
            assert_true(same_bits(C.buf[e], old[e]));
    }
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            const float *a = A.p + (size_t)i * A.ld, *b = B.p + (size_t)j * B.ld;
            float c0 = old[(size_t)off + (size_t)i * C.ld + j];
            float got = C.p[(size_t)i * C.ld + j];
            float d = spec_dot(a, b, K);
            float want = beta != 0.0f ? d + c0 : d;
            if (!same_bits(got, want))
                fail_msg("M=%d N=%d K=%d pad=%d off=%d beta=%g: C[%d][%d] = %a, spec %a", M, N, K, pad, off,
                         (double)beta, i, j, (double)got, (double)want);
            double ref = beta != 0.0f ? c0 : 0.0, mag = beta != 0.0f ? fabs(c0) : 0.0;
            for (int k = 0; k < K; k++) {
                ref += (double)a[k] * b[k];
                mag += fabs((double)a[k] * b[k]);
            }
            /* K/8 FMAs per lane, 3 tree levels and the beta add. */
            double bound = (K / 8 + 5) * (double)FLT_EPSILON * mag + 1e-37;
            if (fabs((double)got - ref) > bound)
                fail_msg("M=%d N=%d K=%d: C[%d][%d] = %.9g, reference %.9g", M, N, K, i, j, (double)got, ref);
        }
    free(A.buf);
    free(B.buf);
    free(C.buf);
    free(old);
}

static const int sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 24, 31, 33, 64, 70};
#define NSIZES (int)(sizeof sizes / sizeof sizes[0])

static void sweep(void)
{
    for (int mi = 0; mi < NSIZES; mi++)
        for (int ni = 0; ni < NSIZES; ni++)
            for (int ki = 0; ki < NSIZES; ki++) {
                int M = sizes[mi], N = sizes[ni], K = sizes[ki];
                /* Every combination with tight rows and aligned pointers;
                 * strides and misalignment on a rotating subset. */
                int v = mi + ni + ki;
                check_case(M, N, K, 0, 0, (v & 1) ? 1.0f : 0.0f);
                if (v % 3 == 0)
                    check_case(M, N, K, 1 + v % 5, 1, (v & 2) ? 1.0f : 0.0f);
            }
}

/* The sweep on one set of kernels; skipped where the CPU lacks them, so
 * that a pass means they ran. */
static void sweep_limited(enum gemm_isa isa)
{
    enum gemm_isa got = gemm_nt_limit_isa(isa);
    if (got == isa)
        sweep();
    gemm_nt_limit_isa(GEMM_AVX512);
    if (got != isa)
        skip();
}

static void test_scalar_twin_matches_reference(void **state)
{
    (void)state;
    sweep_limited(GEMM_SCALAR);
}

static void test_avx2_matches_reference(void **state)
{
    (void)state;
    sweep_limited(GEMM_AVX2);
}

static void test_avx512_matches_reference(void **state)
{
    (void)state;
    sweep_limited(GEMM_AVX512);
}

/* Large enough to be split over the pool. */
static void test_threaded_shapes(void **state)
{
    (void)state;
    check_case(150, 301, 131, 3, 1, 0.0f);
    check_case(400, 90, 64, 0, 0, 1.0f);
    check_case(5, 2048, 129, 0, 1, 1.0f);
}

static void test_empty_and_k0(void **state)
{
    (void)state;
    float c[6] = {1, 2, 3, 4, 5, 6};
    gemm_nt(0, 3, 4, NULL, 4, NULL, 4, 0.0f, c, 3);
    gemm_nt(2, 0, 4, NULL, 4, NULL, 4, 0.0f, c, 3);
    for (int i = 0; i < 6; i++)
        assert_true(c[i] == (float)(i + 1));
    float a = 1.0f, b = 1.0f;
    gemm_nt(2, 3, 0, &a, 0, &b, 0, 1.0f, c, 3);
    for (int i = 0; i < 6; i++)
        assert_true(c[i] == (float)(i + 1));
    gemm_nt(2, 3, 0, &a, 0, &b, 0, 0.0f, c, 3);
    for (int i = 0; i < 6; i++)
        assert_true(same_bits(c[i], 0.0f));
}

/* One row of A placed at every position of every M from 1 to 80 among
 * random neighbours, and one row of B at varying positions among varying
 * N: its elements must keep their bits. */
static void check_invariance(int N, int K, int maxM, int mstep)
{
    int ld = K + 3;
    float *row = xmalloc((size_t)K * sizeof(float));
    float *B = xmalloc((size_t)N * ld * sizeof(float));
    float *A = xmalloc(((size_t)maxM * ld + 1) * sizeof(float));
    float *C = xmalloc((size_t)maxM * N * sizeof(float));
    float *want = xmalloc((size_t)N * sizeof(float));
    fill(row, (size_t)K);
    fill(B, (size_t)N * ld);

    gemm_nt(1, N, K, row, K, B, ld, 0.0f, want, N);
    for (int M = 1; M <= maxM; M += mstep)
        for (int p = 0; p < M; p++) {
            int off = (M + p) & 1; /* shifts the alignment of every row */
            fill(A, (size_t)M * ld + 1);
            memcpy(A + off + (size_t)p * ld, row, (size_t)K * sizeof(float));
            gemm_nt(M, N, K, A + off, ld, B, ld, 0.0f, C, N);
            if (memcmp(C + (size_t)p * N, want, (size_t)N * sizeof(float)) != 0)
                fail_msg("N=%d K=%d: row at %d of M=%d differs from M=1", N, K, p, M);
        }

    /* Column side: B's row j moved to position q among n rows. */
    float *Bq = xmalloc((size_t)N * ld * sizeof(float));
    float *Cq = xmalloc((size_t)N * sizeof(float));
    for (int n = 1; n <= N; n += 1 + n / 4)
        for (int q = 0; q < n; q += 1 + q / 3) {
            int j = (n * 7 + q) % N;
            fill(Bq, (size_t)n * ld);
            memcpy(Bq + (size_t)q * ld, B + (size_t)j * ld, (size_t)K * sizeof(float));
            gemm_nt(1, n, K, row, K, Bq, ld, 0.0f, Cq, n);
            assert_true(same_bits(Cq[q], want[j]));
        }
    free(Bq);
    free(Cq);
    free(row);
    free(B);
    free(A);
    free(C);
    free(want);
}

static void test_batch_invariance(void **state)
{
    (void)state;
    check_invariance(24, 8, 80, 1);
    check_invariance(37, 67, 80, 1);
    check_invariance(70, 131, 80, 1);
}

/* The engine's recurrent-step shape, threaded for larger M. */
static void test_batch_invariance_large(void **state)
{
    (void)state;
    check_invariance(2048, 512, 80, 13);
}

/* The same product with one thread, with the pool, and on every narrower
 * set of kernels. */
static void test_threads_and_paths_agree(void **state)
{
    (void)state;
    int shapes[][3] = {{96, 300, 129}, {64, 2048, 256}, {1, 2048, 512}, {200, 64, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        size_t nc = (size_t)M * N;
        float *A = xmalloc((size_t)M * K * sizeof(float)), *B = xmalloc((size_t)N * K * sizeof(float));
        float *C0 = xmalloc(nc * sizeof(float)), *C1 = xmalloc(nc * sizeof(float));
        fill(A, (size_t)M * K);
        fill(B, (size_t)N * K);
        fill(C0, nc);
        memcpy(C1, C0, nc * sizeof(float));
        float *init = xmalloc(nc * sizeof(float));
        memcpy(init, C0, nc * sizeof(float));

        pool_set_threads(1);
        gemm_nt(M, N, K, A, K, B, K, 1.0f, C0, N);
        pool_set_threads(0);
        gemm_nt(M, N, K, A, K, B, K, 1.0f, C1, N);
        assert_memory_equal(C0, C1, nc * sizeof(float));

        for (enum gemm_isa isa = GEMM_SCALAR; isa < GEMM_AVX512; isa++) {
            memcpy(C1, init, nc * sizeof(float));
            gemm_nt_limit_isa(isa);
            gemm_nt(M, N, K, A, K, B, K, 1.0f, C1, N);
            gemm_nt_limit_isa(GEMM_AVX512);
            assert_memory_equal(C0, C1, nc * sizeof(float));
        }
        free(A);
        free(B);
        free(C0);
        free(C1);
        free(init);
    }
}

/* Several threads calling gemm_nt at once (one pool, so most run alone on
 * the calling thread) must each get the bits of a lone call. */
struct caller {
    const float *A, *B, *want;
    float *C;
    int M, N, K, reps, bad;
};

static void *caller_main(void *arg)
{
    struct caller *c = arg;
    for (int r = 0; r < c->reps; r++) {
        gemm_nt(c->M, c->N, c->K, c->A, c->K, c->B, c->K, 0.0f, c->C, c->N);
        if (memcmp(c->C, c->want, (size_t)c->M * c->N * sizeof(float)) != 0)
            c->bad = 1;
    }
    return NULL;
}

static void test_concurrent_callers(void **state)
{
    (void)state;
    enum { NCALLERS = 4 };
    int M = 48, N = 512, K = 200;
    float *A = xmalloc((size_t)M * K * sizeof(float)), *B = xmalloc((size_t)N * K * sizeof(float));
    float *want = xmalloc((size_t)M * N * sizeof(float));
    fill(A, (size_t)M * K);
    fill(B, (size_t)N * K);
    pool_set_threads(1);
    gemm_nt(M, N, K, A, K, B, K, 0.0f, want, N);
    pool_set_threads(0);

    struct caller callers[NCALLERS];
    pthread_t tid[NCALLERS];
    for (int t = 0; t < NCALLERS; t++) {
        callers[t] = (struct caller){.A = A, .B = B, .want = want, .M = M, .N = N, .K = K, .reps = 30};
        callers[t].C = xmalloc((size_t)M * N * sizeof(float));
        assert_int_equal(pthread_create(&tid[t], NULL, caller_main, &callers[t]), 0);
    }
    for (int t = 0; t < NCALLERS; t++) {
        assert_int_equal(pthread_join(tid[t], NULL), 0);
        assert_int_equal(callers[t].bad, 0);
        free(callers[t].C);
    }
    free(A);
    free(B);
    free(want);
}

/* The CPU backend's other products (its gemm op, where it is not x W^T
 * with alpha 1: training's gradients), OpenBLAS split over the pool in
 * bands of C's rows or columns: every form of op(A) op(B), against a double
 * reference, nothing written outside C, and the same bits on one thread as
 * on the pool, with OpenBLAS's kernels for this CPU and for AVX2
 * (OPENBLAS_CORETYPE=Haswell, as make test also runs it). */
static void test_backend_products_and_their_bits(void **state)
{
    (void)state;
    char err[256];
    struct backend *be = backend_cpu_create(err, sizeof err);
    assert_non_null(be);
    /* Bands of rows, of columns, products whose halves OpenBLAS's AVX-512
     * kernels give other bits than the whole (300 x 40 x 100), and one too
     * small to split. */
    const int shapes[][3] = {{600, 40, 200}, {40, 600, 200}, {300, 40, 100}, {40, 300, 100}, {9, 7, 5}};
    const float alpha = 0.5f, betas[] = {0.0f, 1.0f, 0.25f};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int form = 0; form < 4; form++)
            for (size_t b = 0; b < sizeof betas / sizeof betas[0]; b++) {
                const int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2], ta = form & 1, tb = form >> 1;
                const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 3, ldc = N + 3;
                const float beta = betas[b];
                struct mat A = mat_new(ta ? K : M, ta ? M : K, lda, 0), B = mat_new(tb ? N : K, tb ? K : N, ldb, 0);
                struct mat C = mat_new(M, N, ldc, 0);
                const size_t cn = (size_t)M * ldc;
                float *init = xmalloc(cn * sizeof(float)), *one = xmalloc(cn * sizeof(float));
                memcpy(init, C.p, cn * sizeof(float));
                memcpy(one, C.p, cn * sizeof(float));
                pool_set_threads(1);
                be->ops->gemm(be, ta, tb, M, N, K, alpha, A.p, lda, B.p, ldb, beta, one, ldc);
                pool_set_threads(0);
                be->ops->gemm(be, ta, tb, M, N, K, alpha, A.p, lda, B.p, ldb, beta, C.p, ldc);
                if (memcmp(C.p, one, cn * sizeof(float)) != 0)
                    fail_msg("M=%d N=%d K=%d form %d beta %g: other bits when split", M, N, K, form, (double)beta);
                for (int i = 0; i < M; i++)
                    for (int j = 0; j < ldc; j++) {
                        const size_t at = (size_t)i * ldc + j;
                        if (j >= N) {
                            if (!same_bits(C.p[at], init[at]))
                                fail_msg("M=%d N=%d K=%d form %d wrote past row %d", M, N, K, form, i);
                            continue;
                        }
                        double want = (double)beta * init[at], mag = fabs(want);
                        for (int k = 0; k < K; k++) {
                            const double x = ta ? A.p[(size_t)k * lda + i] : A.p[(size_t)i * lda + k];
                            const double y = tb ? B.p[(size_t)j * ldb + k] : B.p[(size_t)k * ldb + j];
                            want += alpha * x * y;
                            mag += fabs(alpha * x * y);
                        }
                        if (fabs(C.p[at] - want) > 1e-5 * mag)
                            fail_msg("M=%d N=%d K=%d form %d beta %g: C[%d][%d] = %g, want %g", M, N, K, form,
                                     (double)beta, i, j, (double)C.p[at], want);
                    }
                free(A.buf);
                free(B.buf);
                free(C.buf);
                free(init);
                free(one);
            }
    backend_destroy(be);
}

int main(void)
{
    /* More threads than this machine may have cores, so the pool splits
     * every product that is large enough, several ways. */
    setenv("RRN_THREADS", "4", 1);
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalar_twin_matches_reference),
        cmocka_unit_test(test_avx2_matches_reference),
        cmocka_unit_test(test_avx512_matches_reference),
        cmocka_unit_test(test_threaded_shapes),
        cmocka_unit_test(test_empty_and_k0),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_batch_invariance_large),
        cmocka_unit_test(test_threads_and_paths_agree),
        cmocka_unit_test(test_concurrent_callers),
        cmocka_unit_test(test_backend_products_and_their_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
