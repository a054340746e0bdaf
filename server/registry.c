/* registry.c - the folder of models a server serves, and reloading it.
 *
 * The table of models is replaced whole on reload, under a mutex, and
 * every model is reference-counted: requests hold the model they started
 * with until they end, so a reload never pulls a model from under a
 * request.  A model whose file did not change (same device, inode, size
 * and modification time) is kept as it is, batcher and all.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "log.h"
#include "registry.h"
#include "utf8.h"

struct entry {
    struct served_model *model;
    struct stat st; /* of the file it was loaded from */
};

struct registry {
    struct registry_options opt;
    char *dir;
    char device[32];
    pthread_mutex_t mu;
    struct entry *entries; /* sorted by name */
    int n;
};

static void free_model(struct served_model *m)
{
    batcher_stop(m->batcher); /* finishes its jobs, frees the engine */
    backend_destroy(m->be);
    tokenizer_free(&m->tk);
    model_free(&m->model);
    free(m->name);
    free(m->path);
    free(m);
}

void served_model_release(struct served_model *m)
{
    if (m && atomic_fetch_sub(&m->refs, 1) == 1)
        free_model(m);
}

static struct served_model *load_model(struct registry *r, const char *name, const char *path, char *err,
                                       size_t errlen)
{
    struct served_model *m = calloc(1, sizeof *m);
    if (!m || !(m->name = strdup(name)) || !(m->path = strdup(path))) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    atomic_init(&m->refs, 1);
    if (model_load(path, &m->model, err, errlen) != 0 || tokenizer_init(&m->tk, &m->model.cfg, err, errlen) != 0 ||
        !(m->be = backend_create(r->opt.device, err, errlen)) ||
        backend_set_precision(m->be, r->opt.precision, err, errlen) != 0 ||
        backend_set_recurrence(m->be, r->opt.recurrence, err, errlen) != 0)
        goto fail;
    const struct model_config *c = &m->model.cfg;
    int slots = c->task == TASK_LM && config_directions(c) == 1 ? batcher_slots(r->opt.batch.max_batch) : 0;
    struct engine *e = engine_create(&m->model, m->be, slots, err, errlen);
    if (e)
        m->derived_bytes = engine_token_table_bytes(e) + engine_packed_bytes(e);
    if (!e || !(m->batcher = batcher_start(&m->model, &m->tk, e, &r->opt.batch, err, errlen)))
        goto fail;
    return m;
fail:
    if (m)
        free_model(m);
    return NULL;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct entry *)a)->model->name, ((const struct entry *)b)->model->name);
}

static const struct entry *find(const struct entry *entries, int n, const char *name)
{
    struct served_model key = {.name = (char *)name};
    struct entry k = {.model = &key};
    return n ? bsearch(&k, entries, (size_t)n, sizeof *entries, by_name) : NULL;
}

static int same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino && a->st_size == b->st_size &&
           a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* Build the table the folder describes now.  Unchanged files keep their
 * loaded model (a new reference); a file that fails to load keeps the old
 * model of that name if there is one.  Returns the number of failures, or
 * -1 when the folder cannot be read. */
static int scan(struct registry *r, const struct entry *old, int n_old, struct entry **out, int *n_out)
{
    DIR *d = opendir(r->dir);
    if (!d) {
        log_msg("cannot read the models folder %s: %s", r->dir, strerror(errno));
        return -1;
    }
    struct entry *t = NULL;
    int n = 0, cap = 0, failures = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        const char *ext = ".safetensors";
        if (len <= strlen(ext) || strcmp(de->d_name + len - strlen(ext), ext) != 0 || de->d_name[0] == '.')
            continue;
        char name[256], shown[sizeof name], path[4096], err[512];
        snprintf(name, sizeof name, "%.*s", (int)(len - strlen(ext)), de->d_name);
        snprintf(path, sizeof path, "%s/%s", r->dir, de->d_name);
        /* Clients send the name, and /models, /metrics and the log show it. */
        utf8_printable(shown, sizeof shown, name);
        if (strcmp(shown, name) != 0) {
            log_msg("skipped %s: a model's name (its file's, less .safetensors) must be UTF-8 without control "
                    "characters",
                    path);
            failures++;
            continue;
        }
        struct stat st;
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (n == cap) {
            struct entry *bigger = realloc(t, sizeof *t * (size_t)(cap = cap ? 2 * cap : 16));
            if (!bigger) {
                log_msg("out of memory reading the models folder");
                failures++;
                break;
            }
            t = bigger;
        }
        const struct entry *prev = find(old, n_old, name);
        if (prev && same_file(&prev->st, &st)) {
            atomic_fetch_add(&prev->model->refs, 1);
            t[n++] = *prev;
            continue;
        }
        struct served_model *m = load_model(r, name, path, err, sizeof err);
        if (m) {
            m->modified = st.st_mtime;
            log_msg("model %s: loaded %s (%s, %s, %zu parameters, sha256 %s; %.1f MB more for token tables and "
                    "packed weights)",
                    name, path, task_name(m->model.cfg.task), cell_name(m->model.cfg.cell), m->model.n_params,
                    m->model.sha256, (double)m->derived_bytes / 1e6);
            t[n++] = (struct entry){m, st};
        } else {
            failures++;
            log_msg("model %s: cannot load %s: %s%s", name, path, err, prev ? " (the loaded version keeps serving)" : "");
            if (prev) {
                atomic_fetch_add(&prev->model->refs, 1);
                t[n++] = *prev;
            }
        }
    }
    closedir(d);
    if (n)
        qsort(t, (size_t)n, sizeof *t, by_name);
    *out = t;
    *n_out = n;
    return failures;
}

