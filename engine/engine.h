/* engine.h - running a model: the only interface the server, the CLI and the
 * benchmarks use.
 *
 * An engine is one model placed on one backend, with the scratch memory to
 * run it.  It is not thread-safe: one thread (a batcher) drives an engine.
 *
 * Two ways to run it:
 *  - engine_forward: a batch of whole sequences of any lengths
 *    (classification, scoring, attention maps, and prompt prefill).  Each
 *    sequence's results are the same alone or in any batch.
 *  - engine_step: language models advance a batch of independent sequences
 *    one token each, every sequence keeping its own state in a slot, so
 *    sequences can join and leave between steps (continuous batching).
 */
#ifndef RRN_ENGINE_H
#define RRN_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "logprob.h"
#include "model.h"

struct engine;

/* One sequence of a batched forward.  Outputs are written only where the
 * pointer is not NULL. */
struct engine_seq {
    const int32_t *tokens;   /* the token ids, or NULL for vector inputs */
    const float *inputs;     /* vector-input models: [len][embed_dim] */
    int len;                 /* >= 1 */
    int slot;                /* lm: continue the sequence held in this slot
                                (from engine_slot_open) and keep the final
                                state there, or -1 */
    const int32_t *next;     /* lm: the token that follows this sequence
                                (the first of the next chunk), or NULL */
    float *probs;            /* classify: [C] */
    float *logits;           /* classify: [C]; regress: the prediction [O];
                                lm: [len, V] */
    const float *target;     /* regress, training: [O] */
    float *last_logits;      /* lm: [V], the logits after the last token */
    float *attention;        /* RRA: [L][D][rows][K]; see below */
    int attention_rows;      /* positions between one layer's (and
                                direction's) weights and the next's: len
                                when 0, a whole text's length when this
                                sequence is a part of it */
    double logprob;          /* lm, out: sum over t = 1..len-1 of
                                ln p(token t+1 | tokens 1..t), plus
                                ln p(next | tokens) when next is given */
    float *token_logprobs;   /* lm, out when not NULL: [len], the terms of
                                that sum: entry t-1 is ln p(token t+1 |
                                tokens 1..t), the last ln p(next | tokens),
                                or 0 without next */
};

/* The attention weights of layer l, direction d, at the step that consumed
 * token position p (0-based), are attention[((l*D + d)*rows + p)*K + j - 1]
 * for j = 1..K: the weight of the state produced at position p-1-j in the
 * forward direction, p+1+j in the backward one.  Positions outside the
 * sequence are the zero states before its start. */

/* max_slots: how many step-API sequences can be open at once (0 for none). */
struct engine *engine_create(const struct model *m, struct backend *be, int max_slots,
                             char *err, size_t errlen);
void engine_destroy(struct engine *e);
const struct model *engine_model(const struct engine *e);

/* A batch runs in calls of at most ENGINE_CALL_TOKENS tokens (a longer
 * sequence alone): the engine's scratch memory grows with a call's tokens
 * and keeps the largest, so that a batch of 256 texts of 4,000 characters
 * would leave the model holding what a million tokens need, while calls of
 * this size already keep the matrix products busy. */
#define ENGINE_CALL_TOKENS 16384
int engine_forward(struct engine *e, struct engine_seq *seqs, int n, char *err, size_t errlen);

/* Slots for the step API (lm, unidirectional).  A freshly opened slot holds
 * the empty state; engine_forward with seq.slot feeds it a prompt, or the
 * next chunk of a long text (all slots of one forward batch must have
 * consumed the same number of tokens). */
int engine_slot_open(struct engine *e);          /* slot id, or -1 when all are taken */
void engine_slot_close(struct engine *e, int slot);
int engine_slot_position(const struct engine *e, int slot); /* tokens consumed so far */
/* Back to the empty state, at the same position, so that the slot still
 * advances in step with the others of its batch (training's state_reset). */
void engine_slot_clear(struct engine *e, int slot);

/* A text to score. */
struct engine_text {
    const int32_t *tokens;
    int len;                     /* >= 1 */
    double logprob;              /* out, as engine_seq.logprob */
    float *token_logprobs;       /* out when not NULL: [len], its terms, as
                                    engine_seq.token_logprobs */
    int carry;                   /* 1: the text continues the sequence held
                                    in slot and leaves its state there, and
                                    next, when not NULL, is the token after
                                    it (its last term); 0: a whole text */
    int slot;
    const int32_t *next;
    int top_k;                   /* >= 1 with top */
    struct token_logprob *top;   /* out when not NULL: [len][top_k], at position
                                    t the top_k most probable tokens to follow
                                    tokens 1..t+1, most probable first; then
                                    the terms are computed as these are
                                    (logprob.h), and may differ from those
                                    without top in their last digits */
    float *attention;            /* RRA, out when not NULL: the attention
                                    weights, as engine_seq's (one direction) */
    int attention_rows;          /* as engine_seq's */
};

