/* bench_engine.c - the engine's side of `make bench` and `make bench-gpu`.
 *
 *   bench_engine DIR [cpu|cuda [MODE]]
 *
 * Loads the weight files and token inputs bench_torch.py wrote to DIR and
 * times the engine on the same work, on the given backend, printing one
 * JSON object:
 *   (a) classify throughput, LSTM L=2 H=512 E=256, batch 64, T=128, and
 *       over varied lengths (classify_var, bench_torch.py says how);
 *   (b) generation step latency at batch 1 and 32 (step API);
 *   (c) RRA language model forward, batch 64 and batch 1, T=128;
 *   (d) training steps of (b)'s language model (tokens per second), and
 *       the first step's loss against PyTorch's;
 * on the CPU the machine's own sgemm rate on a large square product, so
 * the engine's GFLOP/s can be read as a fraction of what the BLAS can do
 * (the GFLOP/s count the products the engine performs: with token tables,
 * layer 0's input projection is a lookup and is not counted); on the GPU
 * also the GRU classifier, steps at batch 8 and 64, and the skip model,
 * and (a) and (b) again in TF32, under keys ending in _tf32, for cuDNN's
 * TF32 figures (bench_torch.py says why), and every FP32 workload again
 * with the recurrence fused (backend_ops.recurrent_step), under keys
 * ending in _fused.  MODE (fp32, tf32 or fused) runs that mode alone,
 * without training's figures (run_bench_gpu.sh times another build's
 * fused kernels so).  Each forward workload also
 * reports its outputs' largest difference from PyTorch's (*_max_error),
 * and the benchmark fails where they differ by more than rounding.
 */
#include <cjson/cJSON.h>
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine.h"
#include "optim.h"

#define BATCH 64
#define STEPS 128
/* Batches of classify_var, each with lengths of its own. */
#define VAR_BATCHES 64
/* Windows of a training step. */
#define TRAIN_BATCH 32

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The figures so far, printed by die too: a mode that fails on a GPU (a
 * kernel that faults leaves the device unusable) then costs its own
 * figures and those after it, not those measured before.  The modes most
 * likely to fail run last. */
static cJSON *results;

static void print_results(void)
{
    char *text = results ? cJSON_PrintUnformatted(results) : NULL;
    if (text)
        printf("%s\n", text);
    free(text);
}

static void die(const char *what, const char *err)
{
    fprintf(stderr, "bench_engine: %s: %s\n", what, err);
    if (results) {
        cJSON_AddStringToObject(results, "error", err);
        print_results();
    }
    exit(1);
}

/* The bytes of DIR/name, which must hold exactly that many. */
static void *read_file(const char *dir, const char *name, size_t bytes)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    char *p = malloc(bytes + 1);
    if (!f || !p || fread(p, 1, bytes + 1, f) != bytes)
        die(path, "cannot read it, or it is not the size bench_torch.py writes");
    fclose(f);
    return p;
}

/* rows x BATCH int32s from DIR/name: tokens (rows STEPS) or lengths. */
static int32_t *read_ints(const char *dir, const char *name, int rows)
{
    return read_file(dir, name, sizeof(int32_t) * (size_t)rows * BATCH);
}

struct loaded {
    struct model model;
    struct backend *be;
    struct engine *engine;
};

/* How the engine computes: its precision and its recurrence, named in
 * the keys of its figures by suffix. */
struct mode {
    const char *name;
    enum precision prec;
    enum recurrence rec;
    const char *suffix;
};

