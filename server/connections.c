/* connections.c - the open connections, their places under
 * --max-connections and the watchdog that closes those that overstay (see
 * connections.h).
 *
 * A connection is closed here by shutting its socket down, never by
 * closing it: its own libmicrohttpd thread then reads the end and closes
 * it as usual (and reports it, through connection_closed, before the
 * descriptor can be reused).  One mutex guards the list and the count of
 * places; it is taken a few times a request, for a handful of stores.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include "connections.h"
#include "log.h"
#include "metrics.h"

/* How long a connection must have been idle before a client at the limit
 * may take its place: a client just answered may be sending its next
 * request already (a round trip's time), and closing the connection under
 * it would lose that request. */
#define IDLE_TO_YIELD_S 0.1
/* How long, while more than max connections are open, one without a
 * place may stay open without sending a request: a client sends its
 * first at once. */
#define FIRST_REQUEST_S 1.0

/* Descriptors the process holds besides its connections: the standard
 * streams, the listening socket, libmicrohttpd's own, the CUDA driver's
 * and a model file being read at a reload. */
#define OTHER_FILES 64

enum state { IDLE, ARRIVING, HANDLING };

struct connection {
    int fd;                /* -1 once shut down here */
    int timed_out;         /* shut down here: its request did not arrive in time */
    int place;             /* holds one of the max places */
    enum state state;
    struct timespec since; /* when it became idle: accepted, or its last answer sent */
    struct connection *prev, *next;
};

struct connections {
    pthread_mutex_t mu;
    struct connection *list;
    int open, held, max, timeout_s;
    struct metrics *metrics;
    pthread_t watchdog;
    int stop;
    pthread_cond_t wake; /* stops the watchdog */
};

/* Closes c (mu held). */
static void shut(struct connections *cs, struct connection *c, enum connection_close why)
{
    shutdown(c->fd, SHUT_RDWR);
    c->fd = -1;
    c->timed_out = why == CLOSED_TIMEOUT;
    metrics_connection_closed(cs->metrics, why);
}

/* The place-holder idle longest, and for IDLE_TO_YIELD_S at least; NULL
 * if none (mu held). */
static struct connection *longest_idle(struct connections *cs)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    struct connection *best = NULL;
    for (struct connection *w = cs->list; w; w = w->next)
        if (w->place && w->state == IDLE && w->fd >= 0 && metrics_elapsed(&w->since, &now) >= IDLE_TO_YIELD_S &&
            (!best || metrics_elapsed(&w->since, &best->since) > 0))
            best = w;
    return best;
}

/* Once a second: the connections whose request has not arrived within the
 * timeout (and a second's grace, so that libmicrohttpd's idle timeout
 * closes idle ones first), and while more than max are open, those
 * without a place that have sent no request within FIRST_REQUEST_S. */
static void *watchdog_main(void *arg)
{
    struct connections *cs = arg;
    pthread_mutex_lock(&cs->mu);
    while (!cs->stop) {
        struct timespec now, until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 1;
        pthread_cond_timedwait(&cs->wake, &cs->mu, &until);
        clock_gettime(CLOCK_MONOTONIC, &now);
        int live = 0; /* open and not shut down yet */
        for (struct connection *w = cs->list; w; w = w->next)
            live += w->fd >= 0;
        for (struct connection *w = cs->list; w; w = w->next) {
            if (w->fd < 0)
                continue;
            if (w->state != HANDLING && now.tv_sec - w->since.tv_sec > cs->timeout_s + 1) {
                shut(cs, w, CLOSED_TIMEOUT);
                live--;
                log_msg("closed a connection whose request did not arrive within %d s", cs->timeout_s);
            } else if (live > cs->max && !w->place && w->state == IDLE &&
                       metrics_elapsed(&w->since, &now) >= FIRST_REQUEST_S) {
                shut(cs, w, CLOSED_AT_LIMIT);
                live--;
            }
        }
    }
    pthread_mutex_unlock(&cs->mu);
    return NULL;
}

