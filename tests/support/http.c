/* http.c - the HTTP client of http.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int http_connect(int port, int timeout_s)
{
    /* Close-on-exec: a server a test starts later must not inherit (and
     * so keep open) the test's connections to another server. */
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = timeout_s};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int http_send_all(int fd, const void *p, size_t n)
{
    const char *at = p;
    while (n) {
        /* MSG_NOSIGNAL: a server that closed early must fail the send,
         * not kill the test with SIGPIPE. */
        ssize_t w = send(fd, at, n, MSG_NOSIGNAL);
        if (w <= 0)
            return -1;
        at += w;
        n -= (size_t)w;
    }
    return 0;
}

void http_format(struct buf *out, const char *host, const char *method, const char *path, const char *headers,
                 const char *body, size_t len)
{
    buf_printf(out, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n%sContent-Length: %zu\r\n\r\n", method, path,
               host, headers, body ? len : 0);
    if (body)
        buf_add(out, body, len);
}

int http_send_request(int fd, const char *method, const char *path, const char *headers, const char *body,
                      size_t len)
{
    struct buf req = {0};
    http_format(&req, "127.0.0.1", method, path, headers, body, len);
    int rc = http_send_all(fd, req.p, req.len);
    free(req.p);
    return rc;
}

ssize_t http_read_some(int fd, struct buf *raw)
{
    char chunk[8192];
    ssize_t n;
    do
        n = recv(fd, chunk, sizeof chunk, 0);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        buf_add(raw, chunk, (size_t)n);
        return n;
    }
    return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) ? -1 : 0;
}

void http_read_until(int fd, struct buf *raw, const char *needle)
{
    while (!(raw->p && strstr(raw->p, needle)) && http_read_some(fd, raw) > 0)
        ;
}

int http_read_all(int fd, struct buf *raw)
{
    ssize_t n;
    while ((n = http_read_some(fd, raw)) > 0)
        ;
    return n == 0;
}

const char *http_find(const char *p, const char *stop, const char *needle)
{
    const size_t n = strlen(needle);
    for (const char *at; p < stop && (at = memchr(p, needle[0], (size_t)(stop - p))); p = at + 1)
        if ((size_t)(stop - at) >= n && memcmp(at, needle, n) == 0)
            return at;
    return NULL;
}

int http_parse(const struct buf *raw, struct http_resp *r)
{
    memset(r, 0, sizeof *r);
    const char *end = raw->p ? strstr(raw->p, "\r\n\r\n") : NULL;
    if (!end || sscanf(raw->p, "HTTP/1.%*d %d", &r->status) != 1)
        return -1;
    size_t hlen = (size_t)(end - raw->p);
    snprintf(r->head, sizeof r->head, "%.*s", (int)hlen, raw->p);
    const char *p = end + 4, *stop = raw->p + raw->len;
    int chunked = 0;
    for (const char *h = r->head; *h; h++)
        if (strncasecmp(h, "transfer-encoding: chunked", 26) == 0)
            chunked = 1;
    buf_add(&r->body, "", 0);
    if (!chunked) {
        buf_add(&r->body, p, (size_t)(stop - p));
        return 0;
    }
    for (;;) {
        char *next;
        unsigned long size = strtoul(p, &next, 16);
        const char *data = http_find(next, stop, "\r\n");
        if (!data || size == 0 || data + 2 + size > stop)
            return size == 0 ? 0 : -1;
        buf_add(&r->body, data + 2, size);
        p = data + 2 + size + 2;
    }
}

int http_request(int port, const char *method, const char *path, const char *headers, const char *body, size_t len,
                 struct http_resp *r)
{
    struct buf raw = {0};
    int fd = http_connect(port, HTTP_TIMEOUT_S), rc = -1;
    memset(r, 0, sizeof *r);
    if (fd >= 0) {
        http_send_request(fd, method, path, headers, body, len);
        http_read_all(fd, &raw);
        rc = http_parse(&raw, r);
        close(fd);
    }
    free(raw.p);
    return rc;
}

int http_raw_request(int port, const char *bytes, size_t len, struct http_resp *r)
{
    struct buf raw = {0};
    int fd = http_connect(port, HTTP_TIMEOUT_S), rc = -1;
    memset(r, 0, sizeof *r);
    if (fd >= 0) {
        http_send_all(fd, bytes, len);
        http_read_all(fd, &raw);
        rc = http_parse(&raw, r);
        close(fd);
    }
    free(raw.p);
    return rc;
}

void http_must_request(int port, const char *method, const char *path, const char *headers, const char *body,
                       struct http_resp *r)
{
    if (http_request(port, method, path, headers, body, body ? strlen(body) : 0, r) != 0) {
        http_resp_free(r);
        fail_msg("%s %s: no answer", method, path);
    }
}

void http_resp_free(struct http_resp *r)
{
    free(r->body.p);
    r->body = (struct buf){0};
}

const char *http_header(const struct http_resp *r, const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    out[0] = 0;
    for (const char *line = strstr(r->head, "\r\n"); line; line = strstr(line + 2, "\r\n"))
        if (strncasecmp(line + 2, name, n) == 0 && line[2 + n] == ':') {
            const char *v = line + 3 + n;
            while (*v == ' ')
                v++;
            snprintf(out, cap, "%.*s", (int)strcspn(v, "\r\n"), v);
            break;
        }
    return out;
}

double http_metric(int port, const char *series)
{
    struct http_resp r;
    const int all = series[strlen(series) - 1] == '{';
    char want[256];
    snprintf(want, sizeof want, all ? "\n%s" : "\n%s ", series);
    double v = -1;
    if (http_request(port, "GET", "/metrics", "", NULL, 0, &r) == 0 && r.status == 200)
        for (const char *at = strstr(r.body.p, want); at; at = all ? strstr(at + 1, want) : NULL)
            v = (v < 0 ? 0 : v) + strtod(all ? strchr(at, '}') + 1 : at + strlen(want), NULL);
    http_resp_free(&r);
    return v;
}

void http_drop_cached_tokens(char *body)
{
    static const char key[] = "\"cached_tokens\":";
    for (char *at = strstr(body, key); at; at = strstr(at, key)) {
        const char *end = at + strlen(key);
        end += strspn(end, "0123456789");
        end += *end == ',';
        memmove(at, end, strlen(end) + 1);
    }
}
