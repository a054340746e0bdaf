/* options.c - a training run's configuration read and checked (see
 * options.h and docs/training.md). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "error.h"
#include "options.h"
#include "safetensors.h"

cJSON *options_read_checkpoint(const char *path, char *err, size_t errlen)
{
    struct st_file f;
    char why[512];
    if (st_open(path, &f, why, sizeof why)) {
        error_fmt(err, errlen, "%s: %s", path, why);
        return NULL;
    }
    const char *config = st_meta_get(&f, "training_config");
    cJSON *root = config ? cJSON_ParseWithOpts(config, NULL, 1) : NULL;
    if (!cJSON_IsObject(root)) {
        error_fmt(err, errlen, "%s has no training configuration (not a checkpoint?)", path);
        cJSON_Delete(root);
        root = NULL;
    }
    st_close(&f);
    return root;
}

cJSON *options_read_file(const char *path, char *err, size_t errlen)
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
        error_fmt(err, errlen, "cannot read %s", path);
        return NULL;
    }
    cJSON *root = cJSON_ParseWithOpts(text, NULL, 1);
    if (!cJSON_IsObject(root)) {
        error_fmt(err, errlen, "%s: not a JSON object (near byte %ld)", path,
                  root ? 0L : (long)(cJSON_GetErrorPtr() - text));
        cJSON_Delete(root);
        root = NULL;
    }
    free(text);
    return root;
}

void options_free(struct options *o)
{
    free(o->train);
    free(o->valid);
    o->train = o->valid = NULL;
}

/* The keys each object of a configuration may have (the model's own are
 * the engine's to check), so that a mistyped key, in the file or as a
 * flag, is refused rather than silently left at its default. */
static const char *const top_keys[] = {"model", "data", "optim", "init", "vocab", "batch_size", "bptt", "epochs",
                                       "steps", "dropout", "dropout_embed", "state_reset", "seed", "valid_every",
                                       "checkpoint_every", "log_every", "keep_best", "init_from", "out", "device",
                                       "precision", "recurrence"};
static const char *const data_keys[] = {"train", "valid", "split", "synthetic", "length", "dim", "train_size",
                                        "valid_size"};
static const char *const split_keys[] = {"mod", "test", "valid"};
static const char *const optim_keys[] = {"name", "lr", "momentum", "beta1", "beta2", "alpha", "rho", "eps",
                                         "weight_decay", "clip_norm", "min_lr", "step_gamma", "warmup_steps",
                                         "step_every", "nesterov", "decay"};
static const char *const init_keys[] = {"orthogonal", "forget_bias"};
static const char *const vocab_keys[] = {"max_size", "min_count"};
struct section {
    const char *path; /* dotted, "" for the top */
    const char *const *keys;
    int n_keys;
};
#define SECTION(path, keys) {path, keys, (int)(sizeof keys / sizeof keys[0])}
static const struct section sections[] = {
    SECTION("", top_keys),        SECTION("data", data_keys), SECTION("data.split", split_keys),
    SECTION("optim", optim_keys), SECTION("init", init_keys), SECTION("vocab", vocab_keys),
};
#undef SECTION

static int is_key(const struct section *sec, const char *name)
{
    for (int i = 0; i < sec->n_keys; i++)
        if (strcmp(sec->keys[i], name) == 0)
            return 1;
    return 0;
}

/* The section at the dotted path (its first len bytes), or NULL when that
 * object's keys are not the options' to check. */
static const struct section *section_at(const char *path, size_t len)
{
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++)
        if (strlen(sections[i].path) == len && strncmp(sections[i].path, path, len) == 0)
            return &sections[i];
    return NULL;
}

