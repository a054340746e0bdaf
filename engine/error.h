/* error.h - the project's one way to report an error: a message formatted
 * into the caller's buffer (err, errlen), and -1 to return.  Every layer
 * (weight files, configs, the engine, the trainer) reports this way, so a
 * message can travel up unchanged to the CLI or an HTTP answer. */
#ifndef RRN_ERROR_H
#define RRN_ERROR_H

#include <stddef.h>

/* Format into err (when err and errlen are set) and return -1. */
int error_fmt(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
