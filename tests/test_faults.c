/* test_faults.c - `rrnserve serve` under faults, driven over real HTTP on
 * 127.0.0.1 as tests/test_server.c drives it (a child process of $RRN_BIN,
 * optionally under $RRN_SERVER_WRAPPER, on a temporary folder of fixture
 * models): clients that reset their connection mid-stream, slow and idle
 * clients against a short --timeout-s, oversized request heads, clients
 * beyond --max-connections (idle and busy places), a model too large for the memory
 * the process may have (reloaded under an address-space limit), a GPU
 * that is not there, a stream longer than the drain allowed at SIGTERM,
 * and a device that fails while serving (injected).
 * After each fault the server must go on serving.
 *
 * test_server.c already covers a client that closes mid-stream (its stream
 * is cancelled and the queued request gets the slot), SIGHUP with corrupt
 * weight files (logged, the old model keeps serving) and SIGTERM under
 * load (every accepted stream runs to its end), so they are not repeated.
 *
 * Every wait is bounded and nothing asserts how fast anything is, beyond
 * "closed within a generous multiple of the timeout".
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend.h"
#include "batcher.h"
#include "config.h"
#include "model.h"

#include "support/buf.h"
#include "support/http.h"
#include "support/proc.h"
#include "support/server.h"
#include "support/timing.h"
#include "support/filter.h"

/* ---- HTTP ---------------------------------------------------------------- */

/* One request: its status, or -1 when there was no answer. */
static int request(int port, const char *method, const char *path, const char *body, struct http_resp *r)
{
    return http_request(port, method, path, "", body, body ? strlen(body) : 0, r) == 0 ? r->status : -1;
}

static void expect_status(int port, const char *method, const char *path, const char *body, int want)
{
    struct http_resp r;
    int got = request(port, method, path, body, &r);
    if (got != want) {
        char shown[4096];
        snprintf(shown, sizeof shown, "%s", r.body.p ? r.body.p : "");
        http_resp_free(&r);
        fail_msg("%s %s: status %d, not %d: %s", method, path, got, want, shown);
    }
    http_resp_free(&r);
}

#define CLASSIFY "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good day!\"}"
#define GENERATE "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"max_tokens\": 8, \"seed\": 1}"

/* The server answers: health, a classification and a generation. */
static void still_serving(int port)
{
    expect_status(port, "GET", "/healthz", NULL, 200);
    expect_status(port, "POST", "/classify", CLASSIFY, 200);
    expect_status(port, "POST", "/generate", GENERATE, 200);
}

/* The status of one request, and whether its body holds want. */
static int status_with(int port, const char *method, const char *path, const char *body, const char *want)
{
    struct http_resp r;
    int got = request(port, method, path, body, &r);
    if (got >= 0 && !(r.body.p && strstr(r.body.p, want)))
        got = -2;
    http_resp_free(&r);
    return got;
}

/* Starts a stream of a million tokens (needs --max-tokens-limit 1000000),
 * so that none ends while a test acts on it: its connection. */
