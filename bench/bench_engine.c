/* bench_engine.c - the engine's side of `make bench`.
 *
 * Loads the weight files and token inputs bench_torch.py wrote to DIR and
 * times the engine on the same work, printing one JSON object:
 *   (a) classify throughput, LSTM L=2 H=512 E=256, batch 64, T=128;
 *   (b) generation step latency at batch 1 and 32 (step API);
 *   (c) RRA language model forward, batch 64 and batch 1, T=128;
 * plus the machine's own sgemm rate on a large square product, so the
 * engine's GFLOP/s can be read as a fraction of what the BLAS can do.  The
 * GFLOP/s count the products the engine performs: with token tables, layer
 * 0's input projection is a lookup and is not counted.
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"

#define BATCH 64
#define STEPS 128

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, const char *err)
{
    fprintf(stderr, "bench_engine: %s: %s\n", what, err);
    exit(1);
}

static int32_t *read_tokens(const char *dir, const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    int32_t *t = malloc(sizeof(int32_t) * BATCH * STEPS);
    if (!f || !t || fread(t, sizeof(int32_t), BATCH * STEPS, f) != BATCH * STEPS)
        die(path, "cannot read 64x128 int32 tokens");
    fclose(f);
    return t;
}

struct loaded {
    struct model model;
    struct backend *be;
    struct engine *engine;
};

static void load(struct loaded *l, const char *dir, const char *name, int slots)
{
    char path[512], err[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (model_load(path, &l->model, err, sizeof err) != 0)
        die(path, err);
    if (!(l->be = backend_create(DEVICE_CPU, err, sizeof err)) ||
        !(l->engine = engine_create(&l->model, l->be, slots, err, sizeof err)))
        die(path, err);
}

static void unload(struct loaded *l)
{
    engine_destroy(l->engine);
    backend_destroy(l->be);
    model_free(&l->model);
}

/* Sequences per second of full forwards over the first n sequences, for
 * min_s seconds. */
static double forward_rate(struct engine *e, const int32_t *tokens, int n, double min_s)
{
    char err[512];
    struct engine_seq seqs[BATCH];
    float probs[BATCH][2];
    for (int i = 0; i < n; i++)
        seqs[i] = (struct engine_seq){.tokens = tokens + i * STEPS, .len = STEPS, .slot = -1, .probs = probs[i]};
    if (engine_forward(e, seqs, n, err, sizeof err) != 0) /* warm-up */
        die("forward", err);
    int iters = 0;
    double t0 = now(), t;
    do {
        if (engine_forward(e, seqs, n, err, sizeof err) != 0)
            die("forward", err);
        iters++;
    } while ((t = now() - t0) < min_s);
    return iters * n / t;
}

/* Mean milliseconds per generation step at batch n. */
static double step_ms(struct engine *e, int n, double min_s)
{
    char err[512];
    int slots[BATCH];
    int32_t toks[BATCH];
    float *logits = malloc(sizeof(float) * (size_t)n * engine_model(e)->head_out);
    for (int i = 0; i < n; i++) {
        slots[i] = engine_slot_open(e);
        toks[i] = (int32_t)(i * 7 % 256);
    }
    int steps = 0;
    double t0 = 0, t = 0;
    do {
        if (engine_step(e, slots, toks, n, logits, NULL, err, sizeof err) != 0)
            die("step", err);
        if (++steps == 10)
            t0 = now(); /* the first steps warm the caches and scratch */
    } while (steps <= 10 || (t = now() - t0) < min_s);
    for (int i = 0; i < n; i++)
        engine_slot_close(e, slots[i]);
    free(logits);
    return 1e3 * t / (steps - 10);
}

/* GFLOP/s of a 2048^3 sgemm, best of a few. */
static double sgemm_rate(void)
{
    const int N = 2048;
    float *a = calloc((size_t)N * N, sizeof(float)), *b = calloc((size_t)N * N, sizeof(float)),
          *c = calloc((size_t)N * N, sizeof(float));
    if (!a || !b || !c)
        die("sgemm", "out of memory");
    for (size_t i = 0; i < (size_t)N * N; i++)
        a[i] = b[i] = (float)(i % 7) * 0.1f;
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, N, 1.0f, a, N, b, N, 0.0f, c, N);
        double rate = 2.0 * N * N * (double)N / (now() - t0) / 1e9;
        if (rate > best)
            best = rate;
    }
    free(a);
    free(b);
    free(c);
    return best;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: bench_engine DIR (made by bench_torch.py)\n");
        return 2;
    }
    const char *dir = argv[1];
    struct loaded cls, lm, rra;
    load(&cls, dir, "lstm_classify.safetensors", 0);
    load(&lm, dir, "lstm_lm.safetensors", BATCH);
    load(&rra, dir, "rra_lm.safetensors", 0);
    int32_t *ctok = read_tokens(dir, "classify_tokens.i32"), *rtok = read_tokens(dir, "rra_tokens.i32");

    const struct model_config *c = &cls.model.cfg;
    const int tables = engine_token_table_bytes(cls.engine) > 0;
    double flop = 0;
    for (int l = 0; l < c->layers; l++) {
        int in = l == 0 && tables ? 0 : config_layer_input(c, l);
        flop += 2.0 * BATCH * STEPS * 4 * c->hidden * (double)(in + c->hidden);
    }
    double cls_rate = forward_rate(cls.engine, ctok, BATCH, 5.0);
    double s1 = step_ms(lm.engine, 1, 2.0), s32 = step_ms(lm.engine, 32, 2.0);
    double rra_rate = forward_rate(rra.engine, rtok, BATCH, 5.0);
    double rra1_rate = forward_rate(rra.engine, rtok, 1, 2.0);
    double peak = sgemm_rate();
    printf("{\"classify_seq_per_s\": %.2f, \"classify_gflops\": %.1f, \"step_ms_b1\": %.4f, "
           "\"step_ms_b32\": %.4f, \"rra_seq_per_s\": %.2f, \"rra1_seq_per_s\": %.2f, \"sgemm_gflops\": %.1f, "
           "\"token_tables\": %s}\n",
           cls_rate, cls_rate / BATCH * flop / 1e9, s1, s32, rra_rate, rra1_rate, peak, tables ? "true" : "false");
    free(ctok);
    free(rtok);
    unload(&cls);
    unload(&lm);
    unload(&rra);
    return 0;
}
