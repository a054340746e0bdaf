/* model.c - a model's weights in host memory: the tensor layout a config
 * calls for, allocation, loading from and saving to weight files.
 *
 * walk_model below is the only place that knows the tensor names and shapes
 * of ../shared/MODELS.md.  It is run to size the arena, to point the fields
 * of struct model into it, and to list the tensors for the loader, the
 * writer and the trainer, so those can never disagree.
 */
#include "error.h"
#include "model.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "safetensors.h"

struct walk {
    float *arena;              /* NULL while only sizing */
    struct model_tensor *list; /* filled in when not NULL */
    int n;                     /* tensors so far */
    size_t total;              /* floats so far */
    int too_big;               /* the sizes overflowed size_t */
};

/* Lays out the next tensor (cols == 0 for a vector) and returns where its
 * data lives, or NULL while sizing. */
static float *slot(struct walk *w, size_t rows, size_t cols, const char *fmt, ...)
{
    size_t count = rows;
    if (cols && rows > SIZE_MAX / cols)
        w->too_big = 1;
    else if (cols)
        count = rows * cols;
    if (w->total > SIZE_MAX - count)
        w->too_big = 1;
    float *p = w->arena && !w->too_big ? w->arena + w->total : NULL;
    if (w->list) {
        struct model_tensor *t = &w->list[w->n];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(t->name, sizeof t->name, fmt, ap);
        va_end(ap);
        t->ndim = cols ? 2 : 1;
        t->shape[0] = (long)rows;
        t->shape[1] = cols ? (long)cols : 0;
        t->data = p;
    }
    w->n++;
    if (!w->too_big)
        w->total += count;
    return p;
}

/* The tensors of MODELS.md in file order; also points m's fields at them
 * when m is not NULL (m->layers and the w_hh arrays must exist then). */
static void walk_model(const struct model_config *c, struct walk *w, struct model *m)
{
    size_t H = (size_t)c->hidden, E = (size_t)c->embed_dim;
    size_t GH = (size_t)config_gates(c) * H, out = (size_t)config_output_width(c);
    int dirs = config_directions(c);

    float *p = c->input_dim ? NULL : slot(w, (size_t)config_vocab(c), E, "embedding.weight");
    if (m)
        m->embedding = p;
    for (int k = 0; k < c->layers; k++) {
        size_t in = (size_t)config_layer_input(c, k);
        for (int d = 0; d < dirs; d++) {
            const char *sfx = d ? "_reverse" : "";
            struct layer_dir_params tmp, *dp = m ? &m->layers[k].dir[d] : &tmp;
            dp->w_ih = slot(w, GH, in, "rnn.weight_ih_l%d%s", k, sfx);
            for (int j = 0; j < c->skip_matrices; j++) {
                p = j ? slot(w, GH, H, "rnn.weight_hh_l%d_m%d%s", k, j, sfx)
                      : slot(w, GH, H, "rnn.weight_hh_l%d%s", k, sfx);
                if (m)
                    dp->w_hh[j] = p;
            }
            dp->b_ih = slot(w, GH, 0, "rnn.bias_ih_l%d%s", k, sfx);
            dp->b_hh = slot(w, GH, 0, "rnn.bias_hh_l%d%s", k, sfx);
            dp->peephole = c->peephole ? slot(w, H, 0, "rnn.peephole_o_l%d%s", k, sfx) : NULL;
            dp->attn_logits = c->attn_mode == ATTN_STATIC
                                  ? slot(w, (size_t)c->attn_window, 0, "rnn.attention_logits_l%d%s", k, sfx)
                                  : NULL;
            dp->attn_query = c->attn_mode == ATTN_DYNAMIC
                                 ? slot(w, H, H, "rnn.attention_query_l%d%s", k, sfx)
                                 : NULL;
        }
        /* y^l = h^l + P_l y^{l-2} for 1-based l >= 2: only layer k == 1 adds
         * the embedding output (width E); deeper layers add an H*dirs
         * output, which always matches. */
        int residual = c->residual_depth && k >= 1;
        size_t from = k == 1 ? E : out;
        p = residual && from != out ? slot(w, out, from, "rnn.residual_proj_l%d", k) : NULL;
        if (m) {
            m->layers[k].in = (int)in;
            m->layers[k].residual_proj = p;
            m->layers[k].residual_from = residual ? (int)from : 0;
        }
    }
    p = slot(w, (size_t)config_head_out(c), out, "head.weight");
    if (m)
        m->head_w = p;
    p = slot(w, (size_t)config_head_out(c), 0, "head.bias");
    if (m)
        m->head_b = p;
}

