/* bytes.c - a byte buffer that grows as it is added to. */
#include <stdlib.h>
#include <string.h>

#include "bytes.h"

int bytes_add(struct bytes *b, const void *s, size_t n)
{
    /* Doubling: a body or a stream's events grow in many small pieces. */
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n) /* s may be NULL then, which memcpy may not be given */
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}
