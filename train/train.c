/* train.c - `rrnserve train`: one training run, read top to bottom.
 *
 *   1. the configuration: a JSON file, every key also settable as a flag
 *      (--optim.lr 0.001 sets {"optim": {"lr": 0.001}}), read and checked
 *      by options.c;
 *   2. the data, and the tokenizer's vocabulary built from it when the
 *      config leaves it out;
 *   3. the model: initialised (init.c), or taken from a checkpoint;
 *   4. the loop: a batch, forward and backward (engine_train_batch),
 *      clipping, one optimizer step; validation every valid_every steps,
 *      a checkpoint (checkpoint.c) every checkpoint_every, and one when
 *      SIGINT or SIGTERM asks the run to stop;
 *   5. the weight file, with how it was made in its metadata, and the
 *      learning curve as CSV and SVG beside it.
 *
 * Language models learn by truncated backpropagation through time: the
 * batch is B streams over the corpus, each window of bptt tokens carrying
 * its state from the previous window through the engine's slots.
 * Classifiers learn from length-bucketed batches of labelled texts.  Given
 * the same configuration, data and seed, a CPU run gives the same weights
 * bit for bit: every draw comes from seeded generators and every kernel is
 * deterministic.
 */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../cli/commands.h"
#include "checkpoint.h"
#include "config.h"
#include "error.h"
#include "run.h"
#include "safetensors.h"

/* ---- 2. Data and vocabulary. */

/* The training text a vocabulary is built from: the corpus of a language
 * model; the texts of a classifier's training part, read with a byte
 * tokenizer so the same loader and split rule apply (validation and test
 * lines never shape the vocabulary). */
static int vocab_text(const struct options *o, const cJSON *model, char **text, size_t *len, char *err,
                      size_t errlen)
{
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(model, "task");
    if (!cJSON_IsString(task) || strcmp(task->valuestring, "classify") != 0)
        return corpus_read((const char *const *)o->train, o->n_train, text, len, err, errlen);
    const cJSON *classes = cJSON_GetObjectItemCaseSensitive(model, "classes");
    int n_classes = cJSON_GetArraySize(classes);
    char **names = calloc((size_t)n_classes + 1, sizeof *names);
    struct model_config bytes = {.tok_type = TOKENIZER_BYTE};
    struct tokenizer tk = {0};
    int rc = names && tokenizer_init(&tk, &bytes, err, errlen) == 0 ? 0 : error_fmt(err, errlen, "out of memory");
    for (int i = 0; rc == 0 && i < n_classes; i++) {
        const cJSON *c = cJSON_GetArrayItem(classes, i);
        if (!cJSON_IsString(c))
            rc = error_fmt(err, errlen, "config: \"model.classes\" must be strings");
        else
            names[i] = c->valuestring;
    }
    const struct split all = {0, 0, 0};
    size_t cap = 1, n = 0;
    char *buf = rc == 0 ? malloc(cap) : NULL;
    for (int f = 0; rc == 0 && buf && f < o->n_train; f++) {
        struct dataset d;
        if (classify_load(o->train[f], &tk, names, n_classes, o->split.mod ? &o->split : &all, PART_TRAIN, &d, err,
                          errlen)) {
            rc = -1;
            break;
        }
        for (int i = 0; rc == 0 && i < d.n; i++) {
            if (n + (size_t)d.ex[i].len + 2 > cap) {
                while (n + (size_t)d.ex[i].len + 2 > cap)
                    cap *= 2;
                char *grown = realloc(buf, cap);
                if (!grown)
                    rc = error_fmt(err, errlen, "out of memory");
                else
                    buf = grown;
            }
            for (int t = 0; rc == 0 && t < d.ex[i].len; t++)
                buf[n++] = (char)d.ex[i].ids[t];
            if (rc == 0)
                buf[n++] = '\n';
        }
        dataset_free(&d);
    }
    if (rc == 0 && !buf)
        rc = error_fmt(err, errlen, "out of memory");
    tokenizer_free(&tk);
    free(names);
    if (rc != 0) {
        free(buf);
        return -1;
    }
    buf[n] = 0;
    *text = buf;
    *len = n;
    return 0;
}

/* A char or word tokenizer with no token list gets one built from the
 * training data ("vocab": {"max_size", "min_count"} bound a word list). */
