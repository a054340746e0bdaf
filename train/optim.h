/* optim.h - the optimizers' options, the learning-rate schedule and
 * gradient clipping, and the scalars of each step's update.
 *
 * Optimizers: SGD with (optionally Nesterov) momentum, RMSprop, Adam, AdamW
 * (decoupled weight decay) and Adadelta, with PyTorch's update rules and
 * defaults, so a configuration ported from PyTorch behaves the same.  The
 * update runs where the weights are, on the engine's backend
 * (engine_optim_step), over the model's parameters as one flat array;
 * everything is deterministic: the same gradients give the same bits, on
 * the CPU and on a GPU alike.
 */
#ifndef RRN_OPTIM_H
#define RRN_OPTIM_H

#include <stddef.h>

#include "optim_update.h"

enum lr_decay { DECAY_NONE, DECAY_LINEAR, DECAY_COSINE, DECAY_STEP };

struct optim_config {
    enum optim_kind kind;
    float lr;            /* peak learning rate */
    float momentum;      /* sgd; rmsprop's momentum */
    int nesterov;        /* sgd */
    float beta1, beta2;  /* adam, adamw */
    float alpha;         /* rmsprop's smoothing constant (PyTorch's alpha) */
    float rho;           /* adadelta */
    float eps;
    float weight_decay;  /* L2 for sgd/rmsprop/adam/adadelta, decoupled for adamw */
    float clip_norm;     /* global gradient-norm clipping; 0 = off */
    long warmup_steps;   /* linear warm-up from 0 to lr */
    enum lr_decay decay; /* after warm-up, until total_steps */
    long total_steps;
    float min_lr;        /* floor of linear/cosine decay */
    long step_every;     /* DECAY_STEP: multiply by step_gamma every step_every steps */
    float step_gamma;
};

/* PyTorch's defaults for kind (lr included). */
void optim_defaults(struct optim_config *c, enum optim_kind kind);
/* The kind named name ("sgd", "rmsprop", "adam", "adamw", "adadelta"); -1 if unknown. */
int optim_kind_from_name(const char *name);

/* The learning rate at step (0-based) under the schedule. */
float optim_lr(const struct optim_config *c, long step);

/* The update of step (0-based): its learning rate by the schedule, its
 * bias corrections, the clipping. */
void optim_update_at(const struct optim_config *c, long step, struct optim_update *u);

#endif
