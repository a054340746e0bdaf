/* auth.c - loading the API-key hash file and checking bearer keys (see
 * auth.h).  Only hashes are kept: a leaked file or core dump gives no key.
 */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "auth.h"

#define HASH_LEN 32

struct auth {
    int n;
    unsigned char (*hashes)[HASH_LEN];
};

static int hex_value(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Parse exactly 64 hex digits; 0 on success. */
static int parse_hash(const char *s, size_t len, unsigned char out[HASH_LEN])
{
    if (len != 2 * HASH_LEN)
        return -1;
    for (size_t i = 0; i < HASH_LEN; i++) {
        int hi = hex_value((unsigned char)s[2 * i]), lo = hex_value((unsigned char)s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return 0;
}

/* The line without its comment and surrounding white space. */
static const char *trim(char *line, size_t *len)
{
    char *hash = strchr(line, '#');
    if (hash)
        *hash = 0;
    while (*line == ' ' || *line == '\t')
        line++;
    size_t n = strlen(line);
    while (n && strchr(" \t\r\n", line[n - 1]))
        n--;
    *len = n;
    return line;
}

static int add_hash(struct auth *a, const unsigned char h[HASH_LEN])
{
    unsigned char(*more)[HASH_LEN] = realloc(a->hashes, (size_t)(a->n + 1) * sizeof *more);
    if (!more)
        return -1;
    a->hashes = more;
    memcpy(a->hashes[a->n++], h, HASH_LEN);
    return 0;
}

struct auth *auth_load(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open the API key file %s", path);
        return NULL;
    }
    struct auth *a = calloc(1, sizeof *a);
    char *line = NULL;
    size_t cap = 0;
    long lineno = 0;
    int rc = a ? 0 : -1;
    if (!a)
        snprintf(err, errlen, "out of memory");
    while (rc == 0 && getline(&line, &cap, f) >= 0) {
        size_t len;
        unsigned char h[HASH_LEN];
        const char *s = trim(line, &len);
        lineno++;
        if (len == 0)
            continue;
        if (parse_hash(s, len, h) != 0) {
            snprintf(err, errlen, "%s line %ld: expected a SHA-256 hash as 64 hex digits", path, lineno);
            rc = -1;
        } else if (add_hash(a, h) != 0) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
        }
    }
    if (rc == 0 && ferror(f)) {
        snprintf(err, errlen, "error reading the API key file %s", path);
        rc = -1;
    }
    if (rc == 0 && a->n == 0) {
        snprintf(err, errlen, "the API key file %s holds no key hash", path);
        rc = -1;
    }
    free(line);
    fclose(f);
    if (rc != 0) {
        auth_free(a);
        return NULL;
    }
    return a;
}

void auth_free(struct auth *a)
{
    if (!a)
        return;
    free(a->hashes);
    free(a);
}

int auth_count(const struct auth *a)
{
    return a ? a->n : 0;
}

int auth_check(const struct auth *a, const char *authorization)
{
    static const char scheme[] = "Bearer ";
    const size_t slen = sizeof scheme - 1;
    if (!authorization || strncasecmp(authorization, scheme, slen) != 0)
        return 0;
    const char *key = authorization + slen;
    while (*key == ' ')
        key++;
    unsigned char h[EVP_MAX_MD_SIZE];
    unsigned int hlen = 0;
    if (!*key || EVP_Digest(key, strlen(key), h, &hlen, EVP_sha256(), NULL) != 1 || hlen != HASH_LEN)
        return 0;
    /* No early exit: every entry is compared whatever matched before. */
    int match = 0;
    for (int i = 0; i < a->n; i++)
        match |= CRYPTO_memcmp(h, a->hashes[i], HASH_LEN) == 0;
    return match;
}
