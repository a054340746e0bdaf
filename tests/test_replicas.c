/* test_replicas.c - rrnserve scaled out behind nginx, as deploy/replicas.sh
 * runs it: three replicas ($RRN_BIN, as tests/run_tests.sh sets it) of the
 * fixture models and nginx from deploy/nginx.conf, all on 127.0.0.1.
 *   - answers through nginx equal the replicas' own, /generate streams come
 *     through unbuffered-marked (X-Accel-Buffering: no) and whole;
 *   - a request's id (X-Request-Id, the client's or nginx's) is the same in
 *     the answer, nginx's access log and the one replica log that has it;
 *   - JSON answers gzipped for clients that accept it, streams never;
 *   - HTTPS: a self-signed certificate made with `openssl req -x509`, nginx
 *     with deploy/nginx-tls.conf, spoken to with libssl (certificate and
 *     host name verified), the same /classify answer;
 *   - 8 clients send /classify for seconds (each as fast as it is
 *     answered, 1 ms apart) while one replica is killed
 *     (SIGKILL): not one request fails, nginx retries on the others;
 *   - `replicas.sh stop` ends nginx and every replica;
 *   - RRN_GPUS gives two more replicas one GPU each, round robin
 *     (CUDA_VISIBLE_DEVICES, read back from their environments), and a
 *     malformed list is refused.
 * Skipped when nginx is not installed (Debian package nginx), the HTTPS test
 * also when openssl is not.  Every loop and wait is bounded, and the script
 * is told this process's pid (RRN_WATCH_PID) so that nothing outlives it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "support/buf.h"
#include "support/files.h"
#include "support/filter.h"
#include "support/http.h"
#include "support/timing.h"

/* Hang guards only: no test asserts how fast anything is. */
#define SOCKET_TIMEOUT_S 60
#define N_REPLICAS 3
#define N_CLIENTS 8
#define LOAD_BEFORE_KILL_MS 1500
#define LOAD_AFTER_KILL_MS 2500
#define LOAD_LIMIT_S 120
#define MAX_REQUESTS_PER_CLIENT 100000
#define LOG_WAIT_MS 5000

/* snprintf into an array, which must not cut. */
#define FMT(buf, ...) assert_true(snprintf(buf, sizeof buf, __VA_ARGS__) < (int)sizeof buf)

static const char *const classify_body = "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good day!\"}";
static const char *const stream_body =
    "{\"model\": \"combo_lstm_lm\", \"prompt\": \"the \", \"max_tokens\": 12, \"seed\": 7, \"stream\": true}";

struct setup {
    int have_nginx, have_tls;
    char dir[64];       /* this test's folder: certificate, script output */
    char work[128];     /* replicas.sh's work folder */
    char env[2048];     /* the environment replicas.sh runs with */
    int port, tls_port; /* nginx's */
    pid_t pids[N_REPLICAS];
    int ports[N_REPLICAS];
};
static struct setup S;

/* ---- small helpers ------------------------------------------------------- */

