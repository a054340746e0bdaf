/* train.c - `rrnserve train`: one training run, read top to bottom.
 *
 *   1. the configuration: a JSON file, every key also settable as a flag
 *      (--optim.lr 0.001 sets {"optim": {"lr": 0.001}});
 *   2. the data, and the tokenizer's vocabulary built from it when the
 *      config leaves it out;
 *   3. the model: initialised (init.c), or taken from a checkpoint;
 *   4. the loop: a batch, forward and backward (engine_train_batch),
 *      clipping, one optimizer step; validation every valid_every steps,
 *      a checkpoint every checkpoint_every;
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../cli/commands.h"
#include "error.h"
#include "data.h"
#include "engine.h"
#include "init.h"
#include "optim.h"
#include "report.h"

/* ---- 1. Configuration. */

enum { SYNTH_ADDING = 1, SYNTH_REMEMBER };

struct options {
    cJSON *root;               /* the whole configuration, as run */
    char **train, **valid;     /* data paths */
    int n_train, n_valid;
    struct split split;        /* classify: the validation lines */
    int synthetic;             /* 0, or SYNTH_ADDING / SYNTH_REMEMBER */
    int synth_length, synth_dim, synth_train, synth_valid;
    struct optim_config optim;
    struct init_options init;
    int batch, bptt;
    double epochs;
    long steps;                /* 0: from epochs */
    float dropout, dropout_embed;
    double state_reset;        /* lm: chance a window starts from the zero state */
    unsigned long long seed;
    long valid_every, checkpoint_every, log_every;
    int keep_best;             /* write the weights of the best validation */
    const char *init_from;     /* start from this weight file's weights */
    const char *out;
    enum device_kind device;
    enum precision precision;
    enum recurrence recurrence;
};

/* Set the value at a dotted path ("optim.lr"), creating objects on the way.
 * The value is taken as JSON when it parses as JSON, else as a string. */
static int set_path(cJSON *root, const char *path, const char *value, char *err, size_t errlen)
{
    char key[256];
    cJSON *obj = root;
    const char *dot;
    while ((dot = strchr(path, '.'))) {
        snprintf(key, sizeof key, "%.*s", (int)(dot - path), path);
        cJSON *next = cJSON_GetObjectItemCaseSensitive(obj, key);
        if (!next) {
            next = cJSON_AddObjectToObject(obj, key);
        } else if (!cJSON_IsObject(next)) {
            return error_fmt(err, errlen, "--%s: \"%s\" is not an object in the config", path, key);
        }
        if (!next)
            return error_fmt(err, errlen, "out of memory");
        obj = next;
        path = dot + 1;
    }
    cJSON *v = cJSON_Parse(value);
    if (!v)
        v = cJSON_CreateString(value);
    if (!v)
        return error_fmt(err, errlen, "out of memory");
    if (cJSON_GetObjectItemCaseSensitive(obj, path))
        cJSON_ReplaceItemInObjectCaseSensitive(obj, path, v);
    else
        cJSON_AddItemToObject(obj, path, v);
    return 0;
}

static const cJSON *field(const cJSON *o, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(o, name);
}

/* A number field within [lo, hi], or its default when absent. */
static int get_num(const cJSON *o, const char *name, const char *where, double lo, double hi, double dflt,
                   double *out, char *err, size_t errlen)
{
    const cJSON *v = field(o, name);
    *out = dflt; /* also on failure, so callers never hold an unset value */
    if (!v)
        return 0;
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
        return error_fmt(err, errlen, "config: \"%s%s\" must be a number from %g to %g", where, name, lo, hi);
    *out = v->valuedouble;
    return 0;
}

