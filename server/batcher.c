/* batcher.c - one thread per model that turns queued jobs into engine
 * calls: dynamic batching for whole-sequence work, continuous batching for
 * generation (see batcher.h for the contract).
 *
 * The loop, each turn: admit queued generation jobs into free slots; run
 * up to PREFILL_TURN tokens of the prompts not yet run, together, and draw
 * the first token of each prompt that is all in; advance every stream past
 * its prompt by one token with one engine_step; run the queued forward
 * jobs as one batch, but for a score job (or a language model's attention
 * map) longer than a turn's share, which runs a share a turn (score_turn):
 * PREFILL_TURN tokens while streams run, FORWARD_TURN while none do, so
 * that a stream which comes while a long score runs waits a turn for it,
 * not the whole score.  A long prompt thus runs over several turns while
 * the others' tokens keep coming, a step each turn, instead of stopping
 * every stream until it is in.  Forward jobs wait up to max_wait_us for
 * company (as many sequences as the last batch had) only while no stream
 * is running, so batching never delays a stream's next token.  A stream's
 * prompt starts from the longest prefix of it in the model's prompt cache
 * (prompt_cache.h); the states after each prompt (and at its block
 * boundaries, prefill_stop) and each ended stream go into it, and a job
 * whose prompt another job is running (admitted in the same turn, or still
 * running its prompt) waits to start from its state (prompt_taken).
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "batcher.h"
#include "log.h"
#include "metrics.h"
#include "prompt_cache.h"

/* The prompt cache keeps a prompt's state every PREFIX_BLOCK tokens of its
 * first PREFIX_SPAN and every PREFIX_SPAN after (prefill_stop). */
#define PREFIX_BLOCK 256
#define PREFIX_SPAN 4096
/* Prompt tokens a turn runs (at least one round), and a round's length
 * past the first PREFIX_SPAN: what bounds the time a long prompt holds
 * the other streams' next tokens, some 100 ms of a single 512-wide
 * prompt on two CPU cores. */
#define PREFILL_TURN 1024
/* Tokens of forward jobs a turn takes while streams run (at least one
 * job): batched, short texts run some three times faster a token than
 * one prompt does (on the CPU). */
#define FORWARD_TURN 4096
/* A shorter prompt runs beside the others with it rather than wait a turn
 * for the state one of them leaves in the cache: its few tokens cost less
 * than the turn. */
#define PROMPT_WAIT_MIN 16

struct stream {
    struct job *job;
    int slot;
    int at;                   /* prompt tokens its slot has consumed: from
                                 lens[0] on, it generates */
    unsigned long admitted;   /* the order streams came in */
    int32_t last;
    const float *sampled_from; /* the logits of its last token, until the
                                  next engine call */
    struct rng rng;
};

struct batcher {
    const struct model *m;
    const struct tokenizer *tk;
    struct engine *e;
    struct batcher_options opt;
    struct model_metrics *metrics;
    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct job *head, *tail;
    int depth;
    int stopping;
    /* Owned by the batcher thread. */
    struct stream *streams;
    int n_streams, max_streams;
    struct sampler sampler;
    float *logits;            /* [max_streams][V] */
    int *step_slots;          /* [max_streams] */
    int32_t *step_tokens;     /* [max_streams] */
    int *step_streams;        /* [max_streams]: the stream of each step row */
    struct engine_seq *prefill_seqs; /* [max_streams]: a prefill round's sequences */
    int *prefill_streams;     /* [max_streams]: and their streams */
    unsigned long admissions; /* streams admitted so far */
    /* Scored jobs run a share a turn (score_turn), linked by next. */
    struct job *shared_head, *shared_tail;
    unsigned long turns;      /* turns so far (prefill_turn) */
    int max_token_bytes;
    int last_seqs;            /* sequences in the last forward batch */
    int streams_shown;        /* n_streams as metrics_streams last had it */
    size_t scratch_shown;     /* engine_scratch_bytes as metrics last had it */
    struct prompt_cache *cache; /* NULL when off */
    float *cache_state;       /* [engine_slot_state_len] */
    /* The engine's health (batcher_failing): engine calls that failed in a
     * row, and the last one's error; under mu. */
    int failures;
    char last_error[512];
    float *probe_out;         /* [head_out]: a probe's result, unread */
};

struct job *job_new(enum job_kind kind, int n_texts)
{
    struct job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->kind = kind;
    j->n_texts = n_texts;
    j->ids = calloc((size_t)n_texts, sizeof *j->ids);
    j->lens = calloc((size_t)n_texts, sizeof *j->lens);
    if (!j->ids || !j->lens || pthread_mutex_init(&j->mu, NULL) != 0) {
        free(j->ids);
        free(j->lens);
        free(j);
        return NULL;
    }
    pthread_cond_init(&j->cv, NULL);
    atomic_init(&j->cancelled, 0);
    atomic_init(&j->refs, 1);
    j->slot = -1;
    j->wake_after = -1;
    return j;
}

size_t job_text_at(const struct job *j, int t)
{
    size_t at = 0;
    for (int i = 0; i < t; i++)
        at += (size_t)j->lens[i];
    return at;
}

struct token_logprob *job_top(const struct job *j, size_t i)
{
    return j->top ? j->top + i * (size_t)j->top_logprobs : NULL;
}

struct job *job_twin(struct job *j)
{
    struct job *t = job_new(j->kind, 1);
    if (!t)
        return NULL;
    free(t->ids);
    free(t->lens);
    t->n_texts = j->n_texts;
    t->ids = j->ids;
    t->lens = j->lens;
    t->input_of = j;
    atomic_fetch_add(&j->refs, 1);
    return t;
}

