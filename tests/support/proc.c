/* proc.c - the command running of proc.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "proc.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include "buf.h"
#include "timing.h"

const char *rrn_bin(void)
{
    const char *bin = getenv("RRN_BIN");
    return bin && *bin ? bin : "./rrnserve";
}

/* Runs the finished command line cmd and frees it.  Under timeout(1):
 * a command that hangs (a regression, or a test's mistake) is killed with
 * every process it started after PROC_LIMIT_S and exits 124, which fails
 * its test, rather than holding the whole run.  timeout puts it in a
 * process group of its own, which a terminal would stop when it read
 * one: its standard input is /dev/null (or what it redirects itself). */
static int run_line(char **out, struct buf *cmd)
{
    struct buf line = {0};
    buf_printf(&line, "timeout -k 10 %d sh -c '", PROC_LIMIT_S);
    for (const char *c = cmd->p; *c; c++)
        buf_add(&line, *c == '\'' ? "'\\''" : c, *c == '\'' ? 4 : 1);
    buf_printf(&line, "' </dev/null 2>&1");
    FILE *p = popen(line.p, "r");
    free(line.p);
    if (!p) {
        char shown[1024];
        snprintf(shown, sizeof shown, "%s", cmd->p);
        free(cmd->p);
        fail_msg("cannot run %s", shown);
    }
    free(cmd->p);
    struct buf text = {0};
    buf_read(&text, p);
    int status = pclose(p);
    if (out)
        *out = text.p;
    else
        free(text.p);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int proc_run(char **out, const char *fmt, ...)
{
    struct buf cmd = {0};
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&cmd, fmt, ap);
    va_end(ap);
    return run_line(out, &cmd);
}

int proc_rrnserve(char **out, const char *dir, const char *fmt, ...)
{
    const char *bin = rrn_bin();
    char cwd[PATH_MAX] = "";
    /* A relative binary path means the repository root, where the tests
     * run, not dir. */
    if (dir && bin[0] != '/' && !getcwd(cwd, sizeof cwd))
        fail_msg("getcwd failed");
    struct buf cmd = {0};
    if (dir)
        buf_printf(&cmd, "cd '%s' && ", dir);
    buf_printf(&cmd, "'%s%s%s' ", cwd, cwd[0] ? "/" : "", bin);
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(&cmd, fmt, ap);
    va_end(ap);
    return run_line(out, &cmd);
}

int proc_wait(pid_t pid, int timeout_s)
{
    for (int i = 0; i < timeout_s * 100; i++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            return status;
        sleep_ms(10);
    }
    return -1;
}
