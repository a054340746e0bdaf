/* cmd_run.c - `rrnserve run`: a model applied to text from the command line.
 *
 * Prints one JSON object per text: for a classifier the label and the class
 * probabilities, for a regression its outputs, for a language model the
 * log-probability of the text (tokens 2..n given their prefixes), the
 * number of tokens scored and bits per token.  --jsonl reads {"text": ...}
 * lines and runs them through the engine in batches, one result line per
 * input line; a bad line gets an {"error": ...} line in its place, and the
 * exit status says so.  --generate samples text after a prompt through the
 * model's batcher, as the server does, so that a seed gives the text that
 * POST /generate gives; with --stream it prints that text as it comes.
 */
#include <cjson/cJSON.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "batcher.h"
#include "commands.h"
#include "engine.h"
#include "handler.h"
#include "json_text.h"
#include "tokenizer.h"

struct runner {
    struct model model;
    struct tokenizer tk;
    struct backend *be;
    struct engine *engine;
};

/* One text of a batch: its tokens, or the reason it has none. */
struct item {
    int32_t *ids;
    size_t n;
    long lineno; /* its line of a JSONL file, 0 for --text and --file */
    char error[256];
};

static int runner_open(struct runner *r, const char *path, enum device_kind dev, enum precision prec,
                       enum recurrence rec)
{
    char err[512];
    memset(r, 0, sizeof *r);
    if (model_load(path, &r->model, err, sizeof err) != 0) {
        fprintf(stderr, "rrnserve run: %s: %s\n", path, err);
        return -1;
    }
    if (r->model.cfg.input_dim) {
        fprintf(stderr, "rrnserve run: %s: the model reads vectors, not text (task %s)\n", path,
                task_name(r->model.cfg.task));
        return -1;
    }
    if (tokenizer_init(&r->tk, &r->model.cfg, err, sizeof err) != 0 ||
        !(r->be = backend_create(dev, err, sizeof err)) || backend_set_precision(r->be, prec, err, sizeof err) != 0 ||
        backend_set_recurrence(r->be, rec, err, sizeof err) != 0 ||
        /* Language models: the slots --generate's batcher of one stream
         * needs, among them one for engine_score's long texts. */
        !(r->engine = engine_create(&r->model, r->be, r->model.cfg.task == TASK_LM ? batcher_slots(1) : 0, err, sizeof err))) {
        fprintf(stderr, "rrnserve run: %s: %s\n", path, err);
        return -1;
    }
    return 0;
}

static void runner_close(struct runner *r)
{
    engine_destroy(r->engine);
    backend_destroy(r->be);
    tokenizer_free(&r->tk);
    model_free(&r->model);
}

static cJSON *classify_result(const struct model *m, const float *probs)
{
    int best = 0;
    for (int c = 1; c < m->head_out; c++)
        if (probs[c] > probs[best])
            best = c;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "label", m->cfg.classes[best]);
    cJSON *p = cJSON_AddObjectToObject(o, "probabilities");
    for (int c = 0; c < m->head_out; c++)
        cJSON_AddNumberToObject(p, m->cfg.classes[c], probs[c]);
    return o;
}

static cJSON *regress_result(const float *out, int n)
{
    cJSON *o = cJSON_CreateObject(), *a = cJSON_AddArrayToObject(o, "outputs");
    for (int i = 0; a && i < n; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber(out[i]));
    return o;
}

static cJSON *score_result(double logprob, size_t n_tokens)
{
    cJSON *o = cJSON_CreateObject();
    size_t scored = n_tokens - 1;
    cJSON_AddNumberToObject(o, "logprob", logprob);
    cJSON_AddNumberToObject(o, "tokens", (double)scored);
    if (scored)
        cJSON_AddNumberToObject(o, "bits_per_char", -logprob / log(2.0) / (double)scored);
    else
        cJSON_AddNullToObject(o, "bits_per_char");
    return o;
}

static void print_json(cJSON *o)
{
    char *s = cJSON_PrintUnformatted(o);
    if (s)
        puts(s);
    free(s);
    cJSON_Delete(o);
}

/* Marks an item failed: what, after its line of a JSONL file. */
static void item_error(struct item *it, const char *what)
{
    char where[32] = "";
    if (it->lineno)
        snprintf(where, sizeof where, "line %ld: ", it->lineno);
    snprintf(it->error, sizeof it->error, "%s%s", where, what);
}