void job_release(struct job *j)
{
    if (!j || atomic_fetch_sub(&j->refs, 1) != 1)
        return;
    if (j->input_of) {
        job_release(j->input_of);
    } else {
        for (int i = 0; i < j->n_texts; i++)
            free(j->ids[i]);
        free(j->ids);
        free(j->lens);
    }
    for (int i = 0; i < j->n_stop; i++)
        free(j->stop[i]);
    free(j->probs);
    free(j->logprob);
    free(j->attention);
    free(j->tokens);
    free(j->token_logprob);
    free(j->top);
    free(j->text_at);
    free(j->text);
    pthread_cond_destroy(&j->cv);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

void job_cancel(struct job *j)
{
    atomic_store(&j->cancelled, 1);
}

static int cancelled(struct job *j)
{
    return atomic_load(&j->cancelled);
}

/* The error of the jobs cut_off_jobs ends, told apart from the others by
 * its address. */
static const char cut_off_error[] = "the server is shutting down and stopped this request before its end (its time for "
                                    "the requests in flight, --drain-s, ran out, or it was told again to stop)";

static void finish_job(struct batcher *b, struct job *j, int batch_size, const char *error)
{
    (void)b;
    pthread_mutex_lock(&j->mu);
    if (error) {
        j->failed = error == cut_off_error ? JOB_CUT_OFF : JOB_ENGINE_FAILED;
        /* Engine errors are longer than a job keeps: cut, by intent. */
        snprintf(j->error, sizeof j->error, "%.*s", (int)sizeof j->error - 1, error);
    }
    if (batch_size > j->batch_size)
        j->batch_size = batch_size;
    j->done = 1;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    job_release(j);
}

/* The time us microseconds from now, on the clock pthread_cond_timedwait
 * reads. */
static struct timespec deadline_us(long us)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long ns = until.tv_nsec + us % 1000000L * 1000L;
    until.tv_sec += us / 1000000L + ns / 1000000000L;
    until.tv_nsec = ns % 1000000000L;
    return until;
}

int job_wait(struct job *j, int seen_tokens, int timeout_ms)
{
    struct timespec until = deadline_us(timeout_ms * 1000L);
    pthread_mutex_lock(&j->mu);
    int news;
    j->wake_after = seen_tokens;
    while (!(news = j->done || (j->kind == JOB_GENERATE && j->n_tokens > seen_tokens)))
        if (pthread_cond_timedwait(&j->cv, &j->mu, &until) != 0)
            break;
    j->wake_after = -1;
    news = j->done || (j->kind == JOB_GENERATE && j->n_tokens > seen_tokens);
    pthread_mutex_unlock(&j->mu);
    return news;
}

size_t job_text_settled(const struct job *j)
{
    size_t hold = 0;
    for (int i = 0; !j->done && i < j->n_stop; i++)
        if (strlen(j->stop[i]) - 1 > hold)
            hold = strlen(j->stop[i]) - 1;
    return j->text_len > hold ? j->text_len - hold : 0;
}

int batcher_submit(struct batcher *b, struct job *const *jobs, int n)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    /* Before taking mu: a prompt of 100,000 tokens takes a while to hash.
     * A twin's prompt is its original's, hashed already. */
    for (int i = 0; i < n; i++)
        if (jobs[i]->kind == JOB_GENERATE && b->cache && jobs[i]->lens[0] >= PROMPT_WAIT_MIN)
            jobs[i]->prompt_hash = jobs[i]->input_of ? jobs[i]->input_of->prompt_hash
                                                      : prompt_cache_hash(jobs[i]->ids[0], jobs[i]->lens[0]);
    pthread_mutex_lock(&b->mu);
    int rc = b->stopping ? -2 : n > b->opt.max_queue ? -3 : b->depth > b->opt.max_queue - n ? -1 : 0;
    for (int i = 0; rc == 0 && i < n; i++) {
        struct job *j = jobs[i];
        atomic_fetch_add(&j->refs, 1); /* the batcher's */
        j->submitted = now;
        j->next = NULL;
        if (b->tail)
            b->tail->next = j;
        else
            b->head = j;
        b->tail = j;
        b->depth++;
    }
    if (rc == 0)
        pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    return rc;
}

struct model_metrics *batcher_metrics(struct batcher *b)
{
    return b->metrics;
}

int batcher_queue_depth(struct batcher *b)
{
    pthread_mutex_lock(&b->mu);
    int d = b->depth;
    pthread_mutex_unlock(&b->mu);
    return d;
}

static int sequences_of(const struct job *j)
{
    return j->kind == JOB_GENERATE ? 1 : j->n_texts;
}

static int same_prompt(const struct job *a, const struct job *b)
{
    return a->lens[0] == b->lens[0] && a->prompt_hash == b->prompt_hash;
}

/* Whether generation job j should wait for another job with the same
 * prompt (mu held): one taken this turn, or a stream still running its
 * prompt.  With a prompt cache the state after the prompt is kept when
 * that job has run it, and j then starts from it instead of running the
 * same prompt beside it: the generations of one request's "n", or clients
 * sending one prompt at once.  Prompts are told apart by the hash
 * batcher_submit took, so nothing is compared under mu; two prompts with
 * one hash cost a wait, not a wrong state, since the cache compares
 * tokens.  A job waits for those of its turn once (those that waited start
 * together the next turn, from the state the first left), and for a
 * stream's prompt until it is in. */
static int prompt_taken(const struct batcher *b, struct job *j, struct job *const *gen, int n)
{
    if (!b->cache || j->lens[0] < PROMPT_WAIT_MIN)
        return 0;
    for (int i = 0; i < b->n_streams; i++)
        if (b->streams[i].at < b->streams[i].job->lens[0] && same_prompt(b->streams[i].job, j))
            return 1;
    if (j->prompt_waited)
        return 0;
    for (int i = 0; i < n; i++)
        if (!gen[i]->prompt_waited && same_prompt(gen[i], j))
            return j->prompt_waited = 1;
    return 0;
}

