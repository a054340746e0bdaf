/* test_page.c - the attention page at GET /: `rrnserve serve` ($RRN_BIN, as
 * tests/run_tests.sh sets it) runs as a child process on a temporary
 * folder holding two RRA fixtures (one bidirectional).  The page is served (also without a key
 * when keys are required), and headless Chromium, given the page's URL
 * with ?model=&text=, really draws the heatmap: the rendered DOM holds a
 * cell per weight, the token labels, the columns and tooltips of positions
 * before the text, and its screenshot holds cells of several shades of the
 * heatmap's blue.  A text past the page's 400 rows is drawn cut, and says
 * so; a server that wants a key gets the page asking for one.  Without
 * Chromium the browser tests are skipped.
 *
 * Every wait is bounded and every child is killed, also when a test fails
 * (PR_SET_PDEATHSIG covers this process dying).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <openssl/evp.h>
#include <png.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "support/files.h"
#include "support/filter.h"
#include "support/http.h"
#include "support/proc.h"
#include "support/server.h"

#define MODEL "rra_dynamic_w3_l2_lm"
/* The same attention, read both ways: its backward direction looks ahead. */
#define BI_MODEL "rra_dynamic_w3_l2_bi"
#define TITLE "<title>rrnserve: attention heatmap</title>"
#define PAGE_URL "/?model=" MODEL "&text=a%20nice%20day"
#define KEY "page-test-key"
/* Hang guards only: nothing asserts how fast anything is. */
#define BROWSER_TIMEOUT_S 180
/* "a nice day": 10 steps, window 3, 2 layers, one direction. */
#define CELLS (10 * 3 * 2)
/* A heatmap cell is 26 pixels square; the blue of 60 of them covers about
 * 37000 pixels, the legend's bar 1600. */
#define MIN_BLUE_PIXELS 10000
#define MIN_SHADE_PIXELS 200
#define MIN_SHADES 4
/* How a heatmap cell's tooltip says its weight is on a position before the
 * text (the page's script holds the words too, without the comma). */
#define ZERO_STATE_TIP "(the zero state before the text),"
#define ZERO_STATE_AFTER_TIP "(the zero state after the text),"

/* Runs argv (looked up in PATH) in a process group of its own, stdout to
 * out_path (or /dev/null), stderr to /dev/null.  Its wait status, or -1
 * when it ran past timeout_s; either way the whole group is killed after,
 * so no helper process it started outlives it. */
static int run_bounded(char *const argv[], const char *out_path, int timeout_s)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int out = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int null = open("/dev/null", O_RDWR);
        if (out < 0 || null < 0)
            _exit(127);
        dup2(null, STDIN_FILENO);
        dup2(out, STDOUT_FILENO);
        dup2(null, STDERR_FILENO);
        execvp(argv[0], argv);
        _exit(127);
    }
    setpgid(pid, pid);
    int status = proc_wait(pid, timeout_s);
    kill(-pid, SIGKILL);
    if (status == -1)
        waitpid(pid, NULL, 0);
    return status;
}

/* A key file at path that admits key (its SHA-256 in hex); 0, or -1. */
static int write_keys(const char *path, const char *key)
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    FILE *f;
    if (EVP_Digest(key, strlen(key), md, &n, EVP_sha256(), NULL) != 1 || !(f = fopen(path, "w")))
        return -1;
    for (unsigned i = 0; i < n; i++)
        fprintf(f, "%02x", md[i]);
    fputc('\n', f);
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- the page --------------------------------------------------------- */

/* Starts the server on the fixture, requiring the API key key when it is
 * not NULL; the test's own files go to scratch_dir, removed with it. */
static struct server *start(void **state, const char *key)
{
    static const char *const models[] = {MODEL, BI_MODEL, NULL};
    char keys[512];
    /* Without a key the list ends before --api-keys. */
    const char *args[] = {"--device", "cpu", key ? "--api-keys" : NULL, keys, NULL};
    assert_int_equal(scratch_setup(state), 0);
    scratch_path(keys, "keys");
    if (key && write_keys(keys, key) != 0) {
        scratch_teardown(state);
        fail_msg("cannot write %s", keys);
    }
    return server_start(&(struct server_opts){.models = models, .args = args});
}

static int setup_server(void **state)
{
    *state = start(state, NULL);
    return 0;
}

