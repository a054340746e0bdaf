/* test_batcher.c - the batcher without HTTP: jobs from many threads give
 * what each gives alone, generation with a seed gives the same tokens
 * whatever runs beside it, clients in a closed loop are not kept waiting
 * for a full batch, a cancelled stream stops, a request's jobs are queued
 * all or none, and stopping the batcher answers every job it accepted
 * and refuses those that come while it finishes them.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "batcher.h"
#include "handler.h"
#include "registry.h"
#include "support/filter.h"

/* Every batcher's cut_off (batcher_options), down until a test raises it. */
static atomic_int cut_off;

struct env {
    struct model model;
    struct tokenizer tk;
    struct backend *be;
    struct batcher *b;
};

static int open_env(void **state, const char *path, int max_batch, int max_queue, long max_wait_us,
                    size_t prompt_cache_bytes)
{
    char err[512];
    struct env *v = calloc(1, sizeof *v);
    assert_non_null(v);
    if (model_load(path, &v->model, err, sizeof err) != 0 || tokenizer_init(&v->tk, &v->model.cfg, err, sizeof err))
        fail_msg("%s: %s", path, err);
    v->be = backend_cpu_create(err, sizeof err);
    int slots = v->model.cfg.task == TASK_LM ? batcher_slots(max_batch) : 0;
    struct engine *e = engine_create(&v->model, v->be, slots, err, sizeof err);
    assert_non_null(e);
    atomic_store(&cut_off, 0);
    struct batcher_options opt = {.max_batch = max_batch, .max_wait_us = max_wait_us, .max_queue = max_queue,
                                  .prompt_cache_bytes = prompt_cache_bytes, .cut_off = &cut_off};
    v->b = batcher_start(&v->model, &v->tk, e, &opt, err, sizeof err);
    if (!v->b)
        fail_msg("batcher: %s", err);
    *state = v;
    return 0;
}

static int setup_lm(void **state)
{
    return open_env(state, "tests/fixtures/combo_lstm_lm.safetensors", 8, 256, 2000, 0);
}

static int setup_cls(void **state)
{
    return open_env(state, "tests/fixtures/rra_dynamic_w3_l2_bi.safetensors", 8, 256, 2000, 0);
}

/* A long max_wait_us, for the tests of waiting for company. */
static int setup_cls_slow(void **state)
{
    return open_env(state, "tests/fixtures/rra_dynamic_w3_l2_bi.safetensors", 8, 256, 500000, 0);
}

static int teardown(void **state)
{
    struct env *v = *state;
    batcher_stop(v->b);
    backend_destroy(v->be);
    tokenizer_free(&v->tk);
    model_free(&v->model);
    free(v);
    return 0;
}

static struct job *text_job(struct env *v, enum job_kind kind, const char *text)
{
    struct job *j = job_new(kind, 1);
    assert_non_null(j);
    size_t n;
    assert_int_equal(tokenizer_encode(&v->tk, text, strlen(text), &j->ids[0], &n), 0);
    j->lens[0] = (int)n;
    return j;
}

/* Waits up to 60 s, in waits of 10 ms, for job j to end or, generating,
 * to pass seen tokens. */
static void wait_job(struct job *j, int seen)
{
    for (int k = 0; k < 6000 && !job_wait(j, seen, 10); k++)
        ;
}

static struct job *gen_job(struct env *v, const char *prompt, uint64_t seed, int max_tokens)
{
    struct job *j = text_job(v, JOB_GENERATE, prompt);
    j->sample = (struct sample_params){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = seed};
    j->max_tokens = max_tokens;
    return j;
}

static void run_to_end(struct env *v, struct job *j)
{
    assert_int_equal(batcher_submit(v->b, &j, 1), 0);
    wait_job(j, 1 << 30);
    assert_true(j->done);
}

struct worker {
    struct env *v;
    int id;
    struct job *j;
};

static const char *const prompts[] = {"a", "good day", "terrible, awful film", "nice", "the cat sat"};

static void *gen_worker(void *arg)
{
    struct worker *w = arg;
    w->j = gen_job(w->v, prompts[w->id % 5], (uint64_t)w->id, 12 + w->id % 7);
    if (batcher_submit(w->v->b, &w->j, 1) == 0)
        while (!job_wait(w->j, 1 << 30, 50))
            ;
    return NULL;
}

/* 24 streams at once, more than the 8 slots, beside a stream that runs
 * until cancelled (so each of them has company, however the threads are
 * scheduled): each stream's text equals the text its seed and prompt give
 * when it runs alone. */