/* Whether forward job j runs through engine_score: scoring, and a
 * language model's attention maps, which like a score go through a slot a
 * part at a time however long the text. */
static int scored(const struct batcher *b, const struct job *j)
{
    return j->kind == JOB_SCORE || (j->kind == JOB_ATTENTION && b->m->cfg.task == TASK_LM);
}

/* The tokens forward job j adds to a turn's batch while streams run: none
 * for a scored job that will run a share a turn (run_forward). */
static long turn_tokens(const struct batcher *b, const struct job *j)
{
    const size_t n = job_text_at(j, j->n_texts);
    return scored(b, j) && n > PREFILL_TURN ? 0 : (long)n;
}

/* Take queued jobs (mu held): generation jobs while slots are free, forward
 * jobs up to max_batch sequences (a larger job runs alone) and, while
 * streams run, FORWARD_TURN tokens, so that a batch holds their next
 * tokens back no longer than a prompt's share does.  Cancelled jobs
 * are dropped here.  Jobs that do not fit, or wait for their twin's
 * prompt, stay queued, in order. */
static void take_jobs(struct batcher *b, struct job **fwd, int *n_fwd, struct job **gen, int *n_gen)
{
    struct job **link = &b->head, *prev = NULL;
    int seqs = 0, free_slots = b->max_streams - b->n_streams;
    long tokens = 0;
    *n_fwd = *n_gen = 0;
    while (*link) {
        struct job *j = *link;
        int take;
        if (cancelled(j))
            take = 2;
        else if (j->kind == JOB_GENERATE)
            take = *n_gen < free_slots && !prompt_taken(b, j, gen, *n_gen);
        else
            take = seqs == 0 || (seqs + sequences_of(j) <= b->opt.max_batch &&
                                 (b->n_streams == 0 || tokens + turn_tokens(b, j) <= FORWARD_TURN));
        if (!take) {
            prev = j;
            link = &j->next;
            continue;
        }
        *link = j->next;
        if (b->tail == j)
            b->tail = prev;
        b->depth--;
        if (take == 2) {
            finish_job(b, j, 0, "cancelled");
        } else if (j->kind == JOB_GENERATE) {
            gen[(*n_gen)++] = j;
        } else {
            fwd[(*n_fwd)++] = j;
            seqs += sequences_of(j);
            tokens += turn_tokens(b, j);
        }
    }
}

/* Whether queued forward work should wait for more company (mu held). */
static int worth_waiting(const struct batcher *b)
{
    int seqs = 0;
    for (const struct job *j = b->head; j; j = j->next)
        if (j->kind != JOB_GENERATE)
            seqs += sequences_of(j);
    /* Waiting pays only when company is likely: the last batch had some,
     * and only until as many as it had are here.  N clients in a closed
     * loop then go as one batch of N as soon as all N have asked again,
     * instead of waiting max_wait_us every round for a full batch that
     * cannot come; a lone client pays no wait at all; and a growing load
     * still grows the batches, since requests that arrive while a batch
     * runs all join the next one. */
    int want = b->last_seqs < b->opt.max_batch ? b->last_seqs : b->opt.max_batch;
    return b->n_streams == 0 && !b->shared_head && seqs > 0 && seqs < want && b->last_seqs > 1;
}

/* Records how an engine call went.  A device that stays broken (a GPU
 * fault that poisons its context) fails every call after it; a load
 * balancer should stop sending work here, so after BATCHER_FAILING_AFTER
 * failures in a row the model counts as failing until a call succeeds. */
static void note_engine(struct batcher *b, int rc, const char *err)
{
    pthread_mutex_lock(&b->mu);
    int was = b->failures >= BATCHER_FAILING_AFTER;
    if (rc == 0) {
        b->failures = 0;
    } else {
        b->failures++;
        snprintf(b->last_error, sizeof b->last_error, "%s", err);
    }
    int is = b->failures >= BATCHER_FAILING_AFTER;
    pthread_mutex_unlock(&b->mu);
    if (is && !was)
        log_msg("%d engine calls in a row failed: the model counts as failing (/readyz answers 503) until one "
                "succeeds; it is probed every %d ms meanwhile",
                BATCHER_FAILING_AFTER, BATCHER_PROBE_MS);
    if (was && !is)
        log_msg("an engine call succeeded again: the model is no longer failing");
}

int batcher_failing(struct batcher *b, char *err, size_t errlen)
{
    pthread_mutex_lock(&b->mu);
    int failing = b->failures >= BATCHER_FAILING_AFTER;
    if (failing)
        snprintf(err, errlen, "%s", b->last_error);
    pthread_mutex_unlock(&b->mu);
    return failing;
}

/* While failing and idle, the batcher tries the smallest engine call it
 * can make, one token, so that the model recovers without a client's
 * request being the one to find out. */
static void probe_engine(struct batcher *b)
{
    char err[512];
    int32_t token = 0;
    struct engine_seq q = {.tokens = &token, .len = 1, .slot = -1};
    if (b->m->cfg.task == TASK_LM)
        q.last_logits = b->probe_out;
    else
        q.logits = b->probe_out;
    note_engine(b, engine_forward(b->e, &q, 1, err, sizeof err), err);
}

/* Tells the metrics what the engine's scratch memory grew to, if it did. */
static void show_scratch(struct batcher *b)
{
    const size_t bytes = engine_scratch_bytes(b->e);
    if (bytes != b->scratch_shown)
        metrics_scratch_bytes(b->metrics, b->scratch_shown = bytes);
}