static int complete_vocab(struct options *o, char *err, size_t errlen)
{
    cJSON *model = cJSON_GetObjectItemCaseSensitive(o->root, "model");
    cJSON *tok = cJSON_GetObjectItemCaseSensitive(model, "tokenizer");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(tok, "type");
    if (!cJSON_IsString(type) || cJSON_GetObjectItemCaseSensitive(tok, "tokens"))
        return 0;
    int word = strcmp(type->valuestring, "word") == 0;
    if (!word && strcmp(type->valuestring, "char") != 0)
        return 0;
    char *text, **tokens;
    size_t len;
    int n;
    if (vocab_text(o, model, &text, &len, err, errlen))
        return -1;
    int rc = word ? tokenizer_word_vocab(text, len, o->vocab_max_size, o->vocab_min_count, &tokens, &n)
                  : tokenizer_char_vocab(text, len, &tokens, &n);
    free(text);
    if (rc != 0)
        return error_fmt(err, errlen, "out of memory building the vocabulary");
    cJSON *list = cJSON_CreateStringArray((const char *const *)tokens, n);
    for (int i = 0; i < n; i++)
        free(tokens[i]);
    free(tokens);
    if (!list || !cJSON_AddItemToObject(tok, "tokens", list) || !cJSON_AddNumberToObject(tok, "unk", 0))
        return error_fmt(err, errlen, "out of memory");
    fprintf(stderr, "built a %s vocabulary of %d tokens from the training data\n", type->valuestring, n);
    return 0;
}

/* ---- 3.-5. The run. */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int run_sync_weights(struct run *r, char *err, size_t errlen)
{
    if (engine_params_to_host(r->e, r->model.arena) != 0)
        return error_fmt(err, errlen, "cannot read the weights back from the %s backend: %s", r->be->ops->name,
                         r->be->err);
    return 0;
}

/* Add one file's part of labelled examples to d (several files make one
 * set). */
static int add_part(struct run *r, const char *path, const struct split *split, enum part part, struct dataset *d,
                    char *err, size_t errlen)
{
    struct dataset more;
    if (classify_load(path, &r->tk, r->model.cfg.classes, r->model.cfg.n_classes, split, part, &more, err, errlen))
        return -1;
    struct example *ex = realloc(d->ex, sizeof *ex * (size_t)(d->n + more.n));
    if (!ex) {
        dataset_free(&more);
        return error_fmt(err, errlen, "out of memory");
    }
    memcpy(ex + d->n, more.ex, sizeof *ex * (size_t)more.n);
    d->ex = ex;
    d->n += more.n;
    free(more.ex); /* the examples now belong to d */
    return 0;
}

/* The run's length: steps when given (0 too, as epochs 0 trains none),
 * else epochs of per_epoch steps. */
static long run_steps(const struct options *o, long per_epoch)
{
    return o->steps >= 0 ? o->steps : (long)ceil(o->epochs * (double)per_epoch);
}