void model_free(struct model *m)
{
    if (m->layers)
        free(m->layers[0].dir[0].w_hh); /* one block holds every layer's pointers */
    free(m->layers);
    free(m->arena);
    config_free(&m->cfg);
    memset(m, 0, sizeof *m);
}

int model_alloc(struct model *m, struct model_config *cfg, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    memset(cfg, 0, sizeof *cfg);
    const struct model_config *c = &m->cfg;
    int dirs = config_directions(c);

    struct walk w = {0};
    walk_model(c, &w, NULL);
    if (w.too_big || w.total > SIZE_MAX / sizeof(float)) {
        model_free(m);
        return error_fmt(err, errlen, "model too large for this machine");
    }
    m->arena = calloc(w.total, sizeof *m->arena);
    m->layers = calloc((size_t)c->layers, sizeof *m->layers);
    float **hh = calloc((size_t)c->layers * (size_t)dirs * (size_t)c->skip_matrices, sizeof *hh);
    if (!m->arena || !m->layers || !hh) {
        free(hh);
        model_free(m);
        return error_fmt(err, errlen, "out of memory for %zu parameters", w.total);
    }
    for (int k = 0; k < c->layers; k++)
        for (int d = 0; d < dirs; d++)
            m->layers[k].dir[d].w_hh = hh + ((size_t)k * (size_t)dirs + (size_t)d) * (size_t)c->skip_matrices;
    struct walk place = {.arena = m->arena};
    walk_model(c, &place, m);
    m->vocab = config_vocab(c);
    m->head_out = config_head_out(c);
    m->n_params = w.total;
    return 0;
}

/* Lists the tensors of a config; data pointers into arena (may be NULL). */
static int list_tensors(const struct model_config *c, float *arena, struct model_tensor **out,
                        int *n)
{
    struct walk w = {0};
    walk_model(c, &w, NULL);
    struct model_tensor *list = calloc((size_t)w.n, sizeof *list);
    if (!list)
        return -1;
    struct walk fill = {.arena = arena, .list = list};
    walk_model(c, &fill, NULL);
    *out = list;
    *n = fill.n;
    return 0;
}

int model_tensors(const struct model *m, struct model_tensor **out, int *n)
{
    return list_tensors(&m->cfg, m->arena, out, n);
}

static void shape_str(char *buf, size_t len, int ndim, const long *shape64, const int64_t *st)
{
    size_t used = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && used < len; i++) {
        long long v = shape64 ? shape64[i] : st[i];
        used += (size_t)snprintf(buf + used, len - used, "%s%lld", i ? ", " : "", v);
    }
    if (used < len)
        snprintf(buf + used, len - used, "]");
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const struct model_tensor *)a)->name, ((const struct model_tensor *)b)->name);
}

/* Exactly the tensors the config calls for, each with its shape.  The
 * expected list is checked before anything is allocated, so a file cannot
 * make the loader allocate more than the file itself holds. */
static int check_tensors(const struct st_file *f, const struct model_config *c, char *err,
                         size_t errlen)
{
    struct model_tensor *want;
    int n;
    if (list_tensors(c, NULL, &want, &n))
        return error_fmt(err, errlen, "out of memory");
    int rc = 0;
    char a[128], b[128];
    for (int i = 0; i < n && rc == 0; i++) {
        const struct st_tensor *t = st_find(f, want[i].name);
        shape_str(a, sizeof a, want[i].ndim, want[i].shape, NULL);
        if (!t) {
            rc = error_fmt(err, errlen, "missing tensor \"%s\" %s", want[i].name, a);
            break;
        }
        int same = t->ndim == want[i].ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = t->shape[d] == (int64_t)want[i].shape[d];
        if (!same) {
            shape_str(b, sizeof b, t->ndim, NULL, t->shape);
            rc = error_fmt(err, errlen, "tensor \"%s\" has shape %s, the config calls for %s",
                      want[i].name, b, a);
        }
    }
    /* Every wanted name was found and the file's names are unique, so any
     * surplus is a tensor the config does not know. */
    if (rc == 0 && f->n_tensors != n) {
        qsort(want, (size_t)n, sizeof *want, cmp_name);
        for (int i = 0; i < f->n_tensors; i++) {
            struct model_tensor key;
            snprintf(key.name, sizeof key.name, "%s", f->tensors[i].name);
            if (strlen(f->tensors[i].name) >= sizeof key.name ||
                !bsearch(&key, want, (size_t)n, sizeof *want, cmp_name)) {
                rc = error_fmt(err, errlen, "unexpected tensor \"%s\" (the config does not call for it)",
                          f->tensors[i].name);
                break;
            }
        }
    }
    free(want);
    return rc;
}

