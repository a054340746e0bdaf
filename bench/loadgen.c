/* loadgen.c - the HTTP load generator of `make bench-server`.
 *
 *   loadgen --url http://127.0.0.1:PORT/classify --body FILE [--clients N]
 *           [--seconds S] [--requests N] [--timeout-ms N]
 *
 * N clients (one thread each) hold one HTTP/1.1 keep-alive connection each
 * and send POST requests back to back, each waiting for its answer before
 * sending the next, until S seconds have passed (or N requests in all have
 * been sent).  FILE holds one request body per non-empty line; the requests
 * take the lines in turn, and "{{seq}}" in a line is replaced by the
 * request's sequence number (0, 1, ...), so that e.g. every generation gets
 * its own seed.  Only loopback is allowed: the host must be 127.0.0.1 or
 * localhost.
 *
 * Prints one JSON line: the requests sent, the errors (non-2xx by status,
 * "conn" for a connection that failed or timed out), throughput (2xx
 * answers per second of the run), tokens per second (the sum of the
 * "tokens" fields of the 2xx answers, for /generate), and latency
 * percentiles over the 2xx answers, in milliseconds.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAX_CLIENTS 4096
#define MAX_BODIES 1000000
#define MAX_LINE (1 << 20)            /* longest body line */
#define MAX_RESPONSE (16 << 20)       /* largest response accepted */
#define MAX_LATENCIES (50 * 1000 * 1000) /* per client */
#define N_STATUS 600
#define SEQ_MARK "{{seq}}"

struct options {
    char host[64];
    int port;
    char path[1024];
    const char *body_file;
    int clients;
    double seconds;
    long requests;   /* 0: no count limit */
    int timeout_ms;
};

struct shared {
    const struct options *opt;
    char **bodies;
    int n_bodies;
    struct sockaddr_in addr;
    double t_start, t_end; /* the run's window, monotonic seconds */
    atomic_long next_seq;  /* requests handed out */
};

struct client {
    struct shared *sh;
    pthread_t thread;
    int started;
    /* Results, the client's own until joined. */
    double *lat_ms;        /* latencies of 2xx answers */
    size_t n_lat, cap_lat;
    long status[N_STATUS]; /* answers by status */
    long conn_errors;
    long tokens;
    long ok_in_window;     /* 2xx answers completed before t_end */
    /* Connection and buffers. */
    int fd;
    char *req;
    size_t req_cap;
    char *buf;             /* response bytes */
    size_t len, cap;
};

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void usage(void)
{
    fprintf(stderr, "usage: loadgen --url http://127.0.0.1:PORT/PATH --body FILE [--clients N] [--seconds S]\n"
                    "               [--requests N] [--timeout-ms N]\n");
}

/* http://HOST[:PORT]/PATH with HOST 127.0.0.1 or localhost only. */
static int parse_url(const char *url, struct options *o)
{
    const char *p = url;
    if (strncmp(p, "http://", 7) != 0) {
        fprintf(stderr, "loadgen: --url must start with http://\n");
        return -1;
    }
    p += 7;
    size_t hl = strcspn(p, ":/");
    if (hl == 0 || hl >= sizeof o->host) {
        fprintf(stderr, "loadgen: bad host in --url\n");
        return -1;
    }
    memcpy(o->host, p, hl);
    o->host[hl] = 0;
    if (strcmp(o->host, "127.0.0.1") != 0 && strcasecmp(o->host, "localhost") != 0) {
        fprintf(stderr, "loadgen: only 127.0.0.1 or localhost may be loaded, not %s\n", o->host);
        return -1;
    }
    p += hl;
    o->port = 80;
    if (*p == ':') {
        char *end;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || port < 1 || port > 65535) {
            fprintf(stderr, "loadgen: bad port in --url\n");
            return -1;
        }
        o->port = (int)port;
        p = end;
    }
    if (*p == 0)
        p = "/";
    if (*p != '/' || strlen(p) >= sizeof o->path || strpbrk(p, " \r\n")) {
        fprintf(stderr, "loadgen: bad path in --url\n");
        return -1;
    }
    strcpy(o->path, p);
    return 0;
}

