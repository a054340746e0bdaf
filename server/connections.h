/* connections.h - the server's open connections, which libmicrohttpd
 * reports to http.c: the deadline a request has to arrive in, and room for
 * new clients at --max-connections.
 *
 * Of the connections open, at most max hold a place; a connection takes
 * one when its first request to be served begins (libmicrohttpd accepts
 * up to CONNECTIONS_BEYOND_MAX more connections, so that clients who
 * arrive at the limit are seen).  When every place is held, a request on a
 * connection without one takes the place of the connection that has been
 * idle (kept alive between requests) longest, if one has been idle for
 * 100 ms or more, and that connection is closed, as nginx reuses its idle
 * keep-alive connections; otherwise the request is refused (http.c answers
 * 503 and closes), since every place holds a request in flight or one
 * just answered.  A client that arrives at the limit thus gets served or
 * an answer at once, rather than waiting unanswered in the kernel's listen
 * backlog until some connection ends.
 *
 * A watchdog thread closes, once a second, the connections whose request
 * has not fully arrived within the timeout (libmicrohttpd's own timeout is
 * for idle connections only, and a client sending a byte now and then is
 * never idle), and, while more than max connections are open, those
 * without a place that have sent no request for a second, which would
 * otherwise fill the room beyond max and leave the next clients in the
 * backlog.
 */
#ifndef RRN_CONNECTIONS_H
#define RRN_CONNECTIONS_H

#include <stddef.h>

#define CONNECTIONS_BEYOND_MAX 64

struct connections;
struct connection;
struct metrics;

/* The most connections that the open-file limit (RLIMIT_NOFILE) leaves
 * room for, with the CONNECTIONS_BEYOND_MAX more and the files the
 * process holds besides: max, after raising the soft limit towards the
 * hard one where it was lower, or fewer where even the hard limit is
 * lower (at least 1).  note says what was done, for the log ("" when
 * nothing). */
int connections_fit_files(int max, char *note, size_t notelen);

/* Starts the watchdog; NULL with err set when no thread could start.
 * metrics may be NULL. */
struct connections *connections_new(int max, int timeout_s, struct metrics *metrics, char *err, size_t errlen);
/* Stops the watchdog; every connection must have been closed (or the
 * daemon stopped) before. */
void connections_free(struct connections *cs);
/* The places: the max given to connections_new. */
int connections_max(const struct connections *cs);

/* A connection accepted on socket fd; NULL when out of memory, and the
 * connection then goes unwatched (libmicrohttpd's idle timeout still
 * applies) and is always served. */
struct connection *connection_opened(struct connections *cs, int fd);
/* Before its socket is closed, so the watchdog never shuts down a
 * descriptor that has been reused.  c may be NULL. */
void connection_closed(struct connections *cs, struct connection *c);

/* Whether the watchdog closed c because its request had not arrived
 * within --timeout-s (its end is then the server's, a 408, not the
 * client's).  c may be NULL. */
int connection_timed_out(struct connections *cs, const struct connection *c);
/* A request's head has arrived on c: 0 to serve it, -1 when every place
 * is held by a connection with a request in flight (answer 503 and close
 * the connection).  c may be NULL. */
int connection_request_begins(struct connections *cs, struct connection *c);
/* c's request has fully arrived: no deadline until it ends.  c may be
 * NULL. */
void connection_request_arrived(struct connections *cs, struct connection *c);
/* c's request has ended, answered or not, and c is idle; last: c closes
 * after it (the client asked, an error, Connection: close answered), so
 * its place is free at once rather than when libmicrohttpd reports the
 * close, a moment later.  A guess either way is safe: a connection that
 * stays open after all takes a place again with its next request.  c may
 * be NULL. */
void connection_request_ended(struct connections *cs, struct connection *c, int last);

#endif