/* Run a batch of items and print one line each; returns the number of
 * items that failed. */
static int run_batch(struct runner *r, struct item *items, int n)
{
    char err[512] = "";
    int ok = 0, failed = 0;
    struct engine_text *texts = calloc((size_t)n, sizeof *texts);
    int *which = calloc((size_t)n, sizeof *which);
    float *probs = calloc((size_t)n * r->model.head_out, sizeof *probs);
    struct engine_seq *seqs = calloc((size_t)n, sizeof *seqs);
    int rc = texts && which && probs && seqs ? 0 : -1;
    if (rc != 0)
        snprintf(err, sizeof err, "out of memory");
    for (int i = 0; rc == 0 && i < n; i++) {
        if (items[i].error[0])
            continue;
        if (items[i].n == 0) {
            item_error(&items[i], "the text has no tokens");
            continue;
        }
        texts[ok] = (struct engine_text){.tokens = items[i].ids, .len = (int)items[i].n};
        /* A classifier's probabilities, or a regression's prediction. */
        float *out = probs + (size_t)ok * r->model.head_out;
        int regress = r->model.cfg.task == TASK_REGRESS;
        seqs[ok] = (struct engine_seq){.tokens = items[i].ids, .len = (int)items[i].n, .slot = -1,
                                       .probs = regress ? NULL : out, .logits = regress ? out : NULL};
        which[ok++] = i;
    }
    if (rc == 0 && ok)
        rc = r->model.cfg.task == TASK_LM ? engine_score(r->engine, texts, ok, err, sizeof err)
                                          : engine_forward(r->engine, seqs, ok, err, sizeof err);
    for (int i = 0, k = 0; i < n; i++) {
        cJSON *o = NULL;
        if (rc == 0 && k < ok && which[k] == i) {
            const float *out = probs + (size_t)k * r->model.head_out;
            if (r->model.cfg.task == TASK_LM && !isfinite(texts[k].logprob))
                item_error(&items[i], "the text: " ENGINE_SCORE_NOT_FINITE);
            else
                o = r->model.cfg.task == TASK_LM        ? score_result(texts[k].logprob, items[i].n)
                    : r->model.cfg.task == TASK_REGRESS ? regress_result(out, r->model.head_out)
                                                        : classify_result(&r->model, out);
            k++;
        }
        if (!o) {
            o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "error", items[i].error[0] ? items[i].error : err);
            fprintf(stderr, "rrnserve run: %s\n", items[i].error[0] ? items[i].error : err);
            failed++;
        }
        print_json(o);
    }
    free(texts);
    free(which);
    free(probs);
    free(seqs);
    return failed;
}

static int encode(struct runner *r, struct item *it, const char *text, size_t len)
{
    if (tokenizer_encode(&r->tk, text, len, &it->ids, &it->n) != 0) {
        snprintf(it->error, sizeof it->error, "out of memory tokenizing %zu bytes", len);
        return -1;
    }
    return 0;
}

/* The whole of a file, or of standard input for "-". */
static char *read_whole(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap)
            break;
        char *bigger = realloc(buf, cap *= 2);
        if (!bigger)
            free(buf);
        buf = bigger;
    }
    if (buf && ferror(f)) {
        free(buf);
        buf = NULL;
    }
    if (f != stdin)
        fclose(f);
    *len = n;
    return buf;
}

/* Parse one JSONL line into an item. */
static void parse_line(struct runner *r, struct item *it, const char *line, size_t len, long lineno)
{
    cJSON *o = json_parse_whole(line, len);
    const cJSON *text = o ? cJSON_GetObjectItemCaseSensitive(o, "text") : NULL;
    it->lineno = lineno;
    if (!o)
        snprintf(it->error, sizeof it->error, "line %ld: not valid JSON", lineno);
    else if (json_holds_nul(line, len))
        snprintf(it->error, sizeof it->error, "line %ld: a string holds U+0000 (\\u0000)", lineno);
    else if (!cJSON_IsObject(o))
        snprintf(it->error, sizeof it->error, "line %ld: not a JSON object", lineno);
    else if (!cJSON_IsString(text))
        snprintf(it->error, sizeof it->error, "line %ld: \"text\" must be a string", lineno);
    else
        encode(r, it, text->valuestring, strlen(text->valuestring));
    cJSON_Delete(o);
}