static int open_data(struct run *r, char *err, size_t errlen)
{
    const struct options *o = &r->o;
    /* An option the model or its data would leave without effect is
     * refused; each kind of model validates on its own held-out data. */
    if (run_is_lm(r) && o->split.mod)
        return error_fmt(err, errlen, "config: \"data.split\" sets apart a classifier's lines; a language model "
                                      "validates on the files of \"data.valid\"");
    if (!run_is_lm(r) && o->n_valid)
        return error_fmt(err, errlen, "config: \"data.valid\" is a language model's; a classifier validates on "
                                      "the lines \"data.split\" sets apart");
    if (o->dropout > 0 && r->model.cfg.layers < 2)
        return error_fmt(err, errlen, "config: \"dropout\" acts between layers, and the model has one: "
                                      "\"dropout_embed\" drops its input");
    int validates = o->synthetic || (run_is_lm(r) ? o->n_valid : o->split.mod);
    if (!validates && (o->keep_best || o->valid_every))
        return error_fmt(err, errlen, "config: \"%s\" needs validation data, which %s",
                         o->keep_best ? "keep_best" : "valid_every",
                         run_is_lm(r) ? "a language model reads from \"data.valid\""
                                      : "a classifier sets apart with \"data.split\"");
    if (run_is_lm(r)) {
        if (corpus_disjoint((const char *const *)o->train, o->n_train, (const char *const *)o->valid, o->n_valid, err,
                            errlen) ||
            corpus_load((const char *const *)o->train, o->n_train, &r->tk, &r->train_c, err, errlen) ||
            (o->n_valid && corpus_load((const char *const *)o->valid, o->n_valid, &r->tk, &r->valid_c, err, errlen)) ||
            lm_windows_init(&r->win, &r->train_c, o->batch, o->bptt, o->seed, err, errlen))
            return -1;
        r->window = malloc(sizeof(int32_t) * (size_t)o->batch * (o->bptt + 1));
        r->slots = malloc(sizeof(int) * (size_t)o->batch);
        if (!r->window || !r->slots)
            return error_fmt(err, errlen, "out of memory");
        for (int i = 0; i < o->batch; i++)
            r->slots[i] = -1;
        r->total_steps = run_steps(o, lm_windows_per_epoch(&r->win));
        return 0;
    }
    if (o->synthetic) {
        int T = o->synth_length, D = o->synth_dim, in = o->synthetic == SYNTH_ADDING ? 2 : D;
        int out = o->synthetic == SYNTH_ADDING ? 1 : D;
        if (r->model.cfg.task != TASK_REGRESS || r->model.cfg.input_dim != in || r->model.head_out != out)
            return error_fmt(err, errlen, "the %s task needs a model with task \"regress\", \"input\": {\"type\": "
                                     "\"vector\", \"dim\": %d} and \"outputs\": %d",
                        o->synthetic == SYNTH_ADDING ? "adding" : "remember", in, out);
        int rc = o->synthetic == SYNTH_ADDING ? synth_adding(o->synth_train, T, o->seed, &r->train_d) ||
                                                    synth_adding(o->synth_valid, T, o->seed + 1, &r->valid_d)
                                              : synth_remember(o->synth_train, T, D, o->seed, &r->train_d) ||
                                                    synth_remember(o->synth_valid, T, D, o->seed + 1, &r->valid_d);
        if (rc)
            return error_fmt(err, errlen, "out of memory generating the %s task", o->synthetic == SYNTH_ADDING ? "adding" : "remember");
    }
    const struct split all = {0, 0, 0};
    const struct split *train_split = o->split.mod ? &o->split : &all;
    for (int i = 0; !o->synthetic && i < o->n_train; i++)
        if (add_part(r, o->train[i], train_split, PART_TRAIN, &r->train_d, err, errlen) ||
            (o->split.mod && add_part(r, o->train[i], &o->split, PART_VALID, &r->valid_d, err, errlen)))
            return -1;
    r->order = malloc(sizeof(int) * (size_t)r->train_d.n);
    r->batch_start = malloc(sizeof(int) * ((size_t)r->train_d.n + 2));
    if (!r->order || !r->batch_start)
        return error_fmt(err, errlen, "out of memory");
    r->total_steps = run_steps(o, (r->train_d.n + o->batch - 1) / o->batch);
    r->next_batch = r->n_batches = 0;
    return 0;
}

/* A new pass over the corpus starts every stream afresh.  Besides, each
 * window drops its carried state with chance state_reset: serving starts
 * every text from the zero state, which carried streams otherwise meet
 * only once a pass.  A batch's slots advance in step, so a dropped state
 * is cleared in place rather than given a fresh slot.  The draws depend on
 * the step's seed alone, so a resumed run makes the same ones. */
static void lm_reset_streams(struct run *r, int new_pass, unsigned long long step_seed)
{
    if (new_pass) {
        for (int i = 0; i < r->o.batch; i++) {
            engine_slot_close(r->e, r->slots[i]);
            r->slots[i] = engine_slot_open(r->e);
        }
        return;
    }
    struct rng g;
    rng_seed(&g, step_seed ^ 0x9e3779b97f4a7c15ULL);
    for (int i = 0; i < r->o.batch; i++)
        if (rng_uniform(&g) < r->o.state_reset)
            engine_slot_clear(r->e, r->slots[i]);
}