static int teardown_server(void **state)
{
    server_teardown(state);
    return scratch_teardown(state);
}

static void test_page_served(void **state)
{
    struct server *s = *state;
    struct http_resp r;
    http_must_request(s->port, "GET", "/", "", NULL, &r);
    assert_int_equal(r.status, 200);
    char type[128];
    assert_string_equal(http_header(&r, "Content-Type", type, sizeof type), "text/html; charset=utf-8");
    assert_non_null(strstr(r.body.p, "<!DOCTYPE html>"));
    assert_non_null(strstr(r.body.p, TITLE));
    /* Self-contained: whatever it refers to is a data: URL. */
    static const char *const refs[] = {"src=", "href=", "url(", "@import"};
    for (size_t i = 0; i < sizeof refs / sizeof refs[0]; i++)
        for (const char *p = strstr(r.body.p, refs[i]); p; p = strstr(p + 1, refs[i])) {
            const char *v = p + strlen(refs[i]);
            v += *v == '\'' || *v == '"';
            if (strncmp(v, "data:", 5) != 0)
                fail_msg("the page loads %.60s", p);
        }
    http_resp_free(&r);
    /* The query string is the page's, not a different path. */
    http_must_request(s->port, "GET", PAGE_URL, "", NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body.p, TITLE));
    http_resp_free(&r);
    http_must_request(s->port, "GET", "/metrics", "", NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body.p, "rrnserve_requests_total{endpoint=\"/\",status=\"200\"} 2\n"));
    http_resp_free(&r);
}

static int setup_keyed_server(void **state)
{
    *state = start(state, KEY);
    return 0;
}

/* With keys required the page is still served without one (it holds no
 * data), and what it fetches still needs the key. */
static void test_page_needs_no_key(void **state)
{
    struct server *s = *state;
    struct http_resp r;
    http_must_request(s->port, "GET", "/", "", NULL, &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body.p, TITLE));
    http_resp_free(&r);
    http_must_request(s->port, "GET", "/models", "", NULL, &r);
    assert_int_equal(r.status, 401);
    http_resp_free(&r);
    http_must_request(s->port, "GET", "/models", "Authorization: Bearer " KEY "\r\n", NULL, &r);
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
}

/* ---- the page in a browser ----------------------------------------------- */

/* The path of the first of the names found in PATH, in out; 0 if none. */
static int find_browser(char *out, size_t cap)
{
    static const char *const names[] = {"chromium", "chromium-browser"};
    const char *path = getenv("PATH");
    for (size_t i = 0; path && i < sizeof names / sizeof names[0]; i++)
        for (const char *dir = path; *dir;) {
            size_t n = strcspn(dir, ":");
            snprintf(out, cap, "%.*s/%s", (int)n, dir, names[i]);
            if (n && access(out, X_OK) == 0)
                return 1;
            dir += n + (dir[n] == ':');
        }
    return 0;
}

/* Renders url headlessly at 1000x800: mode is "--dump-dom" (the DOM after
 * the scripts ran, to out) or "--screenshot=PNG". */
static void browse(const char *browser, const char *url, const char *mode, const char *out, const char *profile)
{
    char user_data[128];
    snprintf(user_data, sizeof user_data, "--user-data-dir=%s", profile);
    char *const argv[] = {(char *)browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", user_data, "--virtual-time-budget=5000", "--window-size=1000,800",
                          (char *)mode, (char *)url, NULL};
    int status = run_bounded(argv, out, BROWSER_TIMEOUT_S);
    if (status == -1)
        fail_msg("%s %s did not finish in %d s", browser, mode, BROWSER_TIMEOUT_S);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("%s %s failed (wait status %d)", browser, mode, status);
}

