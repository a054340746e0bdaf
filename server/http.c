/* http.c - the libmicrohttpd daemon behind `rrnserve serve` (see http.h):
 * body accumulation under a size limit, routing, API keys, error bodies,
 * Server-Sent Events, request ids, the request log and the request
 * metrics.
 *
 * The daemon runs one thread per connection, so a handler may block while
 * its model's batcher works; the connection limit and the timeouts
 * (connections.h) keep slow or idle clients from holding threads without
 * bound.
 */
#include <arpa/inet.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "auth.h"
#include "bytes.h"
#include "connections.h"
#include "http.h"
#include "lazy_json.h"
#include "log.h"
#include "metrics.h"
#include "page.h"
#include "request_id.h"
#include "utf8.h"

/* Per-connection memory for the request headers and the read buffer;
 * bodies are copied out as they arrive, so this bounds headers only.
 * libmicrohttpd clears it for every request of a keep-alive connection, so
 * more costs throughput: 32 KiB (its default) serves 5% more small
 * /classify requests a second than 128 KiB did, and still takes heads far
 * larger than clients send (nginx's default limit is 8 KiB a line). */
#define CONNECTION_MEMORY (32 * 1024)
#define SSE_BLOCK 4096
/* The buffer a lazily written JSON answer (lazy_json.h) is sent through. */
#define LAZY_BLOCK 65536
#define BODY_TOO_LARGE "the body is larger than the limit of %zu bytes"

struct route {
    const char *method;
    api_handler *handler;
    int open;           /* answered without an API key */
    /* Answered when every --max-connections place is held too (and the
     * connection closed after): a liveness probe that met the limit's 503
     * would have a supervisor restart a server that is only busy, and a
     * scrape that met it would leave the metrics blind when they matter
     * most.  Each is cheap and has no body.  Readiness keeps the 503: a
     * full server should get no new clients. */
    int probe;
};

/* GET /: the attention page.  It holds no data (what it shows, it fetches
 * with the user's key), so it needs no key. */
static void serve_page(struct api *a, const char *body, size_t len, const struct client *c, struct reply *r)
{
    (void)a;
    (void)body;
    (void)len;
    (void)c;
    r->body = strdup(page_index());
    if (!r->body) {
        reply_error(r, 500, "out of memory");
        return;
    }
    r->status = 200;
    r->content_type = "text/html; charset=utf-8";
}

static const struct route routes[EP_COUNT] = {
    [EP_CLASSIFY] = {"POST", api_classify, 0, 0},   [EP_GENERATE] = {"POST", api_generate, 0, 0},
    [EP_ATTENTION] = {"POST", api_attention, 0, 0}, [EP_SCORE] = {"POST", api_score, 0, 0},
    [EP_MODELS] = {"GET", api_models, 0, 0},        [EP_HEALTHZ] = {"GET", api_healthz, 1, 1},
    [EP_READYZ] = {"GET", api_readyz, 1, 0},        [EP_METRICS] = {"GET", api_metrics, 0, 1},
    [EP_INDEX] = {"GET", serve_page, 1, 0},         [EP_COMPLETIONS] = {"POST", api_completions, 0, 0},
    [EP_OPENAI_MODELS] = {"GET", api_openai_models, 0, 0},
};

struct http_server {
    struct MHD_Daemon *d;
    struct api *api;
    struct auth *auth;
    struct metrics *metrics;
    size_t max_body;
    int port;
    MHD_socket listen_fd;  /* after http_quiesce: ours to close */
    int closing;        /* after http_quiesce: answers close their connection */
    pthread_mutex_t mu; /* guards in_flight and closing */
    pthread_cond_t idle;
    int in_flight;
    struct connections *conns;
    struct request_ids ids;
};

/* One request, from its first header to its completion callback. */
struct request {
    struct http_server *s;
    struct MHD_Connection *conn;
    struct timespec start;
    char id[REQUEST_ID_MAX + 1];
    enum endpoint ep;
    char method[16];
    char path[128];
    int status;             /* 0 until a reply is queued */
    int refusal;            /* the error status for a body that was not kept */
    int close;              /* the answer closes the connection */
    int last;               /* the client will close the connection after it */
    int batch_size;
    struct bytes body;
    struct api_stream *stream;
    struct lazy_json *lazy;
};