/* The log-probability of each of n texts, and what else each asks for;
 * long ones are run in chunks through a slot, so the engine needs one free
 * slot (besides those the texts carry on in).  A language model's
 * attention maps come this way too, in memory bounded by a chunk however
 * long the text. */
int engine_score(struct engine *e, struct engine_text *texts, int n, char *err, size_t errlen);
/* What `rrnserve run` and POST /score say of a text whose logprob is not
 * finite (an Inf or NaN that JSON cannot hold): an error, not a null. */
#define ENGINE_SCORE_NOT_FINITE "its log-probability under the model is not finite (the model's numbers overflow on it)"

/* A slot's whole state as a flat array of engine_slot_state_len floats,
 * to keep (a training checkpoint) and to put back into an open slot with
 * the number of tokens it had consumed. */
size_t engine_slot_state_len(const struct engine *e);
int engine_slot_save(struct engine *e, int slot, float *state);
int engine_slot_restore(struct engine *e, int slot, const float *state, int position);

/* Feed tokens[i] to slots[i] (distinct slots) and write the next-token
 * logits to logits[i*V ...].  attention, when not NULL, gets [n][L][K]. */
int engine_step(struct engine *e, const int *slots, const int32_t *tokens, int n,
                float *logits, float *attention, char *err, size_t errlen);

/* ---- Training.  The backend must implement the backward operations (the
 * CPU backend does). */

/* Loss of a batch, summed, and what it was summed over. */
struct train_result {
    double loss;      /* sum of the per-item losses */
    long count;       /* items: sequences (classify) or scored tokens (lm) */
    long tokens;      /* steps the batch ran (for tokens per second) */
};

/* Regularisation of a training batch. */
struct train_options {
    float dropout;            /* on the input of every layer but the first */
    float dropout_embed;      /* on the first layer's input (the embedding) */
    unsigned long long seed;  /* the dropout masks */
};

/* Forward and backward over a batch, adding the gradient of the mean loss
 * (over the batch's items) to the engine's gradients.  Language models
 * score each token against the next (the last against seq.next, when
 * given) and may carry their state through slots, as engine_forward does;
 * no gradient flows into the carried state (truncated backpropagation).
 * Classifiers take labels[i] for sequence i. */
int engine_train_batch(struct engine *e, struct engine_seq *seqs, int n, const int *labels,
                       const struct train_options *opt, struct train_result *res, char *err, size_t errlen);

/* The optimizer runs where the weights are, on the backend, so that a
 * training step moves nothing of the model between host and device:
 * engine_optim_step applies one step (optim_update.h) of the gradients
 * added up since engine_zero_grads to the weights the engine runs (and
 * drops the token tables, which no longer match them), keeping the
 * optimizer's state beside them: len = optim_state_arrays() * n_params
 * floats, zeros until the first step or engine_optim_state_from_host.
 * *grad_norm gets the gradients' L2 norm before clipping; where it is not
 * finite (the training diverged), the step changed nothing.
 * The rest copies between the backend and host arrays laid out as the
 * model's arena (n_params floats): the gradients (for tests), the weights
 * (to save them, or to start again from saved ones) and the optimizer's
 * state (checkpoints).  Each returns 0, or -1 on a backend error or out of
 * memory. */
int engine_zero_grads(struct engine *e);
int engine_optim_step(struct engine *e, const struct optim_update *u, double *grad_norm);
int engine_grads_to_host(struct engine *e, float *g);
int engine_params_to_host(struct engine *e, float *p);
int engine_params_from_host(struct engine *e, const float *p);
int engine_optim_state_to_host(struct engine *e, float *s, size_t len);
int engine_optim_state_from_host(struct engine *e, const float *s, size_t len);

/* Bytes of backend memory held by the token tables: layer 0's projection
 * of every token, read instead of computed (0 when the engine has none). */
size_t engine_token_table_bytes(const struct engine *e);

/* Bytes of backend memory held by packed copies of the weight matrices
 * (0 where the backend does not pack them, or they were dropped). */
size_t engine_packed_bytes(const struct engine *e);

/* Bytes of scratch memory the engine holds, on its backend and the host:
 * each buffer grows to what the largest call so far needed, and stays. */
size_t engine_scratch_bytes(const struct engine *e);

/* Shapes of steps and forwards whose work the engine replays from a
 * recorded graph (0 on backends that do not record graphs, the CPU). */
size_t engine_graph_count(const struct engine *e);

#endif
