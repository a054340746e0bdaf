/* batcher.h - the only way HTTP threads get work done by a model.
 *
 * Each served model has one batcher: a bounded queue and one thread that
 * owns the model's engine.  HTTP threads tokenize, build a job, submit it
 * and wait; they never run the model.  The batcher thread
 *  - gathers forward jobs (classify, score, attention) into one engine call
 *    of up to max_batch sequences, waiting at most max_wait_us for the
 *    batch to fill once the first job is there (dynamic batching); a long
 *    score job (or a language model's attention map) that comes while
 *    streams run goes a bounded share a turn;
 *  - runs generation with continuous batching: each stream holds a slot,
 *    new streams join between steps (their prompts run together, a
 *    bounded share each turn, so that a long prompt does not stop the
 *    others' tokens), finished or abandoned ones leave, and every step
 *    advances all of them with one engine call, each keeping its own
 *    sampling parameters and random generator.
 * A full queue refuses new jobs (the HTTP layer answers 503); a cancelled
 * job (its client went away) is dropped from its batch at the next chance.
 */
#ifndef RRN_BATCHER_H
#define RRN_BATCHER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#include "engine.h"
#include "sampler.h"
#include "tokenizer.h"

enum job_kind { JOB_CLASSIFY, JOB_SCORE, JOB_ATTENTION, JOB_GENERATE };

enum finish_reason { FINISH_NONE, FINISH_LENGTH, FINISH_STOP };

/* Why a job ended without its answer: the engine failed it (or memory, or
 * a slot; HTTP 500), or the server cut it off as it stopped (503). */
enum job_failure { JOB_SUCCEEDED, JOB_ENGINE_FAILED, JOB_CUT_OFF };

#define JOB_MAX_STOP 4
#define JOB_MAX_TOP_LOGPROBS 20

struct job {
    enum job_kind kind;
    /* Input, set before batcher_submit and not touched after. */
    int n_texts;           /* classify and score: >= 1; attention, generate: 1 */
    int32_t **ids;         /* n_texts token arrays (owned by the job, or by
                              input_of when the job is its twin) */
    int *lens;
    struct job *input_of;  /* job_twin's: whose ids and lens these are */
    /* Generation: the prompt is ids[0] (at least one token). */
    struct sample_params sample;
    int max_tokens;
    char *stop[JOB_MAX_STOP]; /* stop strings, or NULL */
    int n_stop;
    int logprobs;          /* 1: record each token's log-probability (generate:
                              those sampled; score: each text's, engine_score's terms) */
    int top_logprobs;      /* with logprobs: the most probable tokens kept beside each token */

    /* Output, valid once done.  Generation fills tokens and text as it
     * goes: read n_tokens and text_len under mu; the arrays are allocated
     * once, when the stream starts, so the bytes before those counts stay
     * where they are. */
    float *probs;          /* classify: [n_texts][C] */
    double *logprob;       /* score: [n_texts] */
    float *attention;      /* attention: [L][D][len][K] */
    int32_t *tokens;       /* generate: sampled tokens */
    float *token_logprob;  /* with logprobs: generate, ln p of each token (sampler.h);
                              score, [lens[0] + lens[1] + ...], the texts' terms */
    struct token_logprob *top; /* and their alternatives, [token][top_logprobs] as token_logprob */
    size_t *text_at;       /* /v1/completions' text_offset, made for its answer (generate.c):
                              generate, where each token begins in the generated
                              text; score, [as token_logprob], in its text; in characters */
    int n_tokens;
    char *text;            /* generate: decoded text so far (NUL-terminated) */
    size_t text_len;
    enum finish_reason finish;
    int batch_size;        /* sequences in the engine call that ran it */
    int cached_tokens;     /* generate: prompt tokens the prompt cache supplied */
    enum job_failure failed; /* not JOB_SUCCEEDED: error holds the reason */
    char error[256];
    int done;