/* One training step's batch through the engine; adds to res. */
static int train_step(struct run *r, struct train_result *res, char *err, size_t errlen)
{
    const struct options *o = &r->o;
    /* Each step its own masks, the same ones on every run. */
    const struct train_options topt = {o->dropout, o->dropout_embed, o->seed * 1000003ULL + (unsigned long long)r->step};
    if (run_is_lm(r)) {
        struct engine_seq *q = calloc((size_t)o->batch, sizeof *q);
        if (!q)
            return error_fmt(err, errlen, "out of memory");
        int new_pass = lm_windows_next(&r->win, r->window);
        lm_reset_streams(r, new_pass, topt.seed);
        if (new_pass)
            r->epoch = r->win.epoch;
        for (int i = 0; i < o->batch; i++) {
            int32_t *w = r->window + (size_t)i * (o->bptt + 1);
            q[i] = (struct engine_seq){.tokens = w, .len = o->bptt, .slot = r->slots[i], .next = w + o->bptt};
        }
        int rc = engine_train_batch(r->e, q, o->batch, NULL, &topt, res, err, errlen);
        free(q);
        return rc;
    }
    if (r->next_batch == r->n_batches) {
        r->epoch_rng = r->rng; /* what a checkpoint needs to redraw this order */
        if (bucket_batches(&r->train_d, o->batch, &r->rng, r->order, r->batch_start, &r->n_batches))
            return error_fmt(err, errlen, "out of memory");
        r->next_batch = 0;
        r->epoch++;
    }
    int from = r->batch_start[r->next_batch], to = r->batch_start[r->next_batch + 1];
    r->next_batch++;
    struct engine_seq *q = calloc((size_t)(to - from), sizeof *q);
    int *labels = calloc((size_t)(to - from), sizeof *labels);
    int rc = q && labels ? 0 : error_fmt(err, errlen, "out of memory");
    for (int i = from; rc == 0 && i < to; i++) {
        const struct example *x = &r->train_d.ex[r->order[i]];
        q[i - from] = (struct engine_seq){.tokens = x->ids, .inputs = x->inputs, .len = x->len, .slot = -1,
                                          .target = x->target};
        labels[i - from] = x->label;
    }
    if (rc == 0)
        rc = engine_train_batch(r->e, q, to - from, labels, &topt, res, err, errlen);
    free(q);
    free(labels);
    return rc;
}

/* Validation: (loss, metric) = (mean cross-entropy, bits per token) for a
 * language model, (mean cross-entropy, accuracy) for a classifier. */
static int validate(struct run *r, double *loss, double *metric, char *err, size_t errlen)
{
    *loss = *metric = NAN;
    if (run_is_lm(r)) {
        if (!r->valid_c.n)
            return 0;
        struct engine_text t = {.tokens = r->valid_c.ids, .len = (int)r->valid_c.n};
        if (engine_score(r->e, &t, 1, err, errlen))
            return -1;
        *loss = -t.logprob / (double)(r->valid_c.n - 1);
        *metric = *loss / log(2.0);
        return 0;
    }
    if (!r->valid_d.n)
        return 0;
    const int C = r->model.head_out;
    double sum = 0;
    long right = 0;
    for (int at = 0; at < r->valid_d.n; at += r->o.batch) {
        int n = r->valid_d.n - at < r->o.batch ? r->valid_d.n - at : r->o.batch;
        struct engine_seq *q = calloc((size_t)n, sizeof *q);
        float *probs = malloc(sizeof(float) * (size_t)n * C);
        int rc = q && probs ? 0 : error_fmt(err, errlen, "out of memory");
        const int regress = r->model.cfg.task == TASK_REGRESS;
        for (int i = 0; rc == 0 && i < n; i++) {
            const struct example *x = &r->valid_d.ex[at + i];
            float *out = probs + (size_t)i * C;
            q[i] = (struct engine_seq){.tokens = x->ids, .inputs = x->inputs, .len = x->len, .slot = -1,
                                       .probs = regress ? NULL : out, .logits = regress ? out : NULL};
        }
        if (rc == 0)
            rc = engine_forward(r->e, q, n, err, errlen);
        for (int i = 0; rc == 0 && i < n; i++) {
            const float *p = probs + (size_t)i * C;
            const struct example *x = &r->valid_d.ex[at + i];
            if (regress) {
                /* Mean squared error per output, as the training loss. */
                for (int c = 0; c < C; c++)
                    sum += ((double)p[c] - x->target[c]) * ((double)p[c] - x->target[c]) / C;
                continue;
            }
            int best = 0;
            for (int c = 1; c < C; c++)
                best = p[c] > p[best] ? c : best;
            right += best == x->label;
            sum += -log(fmax(p[x->label], 1e-30));
        }
        free(q);
        free(probs);
        if (rc)
            return -1;
    }
    *loss = sum / r->valid_d.n;
    *metric = r->model.cfg.task == TASK_REGRESS ? *loss : (double)right / r->valid_d.n;
    return 0;
}

