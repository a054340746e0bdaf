/* config.c - the "config" metadata of a weight file: parsing, checking,
 * writing back, and the sizes derived from it.
 *
 * The parser is deliberately strict.  A config decides which tensors a file
 * must hold and how they are combined, so a misspelt key or a value of the
 * wrong type must be an error naming the field, never a silent fallback to
 * a default that would run a different model than the one trained.
 */
#include "error.h"
#include "config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistr.h>

static const char *const task_names[] = {"classify", "lm", "regress"};
static const char *const cell_names[] = {"rnn_tanh", "rnn_relu", "lstm", "gru"};
static const char *const pool_names[] = {"last", "mean"};
static const char *const mode_names[] = {"static", "dynamic"}; /* ATTN_STATIC, ATTN_DYNAMIC */
static const char *const tok_names[] = {"byte", "char", "word"};

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

int config_check_keys(const cJSON *obj, const char *prefix, const char *const *allowed, int n_allowed, char *err,
                      size_t errlen)
{
    unsigned seen = 0;
    for (const cJSON *it = obj->child; it; it = it->next) {
        int i = 0;
        while (i < n_allowed && strcmp(it->string, allowed[i]) != 0)
            i++;
        if (i == n_allowed)
            return error_fmt(err, errlen, "config: unknown field \"%s%s\"", prefix, it->string);
        if (seen & (1u << i))
            return error_fmt(err, errlen, "config: field \"%s%s\" appears twice", prefix, it->string);
        seen |= 1u << i;
    }
    return 0;
}

static int get_int(const cJSON *v, const char *field, int lo, int hi, int *out, char *err,
                   size_t errlen)
{
    if (!v)
        return error_fmt(err, errlen, "config: \"%s\" is required", field);
    double d = cJSON_IsNumber(v) ? v->valuedouble : NAN;
    if (!isfinite(d) || d != floor(d) || d < lo || d > hi)
        return error_fmt(err, errlen, "config: \"%s\" must be an integer between %d and %d", field,
                    lo, hi);
    *out = (int)d;
    return 0;
}

static int get_bool(const cJSON *v, const char *field, int *out, char *err, size_t errlen)
{
    if (!cJSON_IsBool(v))
        return error_fmt(err, errlen, "config: \"%s\" must be true or false", field);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* Looks a string value up in names[]; *out is its index (0 on failure, so
 * callers never hold an unset value). */
static int get_enum(const cJSON *v, const char *field, const char *const *names, int n,
                    int *out, char *err, size_t errlen)
{
    *out = 0;
    if (!v)
        return error_fmt(err, errlen, "config: \"%s\" is required", field);
    if (cJSON_IsString(v)) {
        for (int i = 0; i < n; i++) {
            if (strcmp(v->valuestring, names[i]) == 0) {
                *out = i;
                return 0;
            }
        }
    }
    char list[128] = "";
    for (int i = 0; i < n; i++) {
        size_t len = strlen(list);
        snprintf(list + len, sizeof list - len, "%s\"%s\"", i == 0 ? "" : (i == n - 1 ? " or " : ", "),
                 names[i]);
    }
    return error_fmt(err, errlen, "config: \"%s\" must be %s", field, list);
}

static int cmp_str_ptr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Copies an array of strings.  The strings end up in JSON responses and
 * filenames of reports, so they must be valid UTF-8.  When distinct is set a
 * repeated string is an error (two classes with one label could not be told
 * apart). */
static int get_strings(const cJSON *v, const char *field, int lo, int hi, int distinct,
                       char ***out, int *n_out, char *err, size_t errlen)
{
    int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
    if (n < lo || n > hi)
        return error_fmt(err, errlen, "config: \"%s\" must be an array of %d to %d strings", field,
                    lo, hi);
    char **s = calloc((size_t)n, sizeof *s);
    if (!s)
        return error_fmt(err, errlen, "config: out of memory");
    int i = 0;
    for (const cJSON *it = v->child; it; it = it->next, i++) {
        if (!cJSON_IsString(it)) {
            error_fmt(err, errlen, "config: \"%s[%d]\" must be a string", field, i);
            goto bad;
        }
        size_t len = strlen(it->valuestring);
        if (u8_check((const uint8_t *)it->valuestring, len)) {
            error_fmt(err, errlen, "config: \"%s[%d]\" is not valid UTF-8", field, i);
            goto bad;
        }
        s[i] = malloc(len + 1);
        if (!s[i]) {
            error_fmt(err, errlen, "config: out of memory");
            goto bad;
        }
        memcpy(s[i], it->valuestring, len + 1);
    }
    if (distinct) {
        char **sorted = malloc((size_t)n * sizeof *sorted);
        if (!sorted) {
            error_fmt(err, errlen, "config: out of memory");
            goto bad;
        }
        memcpy(sorted, s, (size_t)n * sizeof *sorted);
        qsort(sorted, (size_t)n, sizeof *sorted, cmp_str_ptr);
        for (int j = 1; j < n; j++) {
            if (strcmp(sorted[j - 1], sorted[j]) == 0) {
                error_fmt(err, errlen, "config: \"%s\" holds \"%s\" twice", field, sorted[j]);
                free(sorted);
                goto bad;
            }
        }
        free(sorted);
    }
    *out = s;
    *n_out = n;
    return 0;
bad:
    for (int j = 0; j < n; j++)
        free(s[j]);
    free(s);
    return -1;
}

static int parse_skip(const cJSON *v, struct model_config *cfg, char *err, size_t errlen)
{
    static const char *const keys[] = {"period", "matrices"};
    cfg->skip_period = 1;
    cfg->skip_matrices = 1;
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsObject(v))
        return error_fmt(err, errlen, "config: \"skip\" must be an object or null");
    if (config_check_keys(v, "skip.", keys, COUNT(keys), err, errlen))
        return -1;
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(v, "period");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(v, "matrices");
    if (p && get_int(p, "skip.period", 1, CONFIG_MAX_SKIP_PERIOD, &cfg->skip_period, err, errlen))
        return -1;
    if (m && get_int(m, "skip.matrices", 1, CONFIG_MAX_SKIP_MATRICES, &cfg->skip_matrices, err,
                     errlen))
        return -1;
    return 0;
}