static int get_bool(const cJSON *o, const char *name, const char *where, int dflt, int *out, char *err,
                    size_t errlen)
{
    const cJSON *v = field(o, name);
    *out = dflt;
    if (!v)
        return 0;
    if (!cJSON_IsBool(v))
        return error_fmt(err, errlen, "config: \"%s%s\" must be true or false", where, name);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* A list of paths: a string or an array of strings. */
static int get_paths(const cJSON *o, const char *name, int required, char ***out, int *n, char *err,
                     size_t errlen)
{
    const cJSON *v = field(o, name);
    *out = NULL;
    *n = 0;
    if (!v)
        return required ? error_fmt(err, errlen, "config: \"data.%s\" is required", name) : 0;
    int count = cJSON_IsString(v) ? 1 : cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
    if (count < 1)
        return error_fmt(err, errlen, "config: \"data.%s\" must be a path or a non-empty array of paths", name);
    *out = calloc((size_t)count, sizeof **out);
    if (!*out)
        return error_fmt(err, errlen, "out of memory");
    for (int i = 0; i < count; i++) {
        const cJSON *s = cJSON_IsString(v) ? v : cJSON_GetArrayItem(v, i);
        if (!cJSON_IsString(s))
            return error_fmt(err, errlen, "config: \"data.%s\" must hold paths (strings)", name);
        (*out)[i] = s->valuestring;
        *n = i + 1;
    }
    return 0;
}

static int parse_optim(const cJSON *o, struct optim_config *c, char *err, size_t errlen)
{
    static const char *const decays[] = {"none", "linear", "cosine", "step"};
    const cJSON *name = field(o, "name");
    int kind = cJSON_IsString(name) ? optim_kind_from_name(name->valuestring) : name ? -1 : OPTIM_ADAM;
    if (kind < 0)
        return error_fmt(err, errlen, "config: \"optim.name\" must be sgd, rmsprop, adam, adamw or adadelta");
    optim_defaults(c, (enum optim_kind)kind);
    double v;
    struct {
        const char *key;
        double lo, hi;
        float *f;
        long *l;
    } nums[] = {
        {"lr", 0, 1e3, &c->lr, NULL},
        {"momentum", 0, 1, &c->momentum, NULL},
        {"beta1", 0, 1, &c->beta1, NULL},
        {"beta2", 0, 1, &c->beta2, NULL},
        {"alpha", 0, 1, &c->alpha, NULL},
        {"rho", 0, 1, &c->rho, NULL},
        {"eps", 0, 1, &c->eps, NULL},
        {"weight_decay", 0, 1e3, &c->weight_decay, NULL},
        {"clip_norm", 0, 1e9, &c->clip_norm, NULL},
        {"min_lr", 0, 1e3, &c->min_lr, NULL},
        {"step_gamma", 0, 1e3, &c->step_gamma, NULL},
        {"warmup_steps", 0, 1e12, NULL, &c->warmup_steps},
        {"step_every", 1, 1e12, NULL, &c->step_every},
    };
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        double dflt = nums[i].f ? *nums[i].f : (double)*nums[i].l;
        if (get_num(o, nums[i].key, "optim.", nums[i].lo, nums[i].hi, dflt, &v, err, errlen))
            return -1;
        if (nums[i].f)
            *nums[i].f = (float)v;
        else
            *nums[i].l = (long)v;
    }
    int nesterov;
    if (get_bool(o, "nesterov", "optim.", c->nesterov, &nesterov, err, errlen))
        return -1;
    c->nesterov = nesterov;
    const cJSON *d = field(o, "decay");
    if (d) {
        int found = -1;
        for (int i = 0; i < 4 && cJSON_IsString(d); i++)
            if (strcmp(d->valuestring, decays[i]) == 0)
                found = i;
        if (found < 0)
            return error_fmt(err, errlen, "config: \"optim.decay\" must be none, linear, cosine or step");
        c->decay = (enum lr_decay)found;
    }
    static const char *const keys[] = {"name", "lr", "momentum", "beta1", "beta2", "alpha", "rho", "eps",
                                       "weight_decay", "clip_norm", "min_lr", "step_gamma", "warmup_steps",
                                       "step_every", "nesterov", "decay"};
    for (const cJSON *k = o ? o->child : NULL; k; k = k->next) {
        size_t i = 0;
        while (i < sizeof keys / sizeof keys[0] && strcmp(k->string, keys[i]) != 0)
            i++;
        if (i == sizeof keys / sizeof keys[0])
            return error_fmt(err, errlen, "config: unknown key \"optim.%s\"", k->string);
    }
    return 0;
}