/* Queues scored job j to run a share a turn, its outputs allocated. */
static void share_job(struct batcher *b, struct job *j)
{
    j->next = NULL;
    j->part_text = j->part_at = 0;
    j->slot = -1;
    if (b->shared_tail)
        b->shared_tail->next = j;
    else
        b->shared_head = j;
    b->shared_tail = j;
}

/* Ends the first shared job, with an error or not. */
static void unshare_job(struct batcher *b, const char *error)
{
    struct job *j = b->shared_head;
    if (j->slot >= 0)
        engine_slot_close(b->e, j->slot);
    if (!(b->shared_head = j->next))
        b->shared_tail = NULL;
    finish_job(b, j, 1, error);
}

/* The steps of shared scored jobs a turn runs: a prompt's share while
 * streams run, and while none do as many as a forward batch takes beside
 * them, the longest a stream that comes meanwhile waits. */
static int score_share(const struct batcher *b)
{
    return b->n_streams ? PREFILL_TURN : FORWARD_TURN;
}

/* Text t of scored job j from token at, n tokens of it: the whole text
 * (carry 0: at is 0 and n its length), or a part carried on through j's
 * slot. */
static struct engine_text job_text(const struct batcher *b, const struct job *j, int t, int at, int n, int carry)
{
    const int len = j->lens[t];
    const size_t from = job_text_at(j, t) + (size_t)at;
    return (struct engine_text){
        .tokens = j->ids[t] + at, .len = n, .carry = carry, .slot = carry ? j->slot : -1,
        .next = carry && at + n < len ? j->ids[t] + at + n : NULL,
        .token_logprobs = j->logprobs ? j->token_logprob + from : NULL,
        .top_k = j->top_logprobs, .top = job_top(j, from),
        .attention = j->attention ? j->attention + (size_t)at * b->m->cfg.attn_window : NULL,
        .attention_rows = len,
    };
}

/* Whole texts of a shared job one engine call of score_turn takes. */
#define SHARED_TEXTS 64

/* Runs score_share steps of the shared scored jobs, in order: a part of a
 * long text an engine call, each part carrying on through a slot from
 * where the last stood, so that its terms are those of one pass over it;
 * and whole texts together, each no longer than the steps left, as many
 * as SHARED_TEXTS and a forward batch's tokens (FORWARD_TURN beside
 * streams, an engine call's without).  A call takes about as long as
 * its longest text's steps, batched as they are, and that is what it
 * costs the turn. */
static void score_turn(struct batcher *b)
{
    char err[512];
    struct engine_text texts[SHARED_TEXTS];
    for (int budget = score_share(b); budget > 0 && b->shared_head;) {
        struct job *j = b->shared_head;
        if (cancelled(j)) {
            unshare_job(b, "cancelled");
            continue;
        }
        const int t = j->part_text, len = j->lens[t], at = j->part_at, whole = at == 0 && len <= budget;
        if (!whole && j->slot < 0 && (j->slot = engine_slot_open(b->e)) < 0) {
            unshare_job(b, "no free slot to score a text");
            continue;
        }
        const int batch = b->n_streams ? FORWARD_TURN : ENGINE_CALL_TOKENS;
        int n = 0, tokens = 0, steps = 0;
        if (whole) {
            for (int l; n < SHARED_TEXTS && t + n < j->n_texts && (l = j->lens[t + n]) <= budget &&
                        (n == 0 || tokens + l <= batch);
                 n++) {
                texts[n] = job_text(b, j, t + n, 0, l, 0);
                tokens += l;
                steps = l > steps ? l : steps;
            }
        } else {
            steps = tokens = len - at < budget ? len - at : budget;
            texts[n++] = job_text(b, j, t, at, tokens, 1);
        }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        const int rc = engine_score(b->e, texts, n, err, sizeof err);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        note_engine(b, rc, err);
        metrics_time(b->metrics, TIME_ENGINE, metrics_elapsed(&t0, &t1));
        metrics_batch(b->metrics, n);
        if (rc != 0) {
            log_msg("engine error scoring a text: %s", err);
            unshare_job(b, err);
            continue;
        }
        budget -= steps;
        for (int i = 0; i < n && j->logprob; i++)
            j->logprob[t + i] += texts[i].logprob;
        if (!whole && (j->part_at += tokens) < len)
            continue;
        if (!whole) {
            engine_slot_close(b->e, j->slot);
            j->slot = -1;
            j->part_at = 0;
        }
        if ((j->part_text += n) == j->n_texts)
            unshare_job(b, NULL);
    }
}