static int parse_attention(const cJSON *v, struct model_config *cfg, char *err, size_t errlen)
{
    static const char *const keys[] = {"window", "mode"};
    cfg->attn_mode = ATTN_NONE;
    cfg->attn_window = 0;
    if (!v || cJSON_IsNull(v))
        return 0;
    if (!cJSON_IsObject(v))
        return error_fmt(err, errlen, "config: \"attention\" must be an object or null");
    if (config_check_keys(v, "attention.", keys, COUNT(keys), err, errlen))
        return -1;
    int mode;
    if (get_int(cJSON_GetObjectItemCaseSensitive(v, "window"), "attention.window", 1,
                CONFIG_MAX_ATTN_WINDOW, &cfg->attn_window, err, errlen) ||
        get_enum(cJSON_GetObjectItemCaseSensitive(v, "mode"), "attention.mode", mode_names,
                 COUNT(mode_names), &mode, err, errlen))
        return -1;
    cfg->attn_mode = mode == 0 ? ATTN_STATIC : ATTN_DYNAMIC;
    return 0;
}

static int parse_tokenizer(const cJSON *v, struct model_config *cfg, char *err, size_t errlen)
{
    static const char *const keys[] = {"type", "tokens", "unk"};
    if (!v)
        return error_fmt(err, errlen, "config: \"tokenizer\" is required");
    if (!cJSON_IsObject(v))
        return error_fmt(err, errlen, "config: \"tokenizer\" must be an object");
    if (config_check_keys(v, "tokenizer.", keys, COUNT(keys), err, errlen))
        return -1;
    int type;
    if (get_enum(cJSON_GetObjectItemCaseSensitive(v, "type"), "tokenizer.type", tok_names,
                 COUNT(tok_names), &type, err, errlen))
        return -1;
    cfg->tok_type = (enum tokenizer_type)type;
    const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(v, "tokens");
    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(v, "unk");
    if (cfg->tok_type == TOKENIZER_BYTE) {
        /* The byte vocabulary is fixed; a token list or unk id would be
         * ignored, and ignoring part of a config hides mistakes. */
        if (tokens)
            return error_fmt(err, errlen, "config: \"tokenizer.tokens\" is not allowed with type \"byte\"");
        if (unk)
            return error_fmt(err, errlen, "config: \"tokenizer.unk\" is not allowed with type \"byte\"");
        return 0;
    }
    if (!tokens)
        return error_fmt(err, errlen, "config: \"tokenizer.tokens\" is required with type \"%s\"",
                    tok_names[type]);
    if (!unk)
        return error_fmt(err, errlen, "config: \"tokenizer.unk\" is required with type \"%s\"",
                    tok_names[type]);
    if (get_strings(tokens, "tokenizer.tokens", 1, CONFIG_MAX_VOCAB, 0, &cfg->tokens,
                    &cfg->n_tokens, err, errlen))
        return -1;
    return get_int(unk, "tokenizer.unk", 0, cfg->n_tokens - 1, &cfg->unk, err, errlen);
}