/* ---- replies ------------------------------------------------------------ */

void reply_json(struct reply *r, int status, cJSON *body)
{
    char *text = body ? cJSON_PrintUnformatted(body) : NULL;
    cJSON_Delete(body);
    free(r->body);
    r->body = NULL;
    if (!text) {
        reply_error(r, 500, "out of memory");
        return;
    }
    r->status = status;
    r->body = text;
    r->content_type = NULL;
}

void reply_lazy_json(struct reply *r, int status, cJSON *body, struct lazy_json *z)
{
    if (lazy_json_arrays(z) == 0) {
        reply_json(r, status, body);
        lazy_json_free(z);
        return;
    }
    if (lazy_json_finish(z, body) != 0) {
        lazy_json_free(z);
        reply_error(r, 500, "out of memory");
        return;
    }
    free(r->body);
    r->body = NULL;
    r->status = status;
    r->content_type = NULL;
    r->lazy = z;
}

void reply_error(struct reply *r, int status, const char *fmt, ...)
{
    char msg[512], clean[3 * sizeof msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* A message may quote the client's bytes (a model's name, a path), which
     * need not be UTF-8, and cut them inside a character: the answer must be
     * UTF-8 all the same. */
    size_t len;
    utf8_clean(msg, strlen(msg), 1, clean, &len);
    cJSON *o = cJSON_CreateObject(), *e = cJSON_CreateObject();
    cJSON *code = cJSON_CreateNumber(status), *message = cJSON_CreateString(clean);
    char *text = NULL;
    if (o && e && code && message) {
        cJSON_AddItemToObject(e, "code", code);
        cJSON_AddItemToObject(e, "message", message);
        cJSON_AddItemToObject(o, "error", e);
        text = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
    } else {
        cJSON_Delete(o);
        cJSON_Delete(e);
        cJSON_Delete(code);
        cJSON_Delete(message);
    }
    free(r->body);
    /* With no memory left the body stays empty; send_reply still sends the
     * status. */
    r->status = status;
    r->body = text;
    r->content_type = NULL;
}

/* ---- the client's connection ---------------------------------------------- */

/* Whether the client closed its end.  The connection's thread is blocked
 * in this handler, so nobody else reads the socket: a readable socket whose
 * peek finds no data (EOF) or an error means the client is gone, while
 * data (a pipelined request) means it is still there. */
static int connection_gone(void *arg)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info((struct MHD_Connection *)arg, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return 0;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0)
        return 0;
    if (p.revents & (POLLERR | POLLHUP | POLLNVAL))
        return 1;
    char c;
    return recv(ci->connect_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0;
}

/* What a pull of n bytes of a body made as it is sent tells libmicrohttpd:
 * the bytes, its end (0), or an error that closes the connection (< 0). */
static ssize_t content_read(ssize_t n)
{
    return n > 0 ? n : n == 0 ? MHD_CONTENT_READER_END_OF_STREAM : MHD_CONTENT_READER_END_WITH_ERROR;
}

static ssize_t read_stream(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    return content_read(api_stream_read(cls, buf, max));
}

static ssize_t read_lazy(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    return content_read(lazy_json_read(cls, buf, max));
}

static int add_header(struct MHD_Response *resp, const char *name, const char *value)
{
    return MHD_add_response_header(resp, name, value) == MHD_YES ? 0 : -1;
}

/* Set in a connection's thread when its client went away before its
 * answer: libmicrohttpd then logs the MHD_NO that closes the connection
 * as "Application reported internal error", from the same thread (one per
 * connection), and on_mhd_log drops that line, since the request's own
 * log line already says 499.  An operator should not read each client
 * that gave up as an error of the server. */
static _Thread_local int client_gone;

