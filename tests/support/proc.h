/* proc.h - running commands from the tests: a shell command with all of
 * its output captured, the rrnserve binary under test the same way, and a
 * bounded wait for a child.
 *
 * The tests drive the binary as a user would, so they need its messages
 * and exit status together; capturing through a pipe (not a file) keeps
 * no state behind.  Commands whose background children outlive them must
 * not use proc_run: those children would hold the pipe open. */
#ifndef RRN_TEST_PROC_H
#define RRN_TEST_PROC_H

#include <sys/types.h>

/* The binary under test: $RRN_BIN (tests/run_tests.sh sets it, to the
 * plain or the sanitizer build), else ./rrnserve. */
const char *rrn_bin(void);

/* A command of proc_run or proc_rrnserve that runs longer than this is
 * killed and exits 124: far beyond what any of them takes (a training run
 * under the sanitizers), and a bound on one that hangs. */
#define PROC_LIMIT_S 600

/* Runs a shell command (printf-formatted) with stdout and stderr merged;
 * the output, NUL-terminated and to be freed, goes to *out when out is not
 * NULL.  Its exit status (124 when PROC_LIMIT_S ran out), or -1 when it
 * did not exit normally.  The command runs in a shell of its own, so
 * redirections of its own (2>/dev/null) win over the merge. */
int proc_run(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* proc_run of `rrnserve ARGS` (ARGS printf-formatted), in folder dir when
 * dir is not NULL (the binary's path made absolute for that). */
int proc_rrnserve(char **out, const char *dir, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Waits up to timeout_s for the child pid: its wait status, or -1 when it
 * is still running (it is left running: the caller decides). */
int proc_wait(pid_t pid, int timeout_s);

#endif
