/* request_id.c - request ids: the client's when plausible, else made here
 * (see request_id.h). */
#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

#include "request_id.h"

int request_ids_init(struct request_ids *ids)
{
    unsigned char r[8];
    if (RAND_bytes(r, sizeof r) != 1)
        return -1;
    for (size_t i = 0; i < sizeof r; i++)
        snprintf(ids->prefix + 2 * i, 3, "%02x", r[i]);
    atomic_init(&ids->next, 0);
    return 0;
}

static int plausible(const char *id)
{
    size_t n = 0;
    for (; id[n]; n++) {
        unsigned char c = (unsigned char)id[n];
        if (n == REQUEST_ID_MAX || c < 0x21 || c > 0x7e || c == '"' || c == '\\')
            return 0;
    }
    return n > 0;
}

void request_id_take(struct request_ids *ids, const char *given, char out[REQUEST_ID_MAX + 1])
{
    if (given && plausible(given)) {
        memcpy(out, given, strlen(given) + 1);
        return;
    }
    snprintf(out, REQUEST_ID_MAX + 1, "%s%016llx", ids->prefix, atomic_fetch_add(&ids->next, 1));
}