static int parse_options(cJSON *root, struct options *o, char *err, size_t errlen)
{
    static const char *const keys[] = {"model",       "data",       "optim",   "init",      "vocab",
                                       "batch_size",  "bptt",       "epochs",  "steps",     "dropout",  "dropout_embed", "state_reset",
                                       "seed",        "valid_every", "checkpoint_every", "log_every",
                                       "keep_best",   "init_from",  "out",        "device", "precision",
                                       "recurrence"};
    for (const cJSON *k = root->child; k; k = k->next) {
        size_t i = 0;
        while (i < sizeof keys / sizeof keys[0] && strcmp(k->string, keys[i]) != 0)
            i++;
        if (i == sizeof keys / sizeof keys[0])
            return error_fmt(err, errlen, "config: unknown key \"%s\"", k->string);
    }
    memset(o, 0, sizeof *o);
    o->root = root;
    if (!cJSON_IsObject(field(root, "model")))
        return error_fmt(err, errlen, "config: \"model\" (the model's MODELS.md config) is required");
    const cJSON *data = field(root, "data");
    if (!cJSON_IsObject(data))
        return error_fmt(err, errlen, "config: \"data\" is required: {\"train\": [paths], ...}");
    const cJSON *synth = field(data, "synthetic");
    if (synth) {
        /* The papers' synthetic tasks, generated from the seed. */
        o->synthetic = cJSON_IsString(synth) && strcmp(synth->valuestring, "adding") == 0     ? SYNTH_ADDING
                       : cJSON_IsString(synth) && strcmp(synth->valuestring, "remember") == 0 ? SYNTH_REMEMBER
                                                                                              : 0;
        if (!o->synthetic)
            return error_fmt(err, errlen, "config: \"data.synthetic\" must be \"adding\" or \"remember\"");
        double len, dim, n_train, n_valid;
        if (get_num(data, "length", "data.", 2, 100000, 100, &len, err, errlen) ||
            get_num(data, "dim", "data.", 1, 4096, 6, &dim, err, errlen) ||
            get_num(data, "train_size", "data.", 1, 1e7, 10000, &n_train, err, errlen) ||
            get_num(data, "valid_size", "data.", 1, 1e7, 1000, &n_valid, err, errlen))
            return -1;
        o->synth_length = (int)len;
        o->synth_dim = (int)dim;
        o->synth_train = (int)n_train;
        o->synth_valid = (int)n_valid;
    } else if (get_paths(data, "train", 1, &o->train, &o->n_train, err, errlen) ||
               get_paths(data, "valid", 0, &o->valid, &o->n_valid, err, errlen)) {
        return -1;
    }
    const cJSON *split = field(data, "split");
    double mod = 0, test = 0, valid = 0;
    if (split && (!cJSON_IsObject(split) || get_num(split, "mod", "data.split.", 1, 1e6, 0, &mod, err, errlen) ||
                  get_num(split, "test", "data.split.", 0, 1e6, 0, &test, err, errlen) ||
                  get_num(split, "valid", "data.split.", 0, 1e6, 1, &valid, err, errlen)))
        return split && !cJSON_IsObject(split) ? error_fmt(err, errlen, "config: \"data.split\" must be an object") : -1;
    o->split = (struct split){(int)mod, (int)test, (int)valid};
    if (parse_optim(field(root, "optim"), &o->optim, err, errlen))
        return -1;
    const cJSON *init = field(root, "init");
    double forget = 1.0, v;
    if (get_bool(init, "orthogonal", "init.", 1, &o->init.orthogonal, err, errlen) ||
        get_num(init, "forget_bias", "init.", -100, 100, 1.0, &forget, err, errlen))
        return -1;
    o->init.forget_bias = (float)forget;
    if (get_num(root, "batch_size", "", 1, 65536, 32, &v, err, errlen))
        return -1;
    o->batch = (int)v;
    if (get_num(root, "bptt", "", 1, 1 << 20, 128, &v, err, errlen))
        return -1;
    o->bptt = (int)v;
    if (get_num(root, "epochs", "", 0, 1e6, 1, &o->epochs, err, errlen) ||
        get_num(root, "steps", "", 0, 1e12, 0, &v, err, errlen))
        return -1;
    o->steps = (long)v;
    if (get_num(root, "dropout", "", 0, 0.99, 0, &v, err, errlen))
        return -1;
    o->dropout = (float)v;
    if (get_num(root, "dropout_embed", "", 0, 0.99, 0, &v, err, errlen))
        return -1;
    o->dropout_embed = (float)v;
    if (get_num(root, "state_reset", "", 0, 1, 0, &o->state_reset, err, errlen))
        return -1;
    if (get_num(root, "seed", "", 0, 9007199254740991.0, 1, &v, err, errlen))
        return -1;
    o->seed = (unsigned long long)v;
    if (get_num(root, "valid_every", "", 0, 1e12, 0, &v, err, errlen))
        return -1;
    o->valid_every = (long)v;
    if (get_num(root, "checkpoint_every", "", 0, 1e12, 0, &v, err, errlen))
        return -1;
    o->checkpoint_every = (long)v;
    if (get_num(root, "log_every", "", 1, 1e12, 50, &v, err, errlen) ||
        get_bool(root, "keep_best", "", 0, &o->keep_best, err, errlen))
        return -1;
    o->log_every = (long)v;
    const cJSON *out = field(root, "out");
    if (!cJSON_IsString(out) || !strstr(out->valuestring, ".safetensors"))
        return error_fmt(err, errlen, "config: \"out\" must be the path of the weight file to write (NAME.safetensors)");
    o->out = out->valuestring;
    const cJSON *from = field(root, "init_from");
    if (from && !cJSON_IsString(from))
        return error_fmt(err, errlen, "config: \"init_from\" must be the path of a weight file");
    o->init_from = from ? from->valuestring : NULL;
    const cJSON *dev = field(root, "device");
    o->device = DEVICE_CPU;
    if (dev && !(cJSON_IsString(dev) && backend_device_parse(dev->valuestring, &o->device) == 0))
        return error_fmt(err, errlen, "config: \"device\" must be \"cpu\", \"cuda\" or \"auto\"");
    const cJSON *prec = field(root, "precision");
    o->precision = PRECISION_FP32;
    if (prec && !(cJSON_IsString(prec) && backend_precision_parse(prec->valuestring, &o->precision) == 0))
        return error_fmt(err, errlen, "config: \"precision\" must be \"fp32\", \"tf32\" or \"bf16\"");
    const cJSON *rec = field(root, "recurrence");
    o->recurrence = RECURRENCE_GEMM;
    if (rec && !(cJSON_IsString(rec) && backend_recurrence_parse(rec->valuestring, &o->recurrence) == 0))
        return error_fmt(err, errlen, "config: \"recurrence\" must be \"gemm\" or \"fused\"");
    return 0;
}

