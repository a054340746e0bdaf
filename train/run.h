/* run.h - one training run: what train.c drives step by step and
 * checkpoint.c saves and puts back.
 */
#ifndef RRN_RUN_H
#define RRN_RUN_H

#include "engine.h"
#include "options.h"
#include "report.h"
#include "rng.h"
#include "tokenizer.h"

struct run {
    struct options o;
    struct model model;
    struct tokenizer tk;
    struct backend *be;
    /* The engine holds the weights that training changes, their gradients
     * and the optimizer's state; model.arena is brought up to date from it
     * only to be saved (run_sync_weights). */
    struct engine *e;
    /* lm */
    struct corpus train_c, valid_c;
    struct lm_windows win;
    int32_t *window;            /* [B][bptt + 1] */
    int *slots;
    /* classify */
    struct dataset train_d, valid_d;
    int *order, *batch_start, n_batches, next_batch;
    struct rng rng, epoch_rng;
    long step, total_steps, epoch;
    struct curve curve;
    char csv[4096], svg[4096];
    float *best;               /* keep_best: the weights at the best validation */
    double loss_sum;           /* training loss since the last curve point */
    long loss_count, tokens;
    double norm_sum;           /* the gradients' norms since then, of norm_steps steps */
    long norm_steps;
    struct curve_point best_at;
};

static inline int run_is_lm(const struct run *r)
{
    return r->model.cfg.task == TASK_LM;
}

/* model.arena made the weights the engine has trained, for saving. */
int run_sync_weights(struct run *r, char *err, size_t errlen);

#endif