static void test_generation_is_independent_of_company(void **state)
{
    struct env *v = *state;
    enum { N = 24 };
    struct job *company = gen_job(v, "a", 999, 1000000);
    assert_int_equal(batcher_submit(v->b, &company, 1), 0);
    while (!job_wait(company, 0, 50))
        ;
    struct worker w[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        w[i] = (struct worker){v, i, NULL};
        assert_int_equal(pthread_create(&t[i], NULL, gen_worker, &w[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(t[i], NULL);
    job_cancel(company);
    wait_job(company, 1 << 30);
    assert_true(company->done);
    job_release(company);
    for (int i = 0; i < N; i++) {
        struct job *alone = gen_job(v, prompts[i % 5], (uint64_t)i, 12 + i % 7);
        run_to_end(v, alone);
        assert_true(w[i].j->done && !w[i].j->failed);
        assert_int_equal(w[i].j->n_tokens, alone->n_tokens);
        assert_int_equal(w[i].j->finish, FINISH_LENGTH);
        assert_memory_equal(w[i].j->tokens, alone->tokens, sizeof(int32_t) * (size_t)alone->n_tokens);
        assert_string_equal(w[i].j->text, alone->text);
        assert_true(w[i].j->batch_size > 1);
        assert_int_equal(alone->batch_size, 1);
        job_release(alone);
        job_release(w[i].j);
    }
}

static void *cls_worker(void *arg)
{
    struct worker *w = arg;
    w->j = text_job(w->v, JOB_CLASSIFY, prompts[w->id % 5]);
    if (batcher_submit(w->v->b, &w->j, 1) == 0)
        while (!job_wait(w->j, 0, 50))
            ;
    return NULL;
}

static void test_classify_batched_equals_alone(void **state)
{
    struct env *v = *state;
    enum { N = 32 };
    struct worker w[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
        w[i] = (struct worker){v, i, NULL};
        assert_int_equal(pthread_create(&t[i], NULL, cls_worker, &w[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(t[i], NULL);
    for (int i = 0; i < N; i++) {
        struct job *alone = text_job(v, JOB_CLASSIFY, prompts[i % 5]);
        run_to_end(v, alone);
        assert_true(w[i].j->done && !w[i].j->failed);
        assert_memory_equal(w[i].j->probs, alone->probs, sizeof(float) * (size_t)v->model.head_out);
        job_release(alone);
        job_release(w[i].j);
    }
}

enum { LOOP_ROUNDS = 20 };

static void *loop_worker(void *arg)
{
    struct worker *w = arg;
    for (int r = 0; r < LOOP_ROUNDS; r++) {
        struct job *j = text_job(w->v, JOB_CLASSIFY, prompts[(w->id + r) % 5]);
        if (batcher_submit(w->v->b, &j, 1) == 0)
            for (int i = 0; i < 600 && !job_wait(j, 0, 50); i++)
                ;
        w->id += j->done && !j->failed ? 0 : 1000; /* counts failures */
        job_release(j);
    }
    return NULL;
}

/* Four clients in a closed loop, each asking again as soon as it is
 * answered, with max_batch 8 and max_wait_us 500 ms.  A round's batch must
 * go once the clients of the last batch are back, not after waiting out
 * 500 ms for a full batch of 8 that cannot come: that would take at least
 * 20 x 0.5 = 10 s.  Only the last rounds, as clients finish and fewer come
 * back, may wait it out (a few times 0.5 s). */
static void test_closed_loop_does_not_wait_for_a_full_batch(void **state)
{
    struct env *v = *state;
    enum { N = 4 };
    struct worker w[N];
    pthread_t t[N];
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < N; i++) {
        w[i] = (struct worker){v, i, NULL};
        assert_int_equal(pthread_create(&t[i], NULL, loop_worker, &w[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    for (int i = 0; i < N; i++)
        assert_int_equal(w[i].id, i);
    if (secs > 6.0)
        fail_msg("%d rounds of %d clients took %.1f s: batches waited for company that could not come",
                 LOOP_ROUNDS, N, secs);
}

/* The other side of the closed loop: after a batch of 4, the next 4
 * requests, arriving 20 ms apart, wait for each other (max_wait_us 500 ms)
 * and go as one batch, rather than the first alone and the rest
 * together. */
static void test_waits_for_the_company_the_last_batch_had(void **state)
{
    struct env *v = *state;
    enum { N = 4 };
    struct job *first[N], *next[N];
    for (int i = 0; i < N; i++)
        first[i] = text_job(v, JOB_CLASSIFY, prompts[i]);
    assert_int_equal(batcher_submit(v->b, first, N), 0);
    for (int i = 0; i < N; i++) {
        wait_job(first[i], 0);
        assert_int_equal(first[i]->batch_size, N);
    }
    for (int i = 0; i < N; i++) {
        next[i] = text_job(v, JOB_CLASSIFY, prompts[i]);
        assert_int_equal(batcher_submit(v->b, &next[i], 1), 0);
        nanosleep(&(struct timespec){.tv_nsec = 20 * 1000 * 1000}, NULL);
    }
    for (int i = 0; i < N; i++) {
        wait_job(next[i], 0);
        assert_true(next[i]->done && !next[i]->failed);
        if (next[i]->batch_size != N)
            fail_msg("request %d of the second round went in a batch of %d", i, next[i]->batch_size);
    }
    for (int i = 0; i < N; i++) {
        job_release(first[i]);
        job_release(next[i]);
    }
}

static void test_stop_string_ends_generation(void **state)
{
    struct env *v = *state;
    struct job *j = gen_job(v, "good day", 99, 40);
    run_to_end(v, j);
    assert_true(j->n_tokens >= 4);
    /* Stop at the text's third and fourth bytes: the same stream must end
     * just before their first occurrence. */
    char stop[3] = {j->text[2], j->text[3], 0};
    struct job *k = gen_job(v, "good day", 99, 40);
    k->stop[0] = strdup(stop);
    k->n_stop = 1;
    run_to_end(v, k);
    assert_int_equal(k->finish, FINISH_STOP);
    assert_int_equal(k->text_len, (size_t)(strstr(j->text, stop) - j->text));
    assert_memory_equal(k->text, j->text, k->text_len);
    assert_true(k->n_tokens < j->n_tokens);
    job_release(j);
    job_release(k);
}

/* Two stop strings completed by one token: the text is cut before the one
 * that begins first, though the other is listed first, so that it holds
 * neither.  The short one is the first byte that has not appeared before
 * (at i), the long one the text up to it: both end at byte i. */
static void test_earliest_stop_string_cuts(void **state)
{
    struct env *v = *state;
    struct job *j = gen_job(v, "good day", 99, 40);
    run_to_end(v, j);
    size_t i = 1;
    while (i < j->text_len && memchr(j->text, j->text[i], i))
        i++;
    assert_true(i < j->text_len);
    struct job *k = gen_job(v, "good day", 99, 40);
    k->stop[0] = strndup(j->text + i, 1);
    k->stop[1] = strndup(j->text, i + 1);
    k->n_stop = 2;
    assert_non_null(k->stop[0]);
    assert_non_null(k->stop[1]);
    run_to_end(v, k);
    assert_int_equal(k->finish, FINISH_STOP);
    assert_int_equal(k->text_len, 0);
    job_release(j);
    job_release(k);
}

/* A stream's wait returns as soon as it has tokens past those seen (a
 * stream's events go out a token at a time), not at its timeout; and a
 * cancelled stream stops. */
static void test_cancelled_stream_stops(void **state)
{
    struct env *v = *state;
    struct job *j = gen_job(v, "a", 5, 1000000);
    assert_int_equal(batcher_submit(v->b, &j, 1), 0);
    while (!job_wait(j, 3, 50))
        ;
    pthread_mutex_lock(&j->mu);
    const int seen = j->n_tokens;
    pthread_mutex_unlock(&j->mu);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_true(job_wait(j, seen, 30000));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (t1.tv_sec - t0.tv_sec > 10)
        fail_msg("a wait for the next token returned after %ld s", (long)(t1.tv_sec - t0.tv_sec));
    if (job_wait(j, 1 << 30, 0))
        fail_msg("a wait for the next token returned only when the stream had ended");
    job_cancel(j);
    wait_job(j, 1 << 30);
    assert_true(j->done);
    assert_true(j->failed);
    assert_true(j->n_tokens < 1000000);
    job_release(j);
}

/* A twin shares its original's prompt, which outlives the original's own
 * release (under ASan, a freed prompt would be caught), and generates what
 * a job of its own with the same seed does. */
static void test_twin_shares_the_prompt(void **state)
{
    struct env *v = *state;
    struct job *first = gen_job(v, "the good day", 3, 1), *twin = job_twin(first);
    assert_non_null(twin);
    assert_ptr_equal(twin->ids, first->ids);
    twin->sample = (struct sample_params){.temperature = 1.0f, .top_p = 1.0f, .seed = 9};
    twin->max_tokens = 12;
    job_release(first);
    struct job *own = gen_job(v, "the good day", 9, 12);
    run_to_end(v, twin);
    run_to_end(v, own);
    assert_int_equal(twin->n_tokens, 12);
    assert_memory_equal(twin->tokens, own->tokens, 12 * sizeof *own->tokens);
    job_release(twin);
    job_release(own);
}

/* With a prompt cache of 1 MB. */
static int setup_lm_cached(void **state)
{
    return open_env(state, "tests/fixtures/combo_lstm_lm.safetensors", 8, 256, 2000, 1 << 20);
}

/* Jobs of different requests with one prompt, queued at once, run it once:
 * the first runs it and the other waits a turn and starts from its state.
 * A prompt of the same length but other tokens is run beside the first. */
static void test_one_prompt_runs_once(void **state)
{
    struct env *v = *state;
    const char *prompt = "the good day, the good day", *other = "the good day, the good dax";
    struct job *jobs[3] = {gen_job(v, prompt, 1, 4), gen_job(v, prompt, 2, 4), gen_job(v, other, 3, 4)};
    assert_int_equal(jobs[0]->lens[0], jobs[2]->lens[0]);
    assert_true(jobs[0]->lens[0] >= 16); /* what the cache keeps */
    assert_int_equal(batcher_submit(v->b, jobs, 3), 0);
    for (int i = 0; i < 3; i++) {
        wait_job(jobs[i], 1 << 30);
        assert_true(jobs[i]->done && !jobs[i]->failed);
    }
    assert_int_equal(jobs[0]->cached_tokens, 0);
    assert_int_equal(jobs[1]->cached_tokens, jobs[1]->lens[0]);
    assert_int_equal(jobs[2]->cached_tokens, 0);
    assert_true(jobs[1]->prompt_waited && !jobs[2]->prompt_waited);
    for (int i = 0; i < 3; i++)
        job_release(jobs[i]);
}

/* A prompt of under 16 tokens is kept the second time it runs, not the
 * first (prompt_cache.c's doorkeeper): the third request with it starts
 * from its state, whole, logits and all, and generates what the first
 * did with the same seed. */
static void test_short_prompt_kept_when_seen_again(void **state)
{
    struct env *v = *state;
    struct job *jobs[3];
    for (int i = 0; i < 3; i++) {
        jobs[i] = gen_job(v, "good day", 7, 5);
        run_to_end(v, jobs[i]);
    }
    assert_true(jobs[0]->lens[0] < 16);
    assert_int_equal(jobs[0]->cached_tokens, 0);
    assert_int_equal(jobs[1]->cached_tokens, 0);
    assert_int_equal(jobs[2]->cached_tokens, jobs[2]->lens[0]);
    assert_memory_equal(jobs[2]->tokens, jobs[0]->tokens, 5 * sizeof *jobs[0]->tokens);
    for (int i = 0; i < 3; i++)
        job_release(jobs[i]);
}

/* A prompt that continues a cached one and a new prompt, started in the
 * same turn, are prefilled from different positions: each gives what it
 * gives alone. */
static void test_prefill_from_different_positions(void **state)
{
    struct env *v = *state;
    const char *first = "the good day, the good day", *more = "the good day, the good day and a nice day";
    struct job *warm = gen_job(v, first, 1, 1);
    run_to_end(v, warm);
    struct job *jobs[2] = {gen_job(v, more, 2, 6), gen_job(v, "a nice day, a nice day!", 3, 6)};
    assert_int_equal(batcher_submit(v->b, jobs, 2), 0);
    for (int i = 0; i < 2; i++) {
        wait_job(jobs[i], 1 << 30);
        assert_true(jobs[i]->done);
        if (jobs[i]->failed)
            fail_msg("job %d failed: %s", i, jobs[i]->error);
    }
    assert_int_equal(jobs[0]->cached_tokens, warm->lens[0]);
    assert_int_equal(jobs[1]->cached_tokens, 0);
    for (int i = 0; i < 2; i++) {
        struct job *alone = gen_job(v, i ? "a nice day, a nice day!" : more, (uint64_t)(2 + i), 6);
        run_to_end(v, alone);
        assert_memory_equal(alone->tokens, jobs[i]->tokens, 6 * sizeof *alone->tokens);
        job_release(alone);
        job_release(jobs[i]);
    }
    job_release(warm);
}

/* With a prompt cache of 64 MB: room for a long prompt's states. */
static int setup_lm_big_cache(void **state)
{
    return open_env(state, "tests/fixtures/combo_lstm_lm.safetensors", 8, 256, 2000, 64 << 20);
}

/* A prompt of len characters (as many tokens), to be freed. */
static char *long_prompt(int len)
{
    char *prompt = malloc((size_t)len + 1);
    assert_non_null(prompt);
    for (int i = 0; i < len; i++)
        prompt[i] = "a nice day. "[i % 12];
    prompt[len] = 0;
    return prompt;
}

/* A long prompt runs a share a turn while the streams past their prompts
 * keep stepping: a stream queued with a 60,000-token prompt (some 60
 * turns) and starting from its whole prompt in the cache takes its 10
 * steps alone, all before the long prompt is in (run in one turn, the
 * long prompt would step beside it).  A job with the same long prompt,
 * queued with it, waits until it is all in and starts from its state (not
 * from a state halfway, and not running the rest beside it); and the long
 * prompt's generation is what it gives alone. */
static void test_long_prompt_shares_turns(void **state)
{
    struct env *v = *state;
    const char *short_prompt = "the good day, the good day";
    struct job *warm = gen_job(v, short_prompt, 1, 1);
    run_to_end(v, warm);
    enum { LONG = 60000 };
    char *prompt = long_prompt(LONG);
    struct job *jobs[3] = {gen_job(v, short_prompt, 5, 10), gen_job(v, prompt, 2, 3), gen_job(v, prompt, 2, 3)};
    assert_int_equal(jobs[1]->lens[0], LONG);
    assert_int_equal(batcher_submit(v->b, jobs, 3), 0);
    for (int i = 0; i < 3; i++) {
        wait_job(jobs[i], 1 << 30);
        assert_true(jobs[i]->done && !jobs[i]->failed);
    }
    assert_int_equal(jobs[0]->cached_tokens, warm->lens[0]);
    assert_int_equal(jobs[0]->n_tokens, 10);
    if (jobs[0]->batch_size != 1)
        fail_msg("the short stream stepped beside %d others", jobs[0]->batch_size - 1);
    assert_int_equal(jobs[1]->cached_tokens, 0);
    assert_int_equal(jobs[2]->cached_tokens, LONG);
    assert_memory_equal(jobs[2]->tokens, jobs[1]->tokens, 3 * sizeof *jobs[1]->tokens);
    /* Alone, in a batcher without a cache. */
    struct env *plain;
    open_env((void **)&plain, "tests/fixtures/combo_lstm_lm.safetensors", 8, 256, 2000, 0);
    struct job *alone = gen_job(plain, prompt, 2, 3);
    run_to_end(plain, alone);
    assert_memory_equal(alone->tokens, jobs[1]->tokens, 3 * sizeof *alone->tokens);
    job_release(alone);
    teardown((void **)&plain);
    for (int i = 0; i < 3; i++)
        job_release(jobs[i]);
    job_release(warm);
    free(prompt);
}

/* A short prompt that comes while a long one runs its prompt goes first:
 * past its first 4,096 tokens the long prompt goes 1,024 tokens a round,
 * a whole turn's share, but every other turn's first round takes the
 * prompt that stands lowest, so the short one is in, and generates, long
 * before the long one is.  (The long prompt, a million tokens, is
 * cancelled then.) */
static void test_short_prompt_goes_before_a_long_one(void **state)
{
    struct env *v = *state;
    char *prompt = long_prompt(1000000);
    struct job *lng = gen_job(v, prompt, 1, 1), *shrt = gen_job(v, "the good day", 2, 3);
    free(prompt);
    assert_int_equal(batcher_submit(v->b, &lng, 1), 0);
    for (int k = 0; k < 6000 && batcher_queue_depth(v->b) > 0; k++)
        nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    nanosleep(&(struct timespec){.tv_nsec = 100000000}, NULL);
    assert_int_equal(batcher_submit(v->b, &shrt, 1), 0);
    wait_job(shrt, 1 << 30);
    const int long_done = lng->done;
    job_cancel(lng);
    wait_job(lng, 1 << 30);
    assert_true(shrt->done && !shrt->failed);
    assert_int_equal(shrt->n_tokens, 3);
    assert_false(long_done);
    job_release(shrt);
    job_release(lng);
}

static int tokens_of(struct job *j)
{
    pthread_mutex_lock(&j->mu);
    int n = j->n_tokens;
    pthread_mutex_unlock(&j->mu);
    return n;
}

/* A score job of three texts, 100,000 tokens and two of 600, with each
 * token's term and 2 alternatives. */
/* A score job of seven texts, 106,500 tokens with their terms and two
 * alternatives each (short texts after the long one, which a turn takes
 * together, and a longer one it takes in parts), or an attention job of
 * the first text alone. */
#define LONG_TEXTS 7
static struct job *long_job(struct env *v, enum job_kind kind)
{
    static const int lens[LONG_TEXTS] = {100000, 600, 300, 300, 200, 100, 5000};
    const int n = kind == JOB_SCORE ? LONG_TEXTS : 1;
    struct job *j = job_new(kind, n);
    assert_non_null(j);
    srand(5);
    for (int t = 0; t < n; t++) {
        assert_non_null(j->ids[t] = malloc(sizeof *j->ids[t] * (size_t)lens[t]));
        for (int i = 0; i < lens[t]; i++)
            j->ids[t][i] = rand() % v->model.vocab;
        j->lens[t] = lens[t];
    }
    j->logprobs = kind == JOB_SCORE;
    j->top_logprobs = kind == JOB_SCORE ? 2 : 0;
    return j;
}

/* Scoring a long text, or its attention map, while a stream runs goes a
 * share a turn: the stream keeps getting a token every turn meanwhile (the
 * text takes some 100 turns; run whole, the stream would get none until it
 * is done), and the results (log-probabilities, terms and alternatives, or
 * attention weights) are those the engine gives the texts whole. */
static void check_long_job_shares_turns(struct env *v, enum job_kind kind)
{
    struct job *stream = gen_job(v, "a", 1, 1 << 20);
    assert_int_equal(batcher_submit(v->b, &stream, 1), 0);
    wait_job(stream, 0);
    struct job *shared = long_job(v, kind);
    const int before = tokens_of(stream);
    run_to_end(v, shared);
    const int during = tokens_of(stream) - before;
    assert_false(shared->failed);
    if (during < 90)
        fail_msg("the stream got %d tokens while the long job ran", during);
    job_cancel(stream);
    wait_job(stream, 1 << 30);
    /* The reference: an engine of its own, the texts in one call each. */
    char err[512];
    struct backend *be = backend_cpu_create(err, sizeof err);
    struct engine *e = be ? engine_create(&v->model, be, 2, err, sizeof err) : NULL;
    if (!e)
        fail_msg("reference engine: %s", err);
    struct job *whole = long_job(v, kind);
    const size_t tokens = job_text_at(whole, whole->n_texts), K = (size_t)v->model.cfg.attn_window;
    if (kind == JOB_SCORE) {
        float *terms = malloc(sizeof *terms * tokens);
        struct token_logprob *top = malloc(sizeof *top * tokens * 2);
        assert_true(terms && top);
        for (int t = 0; t < LONG_TEXTS; t++) {
            const size_t at = job_text_at(whole, t);
            struct engine_text text = {.tokens = whole->ids[t], .len = whole->lens[t], .token_logprobs = terms + at,
                                       .top_k = 2, .top = top + 2 * at};
            if (engine_score(e, &text, 1, err, sizeof err) != 0)
                fail_msg("reference score: %s", err);
            assert_true(fabs(shared->logprob[t] - text.logprob) <= 1e-5 * fabs(text.logprob));
        }
        for (size_t i = 0; i < tokens; i++) {
            if (!(fabsf(shared->token_logprob[i] - terms[i]) <= 1e-4f * (1 + fabsf(terms[i]))))
                fail_msg("term %zu: %g shared, %g whole", i, shared->token_logprob[i], terms[i]);
            assert_int_equal(shared->top[2 * i].id, top[2 * i].id);
        }
        free(terms);
        free(top);
    } else {
        const size_t weights = (size_t)v->model.cfg.layers * tokens * K;
        float *map = malloc(sizeof *map * weights);
        assert_non_null(map);
        struct engine_seq q = {.tokens = whole->ids[0], .len = whole->lens[0], .slot = -1, .attention = map};
        if (engine_forward(e, &q, 1, err, sizeof err) != 0)
            fail_msg("reference forward: %s", err);
        for (size_t i = 0; i < weights; i++)
            if (!(fabsf(shared->attention[i] - map[i]) <= 1e-5f))
                fail_msg("weight %zu: %g shared, %g whole", i, shared->attention[i], map[i]);
        free(map);
    }
    job_release(whole);
    engine_destroy(e);
    backend_destroy(be);
    job_release(shared);
    job_release(stream);
}

static void test_long_score_shares_turns(void **state)
{
    check_long_job_shares_turns(*state, JOB_SCORE);
}

static void test_long_attention_shares_turns(void **state)
{
    check_long_job_shares_turns(*state, JOB_ATTENTION);
}

/* A long score taken while no stream runs goes a share a turn too (4,096
 * tokens): a stream that comes meanwhile has its 10 tokens while the score
 * still has turns to go, instead of waiting for all of it. */
static void test_stream_that_comes_during_a_long_score(void **state)
{
    struct env *v = *state;
    struct job *score = long_job(v, JOB_SCORE);
    assert_int_equal(batcher_submit(v->b, &score, 1), 0);
    for (int k = 0; k < 6000 && batcher_queue_depth(v->b) > 0; k++)
        nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    assert_int_equal(batcher_queue_depth(v->b), 0); /* taken while no stream ran */
    struct job *stream = gen_job(v, "a", 1, 10);
    run_to_end(v, stream);
    assert_int_equal(stream->n_tokens, 10);
    if (job_wait(score, 1 << 30, 0))
        fail_msg("the score of 106,500 tokens was done before a stream that came after it had its 10 tokens");
    wait_job(score, 1 << 30);
    assert_true(score->done && !score->failed);
    job_release(stream);
    job_release(score);
}

/* While a stream runs, a turn's forward batch holds at most 4,096 tokens:
 * eight score jobs of 600 tokens queued at once run six and two (together,
 * with no stream). */
static void test_forward_turn_is_bounded(void **state)
{
    struct env *v = *state;
    for (int busy = 1; busy >= 0; busy--) {
        struct job *stream = gen_job(v, "a", 1, 1 << 20);
        if (busy) {
            assert_int_equal(batcher_submit(v->b, &stream, 1), 0);
            wait_job(stream, 0);
        }
        struct job *jobs[8];
        for (int i = 0; i < 8; i++) {
            jobs[i] = job_new(JOB_SCORE, 1);
            assert_non_null(jobs[i] && (jobs[i]->ids[0] = calloc(600, sizeof *jobs[i]->ids[0])));
            jobs[i]->lens[0] = 600;
        }
        assert_int_equal(batcher_submit(v->b, jobs, 8), 0);
        int largest = 0;
        for (int i = 0; i < 8; i++) {
            wait_job(jobs[i], 1 << 30);
            assert_true(jobs[i]->done && !jobs[i]->failed);
            largest = jobs[i]->batch_size > largest ? jobs[i]->batch_size : largest;
            job_release(jobs[i]);
        }
        assert_int_equal(largest, busy ? 6 : 8);
        job_cancel(stream);
        if (busy)
            wait_job(stream, 1 << 30);
        job_release(stream);
    }
}

/* One generation slot, room for two jobs in the queue. */
static int setup_lm_one_slot(void **state)
{
    return open_env(state, "tests/fixtures/combo_lstm_lm.safetensors", 1, 2, 2000, 0);
}

/* A request's jobs are queued all or none: while a stream holds the only
 * slot and one job waits in a queue of two, two more are refused and
 * leave it as it was, three never fit; once the slot is free the waiting
 * job runs, and then the two go in together. */
static void test_submit_is_all_or_none(void **state)
{
    struct env *v = *state;
    struct job *busy = gen_job(v, "a", 1, 1000000);
    assert_int_equal(batcher_submit(v->b, &busy, 1), 0);
    wait_job(busy, 0);
    assert_true(busy->n_tokens > 0);
    struct job *jobs[4];
    for (int i = 0; i < 4; i++)
        jobs[i] = gen_job(v, "good day", (uint64_t)i, 4);
    assert_int_equal(batcher_submit(v->b, jobs, 1), 0);
    assert_int_equal(batcher_submit(v->b, jobs + 1, 2), -1);
    assert_int_equal(batcher_queue_depth(v->b), 1);
    assert_int_equal(batcher_submit(v->b, jobs + 1, 3), -3);
    assert_int_equal(batcher_queue_depth(v->b), 1);
    job_cancel(busy);
    wait_job(jobs[0], 1 << 30);
    assert_true(jobs[0]->done && !jobs[0]->failed);
    assert_int_equal(batcher_submit(v->b, jobs + 1, 2), 0);
    for (int i = 1; i < 3; i++) {
        wait_job(jobs[i], 1 << 30);
        assert_true(jobs[i]->done && !jobs[i]->failed);
        assert_int_equal(jobs[i]->n_tokens, 4);
    }
    assert_false(jobs[3]->done);
    for (int i = 0; i < 4; i++)
        job_release(jobs[i]);
    job_release(busy);
}

/* When cut_off rises (the server's drain time ran out), every job the
 * batcher holds ends at once as JOB_CUT_OFF: a stream holding the only
 * slot, a long score going a share a turn, a generation queued for the
 * slot; and so does one submitted after. */
static void test_cut_off_ends_every_job(void **state)
{
    struct env *v = *state;
    struct job *jobs[4] = {gen_job(v, "a", 1, 1000000), long_job(v, JOB_SCORE), gen_job(v, "good day", 2, 4),
                           gen_job(v, "nice", 3, 4)};
    assert_int_equal(batcher_submit(v->b, &jobs[0], 1), 0);
    wait_job(jobs[0], 0);
    assert_int_equal(batcher_submit(v->b, &jobs[1], 1), 0);
    for (int k = 0; k < 6000 && batcher_queue_depth(v->b) > 0; k++)
        nanosleep(&(struct timespec){.tv_nsec = 1000000}, NULL);
    assert_int_equal(batcher_submit(v->b, &jobs[2], 1), 0);
    assert_int_equal(batcher_queue_depth(v->b), 1);
    assert_false(jobs[0]->done || jobs[1]->done);
    atomic_store(&cut_off, 1);
    assert_int_equal(batcher_submit(v->b, &jobs[3], 1), 0);
    for (int i = 0; i < 4; i++) {
        wait_job(jobs[i], 1 << 30);
        assert_true(jobs[i]->done);
        assert_int_equal(jobs[i]->failed, JOB_CUT_OFF);
        assert_non_null(strstr(jobs[i]->error, "--drain-s"));
        job_release(jobs[i]);
    }
}

static void test_stop_answers_every_accepted_job(void **state)
{
    struct env *v = *state;
    enum { N = 20 };
    struct job *jobs[N];
    for (int i = 0; i < N; i++) {
        jobs[i] = i % 2 ? gen_job(v, prompts[i % 5], (uint64_t)i, 30) : text_job(v, JOB_SCORE, prompts[i % 5]);
        assert_int_equal(batcher_submit(v->b, &jobs[i], 1), 0);
    }
    batcher_stop(v->b);
    v->b = NULL;
    for (int i = 0; i < N; i++) {
        assert_true(jobs[i]->done && !jobs[i]->failed);
        if (i % 2)
            assert_int_equal(jobs[i]->n_tokens, 30);
        else if (jobs[i]->lens[0] > 1)
            assert_true(jobs[i]->logprob[0] < 0.0);
        else
            assert_true(jobs[i]->logprob[0] == 0.0); /* one token: nothing to predict */
        job_release(jobs[i]);
    }
}

static void *stop_main(void *arg)
{
    batcher_stop(arg);
    return NULL;
}

/* A job submitted while the batcher finishes what it accepted (the
 * server's drain, between its HTTP layer's stop and the batcher's) is
 * refused, and the handler answers it 503 "shutting down"; until the stop
 * has begun a job may still be accepted, with nothing answered for it
 * yet.  The stream that held the batcher is cancelled before anything is
 * asserted, so that a failure cannot leave the stop waiting for it. */
static void test_submit_during_stop_is_refused(void **state)
{
    struct env *v = *state;
    struct job *busy = gen_job(v, "a", 1, 1000000);
    assert_int_equal(batcher_submit(v->b, &busy, 1), 0);
    wait_job(busy, 0);
    pthread_t stopper;
    assert_int_equal(pthread_create(&stopper, NULL, stop_main, v->b), 0);
    struct served_model m = {.name = "lm", .batcher = v->b};
    enum { MAX_LATE = 200 }; /* a second for the stop to begin */
    struct job *late[MAX_LATE];
    struct reply r[MAX_LATE];
    int n = 0, rc = 0;
    while (n < MAX_LATE && rc == 0) {
        late[n] = gen_job(v, "good day", (uint64_t)n, 2);
        r[n] = (struct reply){.batch_size = -1};
        rc = jobs_submit(&m, &late[n], 1, &r[n]);
        n++;
        nanosleep(&(struct timespec){.tv_nsec = 5000000}, NULL);
    }
    /* The refused job again, straight to the batcher (not one it took). */
    int again = rc != 0 ? batcher_submit(v->b, &late[n - 1], 1) : 0;
    int busy_ran_on = !busy->done;
    job_cancel(busy);
    assert_int_equal(pthread_join(stopper, NULL), 0);
    v->b = NULL;
    assert_int_equal(rc, -1);
    assert_int_equal(again, -2);
    assert_true(busy_ran_on);
    for (int i = 0; i < n; i++) {
        if (i < n - 1)
            assert_true(r[i].status == 0 && !r[i].body && late[i]->done && !late[i]->failed);
        job_release(late[i]);
    }
    assert_int_equal(r[n - 1].status, 503);
    assert_non_null(strstr(r[n - 1].body, "the server is shutting down"));
    assert_int_equal(r[n - 1].retry_after, 0);
    free(r[n - 1].body);
    job_release(busy);
}

int main(void)
{
    test_filter_from_env();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_generation_is_independent_of_company, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_classify_batched_equals_alone, setup_cls, teardown),
        cmocka_unit_test_setup_teardown(test_closed_loop_does_not_wait_for_a_full_batch, setup_cls_slow, teardown),
        cmocka_unit_test_setup_teardown(test_waits_for_the_company_the_last_batch_had, setup_cls_slow, teardown),
        cmocka_unit_test_setup_teardown(test_earliest_stop_string_cuts, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_stop_string_ends_generation, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_cancelled_stream_stops, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_twin_shares_the_prompt, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_one_prompt_runs_once, setup_lm_cached, teardown),
        cmocka_unit_test_setup_teardown(test_short_prompt_kept_when_seen_again, setup_lm_cached, teardown),
        cmocka_unit_test_setup_teardown(test_prefill_from_different_positions, setup_lm_cached, teardown),
        cmocka_unit_test_setup_teardown(test_long_prompt_shares_turns, setup_lm_big_cache, teardown),
        cmocka_unit_test_setup_teardown(test_short_prompt_goes_before_a_long_one, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_long_score_shares_turns, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_long_attention_shares_turns, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_stream_that_comes_during_a_long_score, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_cut_off_ends_every_job, setup_lm_one_slot, teardown),
        cmocka_unit_test_setup_teardown(test_forward_turn_is_bounded, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_submit_is_all_or_none, setup_lm_one_slot, teardown),
        cmocka_unit_test_setup_teardown(test_stop_answers_every_accepted_job, setup_lm, teardown),
        cmocka_unit_test_setup_teardown(test_submit_during_stop_is_refused, setup_lm, teardown),
    };
    return cmocka_run_group_tests_name("batcher", tests, NULL, NULL);
}