static void load(struct loaded *l, const char *dir, const char *name, int slots, enum device_kind dev,
                 const struct mode *mode)
{
    char path[512], err[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (model_load(path, &l->model, err, sizeof err) != 0)
        die(path, err);
    if (!(l->be = backend_create(dev, err, sizeof err)) ||
        backend_set_precision(l->be, mode->prec, err, sizeof err) != 0 ||
        backend_set_recurrence(l->be, mode->rec, err, sizeof err) != 0 ||
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
 * min_s seconds: of all STEPS tokens, or with lengths (NULL or
 * [batches][BATCH]) of each batch in turn. */
static double forward_rate(struct engine *e, const int32_t *tokens, int n, const int32_t *lengths, int batches,
                           double min_s)
{
    char err[512];
    struct engine_seq seqs[BATCH];
    float probs[BATCH][2];
    int iters = -1; /* the first is a warm-up */
    double t0 = 0, t = 0;
    do {
        const int32_t *len = lengths ? lengths + (size_t)((iters + 1) % batches) * BATCH : NULL;
        for (int i = 0; i < n; i++)
            seqs[i] = (struct engine_seq){
                .tokens = tokens + i * STEPS, .len = len ? len[i] : STEPS, .slot = -1, .probs = probs[i]};
        if (engine_forward(e, seqs, n, err, sizeof err) != 0)
            die("forward", err);
        if (++iters == 0)
            t0 = now();
    } while (iters < batches || (t = now() - t0) < min_s);
    return iters * n / t;
}

/* Past this, an output in FP32 is wrong, not rounded: the timings
 * beside it would be of work that does not compute the model. */
#define FP32_MAX_ERROR 1e-3

/* The largest difference between the engine's outputs for the whole batch
 * (probabilities of a classifier, logits of an lm at every step) and
 * PyTorch's for the same work, saved in DIR/name; dies past max_error. */
static double output_error(struct engine *e, const char *dir, const char *name, const int32_t *tokens,
                           double max_error)
{
    char err[512];
    const struct model *m = engine_model(e);
    const int lm = m->cfg.task == TASK_LM;
    const size_t per = (size_t)m->head_out * (lm ? STEPS : 1), n = per * BATCH;
    float *want = read_file(dir, name, n * sizeof(float)), *got = malloc(n * sizeof(float));
    if (!got)
        die(name, "out of memory");
    struct engine_seq seqs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        seqs[i] = (struct engine_seq){.tokens = tokens + i * STEPS, .len = STEPS, .slot = -1};
        *(lm ? &seqs[i].logits : &seqs[i].probs) = got + i * per;
    }
    if (engine_forward(e, seqs, BATCH, err, sizeof err) != 0)
        die("forward", err);
    double worst = 0;
    for (size_t k = 0; k < n && !isnan(worst); k++) {
        double d = fabs((double)got[k] - want[k]);
        if (isnan(d) || d > worst)
            worst = d;
    }
    free(want);
    free(got);
    if (!(worst <= max_error)) {
        snprintf(err, sizeof err, "the engine's outputs differ from PyTorch's by %g (at most %g expected)", worst,
                 max_error);
        die(name, err);
    }
    return worst;
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

/* Tokens per second of training steps, as bench_torch.py's: the first
 * TRAIN_BATCH rows of tokens, each predicting its STEPS - 1 next tokens
 * from the zero state; gradients clipped to norm 1, then Adam (lr 1e-3).
 * *loss_error gets the first step's mean loss's difference from PyTorch's,
 * at the same weights (dies past FP32_MAX_ERROR). */
static double train_rate(struct loaded *m, const char *dir, const int32_t *tokens, double min_s, double *loss_error)
{
    char err[512];
    struct engine_seq seqs[TRAIN_BATCH];
    for (int i = 0; i < TRAIN_BATCH; i++)
        seqs[i] = (struct engine_seq){.tokens = tokens + i * STEPS, .len = STEPS - 1, .slot = -1,
                                      .next = tokens + i * STEPS + STEPS - 1};
    struct optim_config c;
    optim_defaults(&c, OPTIM_ADAM);
    c.clip_norm = 1.0f;
    const struct train_options no_dropout = {0.0f, 0.0f, 1};
    float *want = read_file(dir, "lm_train_loss.f32", sizeof(float));
    int steps = -1; /* the first is a warm-up, and its loss is checked */
    double t0 = 0, t = 0;
    do {
        struct train_result res = {0};
        struct optim_update u;
        optim_update_at(&c, steps + 1, &u);
        if (engine_zero_grads(m->engine) != 0 ||
            engine_train_batch(m->engine, seqs, TRAIN_BATCH, NULL, &no_dropout, &res, err, sizeof err) != 0)
            die("train", err[0] ? err : "out of memory");
        double grad_norm;
        if (engine_optim_step(m->engine, &u, &grad_norm) != 0)
            die("optimizer step", m->be->err[0] ? m->be->err : "out of memory");
        if (!isfinite(grad_norm))
            die("optimizer step", "the gradients are not finite");
        if (steps++ == -1) {
            *loss_error = fabs(res.loss / (double)res.count - *want);
            if (!(*loss_error <= FP32_MAX_ERROR)) {
                snprintf(err, sizeof err, "the first step's loss is %.7g, PyTorch's %.7g",
                         res.loss / (double)res.count, *want);
                die("train", err);
            }
            t0 = now();
        }
    } while (steps < 1 || (t = now() - t0) < min_s);
    free(want);
    return (double)steps * TRAIN_BATCH * (STEPS - 1) / t;
}

/* GFLOP/s of a 2048^3 sgemm on every core, best of a few.  The CPU
 * backend keeps OpenBLAS to one thread (it splits the products over its
 * own pool), so this gives it them all for the measurement. */
static double sgemm_rate(void)
{
    const int N = 2048;
    openblas_set_num_threads(openblas_get_num_procs());
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

static void add(cJSON *o, const char *key, double v)
{
    if (!cJSON_AddNumberToObject(o, key, v))
        die("json", "out of memory");
}

/* The token inputs bench_torch.py wrote: classify's and the language
 * models' tokens, and classify_var's lengths. */
struct inputs {
    const char *dir;
    enum device_kind dev;
    int gpu;
    int32_t *ctok, *rtok, *clen;
};

/* Every workload in one mode, its keys ending in mode->suffix: the
 * classifiers and the steps, and in FP32 the language models. */
static void bench_mode(cJSON *out, const struct inputs *in, const struct mode *mode, int first)
{
    const char *dir = in->dir, *suffix = mode->suffix;
    const enum device_kind dev = in->dev;
    const int gpu = in->gpu;
    struct loaded m;
    char key[64];
    /* Rounded to TF32, probabilities near a half move by some 1e-2. */
    const double max_error = mode->prec == PRECISION_FP32 ? FP32_MAX_ERROR : 5e-2;
    load(&m, dir, "lstm_classify.safetensors", 0, dev, mode);
    snprintf(key, sizeof key, "classify_max_error%s", suffix);
    add(out, key, output_error(m.engine, dir, "lstm_classify_probs.f32", in->ctok, max_error));
    double rate = forward_rate(m.engine, in->ctok, BATCH, NULL, 1, 5.0);
    snprintf(key, sizeof key, "classify_seq_per_s%s", suffix);
    add(out, key, rate);
    snprintf(key, sizeof key, "classify_var_seq_per_s%s", suffix);
    add(out, key, forward_rate(m.engine, in->ctok, BATCH, in->clen, VAR_BATCHES, 5.0));
    /* How many shapes the 64 sets of lengths came to: one or two where
     * the backend pads (backend_ops.pad_steps), none recorded where
     * not. */
    snprintf(key, sizeof key, "classify_var_graphs%s", suffix);
    add(out, key, (double)engine_graph_count(m.engine));
    if (first) {
        const struct model_config *c = &m.model.cfg;
        const int tables = engine_token_table_bytes(m.engine) > 0;
        double flop = 0;
        for (int l = 0; l < c->layers; l++) {
            int in_dim = l == 0 && tables ? 0 : config_layer_input(c, l);
            flop += 2.0 * BATCH * STEPS * 4 * c->hidden * (double)(in_dim + c->hidden);
        }
        add(out, "classify_gflops", rate / BATCH * flop / 1e9);
        cJSON_AddBoolToObject(out, "token_tables", tables);
    }
    unload(&m);
    if (gpu) {
        load(&m, dir, "gru_classify.safetensors", 0, dev, mode);
        snprintf(key, sizeof key, "gru_classify_max_error%s", suffix);
        add(out, key, output_error(m.engine, dir, "gru_classify_probs.f32", in->ctok, max_error));
        snprintf(key, sizeof key, "gru_classify_seq_per_s%s", suffix);
        add(out, key, forward_rate(m.engine, in->ctok, BATCH, NULL, 1, 5.0));
        unload(&m);
    }

    load(&m, dir, "lstm_lm.safetensors", BATCH, dev, mode);
    static const int cpu_batches[] = {1, 32, 0}, gpu_batches[] = {1, 8, 32, 64, 0};
    for (const int *b = gpu ? gpu_batches : cpu_batches; *b; b++) {
        snprintf(key, sizeof key, "step_ms_b%d%s", *b, suffix);
        add(out, key, step_ms(m.engine, *b, 2.0));
    }
    unload(&m);
    if (first) {
        double loss_error = NAN;
        load(&m, dir, "lstm_lm.safetensors", 0, dev, mode);
        add(out, "train_tok_per_s", train_rate(&m, dir, in->rtok, 5.0, &loss_error));
        add(out, "train_loss_error", loss_error);
        unload(&m);
    }

    if (mode->prec != PRECISION_FP32)
        return;
    static const char *const lms[][2] = {{"rra", "rra_lm.safetensors"}, {"skip", "skip_lm.safetensors"}};
    for (int k = 0; k < (gpu ? 2 : 1); k++) {
        char name[32];
        load(&m, dir, lms[k][1], 0, dev, mode);
        snprintf(key, sizeof key, "%s_max_error%s", lms[k][0], suffix);
        snprintf(name, sizeof name, "%s_logits.f32", lms[k][0]);
        add(out, key, output_error(m.engine, dir, name, in->rtok, FP32_MAX_ERROR));
        snprintf(key, sizeof key, "%s_seq_per_s%s", lms[k][0], suffix);
        add(out, key, forward_rate(m.engine, in->rtok, BATCH, NULL, 1, 5.0));
        snprintf(key, sizeof key, "%s1_seq_per_s%s", lms[k][0], suffix);
        add(out, key, forward_rate(m.engine, in->rtok, 1, NULL, 1, 2.0));
        unload(&m);
    }
}

/* On the GPU, FP32 with the recurrence by cuBLAS's products, TF32, then
 * FP32 with the recurrence fused (keys ending in _fused), last since it
 * is the newest; on the CPU the first alone. */
static const struct mode modes[] = {{"fp32", PRECISION_FP32, RECURRENCE_GEMM, ""},
                                    {"tf32", PRECISION_TF32, RECURRENCE_GEMM, "_tf32"},
                                    {"fused", PRECISION_FP32, RECURRENCE_FUSED, "_fused"}};
#define MODES (int)(sizeof modes / sizeof modes[0])

/* The index of the mode named name, or -1. */
static int mode_named(const char *name)
{
    for (int p = 0; p < MODES; p++)
        if (strcmp(modes[p].name, name) == 0)
            return p;
    return -1;
}

int main(int argc, char **argv)
{
    int gpu = argc >= 3 && strcmp(argv[2], "cuda") == 0;
    int only = argc == 4 && gpu ? mode_named(argv[3]) : -1;
    if (argc < 2 || argc > 4 || (argc >= 3 && !gpu && strcmp(argv[2], "cpu") != 0) || (argc == 4 && only < 0)) {
        fprintf(stderr, "usage: bench_engine DIR [cpu|cuda [fp32|tf32|fused]] (DIR made by bench_torch.py)\n");
        return 2;
    }
    const char *dir = argv[1];
    struct inputs in = {dir, gpu ? DEVICE_CUDA : DEVICE_CPU, gpu, read_ints(dir, "classify_tokens.i32", STEPS),
                        read_ints(dir, "rra_tokens.i32", STEPS), read_ints(dir, "classify_lengths.i32", VAR_BATCHES)};
    if (!(results = cJSON_CreateObject()))
        die("json", "out of memory");

    if (only >= 0)
        bench_mode(results, &in, &modes[only], 0);
    else
        for (int p = 0; p < (gpu ? MODES : 1); p++)
            bench_mode(results, &in, &modes[p], p == 0);
    if (!gpu)
        add(results, "sgemm_gflops", sgemm_rate());

    print_results();
    cJSON_Delete(results);
    free(in.ctok);
    free(in.rtok);
    free(in.clen);
    return 0;
}