/* The weight file, with its training configuration and results: those of
 * the point whose weights it holds, last, the best one's with keep_best. */
static int save_model(struct run *r, const char *path, const struct curve_point *last, char *err, size_t errlen)
{
    char *config = cJSON_PrintUnformatted(r->o.root);
    char results[512];
    snprintf(results, sizeof results,
             "{\"steps\": %ld, \"epochs\": %.3f, \"train_loss\": %.6g, \"valid_loss\": %.6g, \"valid_%s\": %.6g}",
             r->best ? last->step : r->step, last->epoch, last->train_loss, last->valid_loss, r->curve.metric_name,
             last->valid_metric);
    /* JSON has no NaN: a metric never measured is null. */
    for (char *p; (p = strstr(results, "nan"));)
        memcpy(p, "null", 3), memmove(p + 4, p + 3, strlen(p + 3) + 1), p[3] = 'l';
    struct st_meta meta[] = {{"training_config", config}, {"training_results", results}};
    int rc = config ? model_save(&r->model, path, meta, 2, err, errlen) : error_fmt(err, errlen, "out of memory");
    free(config);
    return rc;
}

/* Whether a validation beats the best so far: higher accuracy (lower loss
 * breaking ties), or lower bits per character. */
static int better(const struct run *r, const struct curve_point *p)
{
    const struct curve_point *b = &r->best_at;
    if (!r->best)
        return 1;
    if (r->model.cfg.task != TASK_CLASSIFY) /* bits per character, squared error */
        return p->valid_metric < b->valid_metric;
    return p->valid_metric > b->valid_metric || (p->valid_metric == b->valid_metric && p->valid_loss < b->valid_loss);
}

static void progress(const struct run *r, const struct curve_point *pt, double elapsed, int tty)
{
    double eta = r->step ? elapsed / (double)r->step * (double)(r->total_steps - r->step) : 0;
    fprintf(stderr, "%sstep %ld/%ld  epoch %ld  loss %.4f  grad norm %.3g  %.0f tok/s  eta %.0fs%s", tty ? "\r" : "",
            r->step, r->total_steps, r->epoch, pt->train_loss, pt->grad_norm, pt->tokens_per_s, eta,
            tty ? "   " : "\n");
}

/* NAME.ckpt.safetensors for the run's NAME.safetensors. */
static void checkpoint_path(const struct options *o, char *path, size_t cap)
{
    snprintf(path, cap, "%.*s.ckpt.safetensors", (int)(strlen(o->out) - strlen(".safetensors")), o->out);
}

/* The signal that asked the run to stop, or 0.  The loop looks at it
 * after each step, so that a run stopped with Ctrl-C (or by a supervisor)
 * keeps what it learned in a checkpoint rather than losing it.  A second
 * signal, or any once the steps are done, ends the run (end_signal); but
 * while files are written (writing) it waits for them to be whole: a kill
 * there left a temporary file behind, or a checkpoint's .state of one step
 * beside the weights of the step before. */
static atomic_int stop_signal, end_signal, writing, steps_done;

/* Ends the process as sig's default action does, which a shell reports
 * as that signal. */
static void end_by(int sig)
{
    signal(sig, SIG_DFL);
    raise(sig);
}

static void on_stop_signal(int sig)
{
    int none = 0;
    if (!atomic_load(&steps_done) && atomic_compare_exchange_strong(&stop_signal, &none, sig))
        return;
    /* Stored before writing is read, as writing is stored before
     * end_signal is read (write_files): one of the two ends the run. */
    atomic_store(&end_signal, sig);
    if (!atomic_load(&writing))
        end_by(sig);
}

/* SIGINT and SIGTERM go to on_stop_signal.  A signal the run was started
 * ignoring stays ignored, as a shell has a job it runs in the background
 * ignore SIGINT. */
static void catch_stop_signals(void)
{
    static const int sigs[] = {SIGINT, SIGTERM};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) {
        struct sigaction was, sa = {.sa_handler = on_stop_signal, .sa_flags = SA_RESTART};
        sigemptyset(&sa.sa_mask);
        if (sigaction(sigs[i], NULL, &was) == 0 && was.sa_handler != SIG_IGN)
            sigaction(sigs[i], &sa, NULL);
    }
}

