/* log.c - timestamped log lines on stderr, as text or JSON (see log.h). */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "log.h"
#include "utf8.h"

/* A line of text is cut at this length; JSON escaping may lengthen it. */
#define LINE_MAX_BYTES 2048

static enum log_format format = LOG_TEXT;

void log_set_format(enum log_format f)
{
    format = f;
}

/* The UTC time to the millisecond, as RFC 3339 has it. */
static void now_utc(char out[32])
{
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03ldZ", ts.tv_nsec / 1000000);
}

/* One writev(2) per line keeps concurrent lines whole. */
static void write_line(const char *text)
{
    struct iovec v[2] = {{(void *)text, strlen(text)}, {(void *)"\n", 1}};
    if (writev(STDERR_FILENO, v, 2) < 0)
        return;
}

/* o, which built says was made whole, as one line; o is freed.  -1, and
 * nothing written, when it was not or printing it ran out of memory: the
 * caller then writes the line as text rather than not at all. */
static int write_json(cJSON *o, int built)
{
    char *text = o && built ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    if (!text)
        return -1;
    write_line(text);
    free(text);
    return 0;
}

/* A JSON line with its "time" first. */
static cJSON *json_line(const char *time)
{
    cJSON *o = cJSON_CreateObject();
    if (o && !cJSON_AddStringToObject(o, "time", time)) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

void log_msg(const char *fmt, ...)
{
    char time[32], raw[LINE_MAX_BYTES - 64], msg[sizeof raw], text[LINE_MAX_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    /* An event may name what came from outside (a file's name, a folder
     * given on the command line): one line, UTF-8, whatever it holds. */
    utf8_printable(msg, sizeof msg, raw);
    now_utc(time);
    if (format == LOG_JSON) {
        cJSON *o = json_line(time);
        if (write_json(o, o && cJSON_AddStringToObject(o, "msg", msg)) == 0)
            return;
    }
    snprintf(text, sizeof text, "%s %s", time, msg);
    write_line(text);
}

void log_request(const struct log_request *r)
{
    char time[32], batch[16] = "-", text[LINE_MAX_BYTES];
    now_utc(time);
    if (format == LOG_JSON) {
        cJSON *o = json_line(time);
        int built = o && cJSON_AddStringToObject(o, "method", r->method) &&
                    cJSON_AddStringToObject(o, "path", r->path) && cJSON_AddNumberToObject(o, "status", r->status) &&
                    cJSON_AddNumberToObject(o, "ms", round(r->ms * 100) / 100) &&
                    (r->batch > 0 ? cJSON_AddNumberToObject(o, "batch", r->batch) != NULL
                                  : cJSON_AddNullToObject(o, "batch") != NULL) &&
                    cJSON_AddStringToObject(o, "id", r->id);
        if (write_json(o, built) == 0)
            return;
    }
    if (r->batch > 0)
        snprintf(batch, sizeof batch, "%d", r->batch);
    snprintf(text, sizeof text, "%s %s %s %d %.2fms batch=%s id=%s", time, r->method, r->path, r->status, r->ms,
             batch, r->id);
    write_line(text);
}
