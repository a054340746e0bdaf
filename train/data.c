/* data.c - corpora and truncated-BPTT windows, labelled JSONL, the
 * synthetic tasks and length-bucketed batches (see data.h).
 *
 * Every random choice comes from a struct rng the caller seeds, drawn in a
 * fixed order, so a seed reproduces the data and its order exactly.
 */
#include "error.h"
#include "data.h"
#include "json_text.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

/* Uniform in [0, n), n > 0, without the bias of a plain modulo: draws
 * below 2^64 mod n are thrown back, leaving a multiple of n values. */
static uint64_t draw_below(struct rng *r, uint64_t n)
{
    uint64_t threshold = (0 - n) % n, x;

    do
        x = rng_next(r);
    while (x < threshold);
    return x % n;
}

/* Uniform in [0, 1) on a grid of 2^-24: every value is a float, so none
 * rounds up to 1 as a double draw converted to float could. */
static float uniform_float(struct rng *r)
{
    return (float)(rng_next(r) >> 40) * 0x1p-24f;
}

static void shuffle_ints(int *a, int n, struct rng *r)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)draw_below(r, (uint64_t)i + 1);
        int t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* ---- Corpora */

/* A growing NUL-terminated text. */
struct text {
    char *p;
    size_t n, cap;
};

/* Append the bytes of one file to text (a struct text). */
static int append_file(const char *path, void *text, char *err, size_t errlen)
{
    struct text *t = text;
    FILE *f = fopen(path, "rb");
    if (!f) {
        error_fmt(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    int rc = 0;
    for (;;) {
        if (t->cap - t->n < 2) {
            size_t want = t->cap ? t->cap * 2 : 1 << 16;
            char *grown = want > t->cap ? realloc(t->p, want) : NULL;
            if (!grown) {
                error_fmt(err, errlen, "%s: out of memory", path);
                rc = -1;
                break;
            }
            t->p = grown;
            t->cap = want;
        }
        size_t room = t->cap - 1 - t->n, got = fread(t->p + t->n, 1, room, f);
        t->n += got;
        if (got < room) {
            if (ferror(f)) {
                error_fmt(err, errlen, "%s: %s", path, strerror(errno ? errno : EIO));
                rc = -1;
            }
            break;
        }
    }
    fclose(f);
    if (t->p)
        t->p[t->n] = '\0';
    return rc;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The paths of a folder's regular, non-hidden files in name order (byte
 * order, whatever the locale, so every machine reads the same corpus). */
static int folder_files(const char *dir, char ***out, int *n_out, char *err, size_t errlen)
{
    DIR *d = opendir(dir);
    if (!d) {
        error_fmt(err, errlen, "%s: %s", dir, strerror(errno));
        return -1;
    }
    char **names = NULL;
    int n = 0, cap = 0, rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *e = readdir(d);
        if (!e) {
            if (errno != 0) {
                error_fmt(err, errlen, "%s: %s", dir, strerror(errno));
                rc = -1;
            }
            break;
        }
        if (e->d_name[0] == '.')
            continue;
        size_t len = strlen(dir) + 1 + strlen(e->d_name) + 1;
        char *path = malloc(len);
        if (!path) {
            error_fmt(err, errlen, "%s: out of memory", dir);
            rc = -1;
            break;
        }
        snprintf(path, len, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
            free(path);
            continue;
        }
        if (n == cap) {
            int want = cap ? cap * 2 : 16;
            char **grown = realloc(names, (size_t)want * sizeof *grown);
            if (!grown) {
                free(path);
                error_fmt(err, errlen, "%s: out of memory", dir);
                rc = -1;
                break;
            }
            names = grown;
            cap = want;
        }
        names[n++] = path;
    }
    closedir(d);
    if (rc != 0) {
        for (int i = 0; i < n; i++)
            free(names[i]);
        free(names);
        return -1;
    }
    if (n > 0)
        qsort(names, (size_t)n, sizeof *names, cmp_names);
    *out = names;
    *n_out = n;
    return 0;
}

/* Calls fn on each file the paths stand for, in corpus_read's order; stops
 * at the first that fails. */
typedef int file_fn(const char *path, void *arg, char *err, size_t errlen);

static int each_file(const char *const *paths, int n_paths, file_fn *fn, void *arg, char *err, size_t errlen)
{
    int rc = 0;
    for (int p = 0; p < n_paths && rc == 0; p++) {
        struct stat st;
        if (stat(paths[p], &st) != 0)
            return error_fmt(err, errlen, "%s: %s", paths[p], strerror(errno));
        if (!S_ISDIR(st.st_mode)) {
            rc = fn(paths[p], arg, err, errlen);
            continue;
        }
        char **files = NULL;
        int n = 0;
        rc = folder_files(paths[p], &files, &n, err, errlen);
        for (int i = 0; i < n; i++) {
            if (rc == 0)
                rc = fn(files[i], arg, err, errlen);
            free(files[i]);
        }
        free(files);
    }
    return rc;
}

int corpus_read(const char *const *paths, int n_paths, char **text, size_t *len, char *err, size_t errlen)
{
    struct text t = {0};

    *text = NULL;
    *len = 0;
    if (each_file(paths, n_paths, append_file, &t, err, errlen) != 0) {
        free(t.p);
        return -1;
    }
    /* Nothing read (no paths, empty files): still a NUL-terminated text. */
    if (!t.p && !(t.p = calloc(1, 1))) {
        error_fmt(err, errlen, "out of memory");
        return -1;
    }
    *text = t.p;
    *len = t.n;
    return 0;
}

/* The files one list of paths stands for, by device and inode, so that a
 * file is known by any of its names (a link, a relative path, a folder). */
struct file_set {
    struct file_id {
        dev_t dev;
        ino_t ino;
    } *ids;
    int n, cap;
};

static int by_id(const void *a, const void *b)
{
    const struct file_id *x = a, *y = b;
    return x->dev != y->dev ? (x->dev < y->dev ? -1 : 1) : x->ino != y->ino ? (x->ino < y->ino ? -1 : 1) : 0;
}

/* The file's device and inode, or -1 with its name and why in err. */
static int file_id_of(const char *path, struct file_id *id, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return error_fmt(err, errlen, "%s: %s", path, strerror(errno));
    *id = (struct file_id){st.st_dev, st.st_ino};
    return 0;
}

static int add_id(const char *path, void *arg, char *err, size_t errlen)
{
    struct file_set *set = arg;
    if (set->n == set->cap) {
        int want = set->cap ? 2 * set->cap : 16;
        struct file_id *grown = realloc(set->ids, (size_t)want * sizeof *grown);
        if (!grown)
            return error_fmt(err, errlen, "%s: out of memory", path);
        set->ids = grown;
        set->cap = want;
    }
    if (file_id_of(path, &set->ids[set->n], err, errlen))
        return -1;
    set->n++;
    return 0;
}

static int not_in_set(const char *path, void *arg, char *err, size_t errlen)
{
    const struct file_set *set = arg;
    struct file_id id = {0, 0};
    if (file_id_of(path, &id, err, errlen))
        return -1;
    if (set->n && bsearch(&id, set->ids, (size_t)set->n, sizeof id, by_id))
        return error_fmt(err, errlen, "%s is in the training data too: a model is not measured on what it learns",
                         path);
    return 0;
}

int corpus_disjoint(const char *const *train, int n_train, const char *const *valid, int n_valid, char *err,
                    size_t errlen)
{
    struct file_set set = {0};
    int rc = each_file(train, n_train, add_id, &set, err, errlen);
    if (rc == 0 && set.n)
        qsort(set.ids, (size_t)set.n, sizeof *set.ids, by_id);
    if (rc == 0)
        rc = each_file(valid, n_valid, not_in_set, &set, err, errlen);
    free(set.ids);
    return rc;
}

int corpus_load(const char *const *paths, int n_paths, const struct tokenizer *tk, struct corpus *c, char *err,
                size_t errlen)
{
    char *text;
    size_t len;

    c->ids = NULL;
    c->n = 0;
    if (corpus_read(paths, n_paths, &text, &len, err, errlen) != 0)
        return -1;
    int rc = tokenizer_encode(tk, text, len, &c->ids, &c->n);
    free(text);
    if (rc != 0) {
        error_fmt(err, errlen, "out of memory tokenizing the corpus");
        return -1;
    }
    if (c->n < 2) {
        error_fmt(err, errlen, "%s%s: %zu token%s; a corpus needs at least 2", n_paths > 0 ? paths[0] : "corpus",
                n_paths > 1 ? " and the rest" : "", c->n, c->n == 1 ? "" : "s");
        corpus_free(c);
        return -1;
    }
    return 0;
}

void corpus_free(struct corpus *c)
{
    free(c->ids);
    c->ids = NULL;
    c->n = 0;
}

/* ---- Truncated-BPTT windows
 *
 * Each stream's part holds `part` tokens, of which an epoch reads W windows
 * of T+1, W*T+1 tokens in all, starting at a random offset into the part.
 * W is one less than fits, so the offset can take any of at least T
 * values and the cuts between windows fall at different places in the
 * text from one epoch to the next; an epoch leaves out between T-1 and
 * 2T-2 tokens of each part, a different few each time (and the last
 * n mod B tokens of the corpus are in no part). */

static size_t windows_per_epoch(const struct lm_windows *w)
{
    return w->part / (size_t)w->T - 1;
}

static void draw_starts(struct lm_windows *w)
{
    size_t used = windows_per_epoch(w) * (size_t)w->T + 1;

    for (int b = 0; b < w->B; b++)
        w->start[b] = (size_t)b * w->part + (size_t)draw_below(&w->rng, w->part - used + 1);
    w->pos = 0;
}

int lm_windows_init(struct lm_windows *w, const struct corpus *c, int B, int T, uint64_t seed, char *err,
                    size_t errlen)
{
    memset(w, 0, sizeof *w);
    if (B < 1 || T < 1) {
        error_fmt(err, errlen, "batch (%d) and window length (%d) must be at least 1", B, T);
        return -1;
    }
    size_t need = 2 * (size_t)B * (size_t)T;
    if (c->n < need) {
        error_fmt(err, errlen,
                "a corpus of %zu tokens is too small for %d streams of windows of %d tokens: that needs at least "
                "%zu (2 * batch * window)",
                c->n, B, T, need);
        return -1;
    }
    w->start = malloc((size_t)B * sizeof *w->start);
    if (!w->start) {
        error_fmt(err, errlen, "out of memory");
        return -1;
    }
    w->c = c;
    w->B = B;
    w->T = T;
    w->part = c->n / (size_t)B;
    rng_seed(&w->rng, seed);
    draw_starts(w);
    return 0;
}

void lm_windows_free(struct lm_windows *w)
{
    free(w->start);
    w->start = NULL;
}

int lm_windows_next(struct lm_windows *w, int32_t *window)
{
    const size_t T = (size_t)w->T;

    if (w->pos == windows_per_epoch(w) * T) {
        draw_starts(w);
        w->epoch++;
    }
    int fresh = w->pos == 0;
    for (int b = 0; b < w->B; b++)
        memcpy(window + (size_t)b * (T + 1), w->c->ids + w->start[b] + w->pos, (T + 1) * sizeof *window);
    w->pos += T;
    return fresh;
}

int lm_windows_restore(struct lm_windows *w, size_t pos, long epoch, const struct rng *rng, const size_t *start)
{
    const size_t T = (size_t)w->T, used = windows_per_epoch(w) * T + 1;
    if (pos % T || pos > windows_per_epoch(w) * T)
        return -1;
    for (int b = 0; b < w->B; b++)
        if (start[b] < (size_t)b * w->part || start[b] - (size_t)b * w->part > w->part - used)
            return -1;
    memcpy(w->start, start, sizeof *start * (size_t)w->B);
    w->pos = pos;
    w->epoch = epoch;
    w->rng = *rng;
    return 0;
}

long lm_windows_per_epoch(const struct lm_windows *w)
{
    return (long)windows_per_epoch(w);
}

/* ---- Datasets */

void dataset_free(struct dataset *d)
{
    for (int i = 0; i < d->n; i++) {
        free(d->ex[i].ids);
        free(d->ex[i].inputs);
        free(d->ex[i].target);
    }
    free(d->ex);
    memset(d, 0, sizeof *d);
}

static const char *part_name(enum part p)
{
    return p == PART_TEST ? "test" : p == PART_VALID ? "validation" : "training";
}

static enum part part_of(const struct split *s, long index)
{
    if (s->mod <= 0)
        return PART_TRAIN;
    long r = index % s->mod;
    return r == s->test ? PART_TEST : r == s->valid ? PART_VALID : PART_TRAIN;
}

static int is_blank(const char *line, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char ch = line[i];
        if (ch != ' ' && ch != '\t' && ch != '\r' && ch != '\n')
            return 0;
    }
    return 1;
}