/* The run's files at a checkpoint (last 0) or at its end (last 1), each
 * written whole, an ending signal held until they are. */
static int write_files(struct run *r, const char *path, const struct curve_point *last, char *err, size_t errlen)
{
    atomic_store(&writing, 1);
    if (atomic_load(&end_signal))
        end_by(atomic_load(&end_signal));
    int rc = last ? save_model(r, path, last, err, errlen) || curve_write_csv(&r->curve, r->csv, err, errlen) ||
                        curve_write_svg(&r->curve, r->svg, path, err, errlen)
                  : checkpoint_save(r, path, err, errlen) || curve_write_csv(&r->curve, r->csv, err, errlen);
    atomic_store(&writing, 0);
    if (atomic_load(&end_signal))
        end_by(atomic_load(&end_signal));
    return rc ? -1 : 0;
}

static void run_free(struct run *r)
{
    for (int i = 0; r->slots && r->e && i < r->o.batch; i++)
        engine_slot_close(r->e, r->slots[i]);
    engine_destroy(r->e);
    backend_destroy(r->be);
    tokenizer_free(&r->tk);
    model_free(&r->model);
    corpus_free(&r->train_c);
    corpus_free(&r->valid_c);
    if (r->window)
        lm_windows_free(&r->win);
    free(r->window);
    free(r->slots);
    dataset_free(&r->train_d);
    dataset_free(&r->valid_d);
    free(r->order);
    free(r->batch_start);
    curve_free(&r->curve);
    free(r->best);
    options_free(&r->o);
}

/* Returns 0 when the run ended, -1 with err on an error, or the signal
 * that stopped it (its checkpoint written, and said so). */