static int count_in(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

/* Fails unless needle is in dom exactly want times. */
static void expect_count(const char *what, const char *dom, const char *needle, int want)
{
    int n = count_in(dom, needle);
    if (n != want)
        fail_msg("%s: \"%s\" %d times, not %d", what, needle, n, want);
}

static void check_dom(const char *dom)
{
    /* What the page said, for the failure messages. */
    const char *status = strstr(dom, "id=\"status\"");
    status = status ? strchr(status, '>') : NULL;
    char said[512] = "(no status element)";
    if (status)
        snprintf(said, sizeof said, "\"%.*s\"", (int)strcspn(status + 1, "<"), status + 1);
    if (count_in(dom, "class=\"cell\"") != CELLS)
        fail_msg("%d heatmap cells drawn, not %d; the page says: %s", count_in(dom, "class=\"cell\""), CELLS, said);
    /* The labels of "a nice day", on the rows and on the columns of both
     * layers; the space shows as U+2423. */
    static const char *const labels[] = {">a</text>", ">n</text>", ">i</text>", ">c</text>",
                                         ">e</text>", ">d</text>", ">y</text>", ">\u2423</text>"};
    for (size_t i = 0; i < sizeof labels / sizeof labels[0]; i++)
        if (count_in(dom, labels[i]) < 4)
            fail_msg("the label %s is drawn %d times, not at least 4; the page says: %s", labels[i],
                     count_in(dom, labels[i]), said);
    /* The status line, whole (no cut: 10 steps are far from MAX_ROWS). */
    if (!strstr(dom, MODEL ": 10 tokens, dynamic attention over a window of 3<"))
        fail_msg("the page says: %s", said);
    /* Step t attends to positions t-2, t-3 and t-4, so steps 0-3 look back
     * past the text's start, at positions -4..-1: a column each, labelled
     * as the zero state, and 3 + 3 + 2 + 1 weights on them, in each of the
     * 2 layers. */
    expect_count(MODEL, dom, ">\u2205</text>", 4 * 2);
    expect_count(MODEL, dom, "class=\"outside\"", 4 * 2);
    expect_count(MODEL, dom, ZERO_STATE_TIP, 9 * 2);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* The screenshot holds enough pixels of the heatmap's blues (blue well
 * above red: not white, grey or black), in several shades that each cover
 * at least part of a cell. */
static void check_png(const char *path)
{
    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    if (!png_image_begin_read_from_file(&img, path))
        fail_msg("%s: %s", path, img.message);
    img.format = PNG_FORMAT_RGB;
    size_t size = PNG_IMAGE_SIZE(img), pixels = (size_t)img.width * img.height;
    unsigned char *px = malloc(size);
    uint32_t *blue = malloc(pixels * sizeof *blue);
    assert_non_null(px);
    assert_non_null(blue);
    if (!png_image_finish_read(&img, NULL, px, 0, NULL))
        fail_msg("%s: %s", path, img.message);
    size_t n = 0;
    for (size_t i = 0; i < pixels; i++) {
        int r = px[3 * i], g = px[3 * i + 1], b = px[3 * i + 2];
        if (b >= r + 30 && b >= g)
            blue[n++] = (uint32_t)r << 16 | (uint32_t)g << 8 | (uint32_t)b;
    }
    qsort(blue, n, sizeof *blue, cmp_u32);
    int shades = 0;
    for (size_t i = 0, j; i < n; i = j) {
        for (j = i; j < n && blue[j] == blue[i]; j++)
            ;
        shades += j - i >= MIN_SHADE_PIXELS;
    }
    free(px);
    free(blue);
    if (n < MIN_BLUE_PIXELS || shades < MIN_SHADES)
        fail_msg("the screenshot (%ux%u) has %zu heatmap-blue pixels (want %d) in %d shades of %d pixels or more "
                 "(want %d)", img.width, img.height, n, MIN_BLUE_PIXELS, shades, MIN_SHADE_PIXELS, MIN_SHADES);
}

/* Chromium's path into browser, or the test skipped without it. */
static void need_browser(char *browser, size_t cap)
{
    if (!find_browser(browser, cap)) {
        print_message("chromium is not installed (tools/install-deps.sh installs it)\n");
        skip();
    }
}

/* The DOM of the page at path (with its query) of server s once its
 * scripts ran, to be freed; name keeps the run's files apart. */
static char *dom_of(const char *browser, const struct server *s, const char *path, const char *name)
{
    char url[1024], dom[128], profile[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", s->port, path);
    snprintf(dom, sizeof dom, "%s/%s.html", scratch_dir, name);
    snprintf(profile, sizeof profile, "%s/profile-%s", scratch_dir, name);
    browse(browser, url, "--dump-dom", dom, profile);
    return file_must_read(dom, NULL);
}

static void test_browser_draws_heatmap(void **state)
{
    struct server *s = *state;
    char browser[512], url[128], png[96], shot[112], profile[96];
    need_browser(browser, sizeof browser);
    char *dom = dom_of(browser, s, PAGE_URL, "dom");
    check_dom(dom);
    free(dom);

    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", s->port, PAGE_URL);
    snprintf(png, sizeof png, "%s/page.png", scratch_dir);
    snprintf(shot, sizeof shot, "--screenshot=%s", png);
    snprintf(profile, sizeof profile, "%s/profile-png", scratch_dir);
    browse(browser, url, shot, NULL, profile);
    check_png(png);
}

/* A bidirectional model: 4 heatmaps (2 layers, 2 directions), the
 * backward ones looking ahead at positions t+2..t+4, so past the text's
 * end at steps 6-9 (1 + 2 + 3 + 3 weights, on 4 columns), as the forward
 * ones look before its start at steps 0-3. */
static void test_browser_draws_both_directions(void **state)
{
    struct server *s = *state;
    char browser[512];
    need_browser(browser, sizeof browser);
    char *dom = dom_of(browser, s, "/?model=" BI_MODEL "&text=a%20nice%20day", "bi");
    static const struct {
        const char *needle;
        int times;
    } counts[] = {
        {"class=\"cell\"", 10 * 3 * 4},
        {">layer 0 \u00b7 forward</h2>", 1},
        {">layer 0 \u00b7 backward</h2>", 1},
        {">layer 1 \u00b7 forward</h2>", 1},
        {">layer 1 \u00b7 backward</h2>", 1},
        {">\u2205</text>", 4 * 4},
        {"class=\"outside\"", 4 * 4},
        {ZERO_STATE_TIP, 9 * 2},
        {ZERO_STATE_AFTER_TIP, 9 * 2},
        {"steps ahead", 10 * 3 * 2},
        {"steps back", 10 * 3 * 2},
    };
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        expect_count(BI_MODEL, dom, counts[i].needle, counts[i].times);
    free(dom);
}

/* A text of more than the page's MAX_ROWS (400) steps: its first 400 are
 * drawn, and the status says so; one of 400 is drawn whole. */
static void test_browser_cuts_long_texts(void **state)
{
    struct server *s = *state;
    char browser[512], path[600];
    need_browser(browser, sizeof browser);
    for (int len = 400; len <= 401; len++) {
        int n = snprintf(path, sizeof path, "/?model=" MODEL "&text=");
        for (int i = 0; i < len; i++)
            path[n++] = "ab"[i % 2];
        path[n] = 0;
        char *dom = dom_of(browser, s, path, len == 400 ? "long" : "longer");
        char want[128];
        snprintf(want, sizeof want, MODEL ": %d tokens, dynamic attention over a window of 3%s<", len,
                 len > 400 ? " (the first 400 steps drawn)" : "");
        if (!strstr(dom, want))
            fail_msg("%d tokens: no status \"%s\"", len, want);
        expect_count(want, dom, "class=\"cell\"", 400 * 3 * 2);
        free(dom);
    }
}

/* Opened on a server that wants a key, without one: the page says it
 * cannot list the models, why, and to enter a key, and shows the box. */
static void test_browser_asks_for_a_key(void **state)
{
    struct server *s = *state;
    char browser[512];
    need_browser(browser, sizeof browser);
    char *dom = dom_of(browser, s, PAGE_URL, "keyed");
    const char *said = strstr(dom, "Cannot list the models: /models answered 401: ");
    const char *box = strstr(dom, "id=\"keybox\"");
    if (!said || !strstr(said, "(enter an API key above)</div>"))
        fail_msg("no request for a key in the page:\n%s", dom);
    assert_non_null(box);
    const char *hidden = strstr(box, "hidden");
    if (hidden && hidden < strchr(box, '>'))
        fail_msg("the key's box is still hidden: %.80s", box);
    free(dom);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_page_served, setup_server, teardown_server),
        cmocka_unit_test_setup_teardown(test_page_needs_no_key, setup_keyed_server, teardown_server),
        cmocka_unit_test_setup_teardown(test_browser_draws_heatmap, setup_server, teardown_server),
        cmocka_unit_test_setup_teardown(test_browser_draws_both_directions, setup_server, teardown_server),
        cmocka_unit_test_setup_teardown(test_browser_cuts_long_texts, setup_server, teardown_server),
        cmocka_unit_test_setup_teardown(test_browser_asks_for_a_key, setup_keyed_server, teardown_server),
    };
    return cmocka_run_group_tests_name("page", tests, NULL, NULL);
}