/* "input": {"type": "vector", "dim": D} - the model reads D floats a step
 * (the synthetic tasks of the papers) instead of token ids. */
static int parse_input(const cJSON *v, struct model_config *cfg, char *err, size_t errlen)
{
    static const char *const keys[] = {"type", "dim"};
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(v, "type");
    if (!cJSON_IsObject(v) || config_check_keys(v, "input.", keys, COUNT(keys), err, errlen) ||
        !cJSON_IsString(type) || strcmp(type->valuestring, "vector") != 0)
        return error_fmt(err, errlen, "config: \"input\" must be {\"type\": \"vector\", \"dim\": D}");
    return get_int(cJSON_GetObjectItemCaseSensitive(v, "dim"), "input.dim", 1, CONFIG_MAX_EMBED, &cfg->input_dim,
                   err, errlen);
}

static int parse_object(const cJSON *root, struct model_config *cfg, char *err, size_t errlen)
{
    static const char *const keys[] = {
        "task", "cell", "hidden", "layers", "bidirectional", "embed_dim", "peephole", "skip",
        "residual_depth", "attention", "pool", "classes", "outputs", "input", "tokenizer",
    };
    if (!cJSON_IsObject(root))
        return error_fmt(err, errlen, "config: must be a JSON object");
    if (config_check_keys(root, "", keys, COUNT(keys), err, errlen))
        return -1;
#define FIELD(name) cJSON_GetObjectItemCaseSensitive(root, name)
    int task, cell, pool = POOL_LAST;
    if (get_enum(FIELD("task"), "task", task_names, COUNT(task_names), &task, err, errlen) ||
        get_enum(FIELD("cell"), "cell", cell_names, COUNT(cell_names), &cell, err, errlen) ||
        get_int(FIELD("hidden"), "hidden", 1, CONFIG_MAX_HIDDEN, &cfg->hidden, err, errlen) ||
        (FIELD("input") && parse_input(FIELD("input"), cfg, err, errlen)))
        return -1;
    /* Vector inputs feed the first layer directly: embed_dim is their width. */
    if (cfg->input_dim && !FIELD("embed_dim"))
        cfg->embed_dim = cfg->input_dim;
    else if (get_int(FIELD("embed_dim"), "embed_dim", 1, CONFIG_MAX_EMBED, &cfg->embed_dim, err, errlen))
        return -1;
    if (cfg->input_dim && cfg->embed_dim != cfg->input_dim)
        return error_fmt(err, errlen, "config: \"embed_dim\" must equal \"input.dim\" with vector inputs");
    cfg->task = (enum task)task;
    cfg->cell = (enum cell)cell;
    cfg->layers = 1;
    if ((FIELD("layers") &&
         get_int(FIELD("layers"), "layers", 1, CONFIG_MAX_LAYERS, &cfg->layers, err, errlen)) ||
        (FIELD("bidirectional") &&
         get_bool(FIELD("bidirectional"), "bidirectional", &cfg->bidirectional, err, errlen)) ||
        (FIELD("peephole") && get_bool(FIELD("peephole"), "peephole", &cfg->peephole, err, errlen)) ||
        (FIELD("residual_depth") &&
         get_bool(FIELD("residual_depth"), "residual_depth", &cfg->residual_depth, err, errlen)) ||
        parse_skip(FIELD("skip"), cfg, err, errlen) ||
        parse_attention(FIELD("attention"), cfg, err, errlen) ||
        (FIELD("pool") &&
         get_enum(FIELD("pool"), "pool", pool_names, COUNT(pool_names), &pool, err, errlen)))
        return -1;
    cfg->pool = (enum pool)pool;
    if (cfg->task == TASK_LM && cfg->bidirectional)
        return error_fmt(err, errlen, "config: \"bidirectional\" is not allowed with task \"lm\": "
                                 "a language model cannot look ahead");
    if (cfg->peephole && cfg->cell != CELL_LSTM)
        return error_fmt(err, errlen, "config: \"peephole\" needs cell \"lstm\"");
    if (cfg->attn_mode != ATTN_NONE && cfg->cell != CELL_LSTM)
        return error_fmt(err, errlen, "config: \"attention\" needs cell \"lstm\"");
    /* "last" is the default and is what a generic writer emits, so it is
     * accepted for lm; "mean" would be silently ignored, so it is not. */
    if (cfg->task == TASK_LM && cfg->pool != POOL_LAST)
        return error_fmt(err, errlen, "config: \"pool\" applies only to task \"classify\"");
    const cJSON *classes = FIELD("classes");
    if (cfg->task != TASK_CLASSIFY && classes)
        return error_fmt(err, errlen, "config: \"classes\" is allowed only with task \"classify\"");
    if (cfg->task != TASK_REGRESS && FIELD("outputs"))
        return error_fmt(err, errlen, "config: \"outputs\" is allowed only with task \"regress\"");
    if (cfg->task == TASK_REGRESS &&
        get_int(FIELD("outputs"), "outputs", 1, CONFIG_MAX_CLASSES, &cfg->n_outputs, err, errlen))
        return -1;
    if (cfg->task == TASK_LM && cfg->input_dim)
        return error_fmt(err, errlen, "config: a language model reads tokens, not vector inputs");
    if (cfg->task == TASK_CLASSIFY) {
        if (!classes)
            return error_fmt(err, errlen, "config: \"classes\" is required with task \"classify\"");
        if (get_strings(classes, "classes", 2, CONFIG_MAX_CLASSES, 1, &cfg->classes,
                        &cfg->n_classes, err, errlen))
            return -1;
    }
    if (cfg->input_dim) {
        if (FIELD("tokenizer"))
            return error_fmt(err, errlen, "config: \"tokenizer\" is not allowed with vector inputs");
        return 0;
    }
    return parse_tokenizer(FIELD("tokenizer"), cfg, err, errlen);
#undef FIELD
}