int model_load_st(const struct st_file *f, const char *sha256, struct model *m, char *err,
                  size_t errlen)
{
    memset(m, 0, sizeof *m);
    const char *format = st_meta_get(f, "format");
    const char *version = st_meta_get(f, "format_version");
    const char *json = st_meta_get(f, "config");
    const char *claimed = st_meta_get(f, "data_sha256");
    if (!format || strcmp(format, "rrnserve") != 0)
        return error_fmt(err, errlen, "metadata \"format\" is %s%s%s, not \"rrnserve\"",
                    format ? "\"" : "", format ? format : "missing", format ? "\"" : "");
    if (!version || strcmp(version, "1") != 0)
        return error_fmt(err, errlen, "metadata \"format_version\" is %s%s%s; this build reads \"1\"",
                    version ? "\"" : "", version ? version : "missing", version ? "\"" : "");
    if (!json)
        return error_fmt(err, errlen, "metadata \"config\" is missing");
    struct model_config cfg;
    if (config_parse(json, &cfg, err, errlen))
        return -1;

    char hex[65];
    if (sha256)
        snprintf(hex, sizeof hex, "%s", sha256);
    else
        st_data_sha256(f, hex);
    if (!claimed) {
        config_free(&cfg);
        return error_fmt(err, errlen, "metadata \"data_sha256\" is missing");
    }
    /* Hex digits in either case, as other tools may write them. */
    if (strlen(claimed) != 64 || strcasecmp(claimed, hex) != 0) {
        config_free(&cfg);
        return error_fmt(err, errlen, "checksum mismatch: data_sha256 says %s, data hashes to %s",
                    claimed, hex);
    }

    if (check_tensors(f, &cfg, err, errlen)) {
        config_free(&cfg);
        return -1;
    }
    if (model_alloc(m, &cfg, err, errlen))
        return -1;
    struct model_tensor *list;
    int n;
    if (model_tensors(m, &list, &n)) {
        model_free(m);
        return error_fmt(err, errlen, "out of memory");
    }
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        const struct st_tensor *t = st_find(f, list[i].name);
        st_to_f32(t, list[i].data);
        for (int64_t j = 0; j < t->numel; j++) {
            if (!isfinite(list[i].data[j])) {
                rc = error_fmt(err, errlen, "tensor \"%s\" holds %s at element %lld", list[i].name,
                          isnan(list[i].data[j]) ? "NaN" : "an infinity", (long long)j);
                break;
            }
        }
    }
    free(list);
    if (rc) {
        model_free(m);
        return rc;
    }
    memcpy(m->sha256, hex, sizeof m->sha256);
    return 0;
}

int model_load(const char *path, struct model *m, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    struct st_file f;
    if (st_open(path, &f, err, errlen))
        return -1;
    int rc = model_load_st(&f, NULL, m, err, errlen);
    st_close(&f);
    return rc;
}

int model_save(const struct model *m, const char *path, const struct st_meta *extra, int n_extra, char *err,
               size_t errlen)
{
    struct model_tensor *list;
    int n;
    if (model_tensors(m, &list, &n))
        return error_fmt(err, errlen, "out of memory");
    struct st_write_tensor *t = calloc((size_t)n, sizeof *t);
    struct st_meta *meta = calloc(3 + (size_t)n_extra, sizeof *meta);
    char *json = config_to_json(&m->cfg);
    int rc;
    if (!t || !meta || !json) {
        rc = error_fmt(err, errlen, "out of memory");
    } else {
        for (int i = 0; i < n; i++) {
            t[i].name = list[i].name;
            t[i].ndim = list[i].ndim;
            t[i].shape[0] = list[i].shape[0];
            t[i].shape[1] = list[i].shape[1];
            t[i].data = list[i].data;
        }
        meta[0] = (struct st_meta){"format", "rrnserve"};
        meta[1] = (struct st_meta){"format_version", "1"};
        meta[2] = (struct st_meta){"config", json};
        for (int i = 0; i < n_extra; i++)
            meta[3 + i] = extra[i];
        rc = st_write(path, t, n, meta, 3 + n_extra, err, errlen);
    }
    free(meta);
    free(json);
    free(t);
    free(list);
    return rc;
}