int connections_fit_files(int max, char *note, size_t notelen)
{
    note[0] = 0;
    struct rlimit rl;
    const rlim_t need = (rlim_t)max + CONNECTIONS_BEYOND_MAX + OTHER_FILES;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need)
        return max;
    const rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need ? rl.rlim_max : need;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        rl.rlim_cur = was;
    if (rl.rlim_cur >= need) {
        snprintf(note, notelen, "raised the open-file limit from %llu to %llu for --max-connections %d",
                 (unsigned long long)was, (unsigned long long)rl.rlim_cur, max);
        return max;
    }
    long long fit = (long long)rl.rlim_cur - CONNECTIONS_BEYOND_MAX - OTHER_FILES;
    fit = fit < 1 ? 1 : fit;
    snprintf(note, notelen,
             "the open-file limit (%llu: LimitNOFILE, ulimit -n) leaves room for %lld connection(s): "
             "--max-connections %d lowered to %lld",
             (unsigned long long)rl.rlim_cur, fit, max, fit);
    return (int)fit;
}

struct connections *connections_new(int max, int timeout_s, struct metrics *metrics, char *err, size_t errlen)
{
    struct connections *cs = calloc(1, sizeof *cs);
    if (!cs) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    *cs = (struct connections){.max = max, .timeout_s = timeout_s, .metrics = metrics};
    metrics_connections_max(metrics, max);
    pthread_mutex_init(&cs->mu, NULL);
    pthread_cond_init(&cs->wake, NULL);
    if (pthread_create(&cs->watchdog, NULL, watchdog_main, cs) != 0) {
        snprintf(err, errlen, "cannot start a thread");
        pthread_cond_destroy(&cs->wake);
        pthread_mutex_destroy(&cs->mu);
        free(cs);
        return NULL;
    }
    return cs;
}

void connections_free(struct connections *cs)
{
    if (!cs)
        return;
    pthread_mutex_lock(&cs->mu);
    cs->stop = 1;
    pthread_cond_signal(&cs->wake);
    pthread_mutex_unlock(&cs->mu);
    pthread_join(cs->watchdog, NULL);
    pthread_cond_destroy(&cs->wake);
    pthread_mutex_destroy(&cs->mu);
    free(cs);
}

int connections_max(const struct connections *cs)
{
    return cs->max; /* set once, before any connection */
}

struct connection *connection_opened(struct connections *cs, int fd)
{
    struct connection *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->fd = fd;
    c->state = IDLE;
    clock_gettime(CLOCK_MONOTONIC, &c->since);
    pthread_mutex_lock(&cs->mu);
    c->next = cs->list;
    if (cs->list)
        cs->list->prev = c;
    cs->list = c;
    metrics_connections_open(cs->metrics, ++cs->open);
    pthread_mutex_unlock(&cs->mu);
    return c;
}

void connection_closed(struct connections *cs, struct connection *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&cs->mu);
    if (c->prev)
        c->prev->next = c->next;
    else
        cs->list = c->next;
    if (c->next)
        c->next->prev = c->prev;
    cs->held -= c->place;
    metrics_connections_open(cs->metrics, --cs->open);
    pthread_mutex_unlock(&cs->mu);
    free(c);
}

int connection_request_begins(struct connections *cs, struct connection *c)
{
    if (!c)
        return 0;
    int rc = 0;
    struct connection *idle;
    pthread_mutex_lock(&cs->mu);
    c->state = ARRIVING;
    /* A connection keeps its place from one request to the next; one shut
     * down here as its request came is closing, and takes none. */
    if (c->place) {
        rc = 0;
    } else if (c->fd < 0) {
        rc = -1;
    } else if (cs->held < cs->max) {
        cs->held++;
        c->place = 1;
    } else if ((idle = longest_idle(cs))) {
        idle->place = 0;
        shut(cs, idle, CLOSED_AT_LIMIT);
        c->place = 1;
    } else {
        rc = -1;
    }
    pthread_mutex_unlock(&cs->mu);
    return rc;
}

void connection_request_arrived(struct connections *cs, struct connection *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&cs->mu);
    c->state = HANDLING;
    pthread_mutex_unlock(&cs->mu);
}

int connection_timed_out(struct connections *cs, const struct connection *c)
{
    if (!c)
        return 0;
    pthread_mutex_lock(&cs->mu);
    const int timed_out = c->timed_out;
    pthread_mutex_unlock(&cs->mu);
    return timed_out;
}

void connection_request_ended(struct connections *cs, struct connection *c, int last)
{
    if (!c)
        return;
    pthread_mutex_lock(&cs->mu);
    c->state = IDLE;
    clock_gettime(CLOCK_MONOTONIC, &c->since);
    if (last && c->place) {
        c->place = 0;
        cs->held--;
    }
    pthread_mutex_unlock(&cs->mu);
}