static int parse_args(int argc, char **argv, struct options *o)
{
    *o = (struct options){.clients = 1, .seconds = 5, .timeout_ms = 60000};
    int have_url = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            exit(0);
        }
        if (!v) {
            fprintf(stderr, "loadgen: %s needs a value\n", a);
            return -1;
        }
        i++;
        if (!strcmp(a, "--url")) {
            if (parse_url(v, o) != 0)
                return -1;
            have_url = 1;
        } else if (!strcmp(a, "--body")) {
            o->body_file = v;
        } else if (!strcmp(a, "--clients")) {
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > MAX_CLIENTS) {
                fprintf(stderr, "loadgen: --clients must be from 1 to %d\n", MAX_CLIENTS);
                return -1;
            }
            o->clients = (int)n;
        } else if (!strcmp(a, "--seconds")) {
            double s = strtod(v, &end);
            if (*end || !(s > 0 && s <= 86400)) {
                fprintf(stderr, "loadgen: --seconds must be in (0, 86400]\n");
                return -1;
            }
            o->seconds = s;
        } else if (!strcmp(a, "--requests")) {
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 1000000000L) {
                fprintf(stderr, "loadgen: --requests must be from 1 to 1e9\n");
                return -1;
            }
            o->requests = n;
        } else if (!strcmp(a, "--timeout-ms")) {
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 3600000L) {
                fprintf(stderr, "loadgen: --timeout-ms must be from 1 to 3600000\n");
                return -1;
            }
            o->timeout_ms = (int)n;
        } else {
            fprintf(stderr, "loadgen: unknown option %s\n", a);
            usage();
            return -1;
        }
    }
    if (!have_url || !o->body_file) {
        usage();
        return -1;
    }
    return 0;
}

static void free_bodies(char **bodies, int n)
{
    for (int i = 0; i < n; i++)
        free(bodies[i]);
    free(bodies);
}

/* The non-empty lines of path, without their line ends. */
static int read_bodies(const char *path, char ***out, int *n_out)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "loadgen: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    char **bodies = NULL, *line = NULL;
    size_t line_cap = 0;
    int n = 0, cap = 0, rc = 0;
    ssize_t got;
    while (rc == 0 && (got = getline(&line, &line_cap, f)) >= 0) {
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r'))
            line[--got] = 0;
        if (got == 0)
            continue;
        if (got > MAX_LINE || n >= MAX_BODIES) {
            fprintf(stderr, "loadgen: %s: too many or too long lines\n", path);
            rc = -1;
            break;
        }
        if (n == cap) {
            int ncap = cap ? cap * 2 : 64;
            char **nb = realloc(bodies, sizeof *nb * (size_t)ncap);
            if (!nb) {
                rc = -1;
                break;
            }
            bodies = nb;
            cap = ncap;
        }
        if (!(bodies[n] = strdup(line))) {
            rc = -1;
            break;
        }
        n++;
    }
    if (rc == 0 && ferror(f)) {
        fprintf(stderr, "loadgen: cannot read %s\n", path);
        rc = -1;
    }
    free(line);
    fclose(f);
    if (rc == 0 && n == 0) {
        fprintf(stderr, "loadgen: %s holds no request body\n", path);
        rc = -1;
    }
    if (rc != 0) {
        free_bodies(bodies, n);
        return -1;
    }
    *out = bodies;
    *n_out = n;
    return 0;
}

static int ensure(char **p, size_t *cap, size_t need, size_t limit)
{
    if (need <= *cap)
        return 0;
    if (need > limit)
        return -1;
    size_t ncap = *cap ? *cap : 4096;
    while (ncap < need)
        ncap *= 2;
    if (ncap > limit)
        ncap = limit;
    char *np = realloc(*p, ncap);
    if (!np)
        return -1;
    *p = np;
    *cap = ncap;
    return 0;
}

static void disconnect(struct client *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->len = 0;
}

static int connect_client(struct client *c)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    struct timeval tv = {.tv_sec = c->sh->opt->timeout_ms / 1000, .tv_usec = (c->sh->opt->timeout_ms % 1000) * 1000};
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0 ||
        connect(fd, (const struct sockaddr *)&c->sh->addr, sizeof c->sh->addr) != 0) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->len = 0;
    return 0;
}

