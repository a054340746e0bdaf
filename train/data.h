/* data.h - what the trainer learns from: text corpora for language models,
 * labelled JSONL for classifiers, and the papers' synthetic tasks; and the
 * order it sees them in.
 *
 * Every order is drawn from a seeded generator, so the same seed and data
 * give the same batches, and so the same weights.
 */
#ifndef RRN_DATA_H
#define RRN_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "rng.h"
#include "tokenizer.h"

/* ---- Language modelling: a corpus and truncated-BPTT windows over it. */

struct corpus {
    int32_t *ids;
    size_t n;
};

/* The bytes of every path in order, concatenated; a folder stands for its
 * regular files in name order (not recursive, hidden files skipped).
 * Errors name the path (missing, unreadable).  *text is malloc'd and
 * NUL-terminated.  (The trainer builds a char vocabulary from it.) */
int corpus_read(const char *const *paths, int n_paths, char **text, size_t *len, char *err, size_t errlen);

/* 0 when no file that the valid paths stand for is one of train's (by any
 * of its names), else -1 with the first such file named in err. */
int corpus_disjoint(const char *const *train, int n_train, const char *const *valid, int n_valid, char *err,
                    size_t errlen);

/* The token ids of corpus_read's text; a corpus with fewer than 2 tokens
 * is an error. */
int corpus_load(const char *const *paths, int n_paths, const struct tokenizer *tk, struct corpus *c, char *err,
                size_t errlen);
void corpus_free(struct corpus *c);

/* B streams, stream b reading the b-th of B equal contiguous parts of the
 * corpus; each call gives the next T+1 tokens of every stream (inputs
 * window[b][0..T-1], targets window[b][1..T]; consecutive windows overlap
 * by one token), so the trainer can carry each stream's state from one
 * window to the next.  At the end of the parts, the streams start over,
 * each from a new random offset, and lm_windows_next says so. */
struct lm_windows {
    const struct corpus *c;
    int B, T;
    size_t part;       /* tokens per stream */
    size_t *start;     /* [B] where each stream's part begins this epoch */
    size_t pos;        /* offset inside the parts */
    struct rng rng;
    long epoch;
};

int lm_windows_init(struct lm_windows *w, const struct corpus *c, int B, int T, uint64_t seed, char *err,
                    size_t errlen);
void lm_windows_free(struct lm_windows *w);
/* Fills window [B][T+1]; returns 1 when this window starts a new epoch
 * (the trainer resets its carried state), else 0. */
int lm_windows_next(struct lm_windows *w, int32_t *window);
/* Puts back where a checkpointed w was: its offset, epoch, generator and
 * each stream's start; -1 (w unchanged) when they could not have come
 * from windows of this corpus, batch and length, so that no window is read
 * outside the corpus. */
int lm_windows_restore(struct lm_windows *w, size_t pos, long epoch, const struct rng *rng, const size_t *start);
long lm_windows_per_epoch(const struct lm_windows *w);

/* ---- Examples for classification and regression. */

struct example {
    int32_t *ids;      /* token inputs, or NULL */
    float *inputs;     /* vector inputs [len][dim], or NULL */
    int len;
    int label;         /* classify */
    float *target;     /* regress: [outputs] */
};

struct dataset {
    int n;
    struct example *ex;
    int dim;           /* vector inputs: width of each step; 0 for tokens */
    int outputs;       /* regress: width of the target */
    int skipped;       /* lines whose text has no tokens */
};

void dataset_free(struct dataset *d);

/* Which lines of a JSONL file make which part: line i (0-based, blank lines
 * not counted) is test when i % mod == test, validation when i % mod ==
 * valid, training otherwise.  mod 0: every line is training. */
enum part { PART_TRAIN, PART_VALID, PART_TEST };
struct split {
    int mod, test, valid;
};

/* {"text": ..., "label": ...} lines; label must be one of classes[].  Errors
 * name the file and line: bad JSON, a field missing or of the wrong type,
 * an unknown label.  Lines whose text has no tokens are skipped and
 * counted.  An empty result is an error. */
int classify_load(const char *path, const struct tokenizer *tk, char *const *classes, int n_classes,
                  const struct split *split, enum part part, struct dataset *d, char *err, size_t errlen);

/* The adding problem (Hochreiter & Schmidhuber; rra-recurrent-residual-
 * attention.json): each step is (value ~ U[0,1), marker); exactly two steps
 * are marked, one in each half; the target is the sum of the two marked
 * values.  Predicting 1 always scores MSE 1/6 = 0.167, the baseline. */
int synth_adding(int n, int T, uint64_t seed, struct dataset *d);

/* Remember the first element (skip-connections-multiple-matrices.txt):
 * T steps of D-dimensional inputs ~ U[-1,1); the target is the first
 * step's vector. */
int synth_remember(int n, int T, int D, uint64_t seed, struct dataset *d);

/* Batches of about equal length: each epoch the examples are shuffled,
 * cut into chunks of 32 batches, each chunk sorted by length and cut into
 * batches of B, and the batches shuffled.  order gets n indices and
 * batch_start n_batches+1 offsets into it. */
int bucket_batches(const struct dataset *d, int B, struct rng *r, int *order, int *batch_start, int *n_batches);

#endif
