/* test_cli.c - the rrnserve binary driven as a user drives it: `run` on
 * every input form gives the fixture's numbers, `info` reports a file, and
 * bad arguments or files give a message naming the problem and a non-zero
 * exit status.  RRN_BIN names the binary (tests/run_tests.sh sets it).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#include "model.h"
#include "support/buf.h"
#include "support/cuda.h"
#include "support/files.h"
#include "support/filter.h"
#include "support/fixtures.h"
#include "support/model_json.h"
#include "support/proc.h"

#define FIX "tests/fixtures/"

static void test_version(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(proc_rrnserve(&out, NULL, "--version"), 0);
    assert_non_null(strstr(out, "rrnserve "));
    assert_non_null(strstr(out, "cpu"));
    free(out);
}

static void test_run_classify_text(void **state)
{
    (void)state;
    cJSON *fx = fixture_json("plain_lstm_l2_bi_last");
    const char *text = cJSON_GetArrayItem(cJSON_GetObjectItem(fx, "texts"), 2)->valuestring;
    const cJSON *want = cJSON_GetArrayItem(cJSON_GetObjectItem(fx, "probabilities"), 2);
    const cJSON *classes = cJSON_GetObjectItem(cJSON_GetObjectItem(fx, "config"), "classes");
    char *out;
    assert_int_equal(proc_rrnserve(&out, NULL, "run " FIX "plain_lstm_l2_bi_last.safetensors --text '%s'", text), 0);
    cJSON *got = cJSON_Parse(out);
    assert_non_null(got);
    const cJSON *probs = cJSON_GetObjectItem(got, "probabilities");
    int best = 0;
    for (int c = 0; c < cJSON_GetArraySize(classes); c++) {
        const char *name = cJSON_GetArrayItem(classes, c)->valuestring;
        double p = cJSON_GetObjectItem(probs, name)->valuedouble;
        assert_true(fabs(p - cJSON_GetArrayItem(want, c)->valuedouble) < 1e-5);
        if (cJSON_GetArrayItem(want, c)->valuedouble > cJSON_GetArrayItem(want, best)->valuedouble)
            best = c;
    }
    assert_string_equal(cJSON_GetObjectItem(got, "label")->valuestring,
                        cJSON_GetArrayItem(classes, best)->valuestring);
    cJSON_Delete(got);
    cJSON_Delete(fx);
    free(out);
}

/* A regression that reads text (which `rrnserve train`, whose regressions
 * read vectors, does not make, but an exported model may be) prints its
 * outputs: the engine's, computed here in the same process. */
static void test_run_regress_text(void **state)
{
    (void)state;
    struct model m;
    model_from_json("{\"task\": \"regress\", \"cell\": \"gru\", \"hidden\": 8, \"embed_dim\": 4, \"outputs\": 2, "
                    "\"tokenizer\": {\"type\": \"byte\"}}",
                    0, 3, &m);
    char dir[] = "/tmp/rrn_cli_XXXXXX", path[64], err[256];
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/regress.safetensors", dir);
    if (model_save(&m, path, NULL, 0, err, sizeof err) != 0)
        fail_msg("model_save: %s", err);
    struct backend *be = backend_create(DEVICE_CPU, err, sizeof err);
    assert_non_null(be);
    struct engine *e = engine_create(&m, be, 0, err, sizeof err);
    assert_non_null(e);
    static const int32_t ids[] = {'a', ' ', 'f', 'i', 'n', 'e', ' ', 'd', 'a', 'y'};
    float want[2];
    struct engine_seq q = {.tokens = ids, .len = 10, .slot = -1, .logits = want};
    assert_int_equal(engine_forward(e, &q, 1, err, sizeof err), 0);
    char *out;
    assert_int_equal(proc_rrnserve(&out, NULL, "run %s --text 'a fine day'", path), 0);
    cJSON *got = cJSON_Parse(out);
    const cJSON *outputs = cJSON_GetObjectItem(got, "outputs");
    assert_int_equal(cJSON_GetArraySize(outputs), 2);
    for (int i = 0; i < 2; i++)
        if (!(fabs(cJSON_GetArrayItem(outputs, i)->valuedouble - want[i]) < 1e-6))
            fail_msg("output %d: %s, not %g", i, out, (double)want[i]);
    cJSON_Delete(got);
    free(out);
    engine_destroy(e);
    backend_destroy(be);
    model_free(&m);
    unlink(path);
    rmdir(dir);
}

