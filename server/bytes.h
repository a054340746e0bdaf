/* bytes.h - a byte buffer that grows as it is added to: a request's body
 * (http.c), a stream's events (generate.c), text waiting to be cleaned
 * (handler.c's utf8_stream). */
#ifndef RRN_BYTES_H
#define RRN_BYTES_H

#include <stddef.h>

/* Zeroed to start; p is the owner's to free.  NUL-terminated after the
 * first add. */
struct bytes {
    char *p;
    size_t len, cap;
};

/* Adds n bytes; 0, or -1 out of memory (b as it was). */
int bytes_add(struct bytes *b, const void *s, size_t n);

#endif