/* The request for sequence number seq into c->req; returns its length. */
static long build_request(struct client *c, long seq)
{
    const struct shared *sh = c->sh;
    const char *body = sh->bodies[seq % sh->n_bodies];
    char num[24];
    int nl = snprintf(num, sizeof num, "%ld", seq);
    /* The body with every {{seq}} replaced: first its length. */
    size_t blen = 0, ml = strlen(SEQ_MARK);
    for (const char *p = body, *m; *p; p = m + ml) {
        if (!(m = strstr(p, SEQ_MARK))) {
            blen += strlen(p);
            break;
        }
        blen += (size_t)(m - p) + (size_t)nl;
    }
    const struct options *o = sh->opt;
    size_t need = blen + strlen(o->path) + sizeof o->host + 256;
    if (ensure(&c->req, &c->req_cap, need, (size_t)MAX_LINE * 8 + 4096) != 0)
        return -1;
    int hl = snprintf(c->req, c->req_cap,
                      "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                      "Content-Length: %zu\r\n\r\n",
                      o->path, o->host, o->port, blen);
    if (hl < 0 || (size_t)hl >= c->req_cap)
        return -1;
    char *w = c->req + hl;
    for (const char *p = body, *m; *p; p = m + ml) {
        if (!(m = strstr(p, SEQ_MARK))) {
            size_t rest = strlen(p);
            memcpy(w, p, rest);
            w += rest;
            break;
        }
        memcpy(w, p, (size_t)(m - p));
        w += m - p;
        memcpy(w, num, (size_t)nl);
        w += nl;
    }
    return (long)(w - c->req);
}

static int send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read more bytes into c->buf; -1 on error, timeout, end of stream or a
 * response over the limit. */
static int read_more(struct client *c, double deadline)
{
    if (now_s() > deadline)
        return -1;
    if (ensure(&c->buf, &c->cap, c->len + 65536 + 1, MAX_RESPONSE) != 0)
        return -1;
    ssize_t r;
    do
        r = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
    while (r < 0 && errno == EINTR);
    if (r <= 0)
        return -1;
    c->len += (size_t)r;
    c->buf[c->len] = 0;
    return 0;
}

/* A header's value in the header block [h, end), or NULL. */
static const char *header_value(const char *h, const char *end, const char *name)
{
    size_t nl = strlen(name);
    for (const char *p = h; p && p < end;) {
        const char *eol = strstr(p, "\r\n");
        if (!eol || eol > end)
            break;
        if ((size_t)(eol - p) > nl && !strncasecmp(p, name, nl) && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (*v == ' ' || *v == '\t')
                v++;
            return v;
        }
        p = eol + 2;
    }
    return NULL;
}

/* The value of the top-level "tokens" field of a JSON answer, or 0.  A
 * string value holds no unescaped quote, so "tokens": only matches a key
 * ("prompt_tokens" has no quote before "tokens"). */
static long tokens_field(const char *body, size_t len)
{
    const char *key = "\"tokens\":", *end = body + len;
    size_t kl = strlen(key);
    for (const char *p = body; p + kl <= end; p++) {
        if (memcmp(p, key, kl) != 0)
            continue;
        long v = strtol(p + kl, NULL, 10);
        return v > 0 ? v : 0;
    }
    return 0;
}

/* Read one response.  Sets *status, *body (into c->buf) and *body_len and
 * *close_after; returns -1 on a connection error.  Chunked bodies are
 * decoded in place. */
static int read_response(struct client *c, double deadline, int *status, char **body, size_t *body_len,
                         int *close_after)
{
    char *hend = NULL;
    while (!hend) {
        if (c->len >= 4 && (hend = strstr(c->buf, "\r\n\r\n")))
            break;
        if (read_more(c, deadline) != 0)
            return -1;
    }
    if (strncmp(c->buf, "HTTP/1.", 7) != 0 || c->len < 12)
        return -1;
    int st = atoi(c->buf + 9);
    if (st < 100 || st >= N_STATUS)
        return -1;
    const char *cl = header_value(c->buf, hend + 2, "Content-Length");
    const char *te = header_value(c->buf, hend + 2, "Transfer-Encoding");
    const char *cn = header_value(c->buf, hend + 2, "Connection");
    *close_after = cn && !strncasecmp(cn, "close", 5);
    size_t hlen = (size_t)(hend + 4 - c->buf);
    if (te && !strncasecmp(te, "chunked", 7)) {
        /* Decode chunk by chunk, moving the data down over the sizes. */
        size_t out = hlen, at = hlen;
        for (int chunks = 0;; chunks++) {
            if (chunks > 10000000)
                return -1;
            char *eol;
            while (!(eol = strstr(c->buf + at, "\r\n")))
                if (read_more(c, deadline) != 0)
                    return -1;
            char *end;
            unsigned long size = strtoul(c->buf + at, &end, 16);
            if (end == c->buf + at || size > MAX_RESPONSE)
                return -1;
            size_t data = (size_t)(eol + 2 - c->buf);
            if (size == 0) {
                /* Trailers, up to an empty line; then drop the framing
                 * so the buffer ends the body where the next response
                 * starts. */
                at = data;
                for (int lines = 0;; lines++) {
                    while (!(eol = strstr(c->buf + at, "\r\n")))
                        if (lines > 1000 || read_more(c, deadline) != 0)
                            return -1;
                    int empty = eol == c->buf + at;
                    at = (size_t)(eol + 2 - c->buf);
                    if (empty)
                        break;
                }
                memmove(c->buf + out, c->buf + at, c->len - at + 1);
                c->len -= at - out;
                break;
            }
            while (c->len < data + size + 2)
                if (read_more(c, deadline) != 0)
                    return -1;
            memmove(c->buf + out, c->buf + data, size);
            out += size;
            at = data + size + 2;
            /* Drop the consumed bytes between out and at so the buffer
             * does not grow by the chunk framing. */
            memmove(c->buf + out, c->buf + at, c->len - at + 1);
            c->len -= at - out;
            at = out;
        }
        *body = c->buf + hlen;
        *body_len = out - hlen;
        *status = st;
        return 0;
    }
    if (!cl) {
        /* No length: the body runs to the end of the connection. */
        while (read_more(c, deadline) == 0)
            ;
        *close_after = 1;
        *body = c->buf + hlen;
        *body_len = c->len - hlen;
        *status = st;
        return 0;
    }
    char *end;
    unsigned long n = strtoul(cl, &end, 10);
    if (end == cl || n > MAX_RESPONSE)
        return -1;
    while (c->len < hlen + n)
        if (read_more(c, deadline) != 0)
            return -1;
    *body = c->buf + hlen;
    *body_len = n;
    *status = st;
    return 0;
}

