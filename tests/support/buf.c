/* buf.c - the growing buffer of buf.h. */
#include "buf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void out_of_memory(const char *who, size_t bytes)
{
    fprintf(stderr, "%s: out of memory (%zu bytes)\n", who, bytes);
    abort();
}

void buf_add(struct buf *b, const void *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (!p)
            out_of_memory("buf_add", cap);
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

void buf_vprintf(struct buf *b, const char *fmt, va_list ap)
{
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    if (n < 0) {
        fprintf(stderr, "buf_printf: cannot format \"%s\"\n", fmt);
        abort();
    }
    char *text = malloc((size_t)n + 1);
    if (!text)
        out_of_memory("buf_printf", (size_t)n + 1);
    vsnprintf(text, (size_t)n + 1, fmt, again);
    va_end(again);
    buf_add(b, text, (size_t)n);
    free(text);
}

void buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(b, fmt, ap);
    va_end(ap);
}

int buf_read(struct buf *b, FILE *f)
{
    char chunk[65536];
    size_t n;
    buf_add(b, "", 0);
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        buf_add(b, chunk, n);
    return ferror(f) ? -1 : 0;
}