/* Classify, attention and score jobs as one batch. */
static void run_forward(struct batcher *b, struct job **jobs, int n)
{
    char err[512] = "";
    int seqs = 0, scores = 0;
    for (int i = 0; i < n; i++) {
        seqs += sequences_of(jobs[i]);
        if (scored(b, jobs[i]))
            scores += jobs[i]->n_texts;
    }
    struct engine_seq *q = calloc((size_t)seqs, sizeof *q);
    struct engine_text *st = calloc((size_t)scores + 1, sizeof *st);
    /* Scoring more than a turn's share would hold back the streams' next
     * tokens as long, those of streams that come meanwhile too: such a job
     * runs a share a turn instead. */
    const int C = b->m->head_out, K = b->m->cfg.attn_mode == ATTN_NONE ? 0 : b->m->cfg.attn_window;
    const int LDK = b->m->cfg.layers * config_directions(&b->m->cfg) * K;
    int rc = q && st ? 0 : -1, nq = 0, ns = 0;
    for (int i = 0; rc == 0 && i < n; i++) {
        struct job *j = jobs[i];
        const size_t tokens = job_text_at(j, j->n_texts); /* a score job's terms, when asked for */
        if (j->kind == JOB_CLASSIFY && !(j->probs = malloc(sizeof(float) * (size_t)j->n_texts * C)))
            rc = -1;
        if (j->kind == JOB_SCORE && !(j->logprob = calloc((size_t)j->n_texts, sizeof(double))))
            rc = -1;
        if (j->kind == JOB_SCORE && j->logprobs && !(j->token_logprob = malloc(sizeof(float) * tokens)))
            rc = -1;
        if (j->kind == JOB_SCORE && j->top_logprobs &&
            !(j->top = malloc(sizeof *j->top * tokens * (size_t)j->top_logprobs)))
            rc = -1;
        if (j->kind == JOB_ATTENTION && !(j->attention = calloc((size_t)LDK * j->lens[0] + 1, sizeof(float))))
            rc = -1;
        j->shared = rc == 0 && scored(b, j) && tokens > (size_t)score_share(b);
        for (int t = 0; rc == 0 && !j->shared && t < j->n_texts; t++) {
            if (scored(b, j)) {
                st[ns++] = job_text(b, j, t, 0, j->lens[t], 0);
                continue;
            }
            q[nq++] = (struct engine_seq){
                .tokens = j->ids[t], .len = j->lens[t], .slot = -1,
                .probs = j->kind == JOB_CLASSIFY ? j->probs + (size_t)t * C : NULL,
                .attention = j->kind == JOB_ATTENTION ? j->attention : NULL,
            };
        }
    }
    if (rc != 0)
        snprintf(err, sizeof err, "out of memory");
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++)
        metrics_time(b->metrics, TIME_QUEUE_WAIT, metrics_elapsed(&jobs[i]->submitted, &t0));
    const int runs = rc == 0;
    if (rc == 0 && nq)
        rc = engine_forward(b->e, q, nq, err, sizeof err);
    if (rc == 0 && ns)
        rc = engine_score(b->e, st, ns, err, sizeof err);
    if (runs)
        note_engine(b, rc, err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    /* Counted before any job is answered, so that a client that has its
     * answer finds its batch in /metrics. */
    metrics_time(b->metrics, TIME_ENGINE, metrics_elapsed(&t0, &t1));
    metrics_batch(b->metrics, seqs);
    show_scratch(b);
    for (int i = 0, k = 0; i < n; i++) {
        struct job *j = jobs[i];
        if (rc == 0 && j->shared) {
            share_job(b, j);
            continue;
        }
        for (int t = 0; rc == 0 && scored(b, j) && t < j->n_texts; t++, k++)
            if (j->logprob)
                j->logprob[t] = st[k].logprob;
        finish_job(b, j, seqs, rc == 0 ? NULL : err);
    }
    if (rc != 0)
        log_msg("engine error on a batch of %d sequences: %s", seqs, err);
    b->last_seqs = seqs;
    free(q);
    free(st);
}

/* Samples stream s's next token from its logits and appends it to its job
 * (with its log-probabilities when asked); returns 1 when the stream is
 * over. */
static int next_token(struct batcher *b, struct stream *s, const float *logits)
{
    struct job *j = s->job;
    const int32_t tok = sample_token(&b->sampler, logits, &j->sample, &s->rng);
    if (j->n_tokens == 0) {
        clock_gettime(CLOCK_MONOTONIC, &j->first_token);
        metrics_time(b->metrics, TIME_FIRST_TOKEN, metrics_elapsed(&j->submitted, &j->first_token));
    }
    char buf[8];
    size_t len = 0;
    const char *piece = tokenizer_token(b->tk, tok, buf, &len);
    pthread_mutex_lock(&j->mu);
    /* Written before n_tokens grows, under mu: a reader that saw the
     * count finds them. */
    if (j->logprobs)
        j->token_logprob[j->n_tokens] = token_logprobs(logits, b->m->head_out, tok, j->top_logprobs,
                                                       job_top(j, (size_t)j->n_tokens));
    j->tokens[j->n_tokens++] = tok;
    /* Words are separated by a space; bytes and characters join as they are. */
    if (b->tk->type == TOKENIZER_WORD && j->text_len)
        j->text[j->text_len++] = ' ';
    if (piece)
        memcpy(j->text + j->text_len, piece, len);
    j->text_len += len;
    j->text[j->text_len] = 0;
    /* Only the new piece can complete a stop string; where it completes
     * several, the text is cut before the one that begins first, so that
     * it holds none of them whatever their order. */
    const char *cut = NULL;
    for (int i = 0; i < j->n_stop; i++) {
        size_t sl = strlen(j->stop[i]);
        size_t from = j->text_len > sl + len ? j->text_len - sl - len : 0;
        const char *hit = strstr(j->text + from, j->stop[i]);
        if (hit && (!cut || hit < cut))
            cut = hit;
    }
    if (cut) {
        j->text_len = (size_t)(cut - j->text);
        j->text[j->text_len] = 0;
        j->finish = FINISH_STOP;
    }
    if (j->finish == FINISH_NONE && j->n_tokens >= j->max_tokens)
        j->finish = FINISH_LENGTH;
    int over = j->finish != FINISH_NONE;
    /* A non-streaming request waits for the end: waking its thread at
     * every token would cost a context switch a token for nothing. */
    if (over || j->n_tokens > j->wake_after)
        pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    s->last = tok;
    s->sampled_from = logits;
    return over;
}

/* Keeps the state stream i's slot has reached, after tokens[0..n), with
 * the logits after them, where the cache admits it (asked first, since a
 * save copies the state, from the GPU on CUDA).  A state the cache has
 * no memory for is not kept: that costs a later prompt time, not its
 * result. */
