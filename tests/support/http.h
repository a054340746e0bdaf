/* http.h - a small HTTP/1.1 client over plain sockets to 127.0.0.1, for
 * the tests that speak to `rrnserve serve` (and nginx in front of it).
 *
 * Deliberately not a library client: the tests need to send malformed,
 * partial and oversized requests, hold connections open, leave mid-stream
 * and read answers byte by byte, which a real client would hide or refuse.
 * Nothing here asserts (but http_must_request), so that client threads
 * may use it; every socket has a timeout, so no test can hang on one. */
#ifndef RRN_TEST_HTTP_H
#define RRN_TEST_HTTP_H

#include <stddef.h>
#include <sys/types.h>

#include "buf.h"

/* A hang guard only: no test asserts how fast anything is. */
#define HTTP_TIMEOUT_S 120

struct http_resp {
    int status;
    char head[4096];  /* status line and headers */
    struct buf body;  /* chunked transfer decoded */
};

/* A connection to 127.0.0.1:port with send and receive timeouts of
 * timeout_s; -1 when it cannot connect. */
int http_connect(int port, int timeout_s);
int http_send_all(int fd, const void *p, size_t n);

/* A request (Connection: close) into out: headers is "" or lines ending
 * in \r\n; body may be NULL. */
void http_format(struct buf *out, const char *host, const char *method, const char *path, const char *headers,
                 const char *body, size_t len);
/* Sends a request to Host 127.0.0.1.  A failed send is not final: the
 * server may have answered already (and closed), so the caller reads on. */
int http_send_request(int fd, const char *method, const char *path, const char *headers, const char *body,
                      size_t len);

/* Reads what has arrived: its size; 0 at the end of the connection (EOF
 * or an error), -1 on the socket's timeout. */
ssize_t http_read_some(int fd, struct buf *raw);
void http_read_until(int fd, struct buf *raw, const char *needle);
/* Reads to the end of the connection: 1 when it ended, 0 on the timeout. */
int http_read_all(int fd, struct buf *raw);

/* The first needle in [p, stop), or NULL.  Searched with memchr and
 * memcmp, bounded by stop, rather than strstr: AddressSanitizer's strstr
 * measures the whole rest of the string at each call, which made reading
 * a stream's answer, a search an event or a chunk, quadratic. */
const char *http_find(const char *p, const char *stop, const char *needle);

/* Splits a whole raw answer into status, head and (dechunked) body; 0, or
 * -1 when it is not a whole answer. */
int http_parse(const struct buf *raw, struct http_resp *r);
/* One whole request to 127.0.0.1:port: 0, or -1 when there was no whole
 * answer.  *r is always set, for http_resp_free. */
int http_request(int port, const char *method, const char *path, const char *headers, const char *body, size_t len,
                 struct http_resp *r);
/* Sends bytes as they are, as a whole request, and reads the answer. */
int http_raw_request(int port, const char *bytes, size_t len, struct http_resp *r);
/* http_request that fails the test when there is no answer. */
void http_must_request(int port, const char *method, const char *path, const char *headers, const char *body,
                       struct http_resp *r);
void http_resp_free(struct http_resp *r);

/* The value of a response header (case-insensitive name), in out; "" when
 * there is none. */
const char *http_header(const struct http_resp *r, const char *name, char *out, size_t cap);

/* The value of a Prometheus series of the server's /metrics by its full
 * name ("name{labels}"), or -1 when there is none or no answer; a name
 * ending in '{' ("rrnserve_batch_size_sum{") sums every series of that
 * metric (each model's). */
double http_metric(int port, const char *series);

/* Removes every "cached_tokens":N (and a comma after it) from a body:
 * how much of a prompt the prompt cache supplied depends on the requests
 * before it, which nothing else of an answer may. */
void http_drop_cached_tokens(char *body);

#endif