struct registry *registry_open(const struct registry_options *opt, char *err, size_t errlen)
{
    struct registry *r = calloc(1, sizeof *r);
    if (!r || !(r->dir = strdup(opt->dir))) {
        free(r);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->opt = *opt;
    r->opt.dir = r->dir;
    /* Decide "auto" once, so every model lands on the same device.  Asked
     * for CUDA where it cannot run, no model could load, now or at a
     * reload: refuse to start rather than serve nothing. */
    r->opt.device = backend_resolve(opt->device);
    const char *no_cuda = r->opt.device == DEVICE_CUDA ? backend_cuda_unavailable() : NULL;
    if (no_cuda) {
        snprintf(err, errlen, "device cuda: %s", no_cuda);
        free(r->dir);
        free(r);
        return NULL;
    }
    if (r->opt.device != DEVICE_CUDA && (opt->precision != PRECISION_FP32 || opt->recurrence != RECURRENCE_GEMM)) {
        snprintf(err, errlen, "%s %s needs the cuda device, and models would run on the cpu",
                 opt->precision != PRECISION_FP32 ? "precision" : "recurrence",
                 opt->precision != PRECISION_FP32 ? backend_precision_name(opt->precision)
                                                  : backend_recurrence_name(opt->recurrence));
        free(r->dir);
        free(r);
        return NULL;
    }
    backend_describe(r->opt.device == DEVICE_CUDA ? "cuda" : "cpu", opt->precision, opt->recurrence, r->device,
                     sizeof r->device);
    pthread_mutex_init(&r->mu, NULL);
    if (scan(r, NULL, 0, &r->entries, &r->n) < 0) {
        snprintf(err, errlen, "cannot read the models folder %s: %s", opt->dir, strerror(errno));
        registry_close(r);
        return NULL;
    }
    return r;
}

static void release_all(struct entry *t, int n)
{
    for (int i = 0; i < n; i++)
        served_model_release(t[i].model);
    free(t);
}

void registry_close(struct registry *r)
{
    if (!r)
        return;
    release_all(r->entries, r->n);
    pthread_mutex_destroy(&r->mu);
    free(r->dir);
    free(r);
}

int registry_reload(struct registry *r)
{
    /* Loading can take seconds: do it on a snapshot of the table, outside
     * the lock, so requests keep finding models meanwhile.  Reloads
     * themselves come one at a time (SIGHUP is handled by one thread). */
    pthread_mutex_lock(&r->mu);
    int n_snap = r->n;
    struct entry *snap = malloc(sizeof *snap * (size_t)(n_snap + 1));
    for (int i = 0; snap && i < n_snap; i++) {
        snap[i] = r->entries[i];
        atomic_fetch_add(&snap[i].model->refs, 1);
    }
    pthread_mutex_unlock(&r->mu);
    if (!snap) {
        log_msg("out of memory reloading %s", r->dir);
        return 1;
    }
    struct entry *t;
    int n, failures = scan(r, snap, n_snap, &t, &n);
    release_all(snap, n_snap);
    if (failures < 0)
        return 1;
    pthread_mutex_lock(&r->mu);
    struct entry *old = r->entries;
    int n_old = r->n;
    r->entries = t;
    r->n = n;
    pthread_mutex_unlock(&r->mu);
    /* Outside the lock: dropping a model waits for its batcher to finish. */
    release_all(old, n_old);
    log_msg("reloaded %s: %d models, %d failed to load", r->dir, n, failures);
    return failures;
}

struct served_model *registry_get(struct registry *r, const char *name)
{
    pthread_mutex_lock(&r->mu);
    const struct entry *e = find(r->entries, r->n, name);
    struct served_model *m = e ? e->model : NULL;
    if (m)
        atomic_fetch_add(&m->refs, 1);
    pthread_mutex_unlock(&r->mu);
    return m;
}

int registry_list(struct registry *r, struct served_model ***out, int *n)
{
    pthread_mutex_lock(&r->mu);
    struct served_model **list = malloc(sizeof *list * (size_t)(r->n + 1));
    if (list)
        for (int i = 0; i < r->n; i++) {
            list[i] = r->entries[i].model;
            atomic_fetch_add(&list[i]->refs, 1);
        }
    *n = list ? r->n : 0;
    pthread_mutex_unlock(&r->mu);
    *out = list;
    return list ? 0 : -1;
}

const char *registry_device(const struct registry *r)
{
    return r->device;
}