/* The lm texts as a file (one text) and as JSONL with bad lines between
 * good ones: each good line gives the fixture's log-probability, each bad
 * one an error line in its place naming its line, and the exit status is
 * 1. */
static void test_run_lm_file_and_jsonl(void **state)
{
    (void)state;
    cJSON *fx = fixture_json("combo_lstm_lm");
    const cJSON *texts = cJSON_GetObjectItem(fx, "texts"), *lp = cJSON_GetObjectItem(fx, "logprob");
    char dir[] = "/tmp/rrn_cli_XXXXXX", path[64], *out;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/one.txt", dir);
    FILE *f = fopen(path, "w");
    fputs(cJSON_GetArrayItem(texts, 2)->valuestring, f);
    fclose(f);
    assert_int_equal(proc_rrnserve(&out, NULL, "run " FIX "combo_lstm_lm.safetensors --file %s", path), 0);
    cJSON *got = cJSON_Parse(out);
    assert_non_null(got);
    double L = cJSON_GetObjectItem(got, "logprob")->valuedouble;
    int N = cJSON_GetObjectItem(got, "tokens")->valueint;
    assert_true(fabs(L - cJSON_GetArrayItem(lp, 2)->valuedouble) < 1e-4);
    assert_int_equal(N, (int)strlen(cJSON_GetArrayItem(texts, 2)->valuestring) - 1);
    assert_true(fabs(cJSON_GetObjectItem(got, "bits_per_char")->valuedouble - (-L / log(2.0) / N)) < 1e-9);
    cJSON_Delete(got);
    /* The same text from standard input. */
    char *piped;
    assert_int_equal(proc_rrnserve(&piped, NULL, "run " FIX "combo_lstm_lm.safetensors --file - < %s", path), 0);
    assert_string_equal(piped, out);
    free(piped);
    free(out);
    unlink(path);

    snprintf(path, sizeof path, "%s/in.jsonl", dir);
    f = fopen(path, "w");
    for (int i = 0; i < cJSON_GetArraySize(texts); i++) {
        cJSON *line = cJSON_CreateObject();
        cJSON_AddStringToObject(line, "text", cJSON_GetArrayItem(texts, i)->valuestring);
        char *s = cJSON_PrintUnformatted(line);
        fprintf(f, "%s\n%s", s, i == 1 ? "{\"text\": 42}\n\n{\"text\": \"\"}\nnot json\n[1]\n"
                                                "{\"text\": \"a\"} {\"text\": \"b\"}\n{\"text\": \"a\\u0000b\"}\n" : "");
        free(s);
        cJSON_Delete(line);
    }
    fclose(f);
    assert_int_equal(
        proc_rrnserve(&out, NULL, "run " FIX "combo_lstm_lm.safetensors --batch 2 --jsonl %s 2>/dev/null", path), 1);
    /* The answers to lines 3 and 5 to 9 (4 is blank) are errors naming
     * them: line 8 is two objects, line 9 a text cJSON would cut short. */
    static const char *const errors[] = {"line 3: \"text\" must be a string", "line 5: the text has no tokens",
                                         "line 6: not valid JSON", "line 7: not a JSON object",
                                         "line 8: not valid JSON", "line 9: a string holds U+0000"};
    char *save, *line = strtok_r(out, "\n", &save);
    for (int i = 0, k = 0; i <= cJSON_GetArraySize(texts) + 5; i++, line = strtok_r(NULL, "\n", &save)) {
        assert_non_null(line);
        cJSON *r = cJSON_Parse(line);
        assert_non_null(r);
        if (i >= 2 && i <= 7) {
            const char *e = cJSON_GetObjectItem(r, "error")->valuestring;
            assert_non_null(strstr(e, errors[i - 2]));
        } else {
            assert_true(fabs(cJSON_GetObjectItem(r, "logprob")->valuedouble - cJSON_GetArrayItem(lp, k)->valuedouble) <
                        1e-4);
            k++;
        }
        cJSON_Delete(r);
    }
    free(out);
    unlink(path);
    rmdir(dir);
    cJSON_Delete(fx);
}

/* Fails unless out holds each of the pieces of text in says. */
static void expect_pieces(const char *what, const char *out, const char *const *says, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strstr(out, says[i]))
            fail_msg("%s: no \"%s\" in\n%s", what, says[i], out);
}

