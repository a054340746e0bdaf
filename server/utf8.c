/* utf8.c - text made safe to send (see utf8.h), with libunistring's
 * decoder deciding what is a character.
 */
#include <stdlib.h>
#include <string.h>
#include <unistr.h>

#include "utf8.h"

/* The character at the start of in (n > 0 bytes), as utf8_clean takes it:
 * its length in bytes, 0 for a byte replaced by U+FFFD, -1 for an
 * incomplete character at the end left for later (only when !final). */
static int utf8_next(const char *in, size_t n, int final)
{
    ucs4_t uc;
    int k = u8_mbtoucr(&uc, (const uint8_t *)in, n);
    if (k == -2 && !final)
        return -1;
    return k > 0 && uc != 0 ? k : 0;
}

size_t utf8_clean(const char *in, size_t n, int final, char *out, size_t *outlen)
{
    size_t i = 0, o = 0;
    for (int k; i < n && (k = utf8_next(in + i, n - i, final)) >= 0;) {
        if (k > 0) {
            memcpy(out + o, in + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = 0;
    *outlen = o;
    return i;
}

size_t utf8_length(const char *in, size_t n)
{
    size_t chars = 0;
    for (size_t i = 0; i < n; chars++) {
        int k = utf8_next(in + i, n - i, 1);
        i += k > 0 ? (size_t)k : 1;
    }
    return chars;
}

int utf8_stream_put(struct utf8_stream *u, const char *p, size_t n)
{
    return bytes_add(&u->raw, p, n);
}

const char *utf8_stream_take(struct utf8_stream *u, int final, size_t *len)
{
    struct bytes *raw = &u->raw;
    if (3 * raw->len + 1 > u->clean_cap) {
        char *grown = realloc(u->clean, 3 * raw->len + 1);
        if (!grown)
            return NULL;
        u->clean = grown;
        u->clean_cap = 3 * raw->len + 1;
    }
    const size_t used = raw->len ? utf8_clean(raw->p, raw->len, final, u->clean, len) : 0;
    if (!raw->len) {
        u->clean[0] = 0;
        *len = 0;
    }
    if (used)
        memmove(raw->p, raw->p + used, raw->len - used);
    raw->len -= used;
    return u->clean;
}

int utf8_stream_open(const struct utf8_stream *u, const char *p, size_t n)
{
    /* An unfinished character is at most 3 bytes, and its first is a
     * lead byte, which utf8_clean always reaches as a start (it steps over
     * a byte it cannot take one at a time): so it is one of the last 3
     * bytes' starts that the decoder finds incomplete. */
    uint8_t tail[3];
    const size_t from_p = n < 3 ? n : 3, from_raw = u->raw.len < 3 - from_p ? u->raw.len : 3 - from_p;
    if (from_raw)
        memcpy(tail, u->raw.p + u->raw.len - from_raw, from_raw);
    if (from_p)
        memcpy(tail + from_raw, p + n - from_p, from_p);
    const size_t k = from_raw + from_p;
    for (size_t i = 0; i < k; i++) {
        ucs4_t uc;
        if (u8_mbtoucr(&uc, tail + i, k - i) == -2)
            return 1;
    }
    return 0;
}

void utf8_stream_free(struct utf8_stream *u)
{
    free(u->raw.p);
    free(u->clean);
}

void utf8_printable(char *dst, size_t cap, const char *s)
{
    size_t n = strlen(s), i = 0, o = 0;
    while (i < n) {
        ucs4_t c;
        int k = u8_mbtoucr(&c, (const uint8_t *)s + i, n - i);
        int shown = k > 0 && c >= 0x20 && !(c >= 0x7f && c < 0xa0);
        size_t len = shown ? (size_t)k : 1;
        if (o + len >= cap)
            break;
        memcpy(dst + o, shown ? s + i : "?", len);
        o += len;
        i += k > 0 ? (size_t)k : 1;
    }
    dst[o] = 0;
}