    /* Shared state; use the functions below. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int wake_after;        /* a waiter needs more tokens than this (under mu) */
    atomic_int cancelled;
    atomic_int refs;
    struct job *next;      /* queue link, the batcher's */
    int shared;            /* score, lm attention: runs a share a turn (the batcher's) */
    int slot, part_text, part_at; /* and where it stands: its slot, text and token */
    uint64_t prompt_hash;  /* generate: its prompt's, when worth caching (the batcher's) */
    int prompt_waited;     /* generate: waited a turn for its prompt's state (the batcher's) */
    struct timespec submitted, first_token; /* the batcher's, for metrics.h */
};

struct batcher_options {
    int max_batch;         /* sequences per engine call */
    int max_wait_us;       /* how long a batch may wait to fill */
    int max_queue;         /* jobs waiting beyond which submit refuses */
    size_t prompt_cache_bytes; /* generation: prompt_cache.h's limit, 0 for none */
    /* Once it holds non-zero, every job the batcher holds or is given
     * ends at once as JOB_CUT_OFF: the server's time to finish them ran
     * out.  One flag for every batcher, those a reload replaced too.
     * NULL: never. */
    const atomic_int *cut_off;
};

struct batcher;

/* Starts the batcher thread.  The batcher owns the engine from then on,
 * even when it fails to start; not the model or tokenizer, which must
 * outlive it.  The engine needs batcher_slots(max_batch) slots for a
 * unidirectional language model. */
struct batcher *batcher_start(const struct model *m, const struct tokenizer *tk, struct engine *e,
                              const struct batcher_options *opt, char *err, size_t errlen);
/* The streams', one for a score job run a share a turn, and one for
 * engine_score's long texts. */
int batcher_slots(int max_batch);
/* Finishes every job already queued or running, then stops the thread and
 * frees the batcher and its engine. */
void batcher_stop(struct batcher *b);

/* Where text t's tokens start among the job's texts (t = n_texts: how
 * many tokens it holds in all), as its terms and alternatives are laid out
 * for a score job. */
size_t job_text_at(const struct job *j, int t);
/* The alternatives of the job's token i (generate: the i-th generated;
 * score: as job_text_at counts), or NULL when it keeps none. */
struct token_logprob *job_top(const struct job *j, size_t i);

/* A new job with one reference held by the caller. */
struct job *job_new(enum job_kind kind, int n_texts);
/* A new job of j's kind with j's input, its token arrays shared (one copy
 * of a prompt for a request's several generations); it holds a reference
 * to j until released.  Everything else is the caller's to set. */
struct job *job_twin(struct job *j);
void job_release(struct job *j);

/* After this many engine calls in a row have failed, the model counts as
 * failing until one succeeds; while failing and idle, the batcher probes
 * the engine with a one-token call every BATCHER_PROBE_MS. */
#define BATCHER_FAILING_AFTER 3
#define BATCHER_PROBE_MS 500

/* 1 when the model is failing, with the last engine error in err; else 0. */
int batcher_failing(struct batcher *b, char *err, size_t errlen);

/* Queues n jobs at once, all or none, so that the batcher finds them
 * together (a twin with or after its original).  0: queued; -1: the queue has no room for n more; -2: the
 * batcher is stopping; -3: n is more than the queue ever holds. */
int batcher_submit(struct batcher *b, struct job *const *jobs, int n);
int batcher_queue_depth(struct batcher *b);
/* The model's series of metrics.h, which the batcher records. */
struct model_metrics *batcher_metrics(struct batcher *b);

/* Wait until the job is done or, for generation, until it has more than
 * seen_tokens tokens; at most timeout_ms.  Returns 1 when there is news. */
int job_wait(struct job *j, int seen_tokens, int timeout_ms);
/* How many bytes of a generation's text no stop string can take back:
 * all once it is done, else all but as many as its longest stop string
 * less one (a stop string completed by a later token may begin there).
 * What a stream may send.  Under j->mu. */
size_t job_text_settled(const struct job *j);
/* The client went away: the batcher drops the job at the next chance. */
void job_cancel(struct job *j);

#endif