static void cache_state(struct batcher *b, int i, const int32_t *tokens, int n, const float *logits)
{
    struct stream *s = &b->streams[i];
    if (!b->cache || !prompt_cache_admits(b->cache, tokens, n) ||
        engine_slot_save(b->e, s->slot, b->cache_state) != 0)
        return;
    prompt_cache_put(b->cache, tokens, n, b->cache_state, engine_slot_position(b->e, s->slot), logits);
    metrics_prompt_cache_bytes(b->metrics, prompt_cache_bytes(b->cache));
}

/* A stream that ended well leaves the state after its prompt and every
 * token it generated but the last (sampled, never run through the model),
 * which a request continuing the conversation begins with. */
static void cache_ended_stream(struct batcher *b, int i)
{
    const struct job *j = b->streams[i].job;
    int n = j->lens[0] + j->n_tokens - 1;
    if (!b->cache || j->n_tokens < 2)
        return;
    int32_t *seq = malloc(sizeof *seq * (size_t)n);
    if (!seq)
        return;
    memcpy(seq, j->ids[0], sizeof *seq * (size_t)j->lens[0]);
    memcpy(seq + j->lens[0], j->tokens, sizeof *seq * (size_t)(j->n_tokens - 1));
    cache_state(b, i, seq, n, b->streams[i].sampled_from);
    free(seq);
}

static void end_stream(struct batcher *b, int i, const char *error)
{
    struct stream *s = &b->streams[i];
    if (!error)
        cache_ended_stream(b, i);
    if (!error && s->job->n_tokens >= 2) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        metrics_time(b->metrics, TIME_TOKEN_INTERVAL,
                     metrics_elapsed(&s->job->first_token, &now) / (s->job->n_tokens - 1));
    }
    engine_slot_close(b->e, s->slot);
    finish_job(b, s->job, 0, error);
    b->streams[i] = b->streams[--b->n_streams];
}

/* Restores the longest cached prefix of stream i's prompt into its slot
 * (and its logits into row i when it is the whole prompt): how many of the
 * prompt's tokens it covers. */
static int restore_prefix(struct batcher *b, int i)
{
    struct stream *s = &b->streams[i];
    const struct job *j = s->job;
    int position;
    if (!b->cache)
        return 0;
    int have = prompt_cache_find(b->cache, j->ids[0], j->lens[0], b->cache_state, &position,
                                 b->logits + (size_t)i * b->m->head_out);
    if (have && engine_slot_restore(b->e, s->slot, b->cache_state, position) != 0) {
        engine_slot_clear(b->e, s->slot);
        return 0;
    }
    if (have)
        metrics_count(b->metrics, COUNT_CACHED_TOKENS, have);
    return have;
}

/* Where the prefill of a prompt of len tokens stops next after position
 * at: every PREFIX_BLOCK tokens up to PREFIX_SPAN and every PREFILL_TURN
 * after.  Each stop costs an engine call; the cache keeps the state at
 * those of cached_stop, so that prompts which begin alike and end apart
 * (a long instruction or a few examples, then each its own question) find
 * the state where their common beginning ends, give or take a block, and a
 * long prompt keeps an entry every PREFIX_SPAN tokens. */
static int prefill_stop(int at, int len)
{
    const int block = at < PREFIX_SPAN ? PREFIX_BLOCK : PREFILL_TURN;
    const int stop = (at / block + 1) * block;
    return stop < len ? stop : len;
}

static int cached_stop(int at, int len)
{
    return at == len || at % (at <= PREFIX_SPAN ? PREFIX_BLOCK : PREFIX_SPAN) == 0;
}

/* The position of the next prefill round: the lowest a prompt not yet in
 * stands at, or, when oldest, that of the first admitted of them. */
static int round_position(const struct batcher *b, int oldest)
{
    int pos = INT_MAX;
    unsigned long first = ULONG_MAX;
    for (int i = 0; i < b->n_streams; i++) {
        const struct stream *s = &b->streams[i];
        if (s->at < s->job->lens[0] && (oldest ? s->admitted < first : s->at < pos)) {
            pos = s->at;
            first = s->admitted;
        }
    }
    return pos;
}

/* Runs the prompts not yet in, from where each stands (restored from the
 * cache or not), in rounds until PREFILL_TURN tokens have run this turn or
 * none are left, keeping the state at each stop and leaving each stream's
 * logits after its last round in its row of b->logits.  An engine call
 * takes slots that are all at one position, so each round runs the prompts
 * that stand at one position, up to their next stops: prompts from the
 * start go together, block by block, and one restored midway joins them at
 * its first stop.  A round takes the lowest position, so that a short
 * prompt that comes while a long one is halfway runs first; but every
 * other turn's first round takes the prompt admitted first, so that a long
 * prompt moves on however many short ones keep coming.  0, or the
 * engine's error. */
static int prefill_turn(struct batcher *b, char *err, size_t errlen)
{
    const int V = b->m->head_out;
    struct engine_seq *q = b->prefill_seqs;
    int *runs = b->prefill_streams;
    const int oldest = b->turns++ % 2;
    for (int budget = PREFILL_TURN, round = 0; budget > 0; round++) {
        const int pos = round_position(b, oldest && round == 0);
        int n = 0;
        if (pos == INT_MAX)
            return 0;
        for (int i = 0; i < b->n_streams; i++) {
            const struct job *j = b->streams[i].job;
            if (b->streams[i].at != pos || pos >= j->lens[0])
                continue;
            runs[n] = i;
            q[n++] = (struct engine_seq){.tokens = j->ids[0] + pos, .len = prefill_stop(pos, j->lens[0]) - pos,
                                         .slot = b->streams[i].slot, .last_logits = b->logits + (size_t)i * V};
        }
        int rc = engine_forward(b->e, q, n, err, errlen);
        note_engine(b, rc, err);
        if (rc != 0)
            return rc;
        metrics_batch(b->metrics, n);
        for (int k = 0; k < n; k++) {
            struct stream *s = &b->streams[runs[k]];
            s->at += q[k].len;
            budget -= q[k].len;
            if (cached_stop(s->at, s->job->lens[0]))
                cache_state(b, runs[k], s->job->ids[0], s->at, q[k].last_logits);
            if (s->job->batch_size < n)
                s->job->batch_size = n;
        }
    }
    return 0;
}

