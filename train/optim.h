/* optim.h - optimizers, learning-rate schedule and gradient clipping over a
 * model's parameters as one flat float array (struct model keeps every
 * parameter in one arena, and the trainer keeps the gradients in an arena
 * of the same layout).
 *
 * Optimizers: SGD with (optionally Nesterov) momentum, RMSprop, Adam, AdamW
 * (decoupled weight decay) and Adadelta, with PyTorch's update rules and
 * defaults, so a configuration ported from PyTorch behaves the same.
 * Everything is deterministic: the same gradients give the same bits.
 */
#ifndef RRN_OPTIM_H
#define RRN_OPTIM_H

#include <stddef.h>

enum optim_kind { OPTIM_SGD, OPTIM_RMSPROP, OPTIM_ADAM, OPTIM_ADAMW, OPTIM_ADADELTA };
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
/* Name <-> kind ("sgd", "rmsprop", "adam", "adamw", "adadelta"); -1 if unknown. */
int optim_kind_from_name(const char *name);
const char *optim_kind_name(enum optim_kind kind);

struct optim;

struct optim *optim_new(const struct optim_config *c, size_t n_params);
void optim_free(struct optim *o);

/* The learning rate at step (0-based) under the schedule. */
float optim_lr(const struct optim_config *c, long step);

/* Scale grad so its L2 norm is at most max_norm (when max_norm > 0);
 * returns the norm before clipping (in double). */
double optim_clip(float *grad, size_t n, float max_norm);

/* One update of params from grad at the given step (0-based). */
void optim_step(struct optim *o, float *params, const float *grad, long step);

/* The optimizer's state (moment estimates and the like) as a flat float
 * array, for checkpoints: its length, a pointer to read it and a way to
 * restore it. */
size_t optim_state_len(const struct optim *o);
float *optim_state(struct optim *o);

#endif
