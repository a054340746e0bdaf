/* lazy_json.c - a JSON answer whose long arrays are written while it is
 * sent (see lazy_json.h).
 *
 * Each lazy array is a raw node in the tree whose text is a mark, \x01,
 * the array's number, \x02: cJSON prints raw text as it is and writes
 * control characters inside strings as \u00XX escapes, so the printed tree
 * holds those bytes only where the marks are.  Reading sends the printed
 * text up to a mark, then the array, "[", each element printed by cJSON
 * as it is made, ",", ..., "]", then the text up to the next mark.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lazy_json.h"

#define MARK_START '\x01'
#define MARK_END '\x02'

struct lazy_array {
    lazy_item *item;
    void *ctx;
    size_t n;
};

struct lazy_json {
    void (*release)(void *owner);
    void *owner;
    struct lazy_array *arrays;
    int n_arrays;
    char *text;            /* the printed tree, with its marks */
    size_t at;             /* where in text the next bytes come from */
    int array;             /* the array being written, or -1 */
    size_t next;           /* its next element */
    const char *out;       /* bytes made and not yet read: */
    size_t out_len;
    char *owned;           /* out, when it is an element's printed text */
    char punct;            /* out, when it is "[", "," or "]" */
    int comma_out;         /* the comma before element next is out */
};

struct lazy_json *lazy_json_new(void (*release)(void *owner), void *owner)
{
    struct lazy_json *z = calloc(1, sizeof *z);
    if (!z) {
        release(owner);
        return NULL;
    }
    z->release = release;
    z->owner = owner;
    z->array = -1;
    return z;
}

/* The array made now, for lazy_json_array without an answer. */
static cJSON *array_now(lazy_item *item, const void *ctx, size_t n)
{
    cJSON *a = cJSON_CreateArray();
    for (size_t i = 0; a && i < n; i++) {
        cJSON *e = item(ctx, i);
        if (!e || !cJSON_AddItemToArray(a, e)) {
            cJSON_Delete(e);
            cJSON_Delete(a);
            return NULL;
        }
    }
    return a;
}

cJSON *lazy_json_array(struct lazy_json *z, lazy_item *item, const void *ctx, size_t ctx_size, size_t n)
{
    if (!z)
        return array_now(item, ctx, n);
    char mark[24];
    snprintf(mark, sizeof mark, "%c%d%c", MARK_START, z->n_arrays, MARK_END);
    struct lazy_array *grown = realloc(z->arrays, sizeof *grown * (size_t)(z->n_arrays + 1));
    if (!grown)
        return NULL;
    z->arrays = grown;
    void *copy = malloc(ctx_size ? ctx_size : 1);
    cJSON *node = copy ? cJSON_CreateRaw(mark) : NULL;
    if (!node) {
        free(copy);
        return NULL;
    }
    if (ctx_size)
        memcpy(copy, ctx, ctx_size);
    z->arrays[z->n_arrays++] = (struct lazy_array){item, copy, n};
    return node;
}

int lazy_json_arrays(const struct lazy_json *z)
{
    return z->n_arrays;
}

int lazy_json_finish(struct lazy_json *z, cJSON *root)
{
    z->text = root ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return z->text ? 0 : -1;
}

static void set_out(struct lazy_json *z, const char *p, size_t n)
{
    z->out = p;
    z->out_len = n;
}

static void set_punct(struct lazy_json *z, char c)
{
    z->punct = c;
    set_out(z, &z->punct, 1);
}

/* Makes the next bytes to send: 1, or 0 at the end, -1 on failure. */
static int make_more(struct lazy_json *z)
{
    free(z->owned);
    z->owned = NULL;
    if (z->array < 0) {
        const char *p = z->text + z->at;
        if (!*p)
            return 0;
        const char *mark = strchr(p, MARK_START);
        if (mark != p) {
            const size_t n = mark ? (size_t)(mark - p) : strlen(p);
            set_out(z, p, n);
            z->at += n;
            return 1;
        }
        char *end;
        z->array = (int)strtol(mark + 1, &end, 10);
        z->at += (size_t)(end + 1 - p);
        z->next = 0;
        set_punct(z, '[');
        return 1;
    }
    const struct lazy_array *a = &z->arrays[z->array];
    if (z->next == a->n) {
        z->array = -1;
        set_punct(z, ']');
        return 1;
    }
    if (z->next > 0 && !z->comma_out) {
        z->comma_out = 1;
        set_punct(z, ',');
        return 1;
    }
    cJSON *e = a->item(a->ctx, z->next);
    z->owned = e ? cJSON_PrintUnformatted(e) : NULL;
    cJSON_Delete(e);
    if (!z->owned)
        return -1;
    z->next++;
    z->comma_out = 0;
    set_out(z, z->owned, strlen(z->owned));
    return 1;
}

ssize_t lazy_json_read(struct lazy_json *z, char *buf, size_t max)
{
    size_t n = 0;
    while (n < max) {
        if (z->out_len == 0) {
            const int more = make_more(z);
            if (more < 0)
                return -1;
            if (more == 0)
                break;
            continue;
        }
        const size_t k = z->out_len < max - n ? z->out_len : max - n;
        memcpy(buf + n, z->out, k);
        z->out += k;
        z->out_len -= k;
        n += k;
    }
    return (ssize_t)n;
}

void lazy_json_free(struct lazy_json *z)
{
    if (!z)
        return;
    for (int i = 0; i < z->n_arrays; i++)
        free(z->arrays[i].ctx);
    free(z->arrays);
    free(z->text);
    free(z->owned);
    z->release(z->owner);
    free(z);
}