static int start_long_stream(int port)
{
    const char *body = "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"max_tokens\": 1000000, "
                       "\"stream\": true}";
    int fd = http_connect(port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    http_send_request(fd, "POST", "/generate", "", body, strlen(body));
    return fd;
}

/* Reads a stream of start_long_stream's into raw until its third token. */
static void read_past_prompt(int fd, struct buf *raw)
{
    http_read_until(fd, raw, "\"index\":2}");
    assert_non_null(raw->p);
    assert_non_null(strstr(raw->p, "\"index\":2}"));
}

static const char *const main_models[] = {"combo_lstm_lm", "plain_lstm_l2_bi_last", NULL};

/* Starts a server of these tests.  They stop theirs with SIGTERM first,
 * wrapped or not: after each fault the server also goes through its
 * orderly shutdown, not only a kill. */
static struct server *start(const char *const *models, const char *const *extra, const char *const *env)
{
    return server_start(&(struct server_opts){.models = models, .args = extra, .env = env, .stop_with_sigterm = 1});
}

/* ---- clients that reset their connection mid-stream ------------------------ */

#define N_RESETS 16

static int setup_main(void **state)
{
    static const char *const extra[] = {"--device", "cpu", "--max-tokens-limit", "1000000", NULL};
    *state = start(main_models, extra, NULL);
    return 0;
}

/* n clients send body to path, read their answers until needle, and all
 * vanish at once with a TCP reset (not the orderly close test_server.c
 * uses): each is logged as 499 (log line "POST path 499"), and the server
 * goes on serving. */
static void reset_after(struct server *s, const char *path, const char *body, const char *needle, int n)
{
    char head[256];
    int hn = snprintf(head, sizeof head, "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %zu\r\n\r\n",
                      path, strlen(body));
    int fds[N_RESETS];
    assert_true(n <= N_RESETS);
    for (int i = 0; i < n; i++) {
        fds[i] = http_connect(s->port, HTTP_TIMEOUT_S);
        assert_true(fds[i] >= 0);
        assert_int_equal(http_send_all(fds[i], head, (size_t)hn), 0);
        assert_int_equal(http_send_all(fds[i], body, strlen(body)), 0);
    }
    for (int i = 0; i < n; i++) {
        struct buf raw = {0};
        http_read_until(fds[i], &raw, needle);
        assert_non_null(raw.p);
        assert_non_null(strstr(raw.p, needle));
        free(raw.p);
    }
    for (int i = 0; i < n; i++) {
        struct linger l = {.l_onoff = 1, .l_linger = 0};
        assert_int_equal(setsockopt(fds[i], SOL_SOCKET, SO_LINGER, &l, sizeof l), 0);
        close(fds[i]);
    }
    char line[64];
    snprintf(line, sizeof line, "POST %s 499", path);
    assert_int_equal(server_wait_log(s, line, n), n);
    still_serving(s->port);
}

/* A request body to combo_lstm_lm: fields (each followed by ", "), then
 * 90,000 characters as key. */
static char *long_body(const char *fields, const char *key)
{
    struct buf b = {0};
    buf_printf(&b, "{\"model\": \"combo_lstm_lm\", %s\"%s\": \"", fields, key);
    for (int i = 0; i < 9000; i++)
        buf_printf(&b, "good day! ");
    buf_printf(&b, "\"}");
    return b.p;
}

/* Streams of a million tokens whose clients vanish after their first
 * event; then attention maps of 90,000 characters (some 30 MB of JSON
 * each, written as they are sent) whose clients vanish a thousand steps
 * in, and completions echoing and scoring such a prompt whose clients
 * vanish past its tokens' list.  Under valgrind the answers alone take
 * three minutes: those run in the AddressSanitizer build. */
static void test_reset_mid_stream(void **state)
{
    struct server *s = *state;
    reset_after(s, "/generate",
                "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"max_tokens\": 1000000, "
                "\"stream\": true}",
                "\"index\":0", N_RESETS);
    if (server_wrapped())
        return;
    char *body = long_body("", "text");
    reset_after(s, "/attention", body, "{\"position\":1000,", 4);
    free(body);
    body = long_body("\"echo\": true, \"max_tokens\": 0, \"logprobs\": 3, ", "prompt");
    reset_after(s, "/v1/completions", body, "\"token_logprobs\":[null,", 4);
    free(body);
}

/* ---- slow and idle clients ------------------------------------------------ */

#define TIMEOUT_S 2
#define N_SLOW 4
/* A slow client gives up after this many bytes if the server has not
 * closed it: the request head is longer, so it never completes. */
#define SLOW_BYTES 40

static int setup_short_timeout(void **state)
{
    static const char *const extra[] = {"--device", "cpu", "--timeout-s", "2", NULL};
    *state = start(main_models, extra, NULL);
    return 0;
}

struct slow_client {
    int port;
    int closed;       /* the server closed the connection */
    int sent;         /* bytes sent before that */
    double seconds;   /* from connecting to the close */
};

/* Sends a request head a byte a second, watching for the server's close. */
static void *slow_main(void *arg)
{
    struct slow_client *c = arg;
    const char *head = "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    int fd = http_connect(c->port, 1);
    if (fd < 0)
        return NULL;
    double t0 = now_s();
    for (int i = 0; i < SLOW_BYTES && !c->closed; i++) {
        if (send(fd, head + i, 1, MSG_NOSIGNAL) != 1) {
            c->closed = 1;
            break;
        }
        c->sent++;
        char b;
        ssize_t n = recv(fd, &b, 1, 0); /* waits up to the 1 s socket timeout */
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
            c->closed = 1;
    }
    c->seconds = now_s() - t0;
    close(fd);
    return NULL;
}

/* Clients that send nothing are closed after --timeout-s, and so are
 * clients that send a byte a second and never complete their request (the
 * idle timeout alone let them stay: http.c's watchdog closes them).  Other
 * clients are served meanwhile. */
static void test_slow_clients(void **state)
{
    struct server *s = *state;
    static struct slow_client slow[N_SLOW];
    pthread_t threads[N_SLOW];
    for (int i = 0; i < N_SLOW; i++) {
        slow[i] = (struct slow_client){.port = s->port};
        assert_int_equal(pthread_create(&threads[i], NULL, slow_main, &slow[i]), 0);
    }
    /* An idle client: closed by the timeout. */
    int idle = http_connect(s->port, 10 * TIMEOUT_S + 30);
    assert_true(idle >= 0);
    double t0 = now_s();
    /* Meanwhile others are served. */
    for (int i = 0; i < 10; i++)
        expect_status(s->port, "POST", "/classify", CLASSIFY, 200);
    char b;
    ssize_t n = recv(idle, &b, 1, 0);
    double idle_s = now_s() - t0;
    close(idle);
    assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
    if (idle_s > 10 * TIMEOUT_S + 20)
        fail_msg("an idle connection was closed after %.1f s, with --timeout-s %d", idle_s, TIMEOUT_S);
    for (int i = 0; i < N_SLOW; i++)
        pthread_join(threads[i], NULL);
    for (int i = 0; i < N_SLOW; i++)
        if (!slow[i].closed)
            fail_msg("a client sending a byte a second was still connected after %d bytes (%.1f s), with "
                     "--timeout-s %d",
                     slow[i].sent, slow[i].seconds, TIMEOUT_S);
    still_serving(s->port);
}

/* A request whose head came whole but whose body comes a byte a second is
 * closed by the watchdog too, and logged and counted as the server's 408,
 * not as a client that went away (499). */
static void test_slow_body_is_a_timeout(void **state)
{
    struct server *s = *state;
    const char *head = "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n";
    int fd = http_connect(s->port, 1);
    assert_true(fd >= 0);
    assert_int_equal(http_send_all(fd, head, strlen(head)), 0);
    int closed = 0;
    for (int i = 0; i < 10 * TIMEOUT_S + 20 && !closed; i++) {
        char b;
        if (send(fd, "{", 1, MSG_NOSIGNAL) != 1)
            break;
        ssize_t n = recv(fd, &b, 1, 0); /* waits up to the 1 s socket timeout */
        closed = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    close(fd);
    assert_int_equal(server_wait_log(s, "POST /classify 408", 1), 1);
    assert_false(server_log_has(s, "POST /classify 499"));
    assert_true(http_metric(s->port, "rrnserve_requests_total{endpoint=\"/classify\",status=\"408\"}") == 1);
}

/* ---- oversized request heads --------------------------------------------- */

/* Sends bytes as a request; the status of the answer, 0 when the server
 * closed the connection without one. */
static int send_raw(int port, const char *bytes, size_t len)
{
    int fd = http_connect(port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    http_send_all(fd, bytes, len); /* the server may close before the end */
    struct buf raw = {0};
    int ended = http_read_all(fd, &raw), status = 0;
    close(fd);
    assert_true(ended);
    if (raw.p && sscanf(raw.p, "HTTP/1.%*d %d", &status) != 1)
        status = -1;
    free(raw.p);
    return status;
}

/* A head of len bytes: one long header, many short ones, or a long URL;
 * the connection closed after its answer, which send_raw reads to the end. */
static char *big_head(int kind, size_t len, size_t *out_len)
{
    struct buf b = {0};
    if (kind == 2) {
        buf_add(&b, "GET /", 5);
        while (b.len < len)
            buf_add(&b, "a", 1);
        buf_add(&b, " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", 47);
    } else {
        buf_add(&b, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", 59);
        if (kind == 0)
            buf_add(&b, "X-Big: ", 7);
        while (b.len < len) {
            if (kind == 0) {
                buf_add(&b, "a", 1);
            } else {
                char line[32];
                int n = snprintf(line, sizeof line, "X-H%zu: v\r\n", b.len);
                buf_add(&b, line, (size_t)n);
            }
        }
        if (kind == 0)
            buf_add(&b, "\r\n", 2);
    }
    buf_add(&b, "\r\n", 2);
    *out_len = b.len;
    return b.p;
}

/* Heads past the per-connection memory (32 KiB) are answered 431 (or
 * 414 for a URL) or closed, never crash the server; one well within it
 * is served. */
static void test_oversized_headers(void **state)
{
    struct server *s = *state;
    for (int kind = 0; kind < 3; kind++) {
        size_t len;
        char *head = big_head(kind, 1 << 20, &len);
        int status = send_raw(s->port, head, len);
        free(head);
        if (status != 0 && status != 431 && status != 414 && status != 400)
            fail_msg("a request head of %zu bytes (kind %d) was answered %d", len, kind, status);
    }
    size_t len;
    char *head = big_head(0, 8 << 10, &len);
    assert_int_equal(send_raw(s->port, head, len), 200);
    free(head);
    still_serving(s->port);
}

/* ---- connections beyond --max-connections ------------------------------- */

#define MAX_CONN 8
#define N_FLOOD 32
/* A request that needs a place (not a probe's, which is answered without
 * one). */
#define PING "GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
#define PING_CLOSE "GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
#define PING_ANSWERED "\"models\""

static int setup_few_connections(void **state)
{
    static const char *const extra[] = {"--device", "cpu", "--max-connections", "8", "--timeout-s", "60",
                                        "--max-tokens-limit", "1000000", NULL};
    *state = start(main_models, extra, NULL);
    return 0;
}

/* Whether fd has something to read (an answer, or its end) within ms. */
static int readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) > 0;
}

/* Whether the server has closed fd (read at once: the caller waited). */
static int closed_by_server(int fd)
{
    char b;
    return readable(fd, 0) && recv(fd, &b, 1, MSG_DONTWAIT) <= 0;
}

/* A kept-alive connection that has been answered PING once. */
static int pinged_connection(int port)
{
    struct buf raw = {0};
    int fd = http_connect(port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    assert_int_equal(http_send_all(fd, PING, strlen(PING)), 0);
    if (!readable(fd, 5000))
        fail_msg("PING: no answer within 5 s");
    http_read_until(fd, &raw, PING_ANSWERED);
    if (!raw.p || !strstr(raw.p, " 200 "))
        fail_msg("PING: %s", raw.p ? raw.p : "closed without an answer");
    free(raw.p);
    return fd;
}

/* Sends each of n new connections req, all before reading any answer;
 * each must be answered within 5 s (never left waiting) with a status of
 * want, or 200 or 503 where want is 0.  The number answered 200. */
static int flood(int port, const char *req, int n, int want)
{
    int fds[N_FLOOD], ok = 0;
    assert_true(n <= N_FLOOD);
    for (int i = 0; i < n; i++) {
        fds[i] = http_connect(port, HTTP_TIMEOUT_S);
        assert_true(fds[i] >= 0);
        assert_int_equal(http_send_all(fds[i], req, strlen(req)), 0);
    }
    for (int i = 0; i < n; i++) {
        struct buf raw = {0};
        struct http_resp r;
        int answered = readable(fds[i], 5000) && http_read_all(fds[i], &raw) && http_parse(&raw, &r) == 0;
        close(fds[i]);
        if (!answered || (want ? r.status != want : r.status != 200 && r.status != 503))
            fail_msg("connection %d of the flood: %s", i, raw.p ? raw.p : "no answer within 5 s");
        ok += r.status == 200;
        http_resp_free(&r);
        free(raw.p);
    }
    return ok;
}

/* Every place held by a kept-alive connection that sits idle: a client
 * that comes is served at once, in the place of the connection idle
 * longest, which is closed; the others go on being served on theirs.
 * (libmicrohttpd alone left newcomers in the listen backlog until some
 * connection ended, for up to --timeout-s.)  A flood of clients at once
 * is answered, each, without waiting. */
static void test_idle_connections_make_room(void **state)
{
    struct server *s = *state;
    int hold[MAX_CONN], came[2];
    /* Idle since its answer was sent, which the server notes a moment
     * after the client reads it: the first two answers come well apart. */
    for (int i = 0; i < MAX_CONN; i++) {
        hold[i] = pinged_connection(s->port);
        if (i < 2)
            sleep_ms(150);
    }
    for (int round = 0; round < 2; round++) {
        sleep_ms(300); /* idle long enough to give way (100 ms) */
        came[round] = pinged_connection(s->port); /* kept, so that it holds its place */
        sleep_ms(200);
        for (int i = 0; i < MAX_CONN; i++)
            if (closed_by_server(hold[i]) != (i <= round))
                fail_msg("after %d newcomer(s), connection %d (idle %s) is %s", round + 1, i,
                         i <= round ? "longest" : "shorter", i <= round ? "still open" : "closed");
    }
    /* A request refused before its body (a path that is no endpoint here;
     * one without an API key alike) takes no place, so closes no one's:
     * the holders left are all served on their connections. */
    expect_status(s->port, "GET", "/nothing", NULL, 404);
    for (int i = 2; i < MAX_CONN; i++) {
        struct buf raw = {0};
        assert_int_equal(http_send_all(hold[i], PING, strlen(PING)), 0);
        http_read_until(hold[i], &raw, PING_ANSWERED);
        assert_non_null(raw.p);
        free(raw.p);
    }
    sleep_ms(300);
    assert_true(flood(s->port, PING_CLOSE, N_FLOOD, 0) >= 1);
    for (int i = 0; i < MAX_CONN; i++)
        close(hold[i]);
    close(came[0]);
    close(came[1]);
    assert_true(http_metric(s->port, "rrnserve_connections_closed_total{reason=\"limit\"}") >= 3);
    still_serving(s->port);
}

#define N_SILENT 250

/* n connections that send nothing, then a client behind them: answered
 * 200 within 15 s. */
static void served_behind_silent(int port, int n)
{
    int silent[N_SILENT];
    assert_true(n <= N_SILENT);
    for (int i = 0; i < n; i++) {
        silent[i] = http_connect(port, HTTP_TIMEOUT_S);
        assert_true(silent[i] >= 0);
    }
    int fd = http_connect(port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    assert_int_equal(http_send_all(fd, PING_CLOSE, strlen(PING_CLOSE)), 0);
    struct buf raw = {0};
    if (!readable(fd, 15000) || !http_read_all(fd, &raw) || !strstr(raw.p, " 200 "))
        fail_msg("a client behind %d silent connections: %s", n, raw.p ? raw.p : "no answer within 15 s");
    free(raw.p);
    close(fd);
    for (int i = 0; i < n; i++)
        close(silent[i]);
}

/* More connections than libmicrohttpd takes (8 + 64) that never send a
 * request, places free: a client behind them in the listen backlog is
 * served within seconds, since beyond --max-connections the silent ones
 * are closed after a second, rather than after --timeout-s (60 s). */
static void test_silent_connections_make_room(void **state)
{
    struct server *s = *state;
    served_behind_silent(s->port, 100);
    still_serving(s->port);
}

/* A server started under an open-file limit (prlimit(1) as its wrapper),
 * with --max-connections 512, which needs 640 descriptors.  What its log
 * says of the limit. */
static struct server *start_limited(const char *nofile, const char *logged)
{
    static const char *const extra[] = {"--device", "cpu", "--max-connections", "512", NULL};
    char wrapper[64];
    snprintf(wrapper, sizeof wrapper, "prlimit --nofile=%s", nofile);
    const struct server_opts o = {.models = main_models, .args = extra, .stop_with_sigterm = 1, .wrapper = wrapper};
    struct server *s = server_start(&o);
    if (server_wait_log(s, logged, 1) != 1)
        fail_msg("under --nofile=%s the log does not say \"%s\"", nofile, logged);
    return s;
}

/* Where the hard limit allows, the server raises its soft limit to what
 * --max-connections needs; where it does not, it lowers --max-connections
 * to what fits and says so, and then serves a client behind 250 silent
 * connections.  (Before, libmicrohttpd accepted until it ran out of
 * descriptors at 195 connections, suspended accepting, and the client got
 * no answer within 20 s.)  Skipped under valgrind, which is the wrapper
 * there, and without prlimit. */
static void test_open_file_limit(void **state)
{
    (void)state;
    if (server_wrapped() || system("prlimit --version >/dev/null 2>&1") != 0)
        skip();
    struct server *s = start_limited("200:4000", "raised the open-file limit from 200 to 640 for --max-connections 512");
    server_stop(s);
    s = start_limited("200:200", "--max-connections 512 lowered to 72");
    served_behind_silent(s->port, 250);
    assert_false(server_log_has(s, "Too many open files"));
    assert_true(http_metric(s->port, "rrnserve_connections_max") == 72);
    still_serving(s->port);
    server_stop(s);
}

/* Every place held by a stream in flight: a client that comes is answered
 * 503 at once (Retry-After: 1, naming --max-connections) and its
 * connection closed, as its Connection header says, but for a liveness
 * probe's or a scrape's, answered and closed; so is each of a flood
 * of them; one that connects and sends nothing is closed within a few
 * seconds rather than kept for --timeout-s; the streams run on; once one
 * ends, newcomers are served, one after the other in its place. */
static void test_busy_connections_refuse(void **state)
{
    struct server *s = *state;
    int streams[MAX_CONN];
    for (int i = 0; i < MAX_CONN; i++) {
        struct buf raw = {0};
        streams[i] = start_long_stream(s->port);
        read_past_prompt(streams[i], &raw);
        free(raw.p);
    }
    struct buf raw = {0};
    struct http_resp r;
    int fd = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    assert_int_equal(http_send_all(fd, PING, strlen(PING)), 0);
    assert_true(readable(fd, 5000));
    assert_true(http_read_all(fd, &raw)); /* the answer, then the connection's end */
    close(fd);
    assert_int_equal(http_parse(&raw, &r), 0);
    char retry[16];
    assert_int_equal(r.status, 503);
    assert_string_equal(http_header(&r, "Retry-After", retry, sizeof retry), "1");
    assert_string_equal(http_header(&r, "Connection", retry, sizeof retry), "close");
    assert_non_null(strstr(r.body.p, "--max-connections 8"));
    http_resp_free(&r);
    free(raw.p);
    /* Liveness probes and scrapes are answered all the same, each
     * connection closed after its answer: a busy server is alive, and its
     * metrics show it; it is not ready for more clients. */
    expect_status(s->port, "GET", "/readyz", NULL, 503);
    static const char *const probes[] = {"/healthz", "/metrics"};
    for (int i = 0; i < 2; i++) {
        struct http_resp p;
        char close_[16];
        if (request(s->port, "GET", probes[i], NULL, &p) != 200)
            fail_msg("GET %s with every place held: %d %s", probes[i], p.status, p.body.p ? p.body.p : "");
        assert_string_equal(http_header(&p, "Connection", close_, sizeof close_), "close");
        http_resp_free(&p);
    }
    flood(s->port, "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 51\r\n\r\n" CLASSIFY, N_FLOOD,
          503);
    fd = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(fd >= 0);
    double t0 = now_s();
    assert_true(readable(fd, 10000));
    if (!closed_by_server(fd))
        fail_msg("a silent connection at the limit got an answer");
    close(fd);
    if (now_s() - t0 > 5)
        fail_msg("a silent connection at the limit was closed after %.1f s", now_s() - t0);
    for (int i = 0; i < MAX_CONN; i++) {
        struct buf more = {0};
        http_read_until(streams[i], &more, "\"index\":");
        assert_non_null(more.p);
        free(more.p);
    }
    /* A place is free once the stream's connection has closed, a moment
     * after its request's end is logged: a client retries, as told. */
    close(streams[0]);
    assert_int_equal(server_wait_log(s, "POST /generate 499", 1), 1);
    struct http_resp ok;
    for (int i = 0; i < 100 && request(s->port, "GET", "/models", NULL, &ok) == 503; i++) {
        http_resp_free(&ok);
        sleep_ms(50);
    }
    assert_int_equal(ok.status, 200);
    http_resp_free(&ok);
    /* One place free: client after client, each closing its connection,
     * gets it, since a connection that ends with its answer gives up its
     * place then, not when libmicrohttpd reports the close (which a
     * client may come before: 3 of 200 got 503 that way). */
    for (int i = 0; i < 300; i++)
        expect_status(s->port, "GET", "/models", NULL, 200);
    for (int i = 1; i < MAX_CONN; i++)
        close(streams[i]);
    assert_int_equal(server_wait_log(s, "POST /generate 499", MAX_CONN), MAX_CONN);
    /* Every connection counted open has closed, but the one reading it.
     * libmicrohttpd reports a close a moment after the client sees it, so
     * the last reading's own connection may still count in the next. */
    double open = -1;
    for (int i = 0; i < 200 && (open = http_metric(s->port, "rrnserve_connections_open")) != 1; i++)
        sleep_ms(50);
    assert_true(open == 1);
    still_serving(s->port);
}

/* ---- a model too large for the memory the process may have ----------------- */

static int setup_one_model(void **state)
{
    static const char *const models[] = {"plain_lstm_l2_bi_last", NULL};
    static const char *const extra[] = {"--device", "cpu", NULL};
    *state = start(models, extra, NULL);
    return 0;
}

/* VmSize of a process, in bytes, or -1. */
static long long vm_size(pid_t pid)
{
    char path[64], line[256];
    long long kb = -1;
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmSize: %lld kB", &kb) == 1)
            break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* A valid weight file of about 68 MB (an LSTM of 2 layers, H = E = 1024,
 * zero weights) at path. */
static void write_big_model(const char *path)
{
    const char *json = "{\"task\": \"classify\", \"cell\": \"lstm\", \"hidden\": 1024, \"layers\": 2, \"embed_dim\": "
                       "1024, \"pool\": \"last\", \"classes\": [\"a\", \"b\"], \"tokenizer\": {\"type\": \"byte\"}}";
    char err[512];
    struct model_config cfg;
    struct model m;
    assert_int_equal(config_parse(json, &cfg, err, sizeof err), 0);
    if (model_alloc(&m, &cfg, err, sizeof err) != 0)
        fail_msg("%s", err);
    if (model_save(&m, path, NULL, 0, err, sizeof err) != 0)
        fail_msg("%s", err);
    model_free(&m);
}

/* The server's address space is limited (prlimit(1)) to what it uses plus
 * 96 MB; a reload then meets a valid 68 MB file whose weights need as much
 * again: it is logged as out of memory and the model already loaded keeps
 * serving.  Skipped under sanitizers and valgrind, which need address
 * space of their own, and without prlimit. */
static void test_model_too_large_for_memory(void **state)
{
    struct server *s = *state;
    if (server_wrapped() || getenv("ASAN_OPTIONS") || getenv("TSAN_OPTIONS") ||
        system("prlimit --version >/dev/null 2>&1") != 0)
        skip();
    expect_status(s->port, "POST", "/classify", CLASSIFY, 200); /* every lazy allocation made */
    char tmp[128], dst[128], cmd[256];
    snprintf(tmp, sizeof tmp, "%s/big.tmp", s->dir);
    snprintf(dst, sizeof dst, "%s/big.safetensors", s->dir);
    write_big_model(tmp);
    long long vm = vm_size(s->pid);
    assert_true(vm > 0);
    snprintf(cmd, sizeof cmd, "prlimit --pid %d --as=%lld", (int)s->pid, vm + (96LL << 20));
    assert_int_equal(system(cmd), 0);
    assert_int_equal(rename(tmp, dst), 0);
    assert_int_equal(kill(s->pid, SIGHUP), 0);
    assert_int_equal(server_wait_log(s, "reloaded ", 1), 1);
    assert_int_equal(server_wait_log(s, "model big: cannot load", 1), 1);
    assert_int_equal(server_wait_log(s, "out of memory", 1), 1);
    struct http_resp models;
    assert_int_equal(request(s->port, "GET", "/models", NULL, &models), 200);
    assert_non_null(strstr(models.body.p, "plain_lstm_l2_bi_last"));
    assert_null(strstr(models.body.p, "\"big\""));
    http_resp_free(&models);
    expect_status(s->port, "POST", "/classify", CLASSIFY, 200);
    expect_status(s->port, "POST", "/classify", "{\"model\": \"big\", \"text\": \"a\"}", 404);
}

/* ---- GPUs ----------------------------------------------------------------- */

/* --device cuda where no GPU can be used (CUDA_VISIBLE_DEVICES hides any,
 * and a build without CUDA has none, nor a machine without a driver): no
 * model could ever load, so the server refuses to start, saying why,
 * rather than run unready for good. */
static void test_gpu_unavailable(void **state)
{
    (void)state;
    char *out;
    /* timeout: a server that starts after all is stopped, and fails this. */
    int status = proc_run(&out, "CUDA_VISIBLE_DEVICES= timeout 20 '%s' serve --models %s --port 0 --device cuda",
                          rrn_bin(), "tests/fixtures");
    if (status != 1 || !strstr(out, "rrnserve serve: device cuda: ") || !strstr(out, "CUDA"))
        fail_msg("serve --device cuda without a GPU: exit %d; printed:\n%s", status, out);
    free(out);
}

/* ---- a device that fails while serving ---------------------------------- */

/* Streams that the fault meets mid-way, past their prompts with tokens
 * coming, each end with the error event naming it and [DONE], not a hang
 * or a cut connection; once the fault is gone the server serves again. */
#define N_FAULT_STREAMS 3
static void fault_mid_stream(int port, const char *fault)
{
    int fds[N_FAULT_STREAMS];
    struct buf raw[N_FAULT_STREAMS] = {{0}};
    for (int i = 0; i < N_FAULT_STREAMS; i++)
        fds[i] = start_long_stream(port);
    for (int i = 0; i < N_FAULT_STREAMS; i++)
        read_past_prompt(fds[i], &raw[i]);
    FILE *f = fopen(fault, "w");
    assert_non_null(f);
    fclose(f);
    for (int i = 0; i < N_FAULT_STREAMS; i++) {
        assert_true(http_read_all(fds[i], &raw[i]));
        const char *end = strstr(raw[i].p, "{\"error\":{\"code\":500,");
        if (!end || !strstr(end, "injected device fault") || !strstr(end, "data: [DONE]"))
            fail_msg("stream %d did not end with the fault's error event: ...%s", i,
                     raw[i].p + (raw[i].len > 400 ? raw[i].len - 400 : 0));
        free(raw[i].p);
        close(fds[i]);
    }
    assert_int_equal(unlink(fault), 0);
    still_serving(port);
}

/* The device fails under a running server: while the file RRN_FAULT_FILE
 * names exists, every engine call fails at its sync, as every call on a
 * GPU whose context a fault poisoned does.  Streams running then end with
 * its error (fault_mid_stream).  Each request then gets a 500
 * naming the fault (a stream its error event), the process goes on
 * answering, and after BATCHER_FAILING_AFTER failures in a row /readyz
 * turns 503 naming the model, so a load balancer drains the machine.
 * When the fault goes, the batcher's probe finds the engine working:
 * /readyz is 200 again and requests succeed, without a restart. */
static void device_fault_case(const char *device)
{
    char dir[] = "/tmp/rrn_fault_XXXXXX", fault[64], env_fault[96];
    assert_non_null(mkdtemp(dir));
    snprintf(fault, sizeof fault, "%s/fault", dir);
    snprintf(env_fault, sizeof env_fault, "RRN_FAULT_FILE=%s", fault);
    const char *const extra[] = {"--device", device, "--max-tokens-limit", "1000000", NULL};
    const char *const env[] = {env_fault, NULL};
    struct server *s = start(main_models, extra, env);
    still_serving(s->port);
    expect_status(s->port, "GET", "/readyz", NULL, 200);
    fault_mid_stream(s->port, fault);

    FILE *f = fopen(fault, "w");
    assert_non_null(f);
    fclose(f);
    for (int i = 0; i < BATCHER_FAILING_AFTER; i++)
        assert_int_equal(status_with(s->port, "POST", "/classify", CLASSIFY, "injected device fault"), 500);
    assert_int_equal(status_with(s->port, "POST", "/generate", GENERATE, "injected device fault"), 500);
    const char *stream = "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good\", \"max_tokens\": 4, "
                         "\"stream\": true}";
    assert_int_equal(status_with(s->port, "POST", "/generate", stream, "\"code\":500"), 200);
    assert_int_equal(status_with(s->port, "GET", "/readyz", NULL, "model plain_lstm_l2_bi_last is failing"),
                     503);
    expect_status(s->port, "GET", "/healthz", NULL, 200);
    assert_true(server_wait_log(s, "the model counts as failing", 1) >= 1);
    assert_int_equal(status_with(s->port, "GET", "/metrics", NULL,
                                 "rrnserve_model_failing{model=\"plain_lstm_l2_bi_last\"} 1\n"),
                     200);

    assert_int_equal(unlink(fault), 0);
    int ready = 0;
    for (int tries = 0; tries < 100 && !ready; tries++) {
        struct http_resp r;
        ready = request(s->port, "GET", "/readyz", NULL, &r) == 200;
        http_resp_free(&r);
        if (!ready)
            sleep_ms(100);
    }
    assert_true(ready);
    assert_true(server_wait_log(s, "no longer failing", 1) >= 1);
    assert_int_equal(status_with(s->port, "GET", "/metrics", NULL,
                                 "rrnserve_model_failing{model=\"plain_lstm_l2_bi_last\"} 0\n"),
                     200);
    still_serving(s->port);
    server_stop(s);
    assert_int_equal(rmdir(dir), 0);
}

/* SIGTERM while a stream of a million tokens and a whole generation of as
 * many run: once the wait for them ends (--drain-s, or a second SIGTERM),
 * the server ends each with an error that says why (the stream's event,
 * code 503, and [DONE]; the other's 503 answer), logs `logged`, and exits
 * 0, rather than waiting for them or cutting their connections. */
#define RUNNING "rrnserve_streams_running{model=\"combo_lstm_lm\"}"

static void check_cut_off(const char *drain_s, int twice, const char *logged)
{
    const char *const extra[] = {"--device", "cpu", "--max-tokens-limit", "1000000", "--drain-s", drain_s, NULL};
    struct server *s = start(main_models, extra, NULL);
    const char *body = "{\"model\": \"combo_lstm_lm\", \"prompt\": \"good day\", \"max_tokens\": 1000000}";
    int whole = http_connect(s->port, HTTP_TIMEOUT_S);
    assert_true(whole >= 0);
    http_send_request(whole, "POST", "/generate", "", body, strlen(body));
    int fd = start_long_stream(s->port);
    struct buf raw = {0}, raw_whole = {0};
    read_past_prompt(fd, &raw);
    for (int i = 0; i < 10000 && http_metric(s->port, RUNNING) != 2; i++)
        sleep_ms(1);
    assert_true(http_metric(s->port, RUNNING) == 2);
    assert_int_equal(kill(s->pid, SIGTERM), 0);
    if (twice) {
        assert_int_equal(server_wait_log(s, "SIGTERM: no new connections", 1), 1);
        assert_int_equal(kill(s->pid, SIGTERM), 0);
    }
    /* Before reading: a stream that goes on would keep the read going. */
    assert_int_equal(server_wait_log(s, logged, 1), 1);
    assert_true(http_read_all(fd, &raw));
    const char *end = strstr(raw.p, "{\"error\":{\"code\":503,");
    if (!end || !strstr(end, "stopped this request before its end") || !strstr(end, "data: [DONE]"))
        fail_msg("the stream did not end with the cut-off's error event: ...%s",
                 raw.p + (raw.len > 400 ? raw.len - 400 : 0));
    assert_true(http_read_all(whole, &raw_whole));
    struct http_resp r;
    assert_int_equal(http_parse(&raw_whole, &r), 0);
    assert_int_equal(r.status, 503);
    assert_non_null(strstr(r.body.p, "stopped this request before its end"));
    http_resp_free(&r);
    free(raw.p);
    free(raw_whole.p);
    close(fd);
    close(whole);
    int status = server_wait_exit(s);
    assert_true(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_false(server_log_has(s, "closing their connections"));
    server_stop(s);
}

/* --drain-s 1: the wait ends after a second. */
static void test_drain_limit(void **state)
{
    (void)state;
    check_cut_off("1", 0, "2 request(s) still in flight after 1 s (--drain-s); ending them");
}

/* A second SIGTERM ends the wait at once, long before --drain-s's 300 s
 * (HTTP_TIMEOUT_S bounds the test's reads). */
static void test_second_sigterm(void **state)
{
    (void)state;
    check_cut_off("300", 1, "SIGTERM again: ending the 2 request(s) still in flight");
}

static void test_device_fault_cpu(void **state)
{
    (void)state;
    device_fault_case("cpu");
}

/* The same on a GPU, where there is one. */
static void test_device_fault_cuda(void **state)
{
    (void)state;
    if (backend_cuda_available()) {
        device_fault_case("cuda");
        return;
    }
    fprintf(stderr, "[  INFO    ] no CUDA GPU: the device fault is tested on the CPU only\n");
    skip();
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_reset_mid_stream, setup_main, server_teardown),
        cmocka_unit_test_setup_teardown(test_slow_clients, setup_short_timeout, server_teardown),
        cmocka_unit_test_setup_teardown(test_slow_body_is_a_timeout, setup_short_timeout, server_teardown),
        cmocka_unit_test_setup_teardown(test_oversized_headers, setup_main, server_teardown),
        cmocka_unit_test_setup_teardown(test_idle_connections_make_room, setup_few_connections, server_teardown),
        cmocka_unit_test_setup_teardown(test_busy_connections_refuse, setup_few_connections, server_teardown),
        cmocka_unit_test_setup_teardown(test_silent_connections_make_room, setup_few_connections, server_teardown),
        cmocka_unit_test(test_open_file_limit),
        cmocka_unit_test_setup_teardown(test_model_too_large_for_memory, setup_one_model, server_teardown),
        cmocka_unit_test(test_gpu_unavailable),
        cmocka_unit_test(test_drain_limit),
        cmocka_unit_test(test_second_sigterm),
        cmocka_unit_test(test_device_fault_cpu),
        cmocka_unit_test(test_device_fault_cuda),
    };
    return server_exit_status(cmocka_run_group_tests_name("faults", tests, NULL, NULL));
}
