/* server.c - the server harness of server.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "server.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "files.h"
#include "fixtures.h"
#include "proc.h"

/* Hang guards only: no test asserts how fast anything is. */
#define LOG_TIMEOUT_S 120
#define EXIT_TIMEOUT_S 300

#define LISTENING "listening on http://127.0.0.1:"

/* Wrapped servers that exited with valgrind's error status. */
static int wrapper_errors;

/* The log is read on a thread of its own: a server whose pipe fills up
 * blocks, and the tests wait on the log while they do other things. */
static void *read_log(void *arg)
{
    struct server *s = arg;
    char chunk[4096];
    ssize_t n;
    while ((n = read(s->logfd, chunk, sizeof chunk)) > 0 || (n < 0 && errno == EINTR)) {
        if (n <= 0)
            continue;
        pthread_mutex_lock(&s->mu);
        buf_add(&s->log, chunk, (size_t)n);
        pthread_cond_broadcast(&s->grew);
        pthread_mutex_unlock(&s->mu);
    }
    pthread_mutex_lock(&s->mu);
    s->eof = 1;
    pthread_cond_broadcast(&s->grew);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int count_in(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; hay && (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

int server_wait_log(struct server *s, const char *needle, int count)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += LOG_TIMEOUT_S;
    pthread_mutex_lock(&s->mu);
    while (count_in(s->log.p, needle) < count && !s->eof && pthread_cond_timedwait(&s->grew, &s->mu, &until) == 0)
        ;
    int n = count_in(s->log.p, needle);
    pthread_mutex_unlock(&s->mu);
    return n;
}

int server_log_has(struct server *s, const char *needle)
{
    pthread_mutex_lock(&s->mu);
    int has = s->log.p && strstr(s->log.p, needle) != NULL;
    pthread_mutex_unlock(&s->mu);
    return has;
}

int server_wrapped(void)
{
    const char *w = getenv("RRN_SERVER_WRAPPER");
    return w && *w;
}

void server_add_model(const struct server *s, const char *fixture, const char *name)
{
    char from[256], to[256];
    snprintf(from, sizeof from, FIXTURES_DIR "/%s.safetensors", fixture);
    snprintf(to, sizeof to, "%s/%s.safetensors", s->dir, name);
    file_copy(from, to);
}

/* In the child, between fork and exec. */
static void set_env(const char *const *env)
{
    for (int i = 0; env && env[i]; i++) {
        char setting[256];
        snprintf(setting, sizeof setting, "%s", env[i]);
        char *eq = strchr(setting, '=');
        if (!eq)
            _exit(126);
        *eq = 0;
        setenv(setting, eq + 1, 1);
    }
}

struct server *server_start(const struct server_opts *o)
{
    static const struct server_opts none;
    if (!o)
        o = &none;
    struct server *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->stop_with_sigterm = o->stop_with_sigterm;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->grew, NULL);
    snprintf(s->dir, sizeof s->dir, "/tmp/rrn_serve_XXXXXX");
    if (!mkdtemp(s->dir)) {
        server_stop(s);
        fail_msg("cannot make a models folder");
    }
    for (int i = 0; o->models && o->models[i]; i++)
        server_add_model(s, o->models[i], o->models[i]);

    char wrapper[1024];
    const char *argv[64];
    int argc = 0;
    snprintf(wrapper, sizeof wrapper, "%s",
             o->wrapper ? o->wrapper : server_wrapped() ? getenv("RRN_SERVER_WRAPPER") : "");
    for (char *w = strtok(wrapper, " "); w && argc < 32; w = strtok(NULL, " "))
        argv[argc++] = w;
    const char *own[] = {rrn_bin(), "serve", "--models", s->dir, "--port", "0", "--host", "127.0.0.1"};
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
        argv[argc++] = own[i];
    for (int i = 0; o->args && o->args[i] && argc < 63; i++)
        argv[argc++] = o->args[i];
    argv[argc] = NULL;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    s->pid = fork();
    assert_true(s->pid >= 0);
    if (s->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        set_env(o->env);
        dup2(fds[1], STDERR_FILENO);
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        execvp(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    s->logfd = fds[0];
    assert_int_equal(pthread_create(&s->reader, NULL, read_log, s), 0);
    s->reading = 1;
    if (server_wait_log(s, LISTENING, 1) == 1) {
        pthread_mutex_lock(&s->mu);
        s->port = atoi(strstr(s->log.p, LISTENING) + strlen(LISTENING));
        pthread_mutex_unlock(&s->mu);
    }
    if (s->port <= 0) {
        char out[8192];
        pthread_mutex_lock(&s->mu);
        snprintf(out, sizeof out, "%s", s->log.p ? s->log.p : "");
        pthread_mutex_unlock(&s->mu);
        server_stop(s);
        fail_msg("the server did not start; its output:\n%s", out);
    }
    return s;
}

int server_wait_exit(struct server *s)
{
    int status = proc_wait(s->pid, EXIT_TIMEOUT_S);
    if (status != -1)
        s->pid = 0;
    return status;
}

void server_stop(struct server *s)
{
    if (!s)
        return;
    if (s->pid > 0 && (s->stop_with_sigterm || server_wrapped()) && kill(s->pid, SIGTERM) == 0) {
        int status = server_wait_exit(s);
        if (status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 99) {
            pthread_mutex_lock(&s->mu);
            fprintf(stderr, "the wrapped server reported errors; its output:\n%s\n", s->log.p ? s->log.p : "");
            pthread_mutex_unlock(&s->mu);
            wrapper_errors++;
        }
    }
    if (s->pid > 0) {
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
    }
    if (s->reading)
        pthread_join(s->reader, NULL);
    if (s->logfd > 0)
        close(s->logfd);
    if (s->dir[0])
        remove_tree(s->dir, NULL);
    free(s->log.p);
    pthread_cond_destroy(&s->grew);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

int server_teardown(void **state)
{
    server_stop(*state);
    *state = NULL;
    return 0;
}

int server_exit_status(int cmocka_rc)
{
    if (wrapper_errors)
        fprintf(stderr, "%d wrapped server(s) reported errors\n", wrapper_errors);
    return cmocka_rc || wrapper_errors ? 1 : 0;
}
