/* utf8.h - text made safe to send: any bytes as valid UTF-8, with what is
 * not UTF-8 (and NUL) replaced by U+FFFD, whole or as it comes in pieces.
 * Generated text, echoed prompts and error messages that quote a client's
 * bytes all go through it, since a JSON answer must be UTF-8 to parse.
 */
#ifndef RRN_UTF8_H
#define RRN_UTF8_H

#include <stddef.h>

#include "bytes.h"

/* Writes the UTF-8 of in[0..n) to out with every invalid byte, and NUL,
 * replaced by U+FFFD, so any text is a valid JSON string.  An incomplete
 * sequence at the end is left for the next call unless final.  out needs
 * room for 3n + 1 bytes.  Returns the number of input bytes consumed. */
size_t utf8_clean(const char *in, size_t n, int final, char *out, size_t *outlen);
/* The characters utf8_clean makes of n bytes (all of them, as final). */
size_t utf8_length(const char *in, size_t n);

/* Text that comes in pieces (a stream's tokens), cleaned as utf8_clean
 * does: a character split over pieces comes out whole with its last byte.
 * Zeroed to start. */
struct utf8_stream {
    struct bytes raw;   /* bytes put and not yet taken: an unfinished character */
    char *clean;        /* what the last utf8_stream_take made */
    size_t clean_cap;
};
/* Adds n bytes.  0, or -1 out of memory. */
int utf8_stream_put(struct utf8_stream *u, const char *p, size_t n);
/* The clean text of the bytes put since the last take, but for an
 * unfinished character at their end unless final; NUL-terminated, *len
 * its length, valid until the next take.  NULL: out of memory. */
const char *utf8_stream_take(struct utf8_stream *u, int final, size_t *len);
/* Whether the bytes put and not yet taken, followed by p[0..n), end in an
 * unfinished character: one a later byte may finish. */
int utf8_stream_open(const struct utf8_stream *u, const char *p, size_t n);
void utf8_stream_free(struct utf8_stream *u);

/* s as one line of UTF-8 to show (in the log, in a message): each control
 * character (C1's too: a terminal may act on them) and each byte that is
 * not UTF-8 shown as '?', so that no text can forge a line, drive a
 * terminal or break a JSON line; cut between characters to fit cap bytes
 * with its NUL. */
void utf8_printable(char *dst, size_t cap, const char *s);

#endif