/* `info`: the file's metadata (its config and checksum aside), the config
 * as read, the parameters, each tensor's line and the checksum checked;
 * a copy whose data changed is a mismatch, and one whose config does not
 * parse shows it as invalid, each with exit 1 (the model does not load). */
static void test_info(void **state)
{
    (void)state;
    static const char *const whole[] = {
        "file: " FIX "rra_static_w3_l2_bi.safetensors\nformat: rrnserve\nformat_version: 1\nconfig: {\n",
        "\"attention\":\t{\n\t\t\"window\":\t3,\n\t\t\"mode\":\t\"static\"\n\t},",
        "}\nparameters: 2847\ntensors: 23 (11388 bytes of data)\n",
        "\n  head.weight                      F32    [3, 16]           192\n",
        "\n  rnn.attention_logits_l1_reverse  F32    [3]               12\n",
        "\ndata_sha256: ok ",
    };
    char *out, dir[] = "/tmp/rrn_cli_XXXXXX", path[64];
    assert_int_equal(proc_rrnserve(&out, NULL, "info " FIX "rra_static_w3_l2_bi.safetensors"), 0);
    expect_pieces("info", out, whole, sizeof whole / sizeof whole[0]);
    free(out);

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    size_t len;
    char *file = file_must_read(FIX "rra_static_w3_l2_bi.safetensors", &len);
    file[len - 1] ^= 1; /* the last byte of the last tensor's data */
    file_write(path, file, len);
    file[len - 1] ^= 1;
    static const char *const changed[] = {"\ndata_sha256: mismatch: file says ", ", data hashes to "};
    assert_int_equal(proc_rrnserve(&out, NULL, "info %s", path), 1);
    expect_pieces("info of changed data", out, changed, sizeof changed / sizeof changed[0]);
    free(out);

    /* The config's cell renamed, in place: the header keeps its length.  It
     * is text from byte 8, after its length. */
    char *cell = strstr(file + 8, "\\\"cell\\\": \\\"lstm\\\"");
    assert_non_null(cell);
    memcpy(cell + 12, "lsxm", 4);
    file_write(path, file, len);
    static const char *const invalid[] = {"\nconfig (invalid): {\"task\": \"classify\", \"cell\": \"lsxm\"",
                                          "\ndata_sha256: ok "};
    assert_int_equal(proc_rrnserve(&out, NULL, "info %s", path), 1);
    expect_pieces("info of a bad config", out, invalid, sizeof invalid / sizeof invalid[0]);
    free(out);
    free(file);
    unlink(path);

    /* Token lists that the tokenizer refuses, which the config's parser
     * lets through: info fails with the message run gives. */
    static const char *const tokens[][2] = {
        {"[\"<unk>\", \"a\", \"a\"]", "tokenizer: duplicate token \"a\""},
        {"[\"<unk>\", \"a\", \"\"]", "tokenizer: token 2 is empty"},
        {"[\"<unk>\", \"a\", \"bc\"]", "tokenizer: char token 2 (\"bc\") is not exactly one code point"},
    };
    for (size_t i = 0; i < sizeof tokens / sizeof *tokens; i++) {
        char json[256], err[256], *ran;
        snprintf(json, sizeof json, "{\"task\": \"lm\", \"cell\": \"gru\", \"hidden\": 4, \"embed_dim\": 4,"
                 " \"tokenizer\": {\"type\": \"char\", \"tokens\": %s, \"unk\": 0}}", tokens[i][0]);
        struct model m;
        model_from_json(json, 0, 1, &m);
        if (model_save(&m, path, NULL, 0, err, sizeof err) != 0)
            fail_msg("model_save: %s", err);
        model_free(&m);
        assert_int_equal(proc_rrnserve(&ran, NULL, "run %s --text a 2>&1 >/dev/null", path), 1);
        assert_non_null(strstr(ran, tokens[i][1]));
        assert_int_equal(proc_rrnserve(&out, NULL, "info %s 2>&1 >/dev/null", path), 1);
        if (!strstr(out, strstr(ran, tokens[i][1])))
            fail_msg("info of tokens %s: %s; run says %s", tokens[i][0], out, ran);
        free(out);
        free(ran);
    }
    unlink(path);
    rmdir(dir);
}