static int run_jsonl(struct runner *r, const char *path, int batch)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    if (!f) {
        fprintf(stderr, "rrnserve run: cannot open %s\n", path);
        return 1;
    }
    struct item *items = calloc((size_t)batch, sizeof *items);
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    long lineno = 0;
    int n = 0, failed = 0;
    while (items && (got = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == (size_t)got)
            continue;
        memset(&items[n], 0, sizeof items[n]);
        parse_line(r, &items[n++], line, (size_t)got, lineno);
        if (n == batch) {
            failed += run_batch(r, items, n);
            for (int i = 0; i < n; i++)
                free(items[i].ids);
            n = 0;
        }
    }
    if (items && n)
        failed += run_batch(r, items, n);
    for (int i = 0; items && i < n; i++)
        free(items[i].ids);
    int read_error = ferror(f);
    if (read_error)
        fprintf(stderr, "rrnserve run: error reading %s\n", path);
    free(line);
    free(items);
    if (f != stdin)
        fclose(f);
    return !items || failed || read_error ? 1 : 0;
}

/* --generate's settings, the fields of POST /generate. */
struct generation {
    struct sample_params sample;
    int seeded;
    int max_tokens;
    const char *stop[JOB_MAX_STOP];
    int n_stop;
    int stream;   /* print the text as it comes, not the JSON answer */
};

/* --stream: prints the job's text as it is generated, then a newline.
 * What a stop string may yet take back waits for the next token
 * (job_text_settled); and the text is cleaned of invalid UTF-8 as the
 * JSON answer's is, a character split over byte tokens printed whole.
 * 0, or -1 out of memory. */
static int stream_generation(struct job *j)
{
    struct utf8_stream text = {0};
    size_t taken = 0; /* bytes of j->text put into text */
    int done = 0, seen = 0, rc = 0;
    while (!done && rc == 0) {
        job_wait(j, seen, 1000);
        pthread_mutex_lock(&j->mu);
        done = j->done;
        seen = j->n_tokens;
        const size_t upto = job_text_settled(j);
        if (upto > taken && utf8_stream_put(&text, j->text + taken, upto - taken) == 0)
            taken = upto;
        else if (upto > taken)
            rc = -1;
        pthread_mutex_unlock(&j->mu);
        size_t len;
        const char *clean = rc == 0 ? utf8_stream_take(&text, done, &len) : NULL;
        if (!clean) {
            rc = -1;
            break;
        }
        fwrite(clean, 1, len, stdout);
        fflush(stdout);
    }
    putchar('\n');
    utf8_stream_free(&text);
    return rc;
}

/* Samples text after prompt with the model's batcher (one stream, no
 * prompt cache), which takes the engine over; prints the answer.  0, or 1
 * with the reason on standard error. */
static int run_generate(struct runner *r, const char *prompt, struct generation *g)
{
    char err[512] = "";
    struct job *j = NULL;
    struct batcher *b = NULL;
    if (r->model.cfg.task != TASK_LM || config_directions(&r->model.cfg) != 1) {
        snprintf(err, sizeof err, "--generate needs a language model that reads one way (this one: task %s%s)",
                 task_name(r->model.cfg.task), r->model.cfg.task == TASK_LM ? ", bidirectional" : "");
    } else if (!g->seeded && sample_seed_random(&g->sample.seed) != 0) {
        snprintf(err, sizeof err, "no random seed could be drawn");
    } else if (!(j = job_new(JOB_GENERATE, 1))) {
        snprintf(err, sizeof err, "out of memory");
    } else {
        size_t n = 0;
        if (tokenizer_encode(&r->tk, prompt, strlen(prompt), &j->ids[0], &n) != 0)
            snprintf(err, sizeof err, "out of memory tokenizing the prompt");
        else if (n == 0)
            snprintf(err, sizeof err, "the prompt has no tokens");
        j->lens[0] = (int)n;
        j->sample = g->sample;
        j->max_tokens = g->max_tokens;
        for (int i = 0; !err[0] && i < g->n_stop; i++)
            if (!(j->stop[j->n_stop++] = strdup(g->stop[i])))
                snprintf(err, sizeof err, "out of memory");
    }
    if (!err[0]) {
        struct batcher_options opt = {.max_batch = 1, .max_wait_us = 0, .max_queue = 1};
        b = batcher_start(&r->model, &r->tk, r->engine, &opt, err, sizeof err);
        r->engine = NULL; /* the batcher's, even when it did not start */
    }
    if (b && batcher_submit(b, &j, 1) != 0) {
        snprintf(err, sizeof err, "the model refused the generation");
    } else if (b && g->stream) {
        if (!g->seeded)
            fprintf(stderr, "rrnserve run: seed %llu\n", (unsigned long long)g->sample.seed);
        if (stream_generation(j) != 0)
            snprintf(err, sizeof err, "out of memory");
    } else if (b) {
        while (!job_wait(j, INT_MAX, 1000))
            ;
    }
    if (!err[0] && j->failed)
        snprintf(err, sizeof err, "%s", j->error);
    cJSON *o = err[0] || g->stream ? NULL : generation_result(j);
    if (!err[0] && !g->stream && !o)
        snprintf(err, sizeof err, "out of memory");
    if (o)
        print_json(o);
    if (err[0])
        fprintf(stderr, "rrnserve run: %s\n", err);
    job_release(j);
    batcher_stop(b);
    return err[0] ? 1 : 0;
}