/* Queues r's answer (taking its body); MHD_NO closes the connection. */
static enum MHD_Result send_reply(struct request *rq, struct reply *r)
{
    struct http_server *s = rq->s;
    rq->status = r->status;
    rq->batch_size = r->batch_size;
    if (r->status == HTTP_CLIENT_GONE) {
        free(r->body);
        lazy_json_free(r->lazy);
        client_gone = 1;
        return MHD_NO;
    }
    struct MHD_Response *resp;
    const char *type = r->content_type ? r->content_type : "application/json";
    if (r->stream) {
        /* The request owns the stream (freed at completion), so the
         * response's free callback has nothing to do. */
        rq->stream = r->stream;
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, SSE_BLOCK, read_stream, rq->stream, NULL);
        type = "text/event-stream";
    } else if (r->lazy) {
        rq->lazy = r->lazy;
        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, LAZY_BLOCK, read_lazy, rq->lazy, NULL);
    } else {
        resp = MHD_create_response_from_buffer(r->body ? strlen(r->body) : 0, r->body ? r->body : "",
                                               r->body ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
        if (!resp)
            free(r->body);
    }
    r->body = NULL;
    if (!resp)
        return MHD_NO;
    char retry[16];
    snprintf(retry, sizeof retry, "%d", r->retry_after);
    pthread_mutex_lock(&s->mu);
    int closing = s->closing;
    pthread_mutex_unlock(&s->mu);
    int rc = add_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    rc |= add_header(resp, REQUEST_ID_HEADER, rq->id);
    if (strcmp(type, "text/event-stream") == 0)
        rc |= add_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    if (r->retry_after)
        rc |= add_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, retry);
    /* RFC 9110, 15.5.2: a 401 names the scheme that would do (RFC 6750's). */
    if (r->status == 401)
        rc |= add_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"rrnserve\"");
    if (r->status == 405)
        rc |= add_header(resp, MHD_HTTP_HEADER_ALLOW,
                         strcmp(routes[rq->ep].method, "GET") == 0 ? "GET, HEAD" : routes[rq->ep].method);
    if (closing || rq->close)
        rc |= add_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result ret = rc == 0 ? MHD_queue_response(rq->conn, (unsigned)r->status, resp) : MHD_NO;
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result send_error(struct request *rq, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static enum MHD_Result send_error(struct request *rq, int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    struct reply r = {.batch_size = -1};
    reply_error(&r, status, "%s", msg);
    return send_reply(rq, &r);
}

/* ---- connections ------------------------------------------------------------ */

static struct connection *connection_of(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    struct http_server *s = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        *socket_context = ci ? connection_opened(s->conns, ci->connect_fd) : NULL;
    } else {
        connection_closed(s->conns, *socket_context);
        *socket_context = NULL;
    }
}

/* ---- requests ----------------------------------------------------------- */

/* The path of a request target, also in absolute form
 * ("http://host:port/path"), which RFC 9112 has servers accept. */
static const char *target_path(const char *url)
{
    const char *authority = strncasecmp(url, "http://", 7) == 0    ? url + 7
                            : strncasecmp(url, "https://", 8) == 0 ? url + 8
                                                                    : NULL;
    if (!authority)
        return url;
    const char *path = strchr(authority, '/');
    return path ? path : "/";
}

static enum endpoint route_of(const char *url)
{
    for (int e = 0; e < EP_OTHER; e++)
        if (strcmp(url, endpoint_path((enum endpoint)e)) == 0)
            return (enum endpoint)e;
    return EP_OTHER;
}

static struct request *request_new(struct http_server *s, struct MHD_Connection *conn, const char *url,
                                   const char *method)
{
    struct request *rq = calloc(1, sizeof *rq);
    if (!rq)
        return NULL;
    rq->s = s;
    rq->conn = conn;
    rq->batch_size = -1;
    url = target_path(url);
    rq->ep = route_of(url);
    clock_gettime(CLOCK_MONOTONIC, &rq->start);
    request_id_take(&s->ids, MHD_lookup_connection_value(conn, MHD_HEADER_KIND, REQUEST_ID_HEADER), rq->id);
    utf8_printable(rq->method, sizeof rq->method, method);
    utf8_printable(rq->path, sizeof rq->path, url);
    pthread_mutex_lock(&s->mu);
    s->in_flight++;
    pthread_mutex_unlock(&s->mu);
    return rq;
}