int options_set(cJSON *root, const char *path, const char *value, char *err, size_t errlen)
{
    /* Each part of the path must be a key of the section it is in, as far
     * as the path runs through sections ("model." hands over to the engine). */
    char key[256];
    const struct section *sec = &sections[0];
    for (size_t at = 0; sec; at++) {
        size_t len = strcspn(path + at, ".");
        snprintf(key, sizeof key, "%.*s", (int)len, path + at);
        if (!is_key(sec, key))
            return error_fmt(err, errlen, "unknown key \"%.*s\" (the flag --%s)", (int)(at + len), path, path);
        at += len;
        sec = path[at] ? section_at(path, at) : NULL;
    }
    cJSON *obj = root;
    const char *name = path, *dot;
    while ((dot = strchr(name, '.'))) {
        snprintf(key, sizeof key, "%.*s", (int)(dot - name), name);
        cJSON *next = cJSON_GetObjectItemCaseSensitive(obj, key);
        if (!next) {
            next = cJSON_AddObjectToObject(obj, key);
        } else if (!cJSON_IsObject(next)) {
            return error_fmt(err, errlen, "--%s: \"%.*s\" is not an object in the config", path,
                             (int)(dot - path), path);
        }
        if (!next)
            return error_fmt(err, errlen, "out of memory");
        obj = next;
        name = dot + 1;
    }
    /* JSON only when the whole value is: a path that begins as JSON
     * (nullius.txt, 2024-emma.txt) or a count with a unit is a string. */
    cJSON *v = cJSON_ParseWithOpts(value, NULL, 1);
    if (!v)
        v = cJSON_CreateString(value);
    if (!v)
        return error_fmt(err, errlen, "out of memory");
    /* null takes the key out, back to its default: the one way to undo a
     * key of a checkpoint's configuration. */
    if (cJSON_IsNull(v)) {
        cJSON_Delete(v);
        cJSON_DeleteItemFromObjectCaseSensitive(obj, name);
        return 0;
    }
    int put = cJSON_GetObjectItemCaseSensitive(obj, name) ? cJSON_ReplaceItemInObjectCaseSensitive(obj, name, v)
                                                           : cJSON_AddItemToObject(obj, name, v);
    if (!put) {
        cJSON_Delete(v);
        return error_fmt(err, errlen, "out of memory");
    }
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

/* The same for a count: a number with a fraction is refused, not cut. */
static int get_int(const cJSON *o, const char *name, const char *where, double lo, double hi, double dflt,
                   double *out, char *err, size_t errlen)
{
    if (get_num(o, name, where, lo, hi, dflt, out, err, errlen))
        return -1;
    if (*out != floor(*out))
        return error_fmt(err, errlen, "config: \"%s%s\" must be a whole number", where, name);
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
        if ((nums[i].f ? get_num : get_int)(o, nums[i].key, "optim.", nums[i].lo, nums[i].hi, dflt, &v, err, errlen))
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
    return 0;
}

/* The value at a dotted path, NULL where some part of it is not there. */
static const cJSON *at_path(const cJSON *root, const char *path)
{
    const cJSON *o = root;
    while (*path && o) {
        size_t len = strcspn(path, ".");
        char key[64];
        snprintf(key, sizeof key, "%.*s", (int)len, path);
        o = cJSON_IsObject(o) ? field(o, key) : NULL;
        path += len + (path[len] == '.');
    }
    return o;
}

/* Each section that is there is an object with none but its own keys,
 * each once. */
static int check_sections(const cJSON *root, char *err, size_t errlen)
{
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++) {
        const char *path = sections[i].path;
        const cJSON *o = at_path(root, path);
        char prefix[32];
        snprintf(prefix, sizeof prefix, "%s%s", path, *path ? "." : "");
        if (o && !cJSON_IsObject(o))
            return error_fmt(err, errlen, "config: \"%s\" must be an object", path);
        if (o && config_check_keys(o, prefix, sections[i].keys, sections[i].n_keys, err, errlen))
            return -1;
    }
    return 0;
}