/* A number option in [lo, hi]: 0, or -1 with the reason on standard
 * error (integer: whole numbers only). */
static int number_option(const char *name, const char *arg, double lo, double hi, int integer, double *out)
{
    char *end;
    double v = strtod(arg, &end);
    if (end == arg || *end || !isfinite(v) || v < lo || v > hi || (integer && v != floor(v))) {
        fprintf(stderr, "rrnserve run: --%s must be %s from %g to %g, not '%s'\n", name,
                integer ? "an integer" : "a number", lo, hi, arg);
        return -1;
    }
    *out = v;
    return 0;
}

static void run_usage(FILE *out)
{
    fputs("usage: rrnserve run FILE (--text T | --file PATH | --jsonl PATH | --generate PROMPT)\n"
          "                    [--device cpu|cuda|auto] [--precision fp32|tf32|bf16] [--recurrence gemm|fused]\n"
          "                    [--batch N] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
          "                    [--seed S] [--stop STRING]... [--stream]\n"
          "\n"
          "Applies the model of FILE (a .safetensors weight file) to text and prints JSON: a\n"
          "classifier's label and probabilities, a language model's log-probability and bits per char,\n"
          "or text a language model generates after a prompt (as POST /generate answers: api.md).\n"
          "  --text T        one text\n"
          "  --file PATH     the whole of a file as one text (- for standard input)\n"
          "  --jsonl PATH    one {\"text\": ...} object a line (- for standard input), one result line each\n"
          "  --generate P    sample text after the prompt P; with --max-tokens (default 64),\n"
          "                  --temperature (1; 0 is greedy), --top-k (0: all), --top-p (1), --seed\n"
          "                  (default: random, printed) and up to 4 --stop strings\n"
          "  --stream        with --generate: print the text as it comes (and a random seed on\n"
          "                  standard error), not the JSON answer\n"
          "  --device D      cpu (default), cuda, or auto (CUDA when a GPU is present)\n"
          "  --precision P   fp32 (default), or tf32 or bf16 for tensor-core matrix products on cuda\n"
          "  --recurrence R  gemm (default), or fused: each step's recurrent product in its cell kernel\n"
          "  --batch N       texts of a --jsonl file per engine call (default 64)\n",
          out);
}

