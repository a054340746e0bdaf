/* fuzz_http.c - libFuzzer target for the HTTP layer (server/http.c under
 * libmicrohttpd): the input is sent as it is, as the bytes of one
 * connection to a server on 127.0.0.1, which then sees the connection's
 * end; whatever comes back is read to the end of the connection.
 *
 * The server runs as `rrnserve serve` runs it (thread per connection, the
 * watchdog, request ids, API keys required for all but the open
 * endpoints), over an empty models folder: every endpoint answers
 * (/healthz, /readyz 503, /models, /metrics, and the POST endpoints 400 or
 * 404 once they have read their bodies), so what is fuzzed is the framing,
 * the headers, the routing and the bodies' arrival, not the models
 * (fuzz_request does those).  An answer must begin "HTTP/1."; the server
 * must still accept a connection after each input.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "api.h"
#include "auth.h"
#include "http.h"
#include "metrics.h"
#include "registry.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64], keys[96];
static struct api api;
static struct http_server *server;

static void remove_dir(void)
{
    unlink(keys);
    rmdir(dir);
}

static void die(const char *what, const char *why)
{
    fprintf(stderr, "fuzz_http: %s: %s\n", what, why);
    exit(1);
}

static void start_server(void)
{
    char err[512];
    snprintf(dir, sizeof dir, "/tmp/rrn_fuzz_http_XXXXXX");
    if (!mkdtemp(dir))
        die("mkdtemp", "cannot make a folder");
    atexit(remove_dir);
    /* The SHA-256 of the key "fuzz" (auth.h), which the seeds send. */
    snprintf(keys, sizeof keys, "%s/keys", dir);
    FILE *f = fopen(keys, "w");
    if (!f || fputs("93850b707585e404e4951a3ddc1f05a34b3d4f5fc081d616f46d8a2e8f1c8e68\n", f) < 0 || fclose(f) != 0)
        die(keys, "cannot write");
    struct auth *auth = auth_load(keys, err, sizeof err);
    if (!auth)
        die("auth_load", err);
    api.metrics = metrics_new("fuzz");
    struct registry_options ro = {.dir = dir, .device = DEVICE_CPU, .batch = {.max_batch = 8, .max_queue = 64}};
    api.lim = (struct api_limits){.max_text_bytes = 4096, .max_tokens = 16};
    atomic_init(&api.stopping, 0);
    if (!api.metrics || !(api.reg = registry_open(&ro, err, sizeof err)))
        die("registry_open", api.metrics ? err : "out of memory");
    struct http_options ho = {.host = "127.0.0.1", .max_body = 1 << 16, .max_connections = 64, .timeout_s = 2};
    if (!(server = http_start(&ho, &api, auth, api.metrics, err, sizeof err)))
        die("http_start", err);
}

/* A connection to the server, with 5 s timeouts both ways; -1 if none. */
static int connect_server(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)http_port(server))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 5};
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0 ||
        connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!server)
        start_server();
    /* Each input leaves a connection in TIME_WAIT on this side for a
     * minute, and at thousands a second they can hold nearly every local
     * port: a connect that fails is tried again before it counts as the
     * server no longer accepting, a crash for libFuzzer. */
    int fd = connect_server();
    for (int tries = 1; fd < 0 && tries < 10; tries++) {
        nanosleep(&(struct timespec){.tv_nsec = 200 * 1000 * 1000}, NULL);
        fd = connect_server();
    }
    if (fd < 0) {
        fprintf(stderr, "fuzz_http: cannot connect to the server: %s\n", strerror(errno));
        abort();
    }
    /* The server may answer and close before it has read everything. */
    for (size_t sent = 0; sent < size;) {
        ssize_t n = send(fd, data + sent, size - sent, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        sent += (size_t)n;
    }
    shutdown(fd, SHUT_WR);
    char head[8], buf[65536];
    size_t got = 0;
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, 0)) > 0) {
        if (got < sizeof head)
            memcpy(head + got, buf, (size_t)n < sizeof head - got ? (size_t)n : sizeof head - got);
        got += (size_t)n;
    }
    close(fd);
    if (got > 0 && memcmp(head, "HTTP/1.", got < 7 ? got : 7) != 0)
        abort();
    return 0;
}