int options_parse(cJSON *root, struct options *o, char *err, size_t errlen)
{
    if (check_sections(root, err, errlen))
        return -1;
    memset(o, 0, sizeof *o);
    o->root = root;
    if (!cJSON_IsObject(field(root, "model")))
        return error_fmt(err, errlen, "config: \"model\" (the model's MODELS.md config) is required");
    const cJSON *data = field(root, "data");
    if (!cJSON_IsObject(data))
        return error_fmt(err, errlen, "config: \"data\" is required: {\"train\": [paths], ...}");
    const cJSON *synth = field(data, "synthetic");
    /* A key that the other kind of data would read is refused, not left
     * unread: a split that splits nothing trains on the lines it was to
     * hold out. */
    static const char *const files_only[] = {"train", "valid", "split", NULL};
    static const char *const synthetic_only[] = {"length", "dim", "train_size", "valid_size", NULL};
    for (const char *const *k = synth ? files_only : synthetic_only; *k; k++)
        if (field(data, *k))
            return error_fmt(err, errlen, "config: \"data.%s\" %s \"data.synthetic\"", *k,
                             synth ? "does not go with" : "goes only with");
    if (synth) {
        /* The papers' synthetic tasks, generated from the seed. */
        o->synthetic = cJSON_IsString(synth) && strcmp(synth->valuestring, "adding") == 0     ? SYNTH_ADDING
                       : cJSON_IsString(synth) && strcmp(synth->valuestring, "remember") == 0 ? SYNTH_REMEMBER
                                                                                              : SYNTH_NONE;
        if (!o->synthetic)
            return error_fmt(err, errlen, "config: \"data.synthetic\" must be \"adding\" or \"remember\"");
        double len, dim, n_train, n_valid;
        if (get_int(data, "length", "data.", 2, 100000, 100, &len, err, errlen) ||
            get_int(data, "dim", "data.", 1, 4096, 6, &dim, err, errlen) ||
            get_int(data, "train_size", "data.", 1, 1e7, 10000, &n_train, err, errlen) ||
            get_int(data, "valid_size", "data.", 1, 1e7, 1000, &n_valid, err, errlen))
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
    if (split && !field(split, "mod"))
        return error_fmt(err, errlen, "config: \"data.split.mod\" is required: without it nothing is split");
    if (split && (get_int(split, "mod", "data.split.", 1, 1e6, 0, &mod, err, errlen) ||
                  get_int(split, "test", "data.split.", 0, 1e6, 0, &test, err, errlen) ||
                  get_int(split, "valid", "data.split.", 0, 1e6, 1, &valid, err, errlen)))
        return -1;
    /* A part at mod or past it holds no line, and a test part that is also
     * the validation part is one the run looks at. */
    if (split && (test >= mod || valid >= mod || test == valid))
        return error_fmt(err, errlen, "config: \"data.split\"'s test and valid must be two remainders of mod: "
                                      "different, from 0 to mod - 1");
    o->split = (struct split){(int)mod, (int)test, (int)valid};
    if (parse_optim(field(root, "optim"), &o->optim, err, errlen))
        return -1;
    const cJSON *init = field(root, "init");
    double forget = 1.0, v;
    if (get_bool(init, "orthogonal", "init.", 1, &o->init.orthogonal, err, errlen) ||
        get_num(init, "forget_bias", "init.", -100, 100, 1.0, &forget, err, errlen))
        return -1;
    o->init.forget_bias = (float)forget;
    const cJSON *vocab = field(root, "vocab");
    double max_size, min_count;
    if (get_int(vocab, "max_size", "vocab.", 2, CONFIG_MAX_VOCAB, 20000, &max_size, err, errlen) ||
        get_int(vocab, "min_count", "vocab.", 1, 1e9, 1, &min_count, err, errlen))
        return -1;
    o->vocab_max_size = (int)max_size;
    o->vocab_min_count = (int)min_count;
    if (get_int(root, "batch_size", "", 1, 65536, 32, &v, err, errlen))
        return -1;
    o->batch = (int)v;
    if (get_int(root, "bptt", "", 1, 1 << 20, 128, &v, err, errlen))
        return -1;
    o->bptt = (int)v;
    if (get_num(root, "epochs", "", 0, 1e6, 1, &o->epochs, err, errlen) ||
        get_int(root, "steps", "", 0, 1e12, -1, &v, err, errlen))
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
    if (get_int(root, "seed", "", 0, 9007199254740991.0, 1, &v, err, errlen))
        return -1;
    o->seed = (unsigned long long)v;
    if (get_int(root, "valid_every", "", 0, 1e12, 0, &v, err, errlen))
        return -1;
    o->valid_every = (long)v;
    if (get_int(root, "checkpoint_every", "", 0, 1e12, 0, &v, err, errlen))
        return -1;
    o->checkpoint_every = (long)v;
    if (get_int(root, "log_every", "", 1, 1e12, 50, &v, err, errlen) ||
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