/* How a request's headers frame it: Content-Length headers seen, whether
 * two disagree, whether Transfer-Encoding came and names a coding other
 * than chunked, whether a header's name holds white space ("Content-Length
 * : 5", which this server and a proxy may read apart), how many Host
 * headers came, and what Connection asks for. */
struct framing {
    const char *length;
    int lengths_differ, transfer, other_coding, spaced_name, hosts, close, keep_alive;
};

/* Whether a header value, a list separated by commas, holds token
 * (case-insensitive). */
static int lists_token(const char *value, const char *token)
{
    const size_t n = strlen(token);
    for (const char *p = value; *p;) {
        p += strspn(p, " \t,");
        size_t len = strcspn(p, " \t,");
        if (len == n && strncasecmp(p, token, n) == 0)
            return 1;
        p += len;
    }
    return 0;
}

static enum MHD_Result add_framing(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
    (void)kind;
    struct framing *f = cls;
    if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
        f->lengths_differ |= f->length && strcmp(f->length, value) != 0;
        f->length = value;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
        f->transfer = 1;
        f->other_coding |= strcasecmp(value, "chunked") != 0;
    } else if (strcasecmp(key, MHD_HTTP_HEADER_CONNECTION) == 0) {
        f->close |= lists_token(value, "close");
        f->keep_alive |= lists_token(value, "keep-alive");
    }
    f->hosts += strcasecmp(key, MHD_HTTP_HEADER_HOST) == 0;
    f->spaced_name |= key[strcspn(key, " \t")] != 0;
    return MHD_YES;
}

/* The checks that need no body: the body's framing, key, path, method and
 * declared size.  An error is queued at once; MHD_YES with nothing queued
 * lets the request go on to its body.  HEAD is GET without the body, which
 * libmicrohttpd leaves out (load balancers check health with it). */