int config_parse(const char *json, struct model_config *cfg, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof *cfg);
    if (!json)
        return error_fmt(err, errlen, "config: missing");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) {
        size_t at = end && end >= json ? (size_t)(end - json) : 0;
        return error_fmt(err, errlen, "config: not valid JSON (at byte %zu)", at);
    }
    int rc = parse_object(root, cfg, err, errlen);
    cJSON_Delete(root);
    if (rc)
        config_free(cfg);
    return rc;
}

static cJSON *to_cjson(const struct model_config *cfg)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        return NULL;
    /* Each Add returns NULL when out of memory; one flag collects them all
     * so that the tree is built in one readable run. */
    int ok = cJSON_AddStringToObject(o, "task", task_name(cfg->task)) &&
             cJSON_AddStringToObject(o, "cell", cell_name(cfg->cell)) &&
             cJSON_AddNumberToObject(o, "hidden", cfg->hidden) &&
             cJSON_AddNumberToObject(o, "layers", cfg->layers) &&
             cJSON_AddBoolToObject(o, "bidirectional", cfg->bidirectional) &&
             cJSON_AddNumberToObject(o, "embed_dim", cfg->embed_dim) &&
             cJSON_AddBoolToObject(o, "peephole", cfg->peephole);
    cJSON *skip = ok ? cJSON_AddObjectToObject(o, "skip") : NULL;
    ok = skip && cJSON_AddNumberToObject(skip, "period", cfg->skip_period) &&
         cJSON_AddNumberToObject(skip, "matrices", cfg->skip_matrices) &&
         cJSON_AddBoolToObject(o, "residual_depth", cfg->residual_depth);
    if (ok && cfg->attn_mode == ATTN_NONE) {
        ok = cJSON_AddNullToObject(o, "attention") != NULL;
    } else if (ok) {
        cJSON *a = cJSON_AddObjectToObject(o, "attention");
        ok = a && cJSON_AddNumberToObject(a, "window", cfg->attn_window) &&
             cJSON_AddStringToObject(a, "mode", mode_names[cfg->attn_mode == ATTN_DYNAMIC]);
    }
    if (ok && cfg->task == TASK_CLASSIFY) {
        cJSON *classes = cJSON_CreateStringArray((const char *const *)cfg->classes, cfg->n_classes);
        ok = cJSON_AddStringToObject(o, "pool", pool_names[cfg->pool]) && classes &&
             cJSON_AddItemToObject(o, "classes", classes);
        if (!ok)
            cJSON_Delete(classes);
    }
    if (ok && cfg->task == TASK_REGRESS)
        ok = cJSON_AddStringToObject(o, "pool", pool_names[cfg->pool]) &&
             cJSON_AddNumberToObject(o, "outputs", cfg->n_outputs);
    if (ok && cfg->input_dim) {
        cJSON *in = cJSON_AddObjectToObject(o, "input");
        ok = in && cJSON_AddStringToObject(in, "type", "vector") && cJSON_AddNumberToObject(in, "dim", cfg->input_dim);
        if (!ok) {
            cJSON_Delete(o);
            return NULL;
        }
        return o;
    }
    cJSON *tok = ok ? cJSON_AddObjectToObject(o, "tokenizer") : NULL;
    ok = tok && cJSON_AddStringToObject(tok, "type", tok_names[cfg->tok_type]);
    if (ok && cfg->tok_type != TOKENIZER_BYTE) {
        cJSON *tokens = cJSON_CreateStringArray((const char *const *)cfg->tokens, cfg->n_tokens);
        ok = tokens && cJSON_AddItemToObject(tok, "tokens", tokens);
        if (!ok)
            cJSON_Delete(tokens);
        ok = ok && cJSON_AddNumberToObject(tok, "unk", cfg->unk);
    }
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static char *print(const struct model_config *cfg, int pretty)
{
    cJSON *o = to_cjson(cfg);
    if (!o)
        return NULL;
    char *s = pretty ? cJSON_Print(o) : cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

char *config_to_json(const struct model_config *cfg)
{
    return print(cfg, 0);
}

char *config_to_json_pretty(const struct model_config *cfg)
{
    return print(cfg, 1);
}

void config_free(struct model_config *cfg)
{
    for (int i = 0; cfg->classes && i < cfg->n_classes; i++)
        free(cfg->classes[i]);
    for (int i = 0; cfg->tokens && i < cfg->n_tokens; i++)
        free(cfg->tokens[i]);
    free(cfg->classes);
    free(cfg->tokens);
    memset(cfg, 0, sizeof *cfg);
}

int config_gates(const struct model_config *cfg)
{
    return cell_gates(cfg->cell);
}

int cell_gates(enum cell c)
{
    switch (c) {
    case CELL_LSTM:
        return 4;
    case CELL_GRU:
        return 3;
    case CELL_RNN_TANH:
    case CELL_RNN_RELU:
        break;
    }
    return 1;
}

int config_directions(const struct model_config *cfg)
{
    return cfg->bidirectional ? 2 : 1;
}

int config_vocab(const struct model_config *cfg)
{
    if (cfg->input_dim)
        return 0;
    return cfg->tok_type == TOKENIZER_BYTE ? 256 : cfg->n_tokens;
}

int config_layer_input(const struct model_config *cfg, int layer)
{
    return layer == 0 ? cfg->embed_dim : config_output_width(cfg);
}

int config_output_width(const struct model_config *cfg)
{
    return cfg->hidden * config_directions(cfg);
}

int config_head_out(const struct model_config *cfg)
{
    return cfg->task == TASK_CLASSIFY ? cfg->n_classes : cfg->task == TASK_REGRESS ? cfg->n_outputs : config_vocab(cfg);
}

const char *cell_name(enum cell c)
{
    return (unsigned)c < (unsigned)COUNT(cell_names) ? cell_names[c] : "?";
}

const char *task_name(enum task t)
{
    return (unsigned)t < (unsigned)COUNT(task_names) ? task_names[t] : "?";
}
