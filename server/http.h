/* http.h - the HTTP front door: a libmicrohttpd daemon (one thread per
 * connection) that reads request bodies up to a size limit, routes by path
 * and method, checks API keys, hands requests to the endpoint handlers of
 * api.h, sends their replies with each request's id (request_id.h), and
 * logs and counts every request.
 *
 * Handlers never see libmicrohttpd: they fill a struct reply, and ask a
 * struct client whether the client is still there.
 */
#ifndef RRN_HTTP_H
#define RRN_HTTP_H

#include <stddef.h>

#include <cjson/cJSON.h>

/* Not sent: recorded (log, metrics) when the client went away before its
 * answer was ready, as nginx does. */
#define HTTP_CLIENT_GONE 499

struct api_stream;
struct lazy_json;

/* What a handler answers. */
struct reply {
    int status;
    char *body;               /* malloc'd; NULL for a stream */
    const char *content_type; /* static; NULL means application/json */
    int retry_after;          /* seconds for a Retry-After header, 0 for none */
    int batch_size;           /* engine batch that ran the request, -1 for none */
    struct api_stream *stream;/* Server-Sent Events instead of a body (api.h) */
    struct lazy_json *lazy;   /* or a JSON body written as it is sent (lazy_json.h) */
};

/* The connection a request came on, for noticing that its client left. */
struct client {
    int (*gone)(void *arg);
    void *arg;
    const char *request_id; /* the request's (request_id.h), or NULL */
};

/* reply_json takes ownership of body (NULL means out of memory: a 500). */
void reply_json(struct reply *r, int status, cJSON *body);
/* The same for a body with lazy arrays made by z (lazy_json.h), which it
 * takes too: sent as it is written when it has any. */
void reply_lazy_json(struct reply *r, int status, cJSON *body, struct lazy_json *z);
/* {"error": {"code": status, "message": ...}} */
void reply_error(struct reply *r, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

struct api;
struct auth;
struct metrics;

struct http_options {
    const char *host;     /* numeric address or name to bind */
    int port;             /* 0: any free port */
    size_t max_body;      /* bytes */
    int max_connections;
    int timeout_s;        /* idle connections, and requests that take longer
                             than this to arrive, are closed after this */
};

struct http_server;

/* Starts listening; auth may be NULL (no keys required). */
struct http_server *http_start(const struct http_options *opt, struct api *api, struct auth *auth,
                               struct metrics *metrics, char *err, size_t errlen);
/* The port actually bound (the chosen one when opt->port was 0). */
int http_port(const struct http_server *s);
/* Stops accepting connections; answers still to come close their
 * connections, so keep-alive clients move on. */
void http_quiesce(struct http_server *s);
/* Waits until no request is being handled, at most timeout_s seconds;
 * returns the number of requests still in flight. */
int http_drain(struct http_server *s, int timeout_s);
void http_stop(struct http_server *s);

#endif