static enum MHD_Result check_early(struct request *rq, const char *method, const char *version)
{
    struct http_server *s = rq->s;
    const struct route *rt = &routes[rq->ep];
    const char *key = MHD_lookup_connection_value(rq->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    struct framing f = {0};
    MHD_get_connection_values(rq->conn, MHD_HEADER_KIND, add_framing, &f);
    const int http11 = strcmp(version, MHD_HTTP_VERSION_1_1) == 0;
    rq->last = f.close || (!http11 && !f.keep_alive);
    const int method_ok = rt->handler && (strcmp(method, rt->method) == 0 ||
                                          (strcmp(method, "HEAD") == 0 && strcmp(rt->method, "GET") == 0));
    /* Where two parsers could read two different bodies (a proxy in
     * front, and this server), the request is refused: how requests are
     * smuggled past a proxy (RFC 9112, 6.3). */
    if (f.spaced_name)
        return send_error(rq, 400, "a header's name holds white space");
    /* RFC 9112, 3.2: a server must refuse these, which could name two
     * hosts to two parsers as above. */
    if (f.hosts > 1 || (f.hosts == 0 && http11))
        return send_error(rq, 400, "an HTTP/1.1 request needs one Host header");
    if (f.lengths_differ || (f.length && f.transfer))
        return send_error(rq, 400, "%s", f.transfer ? "a request may not have both Content-Length and Transfer-Encoding"
                                                    : "a request's Content-Length headers disagree");
    if (f.other_coding)
        return send_error(rq, 501, "the only Transfer-Encoding understood is chunked");
    /* Before the path and method are judged: a client without a key
     * learns nothing of which paths and methods there are. */
    if (s->auth && !(rt->open && method_ok) && !auth_check(s->auth, key))
        return send_error(rq, 401, "a valid API key is required: Authorization: Bearer KEY");
    if (!rt->handler)
        return send_error(rq, 404, "no endpoint at %.100s (see api.md)", rq->path);
    if (!method_ok)
        return send_error(rq, 405, "%s needs method %s", rq->path, rt->method);
    if (f.length && strtoull(f.length, NULL, 10) > s->max_body)
        return send_error(rq, 413, BODY_TOO_LARGE, s->max_body);
    /* Last, so that a request refused above, a client without a key among
     * them, never takes the place of another's idle connection. */
    if (connection_request_begins(s->conns, connection_of(rq->conn)) != 0) {
        rq->close = 1;
        if (rt->probe)
            return MHD_YES;
        struct reply r = {.batch_size = -1, .retry_after = 1};
        reply_error(&r, 503, "the server has its most connections open (--max-connections %d), none of them "
                             "idle; try again",
                    connections_max(s->conns));
        return send_reply(rq, &r);
    }
    return MHD_YES;
}

/* Appends a piece of the body; -1 when it passes the limit or memory runs
 * out. */
static int add_body(struct request *rq, const char *data, size_t n)
{
    if (n > rq->s->max_body - rq->body.len)
        return -1;
    return bytes_add(&rq->body, data, n);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    struct http_server *s = cls;
    struct request *rq = *con_cls;
    if (!rq) {
        if (!(rq = request_new(s, conn, url, method)))
            return MHD_NO;
        *con_cls = rq;
        return check_early(rq, method, version);
    }
    if (*upload_data_size) {
        /* libmicrohttpd cannot queue an answer in the middle of a body, so
         * a body found too large (or out of memory) is read to its end
         * without being kept, and refused then. */
        if (!rq->status && !rq->refusal && add_body(rq, upload_data, *upload_data_size) != 0)
            rq->refusal = *upload_data_size > s->max_body - rq->body.len ? 413 : 500;
        *upload_data_size = 0;
        return MHD_YES;
    }
    connection_request_arrived(s->conns, connection_of(conn));
    if (rq->status)
        return MHD_YES; /* answered already, by an early error */
    if (rq->refusal == 413)
        return send_error(rq, 413, BODY_TOO_LARGE, s->max_body);
    if (rq->refusal)
        return send_error(rq, 500, "out of memory");
    struct reply r = {.batch_size = -1};
    struct client client = {connection_gone, conn, rq->id};
    routes[rq->ep].handler(s->api, rq->body.p ? rq->body.p : "", rq->body.len, &client, &r);
    return send_reply(rq, &r);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct http_server *s = cls;
    struct request *rq = *con_cls;
    if (!rq)
        return;
    *con_cls = NULL;
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = metrics_elapsed(&rq->start, &end);
    if (rq->stream) {
        rq->batch_size = api_stream_batch_size(rq->stream);
        api_stream_free(rq->stream);
    }
    lazy_json_free(rq->lazy);
    /* A request that ended without a complete answer: its client left, or
     * its body did not arrive in time and the watchdog closed it. */
    int status = rq->status && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK   ? rq->status
                 : connection_timed_out(s->conns, connection_of(conn)) ? MHD_HTTP_REQUEST_TIMEOUT
                                                                         : HTTP_CLIENT_GONE;
    log_request(&(struct log_request){.method = rq->method, .path = rq->path, .id = rq->id, .status = status,
                                      .ms = seconds * 1e3, .batch = rq->batch_size});
    connection_request_ended(s->conns, connection_of(conn),
                             rq->last || rq->close || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK);
    metrics_request(s->metrics, rq->ep, status, seconds);
    free(rq->body.p);
    free(rq);
    pthread_mutex_lock(&s->mu);
    if (--s->in_flight == 0)
        pthread_cond_broadcast(&s->idle);
    pthread_mutex_unlock(&s->mu);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && msg[n - 1] == '\n')
        msg[--n] = 0;
    if (client_gone && strstr(msg, "Application reported internal error")) {
        client_gone = 0;
        return;
    }
    /* A client that closes its connection while its answer is sent (a
     * stream it stops reading): the request's line says 499 already. */
    if (strncmp(msg, "Failed to send", 14) == 0 &&
        (strstr(msg, "closed by remote peer") || strstr(msg, "no longer available for sending")))
        return;
    log_msg("http: %s", msg);
}

/* ---- the daemon ---------------------------------------------------------- */

