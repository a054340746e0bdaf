/* test_deploy.c - the deployment files of deploy/ and the service-manager
 * side of `rrnserve serve`:
 *   - notify_send itself: to a path socket, to an abstract one, and the
 *     cases where it must do nothing or fail;
 *   - the sd_notify protocol of the server ($RRN_BIN, as tests/run_tests.sh
 *     sets it): READY=1 once it listens, RELOADING=1 then READY=1 around a
 *     SIGHUP reload, STOPPING=1 on SIGTERM; a notify socket nobody reads
 *     does not stop it;
 *   - a bare `make` builds the binary;
 *   - `make install` into a temporary PREFIX: the files, the paths written
 *     into the unit and the options file, a reinstall that keeps the
 *     options; `systemd-analyze verify` on the installed unit, alone and with
 *     the GPU drop-in (skipped, never passed, when systemd-analyze is missing
 *     or cannot verify a known-good unit here); its exposure score; and the
 *     unit's ExecStart, run as systemd would with the installed options,
 *     reaching READY=1;
 *   - the Kubernetes manifests of deploy/k8s, checked by tests/check_k8s.py
 *     (skipped when no python3 with the yaml module is found);
 *   - deploy/prometheus: promtool checks the config and rules and runs the
 *     alerts' unit test, and every series the alerts read is one a server
 *     exports (skipped without promtool, Debian package prometheus).
 *
 * Every wait is bounded (socket timeouts, polling counts) and every child is
 * killed when this process dies (PR_SET_PDEATHSIG).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "notify.h"

#include "support/cuda.h"
#include "support/files.h"
#include "support/filter.h"
#include "support/http.h"
#include "support/proc.h"
#include "support/server.h"
#include "support/timing.h"

/* Hang guards only: no test asserts how fast anything is. */
#define RECV_TIMEOUT_S 120
#define EXIT_TIMEOUT_S 300

/* ---- small helpers ------------------------------------------------------- */

/* snprintf into an array, which must not cut. */
#define FMT(buf, ...) assert_true(snprintf(buf, sizeof buf, __VA_ARGS__) < (int)sizeof buf)

static int have(const char *program)
{
    return proc_run(NULL, "command -v %s >/dev/null", program) == 0;
}

/* ---- notify sockets ---------------------------------------------------- */

struct listener {
    int fd;
    char name[112]; /* what NOTIFY_SOCKET says: a path, or @ and a name */
};

/* Binds a datagram socket at l->name. */
static void listen_named(struct listener *l)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    const int abstract = l->name[0] == '@';
    size_t len = strlen(l->name);
    memcpy(a.sun_path, l->name, len);
    if (abstract)
        a.sun_path[0] = 0;
    l->fd = socket(AF_UNIX, SOCK_DGRAM, 0);
    assert_true(l->fd >= 0);
    struct timeval tv = {.tv_sec = RECV_TIMEOUT_S};
    setsockopt(l->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    assert_int_equal(bind(l->fd, (struct sockaddr *)&a, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)),
                     0);
}

/* Binds a datagram socket: at dir/notify, or abstract when dir is NULL. */
static void listen_notify(struct listener *l, const char *dir)
{
    static int serial;
    if (dir)
        snprintf(l->name, sizeof l->name, "%s/notify", dir);
    else
        snprintf(l->name, sizeof l->name, "@rrnserve-test-%ld-%d", (long)getpid(), serial++);
    listen_named(l);
}

/* The next datagram, NUL-terminated, into buf; "" after the timeout. */
static const char *next_state(const struct listener *l, char *buf, size_t cap)
{
    ssize_t n;
    do
        n = recv(l->fd, buf, cap - 1, 0);
    while (n < 0 && errno == EINTR);
    buf[n > 0 ? n : 0] = 0;
    return buf;
}

/* Whether a datagram is waiting, without waiting. */
static int has_state(const struct listener *l)
{
    char buf[256];
    return recv(l->fd, buf, sizeof buf, MSG_DONTWAIT) >= 0;
}

static uint64_t monotonic_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000u + (uint64_t)t.tv_nsec / 1000u;
}

