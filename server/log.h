/* log.h - the server's log: one line per event on stderr, written with a
 * single write so lines from many threads do not interleave.  systemd's
 * journal and `docker logs` both take it as is.  Each line is text
 * prefixed with the UTC time, or (--log-format json) a JSON object, for
 * log collectors that index fields: {"time", "msg"} for an event, and for
 * a request its fields by name.
 */
#ifndef RRN_LOG_H
#define RRN_LOG_H

enum log_format { LOG_TEXT, LOG_JSON };

/* Before any thread logs: the format of every line from then on. */
void log_set_format(enum log_format f);

void log_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* A request answered (or whose client left). */
struct log_request {
    const char *method, *path, *id;
    int status;
    double ms;  /* from its first byte to its last answered */
    int batch;  /* sequences in the engine call that ran it, -1 when none did */
};
void log_request(const struct log_request *r);

#endif
