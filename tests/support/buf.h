/* buf.h - a growing NUL-terminated byte buffer for the test support code
 * and the tests: server logs, HTTP answers, request bodies.
 *
 * Running out of memory aborts instead of failing a cmocka assertion:
 * buf_add is called on reader threads too, where cmocka's longjmp must
 * not run. */
#ifndef RRN_TEST_BUF_H
#define RRN_TEST_BUF_H

#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>

/* Zero-initialised is empty; p stays NULL until something is added. */
struct buf {
    char *p;
    size_t len, cap;
};

void buf_add(struct buf *b, const void *s, size_t n);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_vprintf(struct buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Adds all that can be read from f; 0, or -1 on a read error.  Leaves b
 * a string (p not NULL), even when f had nothing. */
int buf_read(struct buf *b, FILE *f);

#endif