/* "RELOADING=1\nMONOTONIC_USEC=N" with N in [lo, hi]. */
static void check_reloading(const char *msg, uint64_t lo, uint64_t hi)
{
    const char *head = "RELOADING=1\nMONOTONIC_USEC=";
    if (strncmp(msg, head, strlen(head)) != 0)
        fail_msg("not a RELOADING=1 message: \"%s\"", msg);
    char *end;
    unsigned long long us = strtoull(msg + strlen(head), &end, 10);
    assert_true(end > msg + strlen(head) && *end == 0);
    assert_true(us >= lo && us <= hi);
}

static void test_notify_send(void **state)
{
    (void)state;
    char dir[] = "/tmp/rrn_notify_XXXXXX", buf[256];
    assert_non_null(mkdtemp(dir));

    /* Nothing to tell without a socket; a malformed or dead one fails. */
    unsetenv("NOTIFY_SOCKET");
    assert_int_equal(notify_send("READY=1"), 0);
    setenv("NOTIFY_SOCKET", "", 1);
    assert_int_equal(notify_send("READY=1"), 0);
    setenv("NOTIFY_SOCKET", "relative/socket", 1);
    assert_int_equal(notify_send("READY=1"), -1);
    setenv("NOTIFY_SOCKET", "@", 1);
    assert_int_equal(notify_send("READY=1"), -1);
    char dead[160];
    snprintf(dead, sizeof dead, "%s/nobody", dir);
    setenv("NOTIFY_SOCKET", dead, 1);
    assert_int_equal(notify_send("READY=1"), -1);

    struct listener by_path, abstract;
    listen_notify(&by_path, dir);
    setenv("NOTIFY_SOCKET", by_path.name, 1);
    assert_int_equal(notify_send("READY=1\nSTATUS=serving"), 0);
    assert_string_equal(next_state(&by_path, buf, sizeof buf), "READY=1\nSTATUS=serving");
    uint64_t lo = monotonic_us();
    assert_int_equal(notify_reloading(), 0);
    check_reloading(next_state(&by_path, buf, sizeof buf), lo, monotonic_us());

    listen_notify(&abstract, NULL);
    setenv("NOTIFY_SOCKET", abstract.name, 1);
    assert_int_equal(notify_send("STOPPING=1"), 0);
    assert_string_equal(next_state(&abstract, buf, sizeof buf), "STOPPING=1");
    assert_false(has_state(&by_path));

    /* The longest names there is room for: a path of 107 bytes (sun_path's
     * 108 less its NUL) and an abstract name of 108 (no NUL); one more
     * byte is refused. */
    struct listener longest[2];
    for (int k = 0; k < 2; k++) {
        const size_t max = k ? 108 : 107;
        int n = k ? snprintf(longest[k].name, sizeof longest[k].name, "@rrnserve-test-%ld-", (long)getpid())
                  : snprintf(longest[k].name, sizeof longest[k].name, "%s/", dir);
        memset(longest[k].name + n, 'n', max - (size_t)n);
        longest[k].name[max] = 0;
        listen_named(&longest[k]);
        setenv("NOTIFY_SOCKET", longest[k].name, 1);
        assert_int_equal(notify_send("READY=1"), 0);
        assert_string_equal(next_state(&longest[k], buf, sizeof buf), "READY=1");
        strcat(longest[k].name, "n");
        setenv("NOTIFY_SOCKET", longest[k].name, 1);
        assert_int_equal(notify_send("READY=1"), -1);
        close(longest[k].fd);
    }

    unsetenv("NOTIFY_SOCKET");
    close(by_path.fd);
    close(abstract.fd);
    remove_tree(dir, NULL);
}

/* ---- the server under a notify socket ------------------------------------ */

/* Starts `sh -c script` (which execs the server) with NOTIFY_SOCKET set
 * and its output in log (a new file); its pid.
 *
 * The server starts with SIGTERM, SIGINT and SIGHUP already blocked.  It
 * blocks them itself before it starts a thread, but OpenBLAS starts its
 * threads before main(), with nothing blocked, and the kernel may hand such
 * a thread a signal sent to the process, which then dies of it (about one
 * SIGTERM in five sent right after READY=1).  A fault of the server, not
 * of the protocol this test is about; with the mask inherited, every
 * thread blocks them and the server's sigwait takes each one. */