/* Gives new streams their slots, from the longest cached prefix of their
 * prompts. */
static void admit_streams(struct batcher *b, struct job **jobs, int n)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    for (int i = 0; i < n; i++) {
        struct job *j = jobs[i];
        struct stream *s = &b->streams[b->n_streams++];
        metrics_time(b->metrics, TIME_QUEUE_WAIT, metrics_elapsed(&j->submitted, &now));
        metrics_count(b->metrics, COUNT_PROMPT_TOKENS, j->lens[0]);
        *s = (struct stream){.job = j, .slot = engine_slot_open(b->e), .admitted = b->admissions++};
        rng_seed(&s->rng, j->sample.seed);
        size_t text_cap = (size_t)j->max_tokens * ((size_t)b->max_token_bytes + 1) + 1;
        pthread_mutex_lock(&j->mu);
        j->tokens = malloc(sizeof(int32_t) * (size_t)j->max_tokens);
        j->text = malloc(text_cap);
        if (j->text)
            j->text[0] = 0;
        if (j->logprobs) {
            j->token_logprob = malloc(sizeof(float) * (size_t)j->max_tokens);
            /* One more, so that no alternatives is not a malloc of 0. */
            j->top = malloc(sizeof *j->top * ((size_t)j->max_tokens * (size_t)j->top_logprobs + 1));
        }
        pthread_mutex_unlock(&j->mu);
        if (s->slot < 0 || !j->tokens || !j->text || (j->logprobs && (!j->token_logprob || !j->top))) {
            end_stream(b, b->n_streams - 1, "out of memory starting a stream");
            continue;
        }
        j->cached_tokens = s->at = restore_prefix(b, b->n_streams - 1);
    }
}

/* This turn's share of the prompts still to run (prefill_turn), and the
 * first token of each stream whose prompt is all in. */
static void start_streams(struct batcher *b)
{
    char err[512];
    const int V = b->m->head_out;
    const int rc = prefill_turn(b, err, sizeof err);
    if (rc != 0)
        log_msg("engine error running the prompts of %d streams: %s", b->n_streams, err);
    /* Backwards, so that ending stream i moves one already seen into its
     * place. */
    for (int i = b->n_streams - 1; i >= 0; i--) {
        struct stream *s = &b->streams[i];
        if (s->job->n_tokens > 0)
            continue;
        if (rc != 0) {
            end_stream(b, i, err);
        } else if (s->at == s->job->lens[0]) {
            metrics_count(b->metrics, COUNT_TOKENS, 1);
            if (next_token(b, s, b->logits + (size_t)i * V))
                end_stream(b, i, NULL);
        }
    }
}

/* One token for every stream past its prompt. */
static void step_streams(struct batcher *b)
{
    for (int i = b->n_streams - 1; i >= 0; i--)
        if (cancelled(b->streams[i].job))
            end_stream(b, i, "cancelled");
    int n = 0;
    for (int i = 0; i < b->n_streams; i++) {
        if (b->streams[i].job->n_tokens == 0)
            continue; /* still running its prompt */
        b->step_streams[n] = i;
        b->step_slots[n] = b->streams[i].slot;
        b->step_tokens[n++] = b->streams[i].last;
    }
    if (n == 0)
        return;
    char err[512];
    const int V = b->m->head_out;
    int rc = engine_step(b->e, b->step_slots, b->step_tokens, n, b->logits, NULL, err, sizeof err);
    note_engine(b, rc, err);
    if (rc != 0) {
        log_msg("engine error stepping %d streams: %s", n, err);
        for (int k = n - 1; k >= 0; k--)
            end_stream(b, b->step_streams[k], err);
        return;
    }
    metrics_batch(b->metrics, n);
    metrics_count(b->metrics, COUNT_TOKENS, n);
    /* Backwards, so that ending stream i moves one already sampled (or
     * still running its prompt) into its place. */
    for (int k = n - 1; k >= 0; k--) {
        const int i = b->step_streams[k];
        struct stream *s = &b->streams[i];
        if (s->job->batch_size < n)
            s->job->batch_size = n;
        if (next_token(b, s, b->logits + (size_t)k * V))
            end_stream(b, i, NULL);
    }
}

/* Ends every queued job with error (mu held). */
static void fail_queue(struct batcher *b, const char *error)
{
    while (b->head) {
        struct job *j = b->head;
        b->head = j->next;
        b->depth--;
        finish_job(b, j, 0, error);
    }
    b->tail = NULL;
}

/* Ends every job held, queued, streaming or scored a share a turn, as
 * cut off (mu held). */
static void cut_off_jobs(struct batcher *b)
{
    fail_queue(b, cut_off_error);
    while (b->n_streams)
        end_stream(b, b->n_streams - 1, cut_off_error);
    while (b->shared_head)
        unshare_job(b, cut_off_error);
}

