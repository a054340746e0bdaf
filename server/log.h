/* log.h - the server's log: one line per event on stderr, prefixed with
 * the UTC time, written with a single write so lines from many threads do
 * not interleave.  systemd's journal and `docker logs` both take it as is.
 */
#ifndef RRN_LOG_H
#define RRN_LOG_H

void log_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
