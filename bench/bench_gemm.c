/* bench_gemm.c - GFLOP/s of gemm_nt against OpenBLAS cblas_sgemm on the
 * shapes the CPU engine multiplies.
 *
 * gemm_nt exists because cblas_sgemm's results depend on the batch (see
 * engine/gemm.c); this measures what that batch invariance costs.  Each
 * shape runs with every thread of each library's pool and then with one.
 *
 *   cc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iengine bench/bench_gemm.c \
 *      engine/gemm.c -o /tmp/bench_gemm -lopenblas -lpthread -lm
 *   /tmp/bench_gemm [seconds per measurement, default 0.5]
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "gemm.h"
#include "pool.h"

/* OpenBLAS's own thread controls; not in every cblas.h. */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);

struct shape {
    int M, N, K;
    const char *what;
};

static const struct shape shapes[] = {
    {64, 2048, 512, "recurrent step, H=512, batch 64"},
    {64, 2048, 256, "recurrent step, H=256, batch 64"},
    {8192, 2048, 256, "input projection, 64x128 tokens, K=256"},
    {8192, 2048, 512, "input projection, 64x128 tokens, K=512"},
    {1, 2048, 512, "generation step, batch 1"},
    {32, 2048, 512, "recurrent step, batch 32"},
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void run_gemm_nt(const struct shape *s, const float *A, const float *B, float *C)
{
    gemm_nt(s->M, s->N, s->K, A, s->K, B, s->K, 0.0f, C, s->N);
}

/* B packed once (gemm_pack), as the engine packs a model's weights. */
static float *packed;

static void run_gemm_nt_packed(const struct shape *s, const float *A, const float *B, float *C)
{
    (void)B;
    gemm_nt_packed(s->M, s->N, s->K, A, s->K, packed, 0.0f, C, s->N);
}

static void run_sgemm(const struct shape *s, const float *A, const float *B, float *C)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s->M, s->N, s->K, 1.0f, A, s->K, B, s->K, 0.0f, C,
                s->N);
}

/* Best of several timed batches, each about a tenth of `seconds`. */
static double gflops(void (*fn)(const struct shape *, const float *, const float *, float *),
                     const struct shape *s, const float *A, const float *B, float *C, double seconds)
{
    double flops = 2.0 * s->M * s->N * s->K;
    int reps = 1;
    for (;;) {
        double t0 = now_s();
        for (int r = 0; r < reps; r++)
            fn(s, A, B, C);
        double dt = now_s() - t0;
        if (dt > seconds / 10 || reps > (1 << 24))
            break;
        reps *= 2;
    }
    double best = 0.0, t_end = now_s() + seconds;
    while (now_s() < t_end) {
        double t0 = now_s();
        for (int r = 0; r < reps; r++)
            fn(s, A, B, C);
        double rate = flops * reps / (now_s() - t0) / 1e9;
        if (rate > best)
            best = rate;
    }
    return best;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 0.5;
    if (seconds <= 0)
        seconds = 0.5;
    size_t maxa = 0, maxb = 0, maxc = 0;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const struct shape *s = &shapes[i];
        if ((size_t)s->M * s->K > maxa)
            maxa = (size_t)s->M * s->K;
        if ((size_t)s->N * s->K > maxb)
            maxb = (size_t)s->N * s->K;
        if ((size_t)s->M * s->N > maxc)
            maxc = (size_t)s->M * s->N;
    }
    float *A = malloc(maxa * sizeof *A), *B = malloc(maxb * sizeof *B), *C = malloc(maxc * sizeof *C);
    packed = malloc(2 * maxb * sizeof *packed); /* room for any padding */
    if (!A || !B || !C || !packed) {
        fprintf(stderr, "bench_gemm: out of memory\n");
        free(A);
        free(B);
        free(C);
        free(packed);
        return 1;
    }
    srand(1);
    for (size_t i = 0; i < maxa; i++)
        A[i] = (float)((double)rand() / RAND_MAX - 0.5);
    for (size_t i = 0; i < maxb; i++)
        B[i] = (float)((double)rand() / RAND_MAX - 0.5);

    int pool = pool_set_threads(0);
    int blas_threads = openblas_get_num_threads();
    printf("GFLOP/s, best of %.2f s per cell; gemm_nt pool %d threads, OpenBLAS %d threads\n", seconds, pool,
           blas_threads);
    printf("(gemm_nt with B as given, and packed as the engine packs weights; the ratio is packed's)\n");
    printf("%5s %5s %4s | %7s %7s %8s %6s | %7s %7s %8s %6s | %s\n", "M", "N", "K", "gemm_nt", "packed",
           "OpenBLAS", "ratio", "1 thr", "packed", "OpenBLAS", "ratio", "shape");
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const struct shape *s = &shapes[i];
        gemm_pack(s->N, s->K, B, s->K, packed);
        double r[2][3];
        for (int one = 0; one < 2; one++) {
            pool_set_threads(one ? 1 : 0);
            openblas_set_num_threads(one ? 1 : blas_threads);
            r[one][0] = gflops(run_gemm_nt, s, A, B, C, seconds);
            r[one][1] = gflops(run_gemm_nt_packed, s, A, B, C, seconds);
            r[one][2] = gflops(run_sgemm, s, A, B, C, seconds);
        }
        printf("%5d %5d %4d | %7.1f %7.1f %8.1f %5.0f%% | %7.1f %7.1f %8.1f %5.0f%% | %s\n", s->M, s->N, s->K,
               r[0][0], r[0][1], r[0][2], 100 * r[0][1] / r[0][2], r[1][0], r[1][1], r[1][2],
               100 * r[1][1] / r[1][2], s->what);
        fflush(stdout);
    }
    free(A);
    free(B);
    free(C);
    free(packed);
    return 0;
}
