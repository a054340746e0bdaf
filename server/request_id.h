/* request_id.h - the id of each HTTP request, to follow it through logs.
 *
 * A request keeps the X-Request-Id its client or load balancer sent when
 * that is a plausible id: 1 to REQUEST_ID_MAX visible ASCII characters,
 * none a quote or a backslash, so that it stays one field of a log line
 * and cannot forge others.  Otherwise the server makes one: 32 hex digits,
 * as nginx's $request_id, of which the first 16 are drawn at random once
 * per server and the last 16 count, so that ids never repeat within a
 * server and almost surely not across its replicas.  The server answers
 * the id in the same header and writes it on the request's log line.
 */
#ifndef RRN_REQUEST_ID_H
#define RRN_REQUEST_ID_H

#include <stdatomic.h>

#define REQUEST_ID_HEADER "X-Request-Id"
#define REQUEST_ID_MAX 128

struct request_ids {
    char prefix[17];
    atomic_ullong next;
};

/* Draws the prefix; -1 when OpenSSL has no random bytes to give. */
int request_ids_init(struct request_ids *ids);
/* The id of a request whose header held `given` (NULL when it had none). */
void request_id_take(struct request_ids *ids, const char *given, char out[REQUEST_ID_MAX + 1]);

#endif