static void *batcher_main(void *arg)
{
    struct batcher *b = arg;
    int cap = b->opt.max_batch + 1;
    struct job **fwd = malloc(sizeof *fwd * (size_t)(b->opt.max_queue + 1));
    struct job **gen = malloc(sizeof *gen * (size_t)cap);
    pthread_mutex_lock(&b->mu);
    for (;;) {
        while (!b->head && b->n_streams == 0 && !b->shared_head && !b->stopping) {
            if (b->failures < BATCHER_FAILING_AFTER) {
                pthread_cond_wait(&b->cv, &b->mu);
                continue;
            }
            struct timespec until = deadline_us(BATCHER_PROBE_MS * 1000L);
            if (pthread_cond_timedwait(&b->cv, &b->mu, &until) != 0 && !b->head && !b->stopping) {
                pthread_mutex_unlock(&b->mu);
                probe_engine(b);
                pthread_mutex_lock(&b->mu);
            }
        }
        if (b->opt.cut_off && atomic_load(b->opt.cut_off))
            cut_off_jobs(b);
        if (!b->head && b->n_streams == 0 && !b->shared_head && b->stopping)
            break; /* nothing left to do */
        if (worth_waiting(b) && !b->stopping) {
            struct timespec until = deadline_us(b->opt.max_wait_us);
            while (worth_waiting(b) && !b->stopping && pthread_cond_timedwait(&b->cv, &b->mu, &until) == 0)
                ;
        }
        int n_fwd, n_gen;
        if (fwd && gen) {
            take_jobs(b, fwd, &n_fwd, gen, &n_gen);
        } else {
            /* Out of memory for the lists: fail what is queued rather than spin. */
            n_fwd = n_gen = 0;
            fail_queue(b, "out of memory");
        }
        pthread_mutex_unlock(&b->mu);
        if (n_gen)
            admit_streams(b, gen, n_gen);
        start_streams(b);
        step_streams(b);
        if (n_fwd)
            run_forward(b, fwd, n_fwd);
        score_turn(b);
        if (b->n_streams != b->streams_shown)
            metrics_streams(b->metrics, b->streams_shown = b->n_streams);
        show_scratch(b);
        pthread_mutex_lock(&b->mu);
    }
    pthread_mutex_unlock(&b->mu);
    free(fwd);
    free(gen);
    return NULL;
}

int batcher_slots(int max_batch)
{
    return max_batch + 2;
}

struct batcher *batcher_start(const struct model *m, const struct tokenizer *tk, struct engine *e,
                              const struct batcher_options *opt, char *err, size_t errlen)
{
    struct batcher *b = calloc(1, sizeof *b);
    if (!b || !(b->metrics = model_metrics_new())) {
        snprintf(err, errlen, "out of memory");
        free(b);
        engine_destroy(e);
        return NULL;
    }
    b->m = m;
    b->tk = tk;
    b->e = e;
    b->opt = *opt;
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->cv, NULL);
    int generates = m->cfg.task == TASK_LM && config_directions(&m->cfg) == 1;
    b->max_streams = generates ? opt->max_batch : 0;
    b->max_token_bytes = 4;
    for (int i = 0; i < m->cfg.n_tokens; i++) {
        int len = (int)strlen(m->cfg.tokens[i]);
        if (len > b->max_token_bytes)
            b->max_token_bytes = len;
    }
    if (generates) {
        b->streams = calloc((size_t)b->max_streams, sizeof *b->streams);
        b->logits = malloc(sizeof(float) * (size_t)b->max_streams * m->head_out);
        b->step_slots = malloc(sizeof(int) * (size_t)b->max_streams);
        b->step_tokens = malloc(sizeof(int32_t) * (size_t)b->max_streams);
        b->step_streams = malloc(sizeof(int) * (size_t)b->max_streams);
        b->prefill_seqs = malloc(sizeof *b->prefill_seqs * (size_t)b->max_streams);
        b->prefill_streams = malloc(sizeof(int) * (size_t)b->max_streams);
        if (!b->streams || !b->logits || !b->step_slots || !b->step_tokens || !b->step_streams ||
            !b->prefill_seqs || !b->prefill_streams ||
            sampler_init(&b->sampler, m->head_out) != 0) {
            snprintf(err, errlen, "out of memory for %d generation streams", b->max_streams);
            batcher_stop(b);
            return NULL;
        }
        size_t state_len = engine_slot_state_len(e);
        if (opt->prompt_cache_bytes &&
            (!(b->cache = prompt_cache_new(opt->prompt_cache_bytes, state_len, m->head_out)) ||
             !(b->cache_state = malloc(sizeof(float) * state_len)))) {
            snprintf(err, errlen, "out of memory for the prompt cache");
            batcher_stop(b);
            return NULL;
        }
    }
    if (!(b->probe_out = malloc(sizeof(float) * (size_t)m->head_out))) {
        snprintf(err, errlen, "out of memory");
        batcher_stop(b);
        return NULL;
    }
    if (pthread_create(&b->thread, NULL, batcher_main, b) != 0) {
        snprintf(err, errlen, "cannot start the batcher thread");
        batcher_stop(b);
        return NULL;
    }
    b->started = 1;
    return b;
}

void batcher_stop(struct batcher *b)
{
    if (!b)
        return;
    if (b->started) {
        pthread_mutex_lock(&b->mu);
        b->stopping = 1;
        pthread_cond_broadcast(&b->cv);
        pthread_mutex_unlock(&b->mu);
        pthread_join(b->thread, NULL);
    }
    engine_destroy(b->e);
    sampler_free(&b->sampler);
    free(b->streams);
    free(b->logits);
    free(b->step_slots);
    free(b->step_tokens);
    free(b->step_streams);
    free(b->prefill_seqs);
    free(b->prefill_streams);
    free(b->probe_out);
    prompt_cache_free(b->cache);
    free(b->cache_state);
    model_metrics_free(b->metrics);
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    free(b);
}