static int record_latency(struct client *c, double ms)
{
    if (c->n_lat == c->cap_lat) {
        size_t ncap = c->cap_lat ? c->cap_lat * 2 : 1024;
        if (ncap > MAX_LATENCIES)
            return -1;
        double *nl = realloc(c->lat_ms, sizeof *nl * ncap);
        if (!nl)
            return -1;
        c->lat_ms = nl;
        c->cap_lat = ncap;
    }
    c->lat_ms[c->n_lat++] = ms;
    return 0;
}

static void *client_main(void *arg)
{
    struct client *c = arg;
    struct shared *sh = c->sh;
    const struct options *o = sh->opt;
    while (now_s() < sh->t_end) {
        long seq = atomic_fetch_add(&sh->next_seq, 1);
        if (o->requests && seq >= o->requests)
            break;
        long rlen = build_request(c, seq);
        if (rlen < 0) {
            fprintf(stderr, "loadgen: out of memory\n");
            break;
        }
        double t0 = now_s();
        int status = 0, close_after = 0;
        char *body = NULL;
        size_t body_len = 0;
        int rc = c->fd >= 0 || connect_client(c) == 0 ? 0 : -1;
        if (rc == 0 && send_all(c->fd, c->req, (size_t)rlen) != 0) {
            /* A kept-alive connection the server closed: retry once anew. */
            disconnect(c);
            rc = connect_client(c) == 0 && send_all(c->fd, c->req, (size_t)rlen) == 0 ? 0 : -1;
        }
        if (rc == 0)
            rc = read_response(c, t0 + o->timeout_ms / 1000.0, &status, &body, &body_len, &close_after);
        double t1 = now_s();
        if (rc != 0) {
            c->conn_errors++;
            disconnect(c);
            continue;
        }
        c->status[status]++;
        if (status >= 200 && status < 300) {
            if (record_latency(c, (t1 - t0) * 1000) != 0) {
                fprintf(stderr, "loadgen: too many requests to record\n");
                disconnect(c);
                break;
            }
            c->tokens += tokens_field(body, body_len);
            if (t1 <= sh->t_end)
                c->ok_in_window++;
        }
        /* Keep any bytes past this response (there should be none). */
        size_t used = (size_t)(body + body_len - c->buf);
        if (close_after) {
            disconnect(c);
        } else {
            memmove(c->buf, c->buf + used, c->len - used + 1);
            c->len -= used;
        }
    }
    disconnect(c);
    return NULL;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The q-quantile of sorted v (nearest rank). */
static double quantile(const double *v, size_t n, double q)
{
    if (n == 0)
        return 0;
    size_t k = (size_t)(q * (double)n);
    if ((double)k < q * (double)n)
        k++;
    return v[k ? k - 1 : 0];
}

int main(int argc, char **argv)
{
    struct options o;
    if (parse_args(argc, argv, &o) != 0)
        return 2;
    struct shared sh = {.opt = &o};
    if (read_bodies(o.body_file, &sh.bodies, &sh.n_bodies) != 0)
        return 1;
    sh.addr.sin_family = AF_INET;
    sh.addr.sin_port = htons((uint16_t)o.port);
    sh.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* 127.0.0.1, also for localhost */
    atomic_init(&sh.next_seq, 0);

    struct client *cl = calloc((size_t)o.clients, sizeof *cl);
    if (!cl) {
        fprintf(stderr, "loadgen: out of memory\n");
        free_bodies(sh.bodies, sh.n_bodies);
        return 1;
    }
    pthread_attr_t attr;
    int attr_ok = pthread_attr_init(&attr) == 0;
    if (attr_ok)
        pthread_attr_setstacksize(&attr, 256 * 1024);
    sh.t_start = now_s();
    sh.t_end = sh.t_start + o.seconds;
    int failed = 0;
    for (int i = 0; i < o.clients; i++) {
        cl[i].sh = &sh;
        cl[i].fd = -1;
        if (pthread_create(&cl[i].thread, attr_ok ? &attr : NULL, client_main, &cl[i]) != 0) {
            fprintf(stderr, "loadgen: cannot start client %d\n", i);
            failed = 1;
            break;
        }
        cl[i].started = 1;
    }
    for (int i = 0; i < o.clients; i++)
        if (cl[i].started)
            pthread_join(cl[i].thread, NULL);
    double t_done = now_s();
    if (attr_ok)
        pthread_attr_destroy(&attr);

    /* Merge the clients' results. */
    size_t n_lat = 0;
    long status[N_STATUS] = {0}, conn = 0, tokens = 0, ok_window = 0;
    for (int i = 0; i < o.clients; i++) {
        n_lat += cl[i].n_lat;
        conn += cl[i].conn_errors;
        tokens += cl[i].tokens;
        ok_window += cl[i].ok_in_window;
        for (int s = 0; s < N_STATUS; s++)
            status[s] += cl[i].status[s];
    }
    double *lat = malloc(sizeof *lat * (n_lat ? n_lat : 1));
    if (!lat) {
        fprintf(stderr, "loadgen: out of memory\n");
        failed = 1;
    } else {
        size_t k = 0;
        for (int i = 0; i < o.clients; i++) {
            if (cl[i].n_lat)
                memcpy(lat + k, cl[i].lat_ms, sizeof *lat * cl[i].n_lat);
            k += cl[i].n_lat;
        }
        qsort(lat, n_lat, sizeof *lat, cmp_double);
        long errors = conn, requests = conn;
        for (int s = 0; s < N_STATUS; s++) {
            requests += status[s];
            if (s < 200 || s >= 300)
                errors += status[s];
        }
        /* Throughput over the window, from the answers completed in it;
         * a run cut short by --requests uses its own length. */
        double window = o.seconds, span = t_done - sh.t_start;
        long ok = (long)n_lat;
        double rps = o.requests && span < window ? (double)ok / span : (double)ok_window / window;
        double tps = ok ? rps * (double)tokens / (double)ok : 0;
        double sum = 0;
        for (size_t i = 0; i < n_lat; i++)
            sum += lat[i];
        printf("{\"url\":\"http://%s:%d%s\",\"clients\":%d,\"seconds\":%.3f,\"requests\":%ld,\"ok\":%ld,"
               "\"errors\":{\"total\":%ld",
               o.host, o.port, o.path, o.clients, span, requests, ok, errors);
        for (int s = 0; s < N_STATUS; s++)
            if (status[s] && (s < 200 || s >= 300))
                printf(",\"%d\":%ld", s, status[s]);
        if (conn)
            printf(",\"conn\":%ld", conn);
        printf("},\"throughput_rps\":%.2f,\"tokens\":%ld,\"tokens_per_s\":%.1f,"
               "\"latency_ms\":{\"mean\":%.3f,\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f}}\n",
               rps, tokens, tps, n_lat ? sum / (double)n_lat : 0, quantile(lat, n_lat, 0.5),
               quantile(lat, n_lat, 0.9), quantile(lat, n_lat, 0.99), n_lat ? lat[n_lat - 1] : 0);
        fflush(stdout);
    }
    free(lat);
    for (int i = 0; i < o.clients; i++) {
        free(cl[i].lat_ms);
        free(cl[i].req);
        free(cl[i].buf);
    }
    free(cl);
    free_bodies(sh.bodies, sh.n_bodies);
    return failed ? 1 : 0;
}