/* libmicrohttpd's unescaping of a path (and query), but an escaped NUL
 * becomes a control character, which names no endpoint and shows as '?',
 * not the path's end: "/healthz%00junk" was served as /healthz, and
 * logged so. */
static size_t unescape_url(void *cls, struct MHD_Connection *c, char *s)
{
    (void)cls;
    (void)c;
    const size_t n = MHD_http_unescape(s);
    for (size_t i = 0; i < n; i++)
        if (!s[i])
            s[i] = '\x01';
    return n;
}

struct http_server *http_start(const struct http_options *opt, struct api *api, struct auth *auth,
                               struct metrics *metrics, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *ai = NULL;
    int gai = getaddrinfo(opt->host, NULL, &hints, &ai);
    if (gai != 0) {
        snprintf(err, errlen, "cannot resolve host %s: %s", opt->host, gai_strerror(gai));
        return NULL;
    }
    struct sockaddr_storage addr;
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    int ipv6 = ai->ai_family == AF_INET6;
    freeaddrinfo(ai);
    if (ipv6)
        ((struct sockaddr_in6 *)&addr)->sin6_port = htons((uint16_t)opt->port);
    else
        ((struct sockaddr_in *)&addr)->sin_port = htons((uint16_t)opt->port);

    struct http_server *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    char note[256];
    const int max_connections = connections_fit_files(opt->max_connections, note, sizeof note);
    if (*note)
        log_msg("%s", note);
    *s = (struct http_server){.api = api, .auth = auth, .metrics = metrics, .max_body = opt->max_body,
                              .listen_fd = MHD_INVALID_SOCKET};
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->idle, NULL);
    if (request_ids_init(&s->ids) != 0) {
        snprintf(err, errlen, "no random bytes for request ids (OpenSSL's RAND_bytes failed)");
        http_stop(s);
        return NULL;
    }
    if (!(s->conns = connections_new(max_connections, opt->timeout_s, metrics, err, errlen))) {
        http_stop(s);
        return NULL;
    }
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG |
                     MHD_USE_ITC | (ipv6 ? MHD_USE_IPv6 : 0);
    /* The logger first, so that MHD reports nothing the default way. */
    s->d = MHD_start_daemon(flags, (uint16_t)opt->port, NULL, NULL, on_request, s,
                            MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, NULL,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                            MHD_OPTION_CONNECTION_LIMIT,
                            (unsigned)(max_connections + CONNECTIONS_BEYOND_MAX),
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)opt->timeout_s,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)CONNECTION_MEMORY,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
                            MHD_OPTION_UNESCAPE_CALLBACK, unescape_url, NULL,
                            MHD_OPTION_END);
    if (!s->d) {
        snprintf(err, errlen, "cannot listen on %s port %d (in use, or not an address of this machine?)",
                 opt->host, opt->port);
        http_stop(s);
        return NULL;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : opt->port;
    return s;
}

int http_port(const struct http_server *s)
{
    return s->port;
}

void http_quiesce(struct http_server *s)
{
    pthread_mutex_lock(&s->mu);
    s->closing = 1;
    pthread_mutex_unlock(&s->mu);
    /* MHD hands the listening socket back, but its threads may still be
     * polling it, so it is closed only after MHD_stop_daemon; shutting it
     * down now makes the kernel refuse new connections at once instead of
     * queueing them in the backlog. */
    s->listen_fd = MHD_quiesce_daemon(s->d);
    if (s->listen_fd != MHD_INVALID_SOCKET)
        shutdown(s->listen_fd, SHUT_RDWR);
}

int http_drain(struct http_server *s, int timeout_s)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_s;
    pthread_mutex_lock(&s->mu);
    while (s->in_flight > 0 && pthread_cond_timedwait(&s->idle, &s->mu, &until) == 0)
        ;
    int left = s->in_flight;
    pthread_mutex_unlock(&s->mu);
    return left;
}

void http_stop(struct http_server *s)
{
    if (!s)
        return;
    if (s->d)
        MHD_stop_daemon(s->d);
    connections_free(s->conns);
    if (s->listen_fd != MHD_INVALID_SOCKET)
        close(s->listen_fd);
    pthread_cond_destroy(&s->idle);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