/* The text and class of one JSONL line, or a message in why.  *json owns
 * the text; the caller deletes it. */
static int parse_example(const char *line, size_t len, char *const *classes, int n_classes, cJSON **json,
                         const char **text, int *label, char *why, size_t whylen)
{
    *json = NULL;
    if (strlen(line) != len) {
        snprintf(why, whylen, "a NUL byte in the line");
        return -1;
    }
    *json = json_parse_whole(line, len);
    if (!*json) {
        snprintf(why, whylen, "not valid JSON");
        return -1;
    }
    if (json_holds_nul(line, len)) {
        snprintf(why, whylen, "a string holds U+0000 (\\u0000)");
        return -1;
    }
    if (!cJSON_IsObject(*json)) {
        snprintf(why, whylen, "not a JSON object");
        return -1;
    }
    static const char *const fields[] = {"text", "label"};
    const char *values[2];
    for (int f = 0; f < 2; f++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(*json, fields[f]);
        if (!v) {
            snprintf(why, whylen, "no \"%s\" field", fields[f]);
            return -1;
        }
        if (!cJSON_IsString(v)) {
            snprintf(why, whylen, "\"%s\" is not a string", fields[f]);
            return -1;
        }
        /* v is the first of its name; a second would be another reading of
         * the line (most JSON readers take the last). */
        for (const cJSON *later = v->next; later; later = later->next)
            if (strcmp(later->string, fields[f]) == 0) {
                snprintf(why, whylen, "\"%s\" appears twice", fields[f]);
                return -1;
            }
        values[f] = v->valuestring;
    }
    *text = values[0];
    for (int k = 0; k < n_classes; k++) {
        if (strcmp(values[1], classes[k]) == 0) {
            *label = k;
            return 0;
        }
    }
    int at = snprintf(why, whylen, "unknown label \"%s\" (the classes are", values[1]);
    for (int k = 0; k < n_classes && at >= 0 && (size_t)at < whylen; k++)
        at += snprintf(why + at, whylen - (size_t)at, "%s \"%s\"", k ? "," : "", classes[k]);
    if (at >= 0 && (size_t)at < whylen)
        snprintf(why + at, whylen - (size_t)at, ")");
    return -1;
}