/* ---- 2. Data and vocabulary. */

/* The training text a vocabulary is built from: the corpus of a language
 * model; the texts of a classifier's training part, read with a byte
 * tokenizer so the same loader and split rule apply (validation and test
 * lines never shape the vocabulary). */
static int vocab_text(const struct options *o, const cJSON *model, char **text, size_t *len, char *err,
                      size_t errlen)
{
    const cJSON *task = field(model, "task");
    if (!cJSON_IsString(task) || strcmp(task->valuestring, "classify") != 0)
        return corpus_read((const char *const *)o->train, o->n_train, text, len, err, errlen);
    const cJSON *classes = field(model, "classes");
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
    const cJSON *type = field(tok, "type");
    if (!cJSON_IsString(type) || field(tok, "tokens"))
        return 0;
    int word = strcmp(type->valuestring, "word") == 0;
    if (!word && strcmp(type->valuestring, "char") != 0)
        return 0;
    const cJSON *vocab = field(o->root, "vocab");
    double max_size, min_count;
    if (get_num(vocab, "max_size", "vocab.", 2, CONFIG_MAX_VOCAB, 20000, &max_size, err, errlen) ||
        get_num(vocab, "min_count", "vocab.", 1, 1e9, 1, &min_count, err, errlen))
        return -1;
    char *text, **tokens;
    size_t len;
    int n;
    if (vocab_text(o, model, &text, &len, err, errlen))
        return -1;
    int rc = word ? tokenizer_word_vocab(text, len, (int)max_size, (int)min_count, &tokens, &n)
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

struct run {
    struct options o;
    struct model model;
    struct tokenizer tk;
    struct backend *be;
    /* The engine holds the weights that training changes, their gradients
     * and the optimizer's state; model.arena is brought up to date from it
     * only to be saved (sync_weights). */
    struct engine *e;
    /* lm */
    struct corpus train_c, valid_c;
    struct lm_windows win;
    int32_t *window;            /* [B][bptt + 1] */
    int *slots;
    /* classify */
    struct dataset train_d, valid_d;
    int *order, *batch_start, n_batches, next_batch;
    struct rng rng, epoch_rng;
    long step, total_steps, epoch;
    const char *resume;        /* checkpoint to continue from, or NULL */
    struct curve curve;
    char csv[4096], svg[4096];
    float *best;               /* keep_best: the weights at the best validation */
    double loss_sum;           /* training loss since the last curve point */
    long loss_count, tokens;
    double norm_sum;           /* the gradients' norms since then, of norm_steps steps */
    long norm_steps;
    struct curve_point best_at;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int is_lm(const struct run *r)
{
    return r->model.cfg.task == TASK_LM;
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

static int open_data(struct run *r, char *err, size_t errlen)
{
    const struct options *o = &r->o;
    if (is_lm(r)) {
        if (corpus_load((const char *const *)o->train, o->n_train, &r->tk, &r->train_c, err, errlen) ||
            (o->n_valid && corpus_load((const char *const *)o->valid, o->n_valid, &r->tk, &r->valid_c, err, errlen)) ||
            lm_windows_init(&r->win, &r->train_c, o->batch, o->bptt, o->seed, err, errlen))
            return -1;
        r->window = malloc(sizeof(int32_t) * (size_t)o->batch * (o->bptt + 1));
        r->slots = malloc(sizeof(int) * (size_t)o->batch);
        if (!r->window || !r->slots)
            return error_fmt(err, errlen, "out of memory");
        for (int i = 0; i < o->batch; i++)
            r->slots[i] = -1;
        long per_epoch = lm_windows_per_epoch(&r->win);
        r->total_steps = o->steps ? o->steps : (long)ceil(o->epochs * (double)per_epoch);
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
    long per_epoch = (r->train_d.n + o->batch - 1) / o->batch;
    r->total_steps = o->steps ? o->steps : (long)ceil(o->epochs * (double)per_epoch);
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
    if (is_lm(r)) {
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
    if (is_lm(r)) {
        if (!r->valid_c.n)
            return 0;
        const int32_t *toks[1] = {r->valid_c.ids};
        int lens[1] = {(int)r->valid_c.n};
        double lp;
        if (engine_score(r->e, toks, lens, 1, &lp, err, errlen))
            return -1;
        *loss = -lp / (double)(r->valid_c.n - 1);
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

/* The weight file, with its training configuration and results. */
static int save_model(struct run *r, const char *path, const struct curve_point *last, char *err, size_t errlen)
{
    char *config = cJSON_PrintUnformatted(r->o.root);
    char results[512];
    snprintf(results, sizeof results,
             "{\"steps\": %ld, \"epochs\": %.3f, \"train_loss\": %.6g, \"valid_loss\": %.6g, \"valid_%s\": %.6g}",
             r->step, last ? last->epoch : 0.0, last ? last->train_loss : NAN, last ? last->valid_loss : NAN,
             r->curve.metric_name, last ? last->valid_metric : NAN);
    /* JSON has no NaN: a metric never measured is null. */
    for (char *p; (p = strstr(results, "nan"));)
        memcpy(p, "null", 3), memmove(p + 4, p + 3, strlen(p + 3) + 1), p[3] = 'l';
    struct st_meta meta[] = {{"training_config", config}, {"training_results", results}};
    int rc = config ? model_save(&r->model, path, meta, 2, err, errlen) : error_fmt(err, errlen, "out of memory");
    free(config);
    return rc;
}

/* ---- Checkpoints: the weights as a weight file (with the training state
 * in its metadata), and beside it NAME.state holding the optimizer's
 * moments, the streams' carried states and the best weights so far.  A run
 * resumed from one continues exactly as the uninterrupted run would. */

static cJSON *rng_json(const struct rng *g)
{
    char buf[4][17];
    const char *s[4];
    for (int i = 0; i < 4; i++) {
        snprintf(buf[i], sizeof buf[i], "%016llx", (unsigned long long)g->s[i]);
        s[i] = buf[i];
    }
    return cJSON_CreateStringArray(s, 4);
}

static int rng_from_json(const cJSON *a, struct rng *g)
{
    for (int i = 0; i < 4; i++) {
        const cJSON *x = cJSON_GetArrayItem(a, i);
        if (!cJSON_IsString(x))
            return -1;
        g->s[i] = strtoull(x->valuestring, NULL, 16);
    }
    return 0;
}

/* Doubles as C99 hex floats ("%a"): JSON numbers as cJSON prints them
 * lose the last bits, and a resumed run should report what the whole run
 * would have. */
static cJSON *doubles_json(const double *v, int n)
{
    char buf[16][40];
    const char *s[16];
    for (int i = 0; i < n && i < 16; i++) {
        snprintf(buf[i], sizeof buf[i], "%a", v[i]);
        s[i] = buf[i];
    }
    return cJSON_CreateStringArray(s, n);
}

static void doubles_from_json(const cJSON *a, double *v, int n)
{
    for (int i = 0; i < n; i++) {
        const cJSON *x = cJSON_GetArrayItem(a, i);
        v[i] = cJSON_IsString(x) ? strtod(x->valuestring, NULL) : NAN;
    }
}

static cJSON *point_json(const struct curve_point *p)
{
    const double v[8] = {(double)p->step, p->epoch, p->train_loss, p->valid_loss, p->valid_metric, p->lr,
                         p->tokens_per_s, p->grad_norm};
    return doubles_json(v, 8);
}

/* A checkpoint's point; one from before the gradients' norm was kept has
 * none (NAN). */
static void point_from_json(const cJSON *a, struct curve_point *p)
{
    double v[8];
    doubles_from_json(a, v, 8);
    *p = (struct curve_point){(long)v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
}

static char *state_path(const char *ckpt)
{
    size_t n = strlen(ckpt) + 7;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s.state", ckpt);
    return p;
}

/* Floats of the optimizer's state: its arrays of one float a parameter. */
static size_t optim_len(const struct run *r)
{
    return (size_t)optim_state_arrays(r->o.optim.kind, r->o.optim.momentum) * r->model.n_params;
}

/* model.arena made the weights the engine has trained, for saving. */
static int sync_weights(struct run *r, char *err, size_t errlen)
{
    if (engine_params_to_host(r->e, r->model.arena) != 0)
        return error_fmt(err, errlen, "cannot read the weights back from the %s backend: %s", r->be->ops->name,
                         r->be->err);
    return 0;
}

static int save_checkpoint(struct run *r, const char *path, char *err, size_t errlen)
{
    const size_t n_params = r->model.n_params, slot_len = is_lm(r) ? engine_slot_state_len(r->e) : 0;
    const size_t moments_len = optim_len(r);
    cJSON *st = cJSON_CreateObject(), *curve = cJSON_CreateArray(), *slot_pos = cJSON_CreateArray();
    float *slots = slot_len ? malloc(sizeof(float) * slot_len * r->o.batch) : NULL;
    float *moments = moments_len ? malloc(sizeof(float) * moments_len) : NULL;
    char *path2 = state_path(path), *json = NULL;
    int rc = st && curve && slot_pos && path2 && (!slot_len || slots) && (!moments_len || moments)
                 ? 0
                 : error_fmt(err, errlen, "out of memory");
    if (rc == 0)
        rc = sync_weights(r, err, errlen);
    if (rc == 0 && engine_optim_state_to_host(r->e, moments, moments_len) != 0)
        rc = error_fmt(err, errlen, "cannot read the optimizer's state back from the %s backend: %s",
                       r->be->ops->name, r->be->err[0] ? r->be->err : "out of memory");
    for (int i = 0; rc == 0 && i < r->curve.n; i++)
        cJSON_AddItemToArray(curve, point_json(&r->curve.p[i]));
    for (int i = 0; rc == 0 && slot_len && i < r->o.batch; i++) {
        cJSON_AddItemToArray(slot_pos, cJSON_CreateNumber(engine_slot_position(r->e, r->slots[i])));
        if (engine_slot_save(r->e, r->slots[i], slots + (size_t)i * slot_len))
            rc = error_fmt(err, errlen, "cannot read a stream's state back from the backend");
    }
    if (rc == 0) {
        cJSON_AddNumberToObject(st, "step", (double)r->step);
        cJSON_AddNumberToObject(st, "epoch", (double)r->epoch);
        cJSON_AddItemToObject(st, "rng", rng_json(&r->epoch_rng));
        cJSON_AddNumberToObject(st, "next_batch", r->next_batch);
        const double acc[5] = {r->loss_sum, (double)r->loss_count, (double)r->tokens, r->norm_sum,
                               (double)r->norm_steps};
        cJSON_AddItemToObject(st, "since_last_point", doubles_json(acc, 5));
        cJSON_AddItemToObject(st, "curve", curve);
        cJSON_AddItemToObject(st, "slot_pos", slot_pos);
        curve = slot_pos = NULL;
        if (r->best)
            cJSON_AddItemToObject(st, "best", point_json(&r->best_at));
        if (is_lm(r)) {
            cJSON *w = cJSON_AddObjectToObject(st, "windows");
            double *start = malloc(sizeof(double) * (size_t)r->o.batch);
            for (int i = 0; start && i < r->o.batch; i++)
                start[i] = (double)r->win.start[i];
            if (!w || !start)
                rc = error_fmt(err, errlen, "out of memory");
            else {
                cJSON_AddNumberToObject(w, "pos", (double)r->win.pos);
                cJSON_AddNumberToObject(w, "epoch", (double)r->win.epoch);
                cJSON_AddItemToObject(w, "rng", rng_json(&r->win.rng));
                cJSON_AddItemToObject(w, "start", cJSON_CreateDoubleArray(start, r->o.batch));
            }
            free(start);
        }
        json = cJSON_PrintUnformatted(st);
        if (!json)
            rc = error_fmt(err, errlen, "out of memory");
    }
    if (rc == 0) {
        struct st_write_tensor t[3];
        int nt = 0;
        t[nt++] = (struct st_write_tensor){"optim", 1, {(int64_t)moments_len}, moments};
        if (slot_len)
            t[nt++] = (struct st_write_tensor){"slots", 2, {r->o.batch, (int64_t)slot_len}, slots};
        if (r->best)
            t[nt++] = (struct st_write_tensor){"best", 1, {(int64_t)n_params}, r->best};
        struct st_meta meta[] = {{"training_state", json}};
        /* The state first: a weight file next to an older state would
         * resume wrongly, a state next to an older weight file cannot be
         * found without it. */
        rc = st_write(path2, t, nt, meta, 1, err, errlen);
        if (rc == 0) {
            char *config = cJSON_PrintUnformatted(r->o.root);
            struct st_meta mm[] = {{"training_config", config}, {"training_state", json}};
            rc = config ? model_save(&r->model, path, mm, 2, err, errlen) : error_fmt(err, errlen, "out of memory");
            free(config);
        }
    }
    cJSON_Delete(st);
    cJSON_Delete(curve);
    cJSON_Delete(slot_pos);
    free(json);
    free(slots);
    free(moments);
    free(path2);
    return rc;
}

/* After the data and optimizer are set up: put back what the checkpoint
 * holds beyond the weights. */
static int restore_checkpoint(struct run *r, char *err, size_t errlen)
{
    char *path2 = state_path(r->resume), why[512];
    struct st_file f;
    if (!path2 || st_open(path2, &f, why, sizeof why)) {
        error_fmt(err, errlen, "%s: %s", path2 ? path2 : r->resume, path2 ? why : "out of memory");
        free(path2);
        return -1;
    }
    free(path2);
    cJSON *st = cJSON_Parse(st_meta_get(&f, "training_state"));
    const struct st_tensor *optim = st_find(&f, "optim"), *slots = st_find(&f, "slots"), *best = st_find(&f, "best");
    const size_t slot_len = is_lm(r) ? engine_slot_state_len(r->e) : 0;
    int rc = st && optim && (size_t)optim->numel == optim_len(r) &&
                     (!slot_len || (slots && (size_t)slots->numel == slot_len * r->o.batch)) &&
                     (!best || (size_t)best->numel == r->model.n_params)
                 ? 0
                 : error_fmt(err, errlen, "%s.state does not match this run (another model or batch size?)", r->resume);
    float *moments = rc == 0 && optim->numel ? malloc(sizeof(float) * optim_len(r)) : NULL;
    if (rc == 0 && optim->numel && !moments)
        rc = error_fmt(err, errlen, "out of memory");
    if (rc == 0) {
        st_to_f32(optim, moments);
        if (engine_optim_state_from_host(r->e, moments, optim_len(r)) != 0)
            rc = error_fmt(err, errlen, "cannot put the optimizer's state on the %s backend: %s", r->be->ops->name,
                           r->be->err[0] ? r->be->err : "out of memory");
        r->step = (long)cJSON_GetObjectItem(st, "step")->valuedouble;
        r->epoch = (long)cJSON_GetObjectItem(st, "epoch")->valuedouble;
        r->next_batch = (int)cJSON_GetObjectItem(st, "next_batch")->valuedouble;
        double acc[5];
        doubles_from_json(cJSON_GetObjectItem(st, "since_last_point"), acc, 5);
        r->loss_sum = acc[0];
        r->loss_count = (long)acc[1];
        r->tokens = (long)acc[2];
        /* A checkpoint from before the norms were kept has none. */
        r->norm_sum = isnan(acc[3]) ? 0.0 : acc[3];
        r->norm_steps = isnan(acc[4]) ? 0 : (long)acc[4];
        const cJSON *p;
        cJSON_ArrayForEach(p, cJSON_GetObjectItem(st, "curve"))
        {
            struct curve_point pt;
            point_from_json(p, &pt);
            if (curve_add(&r->curve, &pt))
                rc = error_fmt(err, errlen, "out of memory");
        }
        if (best && rc == 0) {
            if (!(r->best = malloc(sizeof(float) * r->model.n_params)))
                rc = error_fmt(err, errlen, "out of memory");
            else
                st_to_f32(best, r->best);
            point_from_json(cJSON_GetObjectItem(st, "best"), &r->best_at);
        }
        if (rng_from_json(cJSON_GetObjectItem(st, "rng"), &r->epoch_rng))
            rc = error_fmt(err, errlen, "%s: bad training_state", r->resume);
    }
    if (rc == 0 && !is_lm(r) && r->next_batch > 0) {
        /* Redraw this epoch's order from the generator as it was. */
        r->rng = r->epoch_rng;
        if (bucket_batches(&r->train_d, r->o.batch, &r->rng, r->order, r->batch_start, &r->n_batches))
            rc = error_fmt(err, errlen, "out of memory");
    }
    if (rc == 0 && is_lm(r)) {
        const cJSON *w = cJSON_GetObjectItem(st, "windows"), *pos = cJSON_GetObjectItem(st, "slot_pos");
        float *all = malloc(sizeof(float) * slot_len * r->o.batch);
        if (!all || !w || rng_from_json(cJSON_GetObjectItem(w, "rng"), &r->win.rng))
            rc = error_fmt(err, errlen, "%s: bad training_state", r->resume);
        else {
            st_to_f32(slots, all);
            r->win.pos = (size_t)cJSON_GetObjectItem(w, "pos")->valuedouble;
            r->win.epoch = (long)cJSON_GetObjectItem(w, "epoch")->valuedouble;
            for (int i = 0; i < r->o.batch; i++) {
                r->win.start[i] = (size_t)cJSON_GetArrayItem(cJSON_GetObjectItem(w, "start"), i)->valuedouble;
                r->slots[i] = engine_slot_open(r->e);
                if (engine_slot_restore(r->e, r->slots[i], all + (size_t)i * slot_len,
                                        (int)cJSON_GetArrayItem(pos, i)->valuedouble))
                    rc = error_fmt(err, errlen, "cannot restore a stream's state");
            }
        }
        free(all);
    }
    free(moments);
    cJSON_Delete(st);
    st_close(&f);
    if (rc == 0)
        fprintf(stderr, "resuming %s at step %ld\n", r->resume, r->step);
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
    free(r->o.train);
    free(r->o.valid);
}

static int train(struct run *r, char *err, size_t errlen)
{
    struct options *o = &r->o;
    /* 3. The model. */
    struct model_config cfg;
    char *model_json = cJSON_PrintUnformatted(field(o->root, "model"));
    if (!model_json)
        return error_fmt(err, errlen, "out of memory");
    int rc = config_parse(model_json, &cfg, err, errlen);
    free(model_json);
    if (rc)
        return -1;
    if (r->resume || o->init_from) {
        /* Continue a run, or fine-tune the weights of another with the same
         * architecture and vocabulary. */
        const char *from = r->resume ? r->resume : o->init_from;
        char *want = config_to_json(&cfg), *have = NULL;
        config_free(&cfg);
        if (model_load(from, &r->model, err, errlen)) {
            free(want);
            return -1;
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
    int slots = is_lm(r) ? o->batch + 1 : 0;
    if (!(r->e = engine_create(&r->model, r->be, slots, err, errlen)))
        return -1;
    rng_seed(&r->rng, o->seed);
    if (open_data(r, err, errlen))
        return -1;
    o->optim.total_steps = r->total_steps;
    if (r->resume && restore_checkpoint(r, err, errlen))
        return -1;
    r->curve.metric_name = is_lm(r) ? "bpc" : r->model.cfg.task == TASK_REGRESS ? "mse" : "accuracy";
    snprintf(r->csv, sizeof r->csv, "%.*s.csv", (int)(strlen(o->out) - strlen(".safetensors")), o->out);
    snprintf(r->svg, sizeof r->svg, "%.*s.svg", (int)(strlen(o->out) - strlen(".safetensors")), o->out);
    /* The device "auto" chose, the precision when it is not FP32 and the
     * recurrence when fused. */
    char where[48];
    backend_describe(r->be->ops->name, o->precision, o->recurrence, where, sizeof where);
    fprintf(stderr, "training %s on %s: %zu parameters, %ld steps of %d %s\n", o->out, where, r->model.n_params,
            r->total_steps, o->batch, is_lm(r) ? "windows" : "texts");

    /* 4. The loop. */
    const int tty = isatty(STDERR_FILENO);
    double start = now(), since = start;
    struct curve_point last = {0};
    last.valid_loss = last.valid_metric = NAN;
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
        if (o->checkpoint_every && r->step % o->checkpoint_every == 0 && r->step < r->total_steps) {
            char ckpt[4200];
            snprintf(ckpt, sizeof ckpt, "%.*s.ckpt.safetensors", (int)(strlen(o->out) - strlen(".safetensors")), o->out);
            if (save_checkpoint(r, ckpt, err, errlen) ||
                curve_write_csv(&r->curve, r->csv, err, errlen))
                return -1;
        }
        if (!log_now && !valid_now)
            continue;
        double t = now();
        struct curve_point pt = {
            .step = r->step,
            .epoch = (double)r->step * o->batch / (is_lm(r) ? (double)lm_windows_per_epoch(&r->win) * o->batch
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
    if (tty)
        fputc('\n', stderr);
    /* 5. The results. */
    if (r->best) {
        memcpy(r->model.arena, r->best, sizeof(float) * r->model.n_params);
        last = r->best_at;
        fprintf(stderr, "keeping the weights of step %ld (validation %s %.4f)\n", last.step, r->curve.metric_name,
                last.valid_metric);
    } else if (sync_weights(r, err, errlen) != 0) {
        return -1;
    }
    if (save_model(r, o->out, &last, err, errlen) || curve_write_csv(&r->curve, r->csv, err, errlen) ||
        curve_write_svg(&r->curve, r->svg, o->out, err, errlen))
        return -1;
    fprintf(stderr, "wrote %s, %s, %s (%.0f s)\n", o->out, r->csv, r->svg, now() - start);
    return 0;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: rrnserve train (--config FILE.json | --resume NAME.ckpt.safetensors) [--KEY VALUE ...]\n"
                 "  every key of the config can be given as a flag: --optim.lr 0.001, --epochs 3,\n"
                 "  --model.hidden 256; a flag's value is read as JSON, else as a string.\n"
                 "  See docs/training.md for the configuration.\n");
}

/* The configuration a checkpoint was made with. */
static cJSON *checkpoint_config(const char *path)
{
    char err[512];
    struct st_file f;
    if (st_open(path, &f, err, sizeof err)) {
        fprintf(stderr, "rrnserve train: %s: %s\n", path, err);
        return NULL;
    }
    const char *config = st_meta_get(&f, "training_config");
    cJSON *root = config ? cJSON_Parse(config) : NULL;
    if (!root)
        fprintf(stderr, "rrnserve train: %s has no training configuration (not a checkpoint?)\n", path);
    st_close(&f);
    return root;
}

static cJSON *file_config(const char *path)
{
    FILE *f = fopen(path, "rb");
    char *text = NULL;
    if (f) {
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        text = size >= 0 ? malloc((size_t)size + 1) : NULL;
        size_t len = text ? fread(text, 1, (size_t)size, f) : 0;
        if (text)
            text[len] = 0;
        fclose(f);
    }
    if (!text) {
        fprintf(stderr, "rrnserve train: cannot read %s\n", path);
        return NULL;
    }
    cJSON *root = cJSON_Parse(text);
    if (!root || !cJSON_IsObject(root))
        fprintf(stderr, "rrnserve train: %s: not a JSON object (near byte %ld)\n", path,
                root ? 0L : (long)(cJSON_GetErrorPtr() - text));
    free(text);
    if (root && !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        root = NULL;
    }
    return root;
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
    cJSON *root = resume ? checkpoint_config(resume) : file_config(config_path);
    if (!root)
        return 1;
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
        if (set_path(root, name, value, err, sizeof err)) {
            fprintf(stderr, "rrnserve train: %s\n", err);
            status = 2;
        }
    }
    struct run r;
    memset(&r, 0, sizeof r);
    r.resume = resume;
    if (status == 0 && (parse_options(root, &r.o, err, sizeof err) || complete_vocab(&r.o, err, sizeof err) ||
                        train(&r, err, sizeof err))) {
        fprintf(stderr, "rrnserve train: %s\n", err);
        status = 1;
    }
    run_free(&r);
    cJSON_Delete(root);
    return status;
}
