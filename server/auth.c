/* auth.c - loading the API-key hash file and checking bearer keys (see
 * auth.h).  Only hashes are kept: a leaked file or core dump gives no key.
 * A reload swaps the whole list under a write lock, so a check sees the
 * old keys or the new ones, never a mix.
 */
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "auth.h"

#define HASH_LEN 32

struct hashes {
    int n;
    unsigned char (*h)[HASH_LEN];
};

struct auth {
    pthread_rwlock_t lock;
    struct hashes keys;
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

static int add_hash(struct hashes *k, const unsigned char h[HASH_LEN])
{
    unsigned char(*more)[HASH_LEN] = realloc(k->h, (size_t)(k->n + 1) * sizeof *more);
    if (!more)
        return -1;
    k->h = more;
    memcpy(k->h[k->n++], h, HASH_LEN);
    return 0;
}

/* The hashes of the file at path into k (empty before); -1 with a message
 * in err, and k emptied, when it is not a good key file. */
static int read_hashes(const char *path, struct hashes *k, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        snprintf(err, errlen, "cannot open the API key file %s", path);
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    long lineno = 0;
    int rc = 0;
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
        } else if (add_hash(k, h) != 0) {
            snprintf(err, errlen, "out of memory");
            rc = -1;
        }
    }
    if (rc == 0 && ferror(f)) {
        snprintf(err, errlen, "error reading the API key file %s", path);
        rc = -1;
    }
    free(line);
    fclose(f);
    if (rc != 0) {
        free(k->h);
        *k = (struct hashes){0};
    }
    return rc;
}

struct auth *auth_load(const char *path, char *err, size_t errlen)
{
    struct auth *a = calloc(1, sizeof *a);
    if (!a || pthread_rwlock_init(&a->lock, NULL) != 0) {
        snprintf(err, errlen, "out of memory");
        free(a);
        return NULL;
    }
    if (read_hashes(path, &a->keys, err, errlen) != 0) {
        auth_free(a);
        return NULL;
    }
    /* A server that could let no one in is a mistake at its start; at a
     * reload, emptying the file is how every key is revoked at once. */
    if (a->keys.n == 0) {
        snprintf(err, errlen, "the API key file %s holds no key hash", path);
        auth_free(a);
        return NULL;
    }
    return a;
}

int auth_reload(struct auth *a, const char *path, char *err, size_t errlen)
{
    struct hashes k = {0};
    if (read_hashes(path, &k, err, errlen) != 0)
        return -1;
    pthread_rwlock_wrlock(&a->lock);
    struct hashes old = a->keys;
    a->keys = k;
    pthread_rwlock_unlock(&a->lock);
    free(old.h);
    return k.n;
}

void auth_free(struct auth *a)
{
    if (!a)
        return;
    pthread_rwlock_destroy(&a->lock);
    free(a->keys.h);
    free(a);
}

int auth_count(struct auth *a)
{
    if (!a)
        return 0;
    pthread_rwlock_rdlock(&a->lock);
    int n = a->keys.n;
    pthread_rwlock_unlock(&a->lock);
    return n;
}

int auth_check(struct auth *a, const char *authorization)
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
    pthread_rwlock_rdlock(&a->lock);
    for (int i = 0; i < a->keys.n; i++)
        match |= CRYPTO_memcmp(h, a->keys.h[i], HASH_LEN) == 0;
    pthread_rwlock_unlock(&a->lock);
    return match;
}
