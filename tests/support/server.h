/* server.h - `rrnserve serve` as a child process of a test: started on a
 * fresh folder of fixture models, on a free port of 127.0.0.1 (its own
 * pick: --port 0, read back from its log), with all of its output kept
 * for the test to wait on and search, and stopped for sure.
 *
 * The child dies with the test process (PR_SET_PDEATHSIG), every wait is
 * bounded, and a setup that fails kills its server before failing, since
 * cmocka runs no teardown for it.  RRN_SERVER_WRAPPER (make
 * test-valgrind) is a command, split at spaces, to run the server under;
 * a wrapped server that exits with valgrind's error status 99 counts as
 * an error, which server_exit_status turns into a failed binary. */
#ifndef RRN_TEST_SERVER_H
#define RRN_TEST_SERVER_H

#include <pthread.h>
#include <sys/types.h>

#include "buf.h"

struct server_opts {
    /* Fixture names (tests/fixtures/NAME.safetensors) to serve,
     * NULL-terminated; NULL for an empty folder. */
    const char *const *models;
    /* More arguments to serve, NULL-terminated, or NULL. */
    const char *const *args;
    /* NAME=VALUE settings of the server's environment, NULL-terminated,
     * or NULL. */
    const char *const *env;
    /* server_stop sends SIGTERM and waits before it kills, also when the
     * server is not wrapped (a wrapped one always is, so that valgrind
     * can check for leaks as it exits). */
    int stop_with_sigterm;
    /* A command (words split at spaces) to run the server under, in
     * place of $RRN_SERVER_WRAPPER's, or NULL. */
    const char *wrapper;
};

struct server {
    pid_t pid;          /* 0 once it exited and was reaped */
    int port;
    char dir[64];       /* its models folder, removed with it */
    /* The rest is the harness's own. */
    int stop_with_sigterm;
    int logfd;
    pthread_t reader;
    int reading;
    pthread_mutex_t mu;
    pthread_cond_t grew;
    struct buf log;     /* everything the server wrote, stderr and stdout */
    int eof;
};

/* Starts the server and waits for its port; fails the test when it does
 * not come up. */
struct server *server_start(const struct server_opts *o);
/* Stops the server if it is still there and frees everything; s may be
 * NULL. */
void server_stop(struct server *s);
/* cmocka teardown: server_stop(*state). */
int server_teardown(void **state);

/* Copies a fixture into the server's folder as name (for a reload). */
void server_add_model(const struct server *s, const char *fixture, const char *name);
/* Waits (bounded) until the log holds needle at least count times; how
 * many times it does. */
int server_wait_log(struct server *s, const char *needle, int count);
int server_log_has(struct server *s, const char *needle);
/* Waits (bounded) for the server to exit: its wait status, or -1. */
int server_wait_exit(struct server *s);

/* Whether RRN_SERVER_WRAPPER is set. */
int server_wrapped(void);
/* main's exit status from cmocka's: failed too when a wrapped server
 * reported errors. */
int server_exit_status(int cmocka_rc);

#endif