static int train(struct run *r, const char *resume, char *err, size_t errlen)
{
    struct options *o = &r->o;
    /* The weight file is written at the end, and its checkpoints, CSV and
     * SVG beside it: a folder that is not there or not writable is found
     * now, before the run's work, rather than after it with nothing kept. */
    char why[512];
    if (st_check_writable(o->out, why, sizeof why))
        return error_fmt(err, errlen, "cannot write %s (nor its checkpoint, CSV and SVG beside it): %s", o->out,
                         why);
    /* 3. The model. */
    struct model_config cfg;
    char *model_json = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(o->root, "model"));
    if (!model_json)
        return error_fmt(err, errlen, "out of memory");
    int rc = config_parse(model_json, &cfg, err, errlen);
    free(model_json);
    if (rc)
        return -1;
    if (resume || o->init_from) {
        /* Continue a run, or fine-tune the weights of another with the same
         * architecture and vocabulary. */
        const char *from = resume ? resume : o->init_from;
        char *want = config_to_json(&cfg), *have = NULL;
        config_free(&cfg);
        if (model_load(from, &r->model, why, sizeof why)) {
            free(want);
            return error_fmt(err, errlen, "%s: %s", from, why);
        }
        have = config_to_json(&r->model.cfg);
        int same = want && have && strcmp(want, have) == 0;
        free(want);
        free(have);
        if (!same)
            return error_fmt(err, errlen, "%s holds a model of another configuration than \"model\"", from);
    } else {
        if (model_alloc(&r->model, &cfg, err, errlen))
            return -1;
        if (model_init(&r->model, &o->init, o->seed))
            return error_fmt(err, errlen, "out of memory drawing the starting weights");
    }
    if (tokenizer_init(&r->tk, &r->model.cfg, err, errlen) || !(r->be = backend_create(o->device, err, errlen)) ||
        backend_set_precision(r->be, o->precision, err, errlen) ||
        backend_set_recurrence(r->be, o->recurrence, err, errlen))
        return -1;
    int slots = run_is_lm(r) ? o->batch + 1 : 0;
    if (!(r->e = engine_create(&r->model, r->be, slots, err, errlen)))
        return -1;
    rng_seed(&r->rng, o->seed);
    if (open_data(r, err, errlen))
        return -1;
    o->optim.total_steps = r->total_steps;
    if (resume && checkpoint_restore(r, resume, err, errlen))
        return -1;
    r->curve.metric_name = run_is_lm(r) ? "bpc" : r->model.cfg.task == TASK_REGRESS ? "mse" : "accuracy";
    snprintf(r->csv, sizeof r->csv, "%.*s.csv", (int)(strlen(o->out) - strlen(".safetensors")), o->out);
    snprintf(r->svg, sizeof r->svg, "%.*s.svg", (int)(strlen(o->out) - strlen(".safetensors")), o->out);
    /* The device "auto" chose, the precision when it is not FP32 and the
     * recurrence when fused. */
    char where[48];
    backend_describe(r->be->ops->name, o->precision, o->recurrence, where, sizeof where);
    fprintf(stderr, "training %s on %s: %zu parameters, %ld steps of %d %s\n", o->out, where, r->model.n_params,
            r->total_steps, o->batch, run_is_lm(r) ? "windows" : o->synthetic ? "sequences" : "texts");

    /* 4. The loop. */
    const int tty = isatty(STDERR_FILENO);
    double start = now(), since = start;
    struct curve_point last = {0};
    last.valid_loss = last.valid_metric = NAN;
    char ckpt[4200];
    checkpoint_path(o, ckpt, sizeof ckpt);
    catch_stop_signals();
    while (r->step < r->total_steps) {
        struct train_result res = {0};
        if (engine_zero_grads(r->e))
            return error_fmt(err, errlen, "out of memory for the gradients");
        if (train_step(r, &res, err, errlen))
            return -1;
        struct optim_update u;
        double grad_norm = NAN;
        optim_update_at(&o->optim, r->step, &u);
        if (isfinite(res.loss) && engine_optim_step(r->e, &u, &grad_norm))
            return error_fmt(err, errlen, "cannot update the weights on the %s backend: %s", r->be->ops->name,
                             r->be->err[0] ? r->be->err : "out of memory");
        /* A step that is not finite would leave weights no checkpoint can
         * mend: it stops the run, the weights as the step before left
         * them. */
        if (!isfinite(res.loss) || !isfinite(grad_norm)) {
            const double v = isfinite(res.loss) ? grad_norm : res.loss;
            return error_fmt(err, errlen,
                             "the training diverged at step %ld: its %s is %s, and the weights were left as they "
                             "were; lower optim.lr, or set optim.clip_norm or optim.warmup_steps, and start again "
                             "or --resume from a checkpoint with the new setting",
                             r->step + 1, isfinite(res.loss) ? "gradients' norm" : "loss",
                             isnan(v) ? "not a number" : "infinite");
        }
        r->step++;
        r->loss_sum += res.loss;
        r->loss_count += res.count;
        r->norm_sum += grad_norm;
        r->norm_steps++;
        r->tokens += res.tokens;
        int log_now = r->step % o->log_every == 0 || r->step == r->total_steps;
        int valid_now = (o->valid_every && r->step % o->valid_every == 0) || r->step == r->total_steps;
        const int stop = atomic_load(&stop_signal);
        if ((stop || (o->checkpoint_every && r->step % o->checkpoint_every == 0)) && r->step < r->total_steps &&
            write_files(r, ckpt, NULL, err, errlen))
            return -1;
        if (stop && r->step < r->total_steps) {
            fprintf(stderr, "%s%s: stopped at step %ld of %ld; wrote %s (continue with rrnserve train --resume %s)\n",
                    tty ? "\n" : "", strsignal(stop), r->step, r->total_steps, ckpt, ckpt);
            return stop;
        }
        if (!log_now && !valid_now)
            continue;
        double t = now();
        struct curve_point pt = {
            .step = r->step,
            .epoch = (double)r->step * o->batch / (run_is_lm(r) ? (double)lm_windows_per_epoch(&r->win) * o->batch
                                                           : (double)r->train_d.n),
            .train_loss = r->loss_sum / (double)(r->loss_count ? r->loss_count : 1),
            .valid_loss = NAN,
            .valid_metric = NAN,
            .lr = optim_lr(&o->optim, r->step - 1),
            .tokens_per_s = (double)r->tokens / (t - since),
            .grad_norm = r->norm_steps ? r->norm_sum / (double)r->norm_steps : NAN,
        };
        progress(r, &pt, t - start, tty);
        if (valid_now) {
            if (validate(r, &pt.valid_loss, &pt.valid_metric, err, errlen))
                return -1;
            if (!isnan(pt.valid_loss))
                fprintf(stderr, "%svalidation at step %ld: loss %.4f, %s %.4f\n", tty ? "\n" : "", r->step,
                        pt.valid_loss, r->curve.metric_name, pt.valid_metric);
        }
        if (curve_add(&r->curve, &pt))
            return error_fmt(err, errlen, "out of memory");
        last = pt;
        if (o->keep_best && !isnan(pt.valid_metric) && better(r, &pt)) {
            /* Early stopping without stopping: remember the best weights. */
            if (!r->best && !(r->best = malloc(sizeof(float) * r->model.n_params)))
                return error_fmt(err, errlen, "out of memory");
            if (engine_params_to_host(r->e, r->best) != 0)
                return error_fmt(err, errlen, "cannot read the weights back from the %s backend: %s",
                                 r->be->ops->name, r->be->err);
            r->best_at = pt;
        }
        r->loss_sum = r->norm_sum = 0;
        r->loss_count = r->tokens = r->norm_steps = 0;
        since = now();
    }
    atomic_store(&steps_done, 1);
    if (tty)
        fputc('\n', stderr);
    /* 5. The results. */
    if (r->best) {
        memcpy(r->model.arena, r->best, sizeof(float) * r->model.n_params);
        last = r->best_at;
        fprintf(stderr, "keeping the weights of step %ld (validation %s %.4f)\n", last.step, r->curve.metric_name,
                last.valid_metric);
    } else if (run_sync_weights(r, err, errlen) != 0) {
        return -1;
    }
    if (write_files(r, o->out, &last, err, errlen))
        return -1;
    fprintf(stderr, "wrote %s, %s, %s (%.0f s)\n", o->out, r->csv, r->svg, now() - start);
    return 0;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: rrnserve train (--config FILE.json | --resume NAME.ckpt.safetensors) [--KEY VALUE ...]\n"
                 "  every key of the config can be given as a flag: --optim.lr 0.001, --epochs 3,\n"
                 "  --model.hidden 256; a flag's value is read as JSON, else as a string, and null\n"
                 "  takes the key out (--data.valid null).\n"
                 "  Ctrl-C or SIGTERM ends the run after its step with a checkpoint to --resume from.\n"
                 "  See docs/training.md for the configuration.\n");
}