static pid_t spawn(const char *script, const char *notify_socket, const char *log)
{
    unlink(log);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        sigaddset(&set, SIGHUP);
        sigprocmask(SIG_BLOCK, &set, NULL);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0)
            _exit(127);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
        setenv("NOTIFY_SOCKET", notify_socket, 1);
        execl("/bin/sh", "sh", "-c", script, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Waits (bounded) for the child; its wait status, or -1 (then killed). */
static int wait_exit(pid_t pid)
{
    int status = proc_wait(pid, EXIT_TIMEOUT_S);
    if (status == -1) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    return status;
}

/* Fails, showing how the server ended and the end of its output. */
static void fail_with_log(pid_t pid, const char *log, const char *what, const char *got)
{
    int status = 0;
    char how[64] = "was running; killed";
    if (waitpid(pid, &status, WNOHANG) == pid) {
        if (WIFSIGNALED(status))
            snprintf(how, sizeof how, "died of signal %d", WTERMSIG(status));
        else
            snprintf(how, sizeof how, "exited with status %d", WEXITSTATUS(status));
    } else {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    char *text = file_read(log, NULL), tail[3001];
    size_t len = text ? strlen(text) : 0;
    snprintf(tail, sizeof tail, "%s", text ? text + (len > 3000 ? len - 3000 : 0) : "");
    free(text);
    fail_msg("%s: got \"%s\"; the server %s; the end of its output:\n%s", what, got, how, tail);
}

static void expect_state(pid_t pid, const char *log, const struct listener *l, const char *want)
{
    char buf[256];
    next_state(l, buf, sizeof buf);
    if (strcmp(buf, want) != 0)
        fail_with_log(pid, log, want, buf);
}

/* The whole conversation: READY=1 (after the listening line), a reload
 * when `reload`, STOPPING=1 on SIGTERM, exit 0, nothing more. */
static void converse(const char *script, struct listener *l, const char *log, int reload)
{
    pid_t pid = spawn(script, l->name, log);
    expect_state(pid, log, l, "READY=1");
    char *text = file_read(log, NULL);
    int listening = text && strstr(text, "listening on http://");
    free(text);
    if (!listening)
        fail_with_log(pid, log, "the listening line before READY=1", "no such line");
    if (reload) {
        char buf[256];
        uint64_t lo = monotonic_us();
        kill(pid, SIGHUP);
        next_state(l, buf, sizeof buf);
        if (strncmp(buf, "RELOADING=1\n", 12) != 0)
            fail_with_log(pid, log, "RELOADING=1", buf);
        check_reloading(buf, lo, monotonic_us());
        expect_state(pid, log, l, "READY=1");
    }
    kill(pid, SIGTERM);
    expect_state(pid, log, l, "STOPPING=1");
    int status = wait_exit(pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_false(has_state(l));
}

static void test_server_notifies(void **state)
{
    (void)state;
    char dir[] = "/tmp/rrn_notify_XXXXXX", script[1024], log[128];
    assert_non_null(mkdtemp(dir));
    snprintf(log, sizeof log, "%s/server.log", dir);
    snprintf(script, sizeof script,
             "exec '%s' serve --models tests/fixtures --host 127.0.0.1 --port 0 --device cpu --threads 1",
             rrn_bin());

    struct listener by_path, abstract;
    listen_notify(&by_path, dir);
    converse(script, &by_path, log, 1);
    listen_notify(&abstract, NULL);
    converse(script, &abstract, log, 0);
    close(by_path.fd);
    close(abstract.fd);

    /* A socket nobody reads: the server serves and stops all the same. */
    char dead[160];
    snprintf(dead, sizeof dead, "%s/nobody", dir);
    pid_t pid = spawn(script, dead, log);
    int up = 0;
    for (int i = 0; i < RECV_TIMEOUT_S * 20 && !up; i++) {
        char *text = file_read(log, NULL);
        up = text && strstr(text, "listening on http://");
        free(text);
        if (!up)
            sleep_ms(50);
    }
    if (!up)
        fail_with_log(pid, log, "listening with a dead notify socket", "no listening line");
    kill(pid, SIGTERM);
    int status = wait_exit(pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    remove_tree(dir, NULL);
}

/* ---- make install and systemd-analyze ------------------------------------ */

static void must_contain(const char *path, const char *text, const char *needle)
{
    if (!text || !strstr(text, needle))
        fail_msg("%s does not hold \"%s\":\n%s", path, needle, text ? text : "(missing)");
}

static void must_exist(const char *prefix, const char *rel, int executable)
{
    char path[512];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", prefix, rel);
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
        fail_msg("make install did not write %s", path);
    /* The service runs as a dynamic user: everything must be readable. */
    assert_true((st.st_mode & 0444) == 0444);
    if (executable)
        assert_true(st.st_mode & S_IXOTH);
}

/* systemd-analyze verify on a unit, with SYSTEMD_UNIT_PATH when unit_path
 * is not NULL (for drop-ins); 0 when it passed without a word, else its
 * output in *out. */
static int verify(const char *unit, const char *unit_path, char **out)
{
    char cmd[4096];
    FMT(cmd, "%s%s%s systemd-analyze verify '%s'", unit_path ? "SYSTEMD_UNIT_PATH='" : "",
        unit_path ? unit_path : "", unit_path ? ":'" : "", unit);
    int rc = proc_run(out, "%s", cmd);
    return rc == 0 && (*out)[0] == 0 ? 0 : -1;
}

/* Whether systemd-analyze verify works here: a known-good unit passes
 * without a word and a key it does not know is reported. */
static int verify_works(const char *dir)
{
    char good[256], bad[256], *out = NULL;
    snprintf(good, sizeof good, "%s/rrn-known-good.service", dir);
    snprintf(bad, sizeof bad, "%s/rrn-known-bad.service", dir);
    file_write_text(good, "[Unit]\nDescription=known good\n[Service]\nType=simple\nExecStart=/bin/true\n");
    file_write_text(bad, "[Unit]\nDescription=known bad\n[Service]\nType=simple\nExecStart=/bin/true\nNoSuchKey=1\n");
    int ok = verify(good, NULL, &out) == 0;
    if (!ok)
        print_message("systemd-analyze verify fails on a known-good unit here:\n%s", out);
    free(out);
    out = NULL;
    if (ok && (verify(bad, NULL, &out) == 0 || !strstr(out, "NoSuchKey"))) {
        print_message("systemd-analyze verify does not report an unknown key here:\n%s", out);
        ok = 0;
    }
    free(out);
    unlink(good);
    unlink(bad);
    return ok;
}

static void check_installed_files(const char *prefix)
{
    char path[512], want[600];
    must_exist(prefix, "bin/rrnserve", 1);
    must_exist(prefix, "lib/systemd/system/rrnserve.service", 0);
    must_exist(prefix, "etc/rrnserve/rrnserve.env", 0);
    must_exist(prefix, "share/rrnserve/rrnserve-gpu.conf", 0);
    /* A build with CUDA installs its CUDA library where the installed
     * binary finds it.  Asked for the GPU where there is no NVIDIA driver,
     * the binary does not look for the library; with CUDA's stub of the
     * driver in its place (which reports no GPU) it loads it, and fails
     * only for want of a GPU. */
    if (strstr(backend_compiled(), "cuda")) {
        must_exist(prefix, "lib/rrnserve/librrnserve-cuda.so", 0);
        char stub[64], env[160], *out;
        if (cuda_stub_driver(stub, env) != 0) {
            print_message("no stub of the CUDA driver: the installed binary's loading of its library not checked\n");
        } else {
            int status = proc_run(&out, "%s '%s/bin/rrnserve' run models/sentiment.safetensors --text a --device cuda",
                                  env, prefix);
            if (status != 1 || !strstr(out, "no CUDA GPU"))
                fail_msg("the installed binary on --device cuda with the driver's stub: exit %d:\n%s", status, out);
            free(out);
            cuda_stub_driver_remove(stub);
        }
    }

    /* Every model of models/ but training checkpoints. */
    DIR *d = opendir("models");
    struct dirent *de;
    int models = 0;
    while (d && (de = readdir(d))) {
        size_t n = strlen(de->d_name);
        const char *ext = ".safetensors", *ckpt = ".ckpt.safetensors";
        if (n < strlen(ext) || strcmp(de->d_name + n - strlen(ext), ext) != 0)
            continue;
        snprintf(path, sizeof path, "%s/share/rrnserve/models/%s", prefix, de->d_name);
        if (n > strlen(ckpt) && strcmp(de->d_name + n - strlen(ckpt), ckpt) == 0) {
            assert_int_not_equal(access(path, F_OK), 0);
            continue;
        }
        must_exist(prefix, path + strlen(prefix) + 1, 0);
        models++;
    }
    if (d)
        closedir(d);
    print_message("make install: %d model(s) installed\n", models);

    /* The paths written into the unit and the options. */
    snprintf(path, sizeof path, "%s/lib/systemd/system/rrnserve.service", prefix);
    char *unit = file_read(path, NULL);
    assert_null(strstr(unit, "@BINDIR@"));
    assert_null(strstr(unit, "@SYSCONFDIR@"));
    assert_null(strstr(unit, "@MODELDIR@"));
    snprintf(want, sizeof want, "\nExecStart=%s/bin/rrnserve serve ", prefix);
    must_contain(path, unit, want);
    snprintf(want, sizeof want, "\nEnvironmentFile=%s/etc/rrnserve/rrnserve.env\n", prefix);
    must_contain(path, unit, want);
    snprintf(want, sizeof want, "\nReadOnlyPaths=%s/share/rrnserve/models\n", prefix);
    must_contain(path, unit, want);
    must_contain(path, unit, "\nType=notify\n");
    free(unit);
    snprintf(path, sizeof path, "%s/etc/rrnserve/rrnserve.env", prefix);
    char *env = file_read(path, NULL);
    snprintf(want, sizeof want, "\nRRN_MODELS=%s/share/rrnserve/models\n", prefix);
    must_contain(path, env, want);
    assert_null(strstr(env, "@MODELDIR@"));
    free(env);
}

/* The unit's ExecStart run as systemd runs it: the options file read,
 * ${VAR} one argument, $VAR split at spaces; on port 0 and the CPU. */
static void run_exec_start(const char *prefix, const char *dir)
{
    char path[512], script[4096], log[256];
    snprintf(path, sizeof path, "%s/lib/systemd/system/rrnserve.service", prefix);
    char *unit = file_read(path, NULL);
    const char *line = strstr(unit, "\nExecStart=");
    assert_non_null(line);
    line += strlen("\nExecStart=");
    size_t len = strcspn(line, "\n");
    char exec[2048] = "", *o = exec;
    for (size_t i = 0; i < len && o < exec + sizeof exec - 8; i++) {
        if (line[i] == '$' && line[i + 1] == '{') {
            /* ${VAR} -> "${VAR}" */
            size_t end = i + 2 + strcspn(line + i + 2, "}");
            o += snprintf(o, (size_t)(exec + sizeof exec - o), "\"%.*s\"", (int)(end + 1 - i), line + i);
            i = end;
        } else {
            *o++ = line[i];
        }
    }
    *o = 0;
    free(unit);
    snprintf(script, sizeof script,
             "set -a; . '%s/etc/rrnserve/rrnserve.env'; set +a; RRN_HOST=127.0.0.1 RRN_PORT=0 RRN_DEVICE=cpu; exec %s",
             prefix, exec);
    snprintf(log, sizeof log, "%s/exec-start.log", dir);
    struct listener l;
    listen_notify(&l, dir);
    converse(script, &l, log, 0);
    close(l.fd);
    char *text = file_read(log, NULL);
    must_contain(log, text, "serving ");
    free(text);
}

/* A bare `make` builds the binary: asked what it would do once the
 * command line's source changed, it links rrnserve (it once built nothing
 * but a build folder's record of its flags, the first rule it read). */
static void test_make_default_goal(void **state)
{
    (void)state;
    char *out = NULL;
    const char *cmd = "make -n --no-print-directory -W cli/main.c";
    if (proc_run(&out, "%s", cmd) != 0)
        fail_msg("%s:\n%s", cmd, out);
    if (!strstr(out, "LINK ") || !strstr(out, "/rrnserve\"\n"))
        fail_msg("%s does not link rrnserve:\n%s", cmd, out);
    free(out);
}

static void test_install_and_verify(void **state)
{
    (void)state;
    if (access("rrnserve", X_OK) != 0) {
        print_message("no ./rrnserve to install (make rrnserve): skipped\n");
        skip();
    }
    char prefix[] = "/tmp/rrn_install_XXXXXX", cmd[4096], path[1024], *out = NULL;
    assert_non_null(mkdtemp(prefix));
    /* -o rrnserve: install the binary that is there, never rebuild it. */
    snprintf(cmd, sizeof cmd, "make -s --no-print-directory -o rrnserve install PREFIX='%s'", prefix);
    if (proc_run(&out, "%s", cmd) != 0)
        fail_msg("%s:\n%s", cmd, out);
    free(out);
    check_installed_files(prefix);

    /* A reinstall keeps the local options. */
    snprintf(path, sizeof path, "%s/etc/rrnserve/rrnserve.env", prefix);
    FILE *f = fopen(path, "a");
    assert_non_null(f);
    fputs("# a local edit\n", f);
    fclose(f);
    if (proc_run(&out, "%s", cmd) != 0)
        fail_msg("%s again:\n%s", cmd, out);
    free(out);
    char *env = file_read(path, NULL);
    must_contain(path, env, "# a local edit\n");
    free(env);

    /* The installed command line, with the installed options, serves. */
    run_exec_start(prefix, prefix);

    if (!have("systemd-analyze")) {
        print_message("systemd-analyze not found (Debian package systemd): skipped\n");
        remove_tree(prefix, NULL);
        skip();
    }
    if (!verify_works(prefix)) {
        remove_tree(prefix, NULL);
        skip();
    }
    char unit[512];
    snprintf(unit, sizeof unit, "%s/lib/systemd/system/rrnserve.service", prefix);
    if (verify(unit, NULL, &out) != 0)
        fail_msg("systemd-analyze verify %s:\n%s", unit, out);
    free(out);

    /* With the GPU drop-in; a broken drop-in beside it shows drop-ins are
     * read at all. */
    char units[512], dropins[600];
    snprintf(units, sizeof units, "%s/units", prefix);
    snprintf(dropins, sizeof dropins, "%s/rrnserve.service.d", units);
    FMT(cmd, "mkdir -p '%s' && cp '%s' '%s/' && cp deploy/rrnserve-gpu.conf '%s/gpu.conf'", dropins, unit, units,
        dropins);
    assert_int_equal(proc_run(NULL, "%s", cmd), 0);
    FMT(unit, "%s/rrnserve.service", units);
    if (verify(unit, units, &out) != 0)
        fail_msg("systemd-analyze verify with the GPU drop-in:\n%s", out);
    free(out);
    FMT(path, "%s/zz-check.conf", dropins);
    file_write_text(path, "[Service]\nNoSuchKey=1\n");
    assert_int_not_equal(verify(unit, units, &out), 0);
    must_contain("systemd-analyze verify with a broken drop-in", out, "NoSuchKey");
    free(out);
    unlink(path);

    /* The hardening, as systemd scores it (0 best, 10 worst), where this
     * systemd can score a unit file offline. */
    snprintf(cmd, sizeof cmd, "systemd-analyze security --offline=yes '%s'", unit);
    proc_run(&out, "%s", cmd);
    const char *at = strstr(out, "Overall exposure level for rrnserve.service: ");
    if (at) {
        double score = strtod(at + strlen("Overall exposure level for rrnserve.service: "), NULL);
        print_message("systemd-analyze security: exposure %.1f\n", score);
        assert_true(score <= 2.0);
    } else {
        print_message("systemd-analyze security --offline is not available here\n");
    }
    free(out);
    remove_tree(prefix, NULL);
}

/* ---- Kubernetes manifests ------------------------------------------------ */

static void test_k8s_manifests(void **state)
{
    (void)state;
    static const char *const pythons[] = {"/usr/bin/python3", "python3"};
    const char *python = NULL;
    char cmd[512], *out = NULL;
    for (size_t i = 0; i < sizeof pythons / sizeof pythons[0] && !python; i++) {
        snprintf(cmd, sizeof cmd, "%s -c 'import yaml'", pythons[i]);
        if (proc_run(NULL, "%s", cmd) == 0)
            python = pythons[i];
    }
    if (!python) {
        print_message("no python3 with the yaml module (Debian package python3-yaml): skipped\n");
        skip();
    }
    snprintf(cmd, sizeof cmd, "%s tests/check_k8s.py deploy/k8s", python);
    int rc = proc_run(&out, "%s", cmd);
    print_message("%s", out);
    if (rc != 0)
        fail_msg("%s: status %d", cmd, rc);
    free(out);
    /* A drain that leaves the preStop hook's 5 s but not the cut-off's
     * 2 s of the 120 s grace period is refused. */
    char dir[] = "/tmp/rrn_k8s_XXXXXX";
    assert_non_null(mkdtemp(dir));
    rc = proc_run(&out,
                  "cp deploy/k8s/*.yaml %s && sed -i 's/RRN_DRAIN_S: \"110\"/RRN_DRAIN_S: \"114\"/' "
                  "%s/configmap.yaml && %s tests/check_k8s.py %s",
                  dir, dir, python, dir);
    if (rc == 0 || !strstr(out, "--drain-s (114 s) and the cut-off (2 s) must end within"))
        fail_msg("a drain of 114 s in a grace period of 120 s: status %d:\n%s", rc, out);
    free(out);
    remove_tree(dir, NULL);
}

/* A renamed or removed metric would silence the alerts that read it, so
 * each rrnserve_ name in alerts.yml (a histogram's _bucket read as its
 * family) must be a family in a server's /metrics: one serving a language
 * model and a classifier, whose series together are all there are. */
static void check_alerts_read_real_series(void)
{
    static const char *const models[] = {"combo_lstm_lm", "plain_lstm_l2_bi_last", NULL};
    static const char *const args[] = {"--device", "cpu", "--threads", "1", NULL};
    struct server *s = server_start(&(struct server_opts){.models = models, .args = args});
    struct http_resp r;
    http_must_request(s->port, "GET", "/metrics", "", NULL, &r);
    assert_int_equal(r.status, 200);
    char *rules = file_read("deploy/prometheus/alerts.yml", NULL);
    assert_non_null(rules);
    int names = 0;
    for (const char *p = rules; (p = strstr(p, "rrnserve_")) != NULL; names++) {
        size_t n = strspn(p, "abcdefghijklmnopqrstuvwxyz_");
        char name[96], want[128];
        snprintf(name, sizeof name, "%.*s", (int)n, p);
        p += n;
        static const char *const parts[] = {"_bucket", "_sum", "_count"};
        for (size_t k = 0; k < sizeof parts / sizeof *parts; k++) {
            size_t len = strlen(name), plen = strlen(parts[k]);
            if (len > plen && strcmp(name + len - plen, parts[k]) == 0)
                name[len - plen] = 0;
        }
        snprintf(want, sizeof want, "\n# TYPE %s ", name);
        if (!strstr(r.body.p, want))
            fail_msg("deploy/prometheus/alerts.yml reads %s, which /metrics does not export", name);
    }
    assert_true(names >= 8);
    free(rules);
    http_resp_free(&r);
    server_stop(s);
}

static void test_prometheus_rules(void **state)
{
    (void)state;
    if (proc_run(NULL, "command -v promtool") != 0) {
        print_message("no promtool (Debian package prometheus): skipped\n");
        skip();
    }
    static const char *const cmds[] = {
        "promtool check config deploy/prometheus/prometheus.yml",
        "promtool test rules deploy/prometheus/alerts_test.yml",
    };
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
        char *out = NULL;
        int rc = proc_run(&out, "%s", cmds[i]);
        if (rc != 0)
            fail_msg("%s: status %d\n%s", cmds[i], rc, out);
        free(out);
    }
    check_alerts_read_real_series();
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_notify_send),
        cmocka_unit_test(test_server_notifies),
        cmocka_unit_test(test_make_default_goal),
        cmocka_unit_test(test_install_and_verify),
        cmocka_unit_test(test_k8s_manifests),
        cmocka_unit_test(test_prometheus_rules),
    };
    return cmocka_run_group_tests_name("deploy", tests, NULL, NULL);
}