/* Tokenize text into a new example of d (d->n grows; *cap is d->ex's
 * room).  Returns 0, 1 when the text has no tokens (nothing added), or -1
 * when out of memory. */
static int add_text_example(struct dataset *d, int *cap, const struct tokenizer *tk, const char *text, int label)
{
    int32_t *ids = NULL;
    size_t n = 0;

    if (tokenizer_encode(tk, text, strlen(text), &ids, &n) != 0)
        return -1;
    if (n == 0)
        return 1;
    if (n > INT_MAX || d->n == INT_MAX) {
        free(ids);
        return -1;
    }
    if (d->n == *cap) {
        int want = *cap ? (*cap > INT_MAX / 2 ? INT_MAX : *cap * 2) : 256;
        struct example *grown = realloc(d->ex, (size_t)want * sizeof *grown);
        if (!grown) {
            free(ids);
            return -1;
        }
        d->ex = grown;
        *cap = want;
    }
    d->ex[d->n++] = (struct example){.ids = ids, .len = (int)n, .label = label};
    return 0;
}

int classify_load(const char *path, const struct tokenizer *tk, char *const *classes, int n_classes,
                  const struct split *split, enum part part, struct dataset *d, char *err, size_t errlen)
{
    memset(d, 0, sizeof *d);
    FILE *f = fopen(path, "r");
    if (!f) {
        error_fmt(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    char *line = NULL, why[512];
    size_t linecap = 0;
    ssize_t len;
    long lineno = 0, index = 0;
    int cap = 0, rc = 0;

    while ((len = getline(&line, &linecap, f)) != -1) {
        lineno++;
        if (is_blank(line, (size_t)len))
            continue;
        /* Every line is checked, not only those of the part asked for, so
         * a file loads for one part exactly when it loads for the others. */
        cJSON *json;
        const char *text = NULL;
        int label = 0;
        if (parse_example(line, (size_t)len, classes, n_classes, &json, &text, &label, why, sizeof why) != 0) {
            error_fmt(err, errlen, "%s:%ld: %s", path, lineno, why);
            rc = -1;
        } else if (part_of(split, index) == part) {
            int added = add_text_example(d, &cap, tk, text, label);
            if (added < 0) {
                error_fmt(err, errlen, "%s:%ld: out of memory", path, lineno);
                rc = -1;
            }
            d->skipped += added == 1;
        }
        cJSON_Delete(json);
        index++;
        if (rc != 0)
            break;
    }
    /* getline failed last, so errno is its reason. */
    if (rc == 0 && ferror(f)) {
        error_fmt(err, errlen, "%s: %s", path, strerror(errno));
        rc = -1;
    }
    free(line);
    fclose(f);
    if (rc == 0 && d->n == 0) {
        error_fmt(err, errlen, "%s: no examples in the %s part (%ld lines, %d without tokens)", path, part_name(part),
                index, d->skipped);
        rc = -1;
    }
    if (rc != 0)
        dataset_free(d);
    return rc;
}

/* ---- Synthetic tasks */

/* n examples of T steps of dim floats and a target of outputs floats,
 * zeroed. */
static int alloc_vectors(struct dataset *d, int n, int T, int dim, int outputs)
{
    memset(d, 0, sizeof *d);
    if (n < 1 || T < 1 || dim < 1 || outputs < 1 || (size_t)T > SIZE_MAX / sizeof(float) / (size_t)dim)
        return -1;
    d->ex = calloc((size_t)n, sizeof *d->ex);
    if (!d->ex)
        return -1;
    d->dim = dim;
    d->outputs = outputs;
    for (int i = 0; i < n; i++) {
        struct example *e = &d->ex[i];
        d->n = i + 1; /* so dataset_free frees what there is */
        e->len = T;
        e->inputs = calloc((size_t)T * (size_t)dim, sizeof *e->inputs);
        e->target = calloc((size_t)outputs, sizeof *e->target);
        if (!e->inputs || !e->target) {
            dataset_free(d);
            return -1;
        }
    }
    return 0;
}

int synth_adding(int n, int T, uint64_t seed, struct dataset *d)
{
    if (T < 2 || alloc_vectors(d, n, T, 2, 1) != 0)
        return -1;
    struct rng r;
    rng_seed(&r, seed);
    const int half = T / 2;
    for (int i = 0; i < n; i++) {
        float *x = d->ex[i].inputs;
        for (int t = 0; t < T; t++)
            x[2 * t] = uniform_float(&r);
        int a = (int)draw_below(&r, (uint64_t)half);
        int b = half + (int)draw_below(&r, (uint64_t)(T - half));
        x[2 * a + 1] = 1.0f;
        x[2 * b + 1] = 1.0f;
        d->ex[i].target[0] = x[2 * a] + x[2 * b];
    }
    return 0;
}

int synth_remember(int n, int T, int D, uint64_t seed, struct dataset *d)
{
    if (alloc_vectors(d, n, T, D, D) != 0)
        return -1;
    struct rng r;
    rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        float *x = d->ex[i].inputs;
        /* 2u - 1 on the 2^-24 grid is exact: a float in [-1, 1). */
        for (size_t k = 0; k < (size_t)T * (size_t)D; k++)
            x[k] = 2.0f * uniform_float(&r) - 1.0f;
        memcpy(d->ex[i].target, x, (size_t)D * sizeof *x);
    }
    return 0;
}

/* ---- Length-bucketed batches */

struct by_len {
    int len, pos, index;
};

/* Shorter first; among equal lengths the shuffled order stands, so ties
 * are broken at random and not by qsort's whims. */
static int cmp_by_len(const void *a, const void *b)
{
    const struct by_len *x = a, *y = b;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return (x->pos > y->pos) - (x->pos < y->pos);
}

/* Buckets of 32 batches: long enough that a batch's examples are of about
 * one length, short enough that the batch order is still random. */
#define BUCKET_BATCHES 32

int bucket_batches(const struct dataset *d, int B, struct rng *r, int *order, int *batch_start, int *n_batches)
{
    const int n = d->n;
    if (B < 1 || n < 1)
        return -1;
    const int nb = (n - 1) / B + 1;
    const size_t chunk = (size_t)B * BUCKET_BATCHES;
    struct by_len *keys = malloc((chunk < (size_t)n ? chunk : (size_t)n) * sizeof *keys);
    int *perm = malloc((size_t)nb * sizeof *perm);
    int *sorted = malloc((size_t)n * sizeof *sorted);
    if (!keys || !perm || !sorted) {
        free(keys);
        free(perm);
        free(sorted);
        return -1;
    }

    for (int i = 0; i < n; i++)
        sorted[i] = i;
    shuffle_ints(sorted, n, r);
    /* A chunk is a whole number of batches, so no batch straddles two. */
    for (size_t c0 = 0; c0 < (size_t)n; c0 += chunk) {
        size_t m = (size_t)n - c0 < chunk ? (size_t)n - c0 : chunk;
        for (size_t j = 0; j < m; j++) {
            int idx = sorted[c0 + j];
            keys[j] = (struct by_len){.len = d->ex[idx].len, .pos = (int)j, .index = idx};
        }
        qsort(keys, m, sizeof *keys, cmp_by_len);
        for (size_t j = 0; j < m; j++)
            sorted[c0 + j] = keys[j].index;
    }

    for (int k = 0; k < nb; k++)
        perm[k] = k;
    shuffle_ints(perm, nb, r);
    int at = 0;
    for (int k = 0; k < nb; k++) {
        int first = perm[k] * B, size = n - first < B ? n - first : B;
        batch_start[k] = at;
        memcpy(order + at, sorted + first, (size_t)size * sizeof *order);
        at += size;
    }
    batch_start[nb] = at;
    *n_batches = nb;
    free(keys);
    free(perm);
    free(sorted);
    return 0;
}