int cmd_train(int argc, char **argv)
{
    char err[1024];
    const char *config_path = NULL, *resume = NULL;
    /* Two passes: find --config or --resume first, then apply every other
     * flag on top. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--config") == 0 && i + 1 < argc)
            config_path = argv[++i];
        else if (strcmp(argv[i], "--resume") == 0 && i + 1 < argc)
            resume = argv[++i];
    }
    if (!config_path == !resume) {
        usage(stderr);
        return 2;
    }
    cJSON *root = resume ? options_read_checkpoint(resume, err, sizeof err) : options_read_file(config_path, err, sizeof err);
    if (!root) {
        fprintf(stderr, "rrnserve train: %s\n", err);
        return 1;
    }
    int status = 0;
    for (int i = 1; i < argc && status == 0; i++) {
        if (strcmp(argv[i], "--config") == 0 || strcmp(argv[i], "--resume") == 0) {
            i++;
            continue;
        }
        if (strncmp(argv[i], "--", 2) != 0 || !argv[i][2]) {
            fprintf(stderr, "rrnserve train: unexpected argument '%s'\n", argv[i]);
            status = 2;
            break;
        }
        const char *key = argv[i] + 2, *eq = strchr(key, '=');
        char name[256];
        const char *value;
        if (eq) {
            snprintf(name, sizeof name, "%.*s", (int)(eq - key), key);
            value = eq + 1;
        } else if (i + 1 < argc) {
            snprintf(name, sizeof name, "%s", key);
            value = argv[++i];
        } else {
            fprintf(stderr, "rrnserve train: --%s needs a value\n", key);
            status = 2;
            break;
        }
        if (options_set(root, name, value, err, sizeof err)) {
            fprintf(stderr, "rrnserve train: %s\n", err);
            status = 2;
        }
    }
    struct run r;
    memset(&r, 0, sizeof r);
    int rc = status || options_parse(root, &r.o, err, sizeof err) || complete_vocab(&r.o, err, sizeof err)
                 ? -1
                 : train(&r, resume, err, sizeof err);
    if (status == 0 && rc < 0) {
        fprintf(stderr, "rrnserve train: %s\n", err);
        status = 1;
    } else if (rc > 0) {
        status = 128 + rc; /* as a shell reports a process a signal ended */
    }
    run_free(&r);
    cJSON_Delete(root);
    return status;
}