/* One command line: its exit status, and a piece of what it printed (or
 * NULL when any output will do). */
struct cli_case {
    const char *args;
    int status;
    const char *says;
};

static void expect_all(const struct cli_case *cases, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char *out;
        int status = proc_rrnserve(&out, NULL, "%s", cases[i].args);
        if (status != cases[i].status || (cases[i].says && !strstr(out, cases[i].says)))
            fail_msg("rrnserve %s: exit %d, want %d with \"%s\"; printed:\n%s", cases[i].args, status,
                     cases[i].status, cases[i].says ? cases[i].says : "", out);
        free(out);
    }
}

/* Each command's --help: its usage on standard output, and exit 0. */
static void test_help(void **state)
{
    (void)state;
    static const struct cli_case cases[] = {
        {"--help", 0, "usage: rrnserve COMMAND"},
        {"run --help", 0, "--jsonl PATH"},
        {"info --help", 0, "usage: rrnserve info FILE"},
        {"serve --help", 0, "--prompt-cache-mb"},
        {"train --help", 0, "usage: rrnserve train"},
        {"run --help 2>/dev/null", 0, "usage: rrnserve run"},
    };
    expect_all(cases, sizeof cases / sizeof cases[0]);
}

static void test_bad_usage(void **state)
{
    (void)state;
    static const struct cli_case cases[] = {
        {"run " FIX "combo_lstm.safetensors", 2, "usage"},
        {"run " FIX "combo_lstm.safetensors --text a --file b", 2, NULL},
        {"run " FIX "combo_lstm.safetensors --text a --device tpu", 2, "--device"},
        {"run " FIX "combo_lstm.safetensors --text a --bogus", 2, "usage: rrnserve run"},
        {"run /nonexistent.safetensors --text a", 1, "/nonexistent.safetensors"},
        {"run " FIX "combo_lstm.safetensors --jsonl /nonexistent.jsonl", 1, "cannot open /nonexistent.jsonl"},
        {"info /nonexistent.safetensors", 1, "/nonexistent.safetensors"},
        {"frobnicate", 2, "unknown command"},
        /* A text with no tokens (the word tokenizer drops punctuation). */
        {"run " FIX "tok_word.safetensors --text '...'", 1, "no tokens"},
        /* A score that overflows the model (a ReLU RNN of 3 layers on "ab "
         * 150 times) is an error, as POST /score's 422, not a null. */
        {"run " FIX "plain_rnn_relu_l3_lm.safetensors --text \"$(printf 'ab %.0s' $(seq 150))\"", 1,
         "the text: its log-probability under the model is not finite"},
        /* --generate: a language model that reads one way, a prompt with
         * tokens, its settings in range and with it alone. */
        {"run " FIX "plain_lstm_l2_bi_last.safetensors --generate a", 1, "task classify"},
        {"run " FIX "rra_dynamic_w3_l1_uni.safetensors --generate a", 1, "task classify)"},
        {"run " FIX "combo_lstm_bi.safetensors --generate a", 1, "--generate needs"},
        {"run " FIX "tok_word_lm.safetensors --generate '...'", 1, "the prompt has no tokens"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --text b", 2, "usage"},
        {"run " FIX "combo_lstm_lm.safetensors --text a --seed 3", 2, "go with --generate"},
        {"run " FIX "combo_lstm_lm.safetensors --text a --stream", 2, "go with --generate"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --max-tokens 0", 2, "--max-tokens"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --temperature -1", 2, "--temperature"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --top-p 1.5", 2, "--top-p"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --seed 1.5", 2, "--seed"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --stop ''", 2, "--stop"},
        {"run " FIX "combo_lstm_lm.safetensors --generate a --stop 1 --stop 2 --stop 3 --stop 4 --stop 5", 2,
         "--stop"},
        /* train: a configuration or a checkpoint, not both nor neither, and
         * every other argument a --name value or --name=value pair (out of
         * the way of the shipped model, should one be taken). */
        {"train --config", 2, "usage: rrnserve train"},
        {"train --config models/sentiment.json --resume x.ckpt.safetensors", 2, "usage: rrnserve train"},
        {"train --config models/sentiment.json --out /tmp/rrn_cli_never.safetensors stray",
         2, "unexpected argument 'stray'"},
        {"train --config models/sentiment.json --out /tmp/rrn_cli_never.safetensors --",
         2, "unexpected argument '--'"},
        {"train --config models/sentiment.json --out /tmp/rrn_cli_never.safetensors --steps",
         2, "--steps needs a value"},
        {"train --config models/sentiment.json --out /tmp/rrn_cli_never.safetensors --stepz=3",
         2, "unknown key \"stepz\" (the flag --stepz)"},
        {"train --config models/sentiment.json --out /tmp/rrn_cli_never.safetensors --optim.lrr 0.1",
         2, "unknown key \"optim.lrr\""},
    };
    expect_all(cases, sizeof cases / sizeof cases[0]);
}

/* TF32 is a mode of the CUDA backend's matrix products, and the fused
 * recurrence a kernel of its own: on the CPU each command refuses them by
 * name, and an unknown precision, recurrence or device is an error that
 * names it. */
static void test_precision(void **state)
{
    (void)state;
    static const struct cli_case cases[] = {
        {"run " FIX "combo_lstm.safetensors --text a --precision fp32", 0, "probabilities"},
        {"run " FIX "combo_lstm.safetensors --text a --device cpu --precision tf32", 1, "fp32 only"},
        {"run " FIX "combo_lstm.safetensors --text a --precision fp8", 2, "--precision must be fp32, tf32 or bf16"},
        {"serve --models " FIX " --port 0 --device cpu --precision tf32", 1, "tf32 needs the cuda device"},
        {"run " FIX "combo_lstm.safetensors --text a --device cpu --precision bf16", 1, "bf16 needs the cuda device"},
        {"serve --port 0 --precision half", 2, "--precision"},
        {"train --config models/sentiment.json --precision fp8 --out /tmp/rrn_cli_never.safetensors", 1,
         "\"precision\" must be"},
        {"train --config models/sentiment.json --device tpu --out /tmp/rrn_cli_never.safetensors", 1,
         "\"device\" must be \"cpu\", \"cuda\" or \"auto\""},
        {"run " FIX "combo_lstm.safetensors --text a --recurrence gemm", 0, "probabilities"},
        {"run " FIX "combo_lstm.safetensors --text a --device cpu --recurrence fused", 1,
         "no fused recurrence; it needs the cuda device"},
        {"run " FIX "combo_lstm.safetensors --text a --recurrence loop", 2, "--recurrence must be gemm or fused"},
        {"serve --models " FIX " --port 0 --device cpu --recurrence fused", 1, "recurrence fused needs the cuda device"},
        {"serve --port 0 --recurrence loop", 2, "--recurrence must be gemm or fused"},
        {"train --config models/sentiment.json --recurrence loop --out /tmp/rrn_cli_never.safetensors", 1,
         "\"recurrence\" must be \"gemm\" or \"fused\""},
    };
    expect_all(cases, sizeof cases / sizeof cases[0]);
}

/* The CUDA backend is a library the binary loads when a CUDA device is
 * asked for or looked for (engine/backend.c), if there is an NVIDIA
 * driver.  A build with CUDA finds its own beside the binary, as this test
 * finds its own one folder up, so that --device cuda fails only for want
 * of a driver or a GPU; a library that will not load is named, and
 * --device auto then computes on the CPU.  Where there is no driver,
 * CUDA's stub of it stands in (it reports no GPU), so that the library is
 * loaded. */
static void test_cuda_library(void **state)
{
    (void)state;
    const char *why = backend_cuda_unavailable();
    if (why && strstr(why, "cannot load"))
        fail_msg("the build's own CUDA library: %s", why);
    static const char run[] = "run " FIX "combo_lstm.safetensors --text a";
    char *out;
    int status = proc_rrnserve(&out, NULL, "%s --device cuda", run);
    if (status != (why ? 1 : 0) || !strstr(out, why ? why : "probabilities"))
        fail_msg("--device cuda: exit %d, want %d with \"%s\"; printed:\n%s", status, why ? 1 : 0,
                 why ? why : "probabilities", out);
    free(out);

    char stub[64], env[160] = "";
    int with_stub = strstr(backend_compiled(), "cuda") && cuda_stub_driver(stub, env) == 0;
    if (with_stub) {
        status = proc_run(&out, "%s '%s' %s --device cuda", env, rrn_bin(), run);
        if (status != 1 || !strstr(out, "no CUDA GPU is available"))
            fail_msg("--device cuda with the driver's stub: exit %d; printed:\n%s", status, out);
        free(out);
    }
    const char *says = with_stub ? "cannot load the CUDA backend: " CUDA_MISSING_LIBRARY : cuda_missing_library_says();
    status = proc_run(&out, "%s RRN_CUDA_LIBRARY=%s '%s' %s --device cuda", env, CUDA_MISSING_LIBRARY, rrn_bin(), run);
    if (status != 1 || !strstr(out, says))
        fail_msg("a missing CUDA library: exit %d, want 1 with \"%s\"; printed:\n%s", status, says, out);
    free(out);
    status = proc_run(&out, "%s RRN_CUDA_LIBRARY=%s '%s' %s --device auto", env, CUDA_MISSING_LIBRARY, rrn_bin(), run);
    if (status != 0 || !strstr(out, "probabilities"))
        fail_msg("--device auto without the CUDA library: exit %d; printed:\n%s", status, out);
    free(out);
    if (with_stub)
        cuda_stub_driver_remove(stub);
}

/* A corrupt weight file: CLI names the file and the problem. */
static void test_corrupt_file(void **state)
{
    (void)state;
    char dir[] = "/tmp/rrn_cli_XXXXXX", path[64], *out;
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    FILE *in = fopen(FIX "combo_lstm.safetensors", "rb"), *o = fopen(path, "wb");
    char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, in);
    buf[n - 3] ^= 0x55; /* flip bits in the last weight */
    fwrite(buf, 1, n, o);
    fclose(in);
    fclose(o);
    assert_int_equal(proc_rrnserve(&out, NULL, "run %s --text abc", path), 1);
    assert_non_null(strstr(out, "checksum"));
    assert_non_null(strstr(out, "bad.safetensors"));
    free(out);
    unlink(path);
    rmdir(dir);
}

/* --generate --stream prints the text as it comes, and the same text as
 * the JSON answer: the bytes a stop string could still take back wait for
 * the next token.  models/austen takes milliseconds a token here, so the
 * command line prints many tokens before the next comes, and a stop
 * string's first letter printed too soon would show in some of the runs:
 * the stops are two letters of its greedy text at each of four places. */
static void test_generate_stream(void **state)
{
    (void)state;
    const char *cmd = "run models/austen.safetensors --generate 'It was' --temperature 0 --max-tokens 80 --seed 1";
    char *out;
    assert_int_equal(proc_rrnserve(&out, NULL, "%s", cmd), 0);
    cJSON *free_run = cJSON_Parse(out);
    assert_non_null(free_run);
    const char *text = cJSON_GetObjectItem(free_run, "text")->valuestring;
    for (size_t at = 20; at < 80; at += 15) {
        char *stopped, *streamed, stop[3] = "";
        for (size_t i = at; !stop[0] && i + 1 < strlen(text); i++)
            if (isalpha((unsigned char)text[i]) && isalpha((unsigned char)text[i + 1]))
                memcpy(stop, text + i, 2);
        assert_true(stop[0]);
        assert_int_equal(proc_rrnserve(&stopped, NULL, "%s --stop %s", cmd, stop), 0);
        cJSON *want = cJSON_Parse(stopped);
        assert_non_null(want);
        assert_string_equal(cJSON_GetObjectItem(want, "finish_reason")->valuestring, "stop");
        assert_int_equal(proc_rrnserve(&streamed, NULL, "%s --stop %s --stream", cmd, stop), 0);
        struct buf line = {0};
        buf_printf(&line, "%s\n", cJSON_GetObjectItem(want, "text")->valuestring);
        if (strcmp(streamed, line.p) != 0)
            fail_msg("--stop %s: --stream printed '%s', the answer's text is '%s'", stop, streamed, line.p);
        free(line.p);
        cJSON_Delete(want);
        free(streamed);
        free(stopped);
    }
    cJSON_Delete(free_run);
    free(out);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_version),      cmocka_unit_test(test_run_classify_text),
        cmocka_unit_test(test_run_regress_text),
        cmocka_unit_test(test_run_lm_file_and_jsonl), cmocka_unit_test(test_info),
        cmocka_unit_test(test_precision),   cmocka_unit_test(test_cuda_library),
        cmocka_unit_test(test_generate_stream),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_bad_usage),    cmocka_unit_test(test_corrupt_file),
    };
    return cmocka_run_group_tests_name("cli", tests, NULL, NULL);
}