int cmd_run(int argc, char **argv)
{
    static const struct option opts[] = {
        {"text", required_argument, NULL, 't'},  {"file", required_argument, NULL, 'f'},
        {"jsonl", required_argument, NULL, 'j'}, {"device", required_argument, NULL, 'd'},
        {"batch", required_argument, NULL, 'b'}, {"precision", required_argument, NULL, 'p'},
        {"recurrence", required_argument, NULL, 'r'}, {"help", no_argument, NULL, 'h'},
        {"generate", required_argument, NULL, 'g'}, {"max-tokens", required_argument, NULL, 'm'},
        {"temperature", required_argument, NULL, 'T'}, {"top-k", required_argument, NULL, 'k'},
        {"top-p", required_argument, NULL, 'P'}, {"seed", required_argument, NULL, 's'},
        {"stop", required_argument, NULL, 'S'}, {"stream", no_argument, NULL, 'O'},
        {NULL, 0, NULL, 0},
    };
    const char *text = NULL, *file = NULL, *jsonl = NULL, *prompt = NULL;
    struct generation g = {.sample = {.temperature = 1.0f, .top_p = 1.0f}, .max_tokens = 64};
    int sampling = 0; /* options that only --generate reads */
    double v;
    enum device_kind dev = DEVICE_CPU;
    enum precision prec = PRECISION_FP32;
    enum recurrence rec = RECURRENCE_GEMM;
    int batch = 64, c, sources = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 't': text = optarg; sources++; break;
        case 'f': file = optarg; sources++; break;
        case 'j': jsonl = optarg; sources++; break;
        case 'g': prompt = optarg; sources++; break;
        case 'm':
            if (number_option("max-tokens", optarg, 1, 1 << 20, 1, &v) != 0)
                return 2;
            g.max_tokens = (int)v;
            sampling++;
            break;
        case 'T':
            if (number_option("temperature", optarg, 0, 1e6, 0, &v) != 0)
                return 2;
            g.sample.temperature = (float)v;
            sampling++;
            break;
        case 'k':
            if (number_option("top-k", optarg, 0, INT_MAX, 1, &v) != 0)
                return 2;
            g.sample.top_k = (int)v;
            sampling++;
            break;
        case 'P':
            if (number_option("top-p", optarg, 1e-9, 1, 0, &v) != 0)
                return 2;
            g.sample.top_p = (float)v;
            sampling++;
            break;
        case 's':
            if (number_option("seed", optarg, 0, (double)SAMPLE_SEED_MAX, 1, &v) != 0)
                return 2;
            g.sample.seed = (uint64_t)v;
            g.seeded = 1;
            sampling++;
            break;
        case 'S':
            if (g.n_stop == JOB_MAX_STOP || !optarg[0]) {
                fprintf(stderr, "rrnserve run: up to %d --stop strings, none empty\n", JOB_MAX_STOP);
                return 2;
            }
            g.stop[g.n_stop++] = optarg;
            sampling++;
            break;
        case 'O':
            g.stream = 1;
            sampling++;
            break;
        case 'd':
            if (backend_device_parse(optarg, &dev) != 0) {
                fprintf(stderr, "rrnserve run: --device must be cpu, cuda or auto, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'p':
            if (backend_precision_parse(optarg, &prec) != 0) {
                fprintf(stderr, "rrnserve run: --precision must be fp32, tf32 or bf16, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'r':
            if (backend_recurrence_parse(optarg, &rec) != 0) {
                fprintf(stderr, "rrnserve run: --recurrence must be gemm or fused, not '%s'\n", optarg);
                return 2;
            }
            break;
        case 'b':
            if (number_option("batch", optarg, 1, 4096, 1, &v) != 0)
                return 2;
            batch = (int)v;
            break;
        case 'h':
            run_usage(stdout);
            return 0;
        default:
            run_usage(stderr);
            return 2;
        }
    }
    if (optind != argc - 1 || sources != 1) {
        run_usage(stderr);
        return 2;
    }
    if (sampling && !prompt) {
        fprintf(stderr, "rrnserve run: --max-tokens, --temperature, --top-k, --top-p, --seed, --stop and "
                        "--stream go with --generate\n");
        return 2;
    }
    struct runner r;
    if (runner_open(&r, argv[optind], dev, prec, rec) != 0) {
        runner_close(&r);
        return 1;
    }
    int status;
    if (prompt) {
        status = run_generate(&r, prompt, &g);
    } else if (jsonl) {
        status = run_jsonl(&r, jsonl, batch);
    } else {
        struct item it = {0};
        size_t len = 0;
        char *buf = file ? read_whole(file, &len) : NULL;
        if (file && !buf) {
            fprintf(stderr, "rrnserve run: cannot read %s\n", file);
            status = 1;
        } else {
            encode(&r, &it, file ? buf : text, file ? len : strlen(text));
            status = run_batch(&r, &it, 1) ? 1 : 0;
        }
        free(it.ids);
        free(buf);
    }
    runner_close(&r);
    return status;
}