/* Runs a shell command, its output into the file `out`; its exit status. */
static int run(const char *cmd, const char *out)
{
    char full[8192];
    FMT(full, "(%s) >'%s' 2>&1 </dev/null", cmd, out);
    int status = system(full);
    return status >= 0 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static int have(const char *program)
{
    char cmd[256];
    FMT(cmd, "command -v %s >/dev/null || test -x /usr/sbin/%s", program, program);
    int status = system(cmd);
    return status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

/* A port free on 127.0.0.1 now, below the range the system hands out for
 * port 0.  The replicas (--port 0) and every client take theirs from that
 * range, so none of them can take this one in the second between the
 * pick and nginx's bind, as one did (nginx: bind() failed, Address already
 * in use). */
static int free_port(void)
{
    int low = 32768;
    FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
    if (f) {
        if (fscanf(f, "%d", &low) != 1)
            low = 32768;
        fclose(f);
    }
    if (low <= 11024)
        fail_msg("the system hands out ports from %d: no room below for a fixed one", low);
    for (int tries = 0; tries < 200; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            fail_msg("socket: %s", strerror(errno));
        int port = 10000 + rand() % (low - 10000);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (ok)
            return port;
    }
    fail_msg("no free port from 10000 to %d", low - 1);
    return -1;
}

/* Whether PID is a live process (not a zombie) running `word`. */
static int alive(pid_t pid, const char *word)
{
    char path[64], cmd[4096];
    FMT(path, "/proc/%ld/cmdline", (long)pid);
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    size_t n = fread(cmd, 1, sizeof cmd - 1, f);
    fclose(f);
    for (size_t i = 0; i < n; i++)
        if (!cmd[i])
            cmd[i] = ' ';
    cmd[n] = 0;
    return n > 0 && strstr(cmd, word) != NULL;
}

/* ---- HTTP over TLS -------------------------------------------------------- */

/* One request over HTTPS, the server's certificate checked against the
 * certificate file and the host name "localhost". */
static int tls_request(int port, const char *ca_file, const char *method, const char *path, const char *body,
                       struct http_resp *r, char *why, size_t why_cap)
{
    struct buf req = {0};
    /* Host as the certificate names it. */
    http_format(&req, "localhost", method, path, "", body, body ? strlen(body) : 0);
    int rc = -1;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = NULL;
    int fd = -1;
    struct buf raw = {0};
    snprintf(why, why_cap, "no TLS context");
    if (!ctx || SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1)
        goto out;
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if ((fd = http_connect(port, SOCKET_TIMEOUT_S)) < 0) {
        snprintf(why, why_cap, "cannot connect to port %d", port);
        goto out;
    }
    ssl = SSL_new(ctx);
    if (!ssl || SSL_set_tlsext_host_name(ssl, "localhost") != 1 || SSL_set1_host(ssl, "localhost") != 1 ||
        SSL_set_fd(ssl, fd) != 1)
        goto out;
    if (SSL_connect(ssl) != 1) {
        long v = SSL_get_verify_result(ssl);
        snprintf(why, why_cap, "handshake failed: %s (verify: %s)", ERR_error_string(ERR_get_error(), NULL),
                 X509_verify_cert_error_string(v));
        goto out;
    }
    if (SSL_write(ssl, req.p, (int)req.len) != (int)req.len) {
        snprintf(why, why_cap, "SSL_write failed");
        goto out;
    }
    char chunk[8192];
    int got;
    while ((got = SSL_read(ssl, chunk, sizeof chunk)) > 0)
        buf_add(&raw, chunk, (size_t)got);
    snprintf(why, why_cap, "%s %s (%s): no whole answer", method, path, SSL_get_version(ssl));
    rc = http_parse(&raw, r);
    if (rc == 0)
        snprintf(why, why_cap, "%s", SSL_get_version(ssl));
out:
    if (ssl) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    if (fd >= 0)
        close(fd);
    SSL_CTX_free(ctx);
    free(raw.p);
    free(req.p);
    return rc;
}

/* The body of a 200 answer, to be freed. */
static char *must_get_body(int port, const char *method, const char *path, const char *body)
{
    struct http_resp r;
    if (http_request(port, method, path, "", body, body ? strlen(body) : 0, &r) != 0) {
        http_resp_free(&r);
        fail_msg("%s %s on port %d: no answer", method, path, port);
    }
    if (r.status != 200)
        fail_msg("%s %s on port %d: status %d: %s", method, path, port, r.status, r.body.p);
    return r.body.p;
}

/* ---- the replicas and nginx ---------------------------------------------- */

/* replicas.sh ARGS run with the environment env (S.env for the group's). */
static int script(const char *env, const char *args)
{
    char cmd[4096], out[256];
    FMT(cmd, "%s deploy/replicas.sh %s", env, args);
    FMT(out, "%s/replicas.out", S.dir);
    int rc = run(cmd, out);
    char *text = file_read(out, NULL);
    print_message("replicas.sh %s (status %d):\n%s", args, rc, text ? text : "");
    free(text);
    return rc;
}

static void read_replicas(void)
{
    char path[256];
    FMT(path, "%s/replicas", S.work);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    for (int i = 0; i < N_REPLICAS; i++) {
        int index;
        long pid;
        assert_int_equal(fscanf(f, "%d %ld %d", &index, &pid, &S.ports[i]), 3);
        assert_int_equal(index, i + 1);
        S.pids[i] = (pid_t)pid;
        assert_true(alive(S.pids[i], "serve --models"));
    }
    fclose(f);
}

/* The environment of replicas.sh for a work folder: the fixture models on
 * the CPU, nothing left once this process is gone, and extra. */
static void replicas_env(char *env, size_t size, const char *work, const char *extra)
{
    const char *bin = getenv("RRN_BIN") ? getenv("RRN_BIN") : "./rrnserve";
    int n = snprintf(env, size,
                     "env RRN_WORK='%s' RRN_BIN='%s' RRN_MODELS=tests/fixtures RRN_ARGS='--device cpu --threads 1' "
                     "RRN_WATCH_PID=%ld %s",
                     work, bin, (long)getpid(), extra);
    assert_true(n > 0 && (size_t)n < size);
}

static int setup(void **state)
{
    (void)state;
    memset(&S, 0, sizeof S);
    S.have_nginx = have("nginx");
    if (!S.have_nginx) {
        print_message("nginx is not installed (Debian package nginx): skipped\n");
        return 0;
    }
    srand((unsigned)getpid());
    snprintf(S.dir, sizeof S.dir, "/tmp/rrn_replicas_XXXXXX");
    assert_non_null(mkdtemp(S.dir));
    FMT(S.work, "%s/work", S.dir);
    S.port = free_port();
    S.tls_port = free_port();
    while (S.tls_port == S.port)
        S.tls_port = free_port();

    char tls[1024] = "", cmd[2048], out[256];
    S.have_tls = have("openssl");
    if (S.have_tls) {
        FMT(cmd,
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
            "-addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout '%s/key.pem' -out '%s/cert.pem'",
            S.dir, S.dir);
        FMT(out, "%s/openssl.out", S.dir);
        if (run(cmd, out) != 0) {
            char *text = file_read(out, NULL);
            fail_msg("%s:\n%s", cmd, text ? text : "");
        }
        FMT(tls, "RRN_TLS_PORT=%d RRN_TLS_CERT='%s/cert.pem' RRN_TLS_KEY='%s/key.pem'", S.tls_port, S.dir, S.dir);
    } else {
        print_message("openssl is not installed: the HTTPS test is skipped\n");
    }
    replicas_env(S.env, sizeof S.env, S.work, tls);
    FMT(cmd, "start %d %d", N_REPLICAS, S.port);
    if (script(S.env, cmd) != 0)
        fail_msg("replicas.sh start failed");
    read_replicas();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (!S.have_nginx)
        return 0;
    script(S.env, "stop");
    remove_tree(S.dir, NULL);
    return 0;
}

#define NEED_NGINX()                                                                                                   \
    do {                                                                                                               \
        if (!S.have_nginx)                                                                                             \
            skip();                                                                                                    \
    } while (0)

/* ---- the tests ----------------------------------------------------------- */

static void test_proxy_equals_direct(void **state)
{
    (void)state;
    NEED_NGINX();
    static const struct {
        const char *method, *path, *body;
    } reqs[] = {
        {"POST", "/classify", "{\"model\": \"plain_lstm_l2_bi_last\", \"text\": \"good day!\"}"},
        {"POST", "/classify", "{\"model\": \"rra_dynamic_w3_l2_bi\", \"texts\": [\"a\", \"nice day\"]}"},
        {"POST", "/score", "{\"model\": \"combo_lstm_lm\", \"text\": \"good day\"}"},
        {"POST", "/generate", "{\"model\": \"combo_lstm_lm\", \"prompt\": \"the \", \"max_tokens\": 20, \"seed\": 1}"},
        {"GET", "/models", NULL},
        {"GET", "/readyz", NULL},
    };
    for (size_t i = 0; i < sizeof reqs / sizeof reqs[0]; i++) {
        char *direct = must_get_body(S.ports[0], reqs[i].method, reqs[i].path, reqs[i].body);
        /* Several times, so that every replica answers some.  How much of
         * a prompt a replica had cached is its own (the same replica may
         * answer twice, and its second answer restores what the first
         * left), so "cached_tokens" is left out of the comparison. */
        http_drop_cached_tokens(direct);
        for (int k = 0; k < N_REPLICAS; k++) {
            char *proxied = must_get_body(S.port, reqs[i].method, reqs[i].path, reqs[i].body);
            http_drop_cached_tokens(proxied);
            if (strcmp(direct, proxied) != 0)
                fail_msg("%s %s: through nginx\n%s\ndirectly\n%s", reqs[i].method, reqs[i].path, proxied, direct);
            free(proxied);
        }
        free(direct);
    }
}

/* Streams pass through unbuffered, /generate's and the completions API's
 * alike; /generate's (which has no time or request id in it) is the
 * replica's own to the byte, but for the prompt tokens its cache
 * supplied. */
static void test_stream_through_proxy(void **state)
{
    (void)state;
    NEED_NGINX();
    static const char *const paths[] = {"/generate", "/v1/completions"};
    for (int p = 0; p < 2; p++) {
        struct http_resp direct, proxied;
        char value[256];
        assert_int_equal(http_request(S.ports[1], "POST", paths[p], "", stream_body, strlen(stream_body), &direct), 0);
        assert_int_equal(http_request(S.port, "POST", paths[p], "", stream_body, strlen(stream_body), &proxied), 0);
        assert_int_equal(direct.status, 200);
        assert_int_equal(proxied.status, 200);
        assert_string_equal(http_header(&proxied, "Content-Type", value, sizeof value), "text/event-stream");
        assert_string_equal(http_header(&proxied, "X-Accel-Buffering", value, sizeof value), "no");
        assert_non_null(strstr(proxied.body.p, "data: [DONE]"));
        if (p == 0) {
            http_drop_cached_tokens(proxied.body.p);
            http_drop_cached_tokens(direct.body.p);
            assert_string_equal(proxied.body.p, direct.body.p);
        }
        http_resp_free(&direct);
        http_resp_free(&proxied);
    }
}

/* How many of the files work/<names[i]> hold needle, waiting up to
 * LOG_WAIT_MS for one to: a replica logs a request once it has answered
 * it, so its line may come after the answer has reached the client. */
static int logs_holding(const char *const *names, int n, const char *needle)
{
    for (int waited = 0;; waited += 20) {
        int found = 0;
        for (int i = 0; i < n; i++) {
            char path[256];
            FMT(path, "%s/%s", S.work, names[i]);
            char *text = file_read(path, NULL);
            found += text && strstr(text, needle);
            free(text);
        }
        if (found || waited >= LOG_WAIT_MS)
            return found;
        sleep_ms(20);
    }
}

/* One request id follows a request through nginx's log and its replica's:
 * the client's when plausible, else nginx's own (32 hex digits), which the
 * replica keeps and answers. */
static void test_request_ids_through_proxy(void **state)
{
    (void)state;
    NEED_NGINX();
    static const char *const nginx_log = "access.log";
    static const char *const replica_logs[N_REPLICAS] = {"replica-1.log", "replica-2.log", "replica-3.log"};
    static const struct {
        const char *header, *kept; /* kept: NULL when nginx's id replaces it */
    } cases[] = {
        {"X-Request-Id: trace-lb-1\r\n", "trace-lb-1"},
        {"", NULL},
        {"X-Request-Id: two words\r\n", NULL},
        {"X-Request-Id: \"quoted\"\r\n", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct http_resp r;
        char id[256], needle[300];
        assert_int_equal(http_request(S.port, "POST", "/classify", cases[i].header, classify_body,
                                      strlen(classify_body), &r), 0);
        assert_int_equal(r.status, 200);
        http_header(&r, "X-Request-Id", id, sizeof id);
        http_resp_free(&r);
        if (cases[i].kept)
            assert_string_equal(id, cases[i].kept);
        else if (strlen(id) != 32 || strspn(id, "0123456789abcdef") != 32)
            fail_msg("\"%s\" answered with the id \"%s\", not nginx's", cases[i].header, id);
        FMT(needle, "id=%s\n", id);
        if (logs_holding(&nginx_log, 1, needle) != 1)
            fail_msg("nginx's access.log has no \"id=%s\"", id);
        int replicas = logs_holding(replica_logs, N_REPLICAS, needle);
        if (replicas != 1)
            fail_msg("%d replica logs have \"id=%s\", not 1", replicas, id);
    }
}

/* Through nginx, JSON answers come gzip-compressed to a client that
 * accepts it and decompress to the replica's own answer; to one that does
 * not, and event streams always, they come as they are. */
static void test_gzip_through_proxy(void **state)
{
    (void)state;
    NEED_NGINX();
    static const char *const gz = "Accept-Encoding: gzip\r\n";
    char value[64], path[256], cmd[1024], out[256];
    char *direct = must_get_body(S.ports[0], "GET", "/models", NULL);
    struct http_resp r;
    assert_int_equal(http_request(S.port, "GET", "/models", gz, NULL, 0, &r), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(http_header(&r, "Content-Encoding", value, sizeof value), "gzip");
    print_message("GET /models through nginx: %zu bytes gzipped, %zu as JSON\n", r.body.len, strlen(direct));
    assert_true(r.body.len < strlen(direct) / 2);
    FMT(path, "%s/models.gz", S.dir);
    file_write(path, r.body.p, r.body.len);
    http_resp_free(&r);
    FMT(cmd, "gzip -dc '%s/models.gz'", S.dir);
    FMT(out, "%s/models.json", S.dir);
    assert_int_equal(run(cmd, out), 0);
    char *unzipped = file_read(out, NULL);
    assert_non_null(unzipped);
    assert_string_equal(unzipped, direct);
    free(unzipped);
    free(direct);

    assert_int_equal(http_request(S.port, "GET", "/models", "", NULL, 0, &r), 0);
    assert_string_equal(http_header(&r, "Content-Encoding", value, sizeof value), "");
    http_resp_free(&r);
    assert_int_equal(http_request(S.port, "POST", "/generate", gz, stream_body, strlen(stream_body), &r), 0);
    assert_int_equal(r.status, 200);
    assert_string_equal(http_header(&r, "Content-Encoding", value, sizeof value), "");
    assert_non_null(strstr(r.body.p, "data: [DONE]"));
    http_resp_free(&r);
}

static void test_https(void **state)
{
    (void)state;
    NEED_NGINX();
    if (!S.have_tls)
        skip();
    char ca[256], why[512];
    FMT(ca, "%s/cert.pem", S.dir);
    char *direct = must_get_body(S.ports[2], "POST", "/classify", classify_body);
    struct http_resp r;
    if (tls_request(S.tls_port, ca, "POST", "/classify", classify_body, &r, why, sizeof why) != 0)
        fail_msg("HTTPS to nginx: %s", why);
    print_message("HTTPS through nginx: %s\n", why);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body.p, direct);
    http_resp_free(&r);
    free(direct);

    /* The plain port does not speak TLS, and a certificate that does not
     * vouch for the server is refused. */
    assert_int_not_equal(tls_request(S.port, ca, "GET", "/healthz", NULL, &r, why, sizeof why), 0);
    char other[256], cmd[1024], out[256];
    FMT(other, "%s/other.pem", S.dir);
    FMT(cmd,
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
        "-keyout '%s/other.key' -out '%s'",
        S.dir, other);
    FMT(out, "%s/openssl.out", S.dir);
    assert_int_equal(run(cmd, out), 0);
    assert_int_not_equal(tls_request(S.tls_port, other, "GET", "/healthz", NULL, &r, why, sizeof why), 0);
    print_message("with a certificate that does not vouch for nginx's: %s\n", why);
}

/* ---- a replica killed under load ----------------------------------------- */

struct load {
    const char *expect;  /* the /classify answer */
    atomic_int stop;
    atomic_int killed;   /* set once the replica is dead */
    atomic_long done, after_kill, failed;
    pthread_mutex_t mu;
    char first_failure[1024];
};

static void *client_main(void *arg)
{
    struct load *L = arg;
    double limit = now_s() + LOAD_LIMIT_S;
    for (int i = 0; i < MAX_REQUESTS_PER_CLIENT && !atomic_load(&L->stop) && now_s() < limit; i++) {
        int after = atomic_load(&L->killed);
        struct http_resp r;
        int rc = http_request(S.port, "POST", "/classify", "", classify_body, strlen(classify_body), &r);
        if (rc != 0 || r.status != 200 || strcmp(r.body.p, L->expect) != 0) {
            atomic_fetch_add(&L->failed, 1);
            pthread_mutex_lock(&L->mu);
            if (!L->first_failure[0])
                snprintf(L->first_failure, sizeof L->first_failure, "%s: status %d: %s",
                         rc != 0 ? "no whole answer" : "wrong answer", rc != 0 ? 0 : r.status,
                         rc != 0 ? "" : r.body.p);
            pthread_mutex_unlock(&L->mu);
        }
        http_resp_free(&r);
        atomic_fetch_add(&L->done, 1);
        if (after)
            atomic_fetch_add(&L->after_kill, 1);
        sleep_ms(1);
    }
    return NULL;
}

/* Requests the access log shows tried on more than one replica. */
static int retried_requests(void)
{
    char path[256];
    FMT(path, "%s/access.log", S.work);
    char *log = file_read(path, NULL);
    int n = 0;
    for (char *line = log; line && *line;) {
        char *end = strchr(line, '\n');
        if (end)
            *end = 0;
        const char *up = strstr(line, "upstream=");
        if (up && strstr(line, "/classify") && strchr(up, ',') && strchr(up, ',') < strstr(up, " upstream_status="))
            n++;
        line = end ? end + 1 : line + strlen(line);
    }
    free(log);
    return n;
}

static void test_kill_replica_under_load(void **state)
{
    (void)state;
    NEED_NGINX();
    struct load L = {0};
    pthread_mutex_init(&L.mu, NULL);
    char *expect = must_get_body(S.ports[0], "POST", "/classify", classify_body);
    L.expect = expect;
    pid_t victim = S.pids[1];
    int victim_port = S.ports[1];

    /* Nothing may fail from here until the clients are joined: they use L. */
    pthread_t clients[N_CLIENTS];
    int started = 0;
    while (started < N_CLIENTS && pthread_create(&clients[started], NULL, client_main, &L) == 0)
        started++;
    /* Load until every replica has answered some /classify (bounded). */
    double limit = now_s() + LOAD_LIMIT_S / 2;
    sleep_ms(LOAD_BEFORE_KILL_MS);
    while (http_metric(victim_port, "rrnserve_requests_total{endpoint=\"/classify\",status=\"200\"}") < 1 &&
           now_s() < limit)
        sleep_ms(100);
    double served = http_metric(victim_port, "rrnserve_requests_total{endpoint=\"/classify\",status=\"200\"}");
    long before = atomic_load(&L.done);

    int killed = kill(victim, SIGKILL);
    for (int i = 0; i < 500 && alive(victim, "serve --models"); i++)
        sleep_ms(10);
    atomic_store(&L.killed, 1);
    double kill_time = now_s();
    /* Load goes on for a while, and for some requests at least. */
    while ((now_s() - kill_time < LOAD_AFTER_KILL_MS / 1000.0 || atomic_load(&L.after_kill) < 50) &&
           now_s() - kill_time < LOAD_LIMIT_S / 2)
        sleep_ms(50);
    atomic_store(&L.stop, 1);
    for (int i = 0; i < started; i++)
        pthread_join(clients[i], NULL);
    assert_int_equal(started, N_CLIENTS);
    assert_int_equal(killed, 0);

    int retried = retried_requests();
    print_message("%ld requests (%ld before the kill, %ld after it), %ld failed; the killed replica had answered "
                  "%.0f; %d retried on another replica\n",
                  atomic_load(&L.done), before, atomic_load(&L.after_kill), atomic_load(&L.failed), served, retried);
    if (atomic_load(&L.failed))
        fail_msg("%ld request(s) failed, the first: %s", atomic_load(&L.failed), L.first_failure);
    assert_false(alive(victim, "serve --models"));
    assert_true(served >= 1);
    assert_true(before > 0);
    assert_true(atomic_load(&L.after_kill) >= 50);
    assert_true(retried >= 1);
    /* The other replicas serve on. */
    for (int i = 0; i < N_REPLICAS; i++)
        if (i != 1)
            assert_true(alive(S.pids[i], "serve --models"));
    free(expect);
    pthread_mutex_destroy(&L.mu);
}

static void test_stop(void **state)
{
    (void)state;
    NEED_NGINX();
    char path[256];
    FMT(path, "%s/nginx.pid", S.work);
    char *text = file_read(path, NULL);
    assert_non_null(text);
    pid_t nginx = (pid_t)atol(text);
    free(text);
    assert_true(alive(nginx, "nginx"));
    assert_int_equal(script(S.env, "stop"), 0);
    assert_false(alive(nginx, "nginx"));
    for (int i = 0; i < N_REPLICAS; i++)
        assert_false(alive(S.pids[i], "serve --models"));
    int fd = http_connect(S.port, SOCKET_TIMEOUT_S);
    if (fd >= 0)
        close(fd);
    assert_true(fd < 0);
    /* Stopping again is harmless. */
    assert_int_equal(script(S.env, "stop"), 0);
}

/* Whether the environment of process pid holds the variable var exactly
 * (NAME=VALUE). */
static int environ_has(pid_t pid, const char *var)
{
    char path[64];
    FMT(path, "/proc/%ld/environ", (long)pid);
    size_t len = 0;
    char *env = file_read(path, &len);
    int found = 0;
    for (size_t at = 0; env && at < len; at += strlen(env + at) + 1)
        found |= strcmp(env + at, var) == 0;
    free(env);
    return found;
}

static void test_gpus_round_robin(void **state)
{
    (void)state;
    NEED_NGINX();
    char work[160], env[2048], cmd[64];
    FMT(work, "%s/gpus", S.dir);
    int port = free_port();
    while (port == S.port || port == S.tls_port)
        port = free_port();
    FMT(cmd, "start 1 %d", port);
    replicas_env(env, sizeof env, work, "RRN_GPUS='0 1;x'");
    assert_int_equal(script(env, cmd), 1);
    char path[256];
    FMT(path, "%s/replicas.out", S.dir);
    char *text = file_must_read(path, NULL);
    assert_non_null(strstr(text, "RRN_GPUS must list GPU indices or UUIDs, not '1;x'"));
    free(text);

    replicas_env(env, sizeof env, work, "RRN_GPUS='1 GPU-5fb3c9a2'");
    FMT(cmd, "start 3 %d", port);
    assert_int_equal(script(env, cmd), 0);
    FMT(path, "%s/replicas", work);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    const char *const want[3] = {"CUDA_VISIBLE_DEVICES=1", "CUDA_VISIBLE_DEVICES=GPU-5fb3c9a2",
                                 "CUDA_VISIBLE_DEVICES=1"};
    for (int i = 0; i < 3; i++) {
        int index, replica_port;
        long pid;
        assert_int_equal(fscanf(f, "%d %ld %d", &index, &pid, &replica_port), 3);
        assert_true(alive((pid_t)pid, "serve --models"));
        if (!environ_has((pid_t)pid, want[i]))
            fail_msg("replica %d runs without %s", index, want[i]);
    }
    fclose(f);
    assert_int_equal(script(env, "stop"), 0);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_proxy_equals_direct),
        cmocka_unit_test(test_stream_through_proxy),
        cmocka_unit_test(test_request_ids_through_proxy),
        cmocka_unit_test(test_gzip_through_proxy),
        cmocka_unit_test(test_https),
        cmocka_unit_test(test_kill_replica_under_load),
        cmocka_unit_test(test_gpus_round_robin),
        cmocka_unit_test(test_stop),
    };
    return cmocka_run_group_tests_name("replicas", tests, setup, teardown);
}
