/* optim.c - the optimizers' options and defaults, the learning-rate
 * schedule, and each step's scalars (optim.h).
 *
 * The updates themselves run on the backend, beside the weights
 * (engine_optim_step; the rules are engine/optim_update.h).  What is
 * worked out here is what PyTorch works out in Python, in double, from
 * the options as the decimals they were written as, so that the
 * parameters match PyTorch's to float rounding.  tests/test_optim.c checks
 * five steps of every optimizer against values PyTorch produced.
 */
#include "optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const kind_names[] = {
    [OPTIM_SGD] = "sgd", [OPTIM_RMSPROP] = "rmsprop", [OPTIM_ADAM] = "adam",
    [OPTIM_ADAMW] = "adamw", [OPTIM_ADADELTA] = "adadelta",
};
#define N_KINDS ((int)(sizeof kind_names / sizeof kind_names[0]))
/* M_PI is not in C11 or POSIX. */
#define PI 3.14159265358979323846

void optim_defaults(struct optim_config *c, enum optim_kind kind)
{
    memset(c, 0, sizeof *c);
    c->kind = kind;
    /* PyTorch 1.13's SGD has no default lr (it is required); 1e-3 is the
     * one later releases give it. */
    c->lr = 1e-3f;
    c->beta1 = 0.9f;
    c->beta2 = 0.999f;
    c->alpha = 0.99f;
    c->rho = 0.9f;
    c->eps = 1e-8f;
    c->step_gamma = 0.1f; /* StepLR's default */
    switch (kind) {
    case OPTIM_RMSPROP:
        c->lr = 1e-2f;
        break;
    case OPTIM_ADAMW:
        c->weight_decay = 1e-2f;
        break;
    case OPTIM_ADADELTA:
        c->lr = 1.0f;
        c->eps = 1e-6f;
        break;
    case OPTIM_SGD:
    case OPTIM_ADAM:
        break;
    }
}

int optim_kind_from_name(const char *name)
{
    for (int k = 0; k < N_KINDS; k++) {
        if (strcmp(name, kind_names[k]) == 0)
            return k;
    }
    return -1;
}

/* The double that the shortest decimal reading back as f stands for: 0.999
 * for 0.999f, which is 0.99900001287....  Options are written as decimals
 * and PyTorch keeps them as doubles; computed from the float, 1 - beta2
 * would be 1.3e-5 off, which moves Adam's steps by a hundred float ulps. */
static double decimal(float f)
{
    char buf[32];

    for (int digits = 1; digits < 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, (double)f);
        double d = strtod(buf, NULL);
        if ((float)d == f)
            return d;
    }
    return f; /* 9 digits: not a decimal anyone wrote, so take it as it is */
}

float optim_lr(const struct optim_config *c, long step)
{
    double peak = c->lr, floor_lr = c->min_lr;

    if (step < c->warmup_steps)
        return (float)(peak * (double)step / (double)c->warmup_steps);
    long since = step - c->warmup_steps;
    long span = c->total_steps - c->warmup_steps;
    /* Where the decay stands, 0 at the end of warm-up to 1 at total_steps
     * and after it (at once when total_steps leaves no room to decay). */
    double progress = span > 0 && since < span ? (double)since / (double)span : 1.0;
    switch (c->decay) {
    case DECAY_NONE:
        return c->lr;
    case DECAY_LINEAR:
        return (float)(floor_lr + (peak - floor_lr) * (1.0 - progress));
    case DECAY_COSINE:
        return (float)(floor_lr + (peak - floor_lr) * 0.5 * (1.0 + cos(PI * progress)));
    case DECAY_STEP:
        if (c->step_every <= 0)
            return c->lr;
        return (float)(peak * pow(c->step_gamma, (double)(since / c->step_every)));
    }
    return c->lr;
}

void optim_update_at(const struct optim_config *c, long step, struct optim_update *u)
{
    /* PyTorch hands the update its lr as a Python float, and works out
     * 1 - beta2, beta2^t and the like from the decimals the smoothing
     * constants were written as. */
    const double lr = decimal(optim_lr(c, step));
    const long t = step + 1; /* Adam's 1-based step count */
    const int adam = c->kind == OPTIM_ADAM || c->kind == OPTIM_ADAMW;
    const float rate = adam ? c->beta1 : c->kind == OPTIM_RMSPROP ? c->alpha : c->rho;
    const double decay = decimal(rate);

    *u = (struct optim_update){
        .kind = c->kind,
        .nesterov = c->nesterov,
        .neg_lr = (float)-lr,
        .momentum = c->momentum,
        .decay = rate,
        .one_minus = (float)(1.0 - decay),
        .decay2 = c->beta2,
        .one_minus2 = (float)(1.0 - decimal(c->beta2)),
        .bc2_sqrt = 1.0f,
        .eps = c->eps,
        .weight_decay = c->kind == OPTIM_ADAMW ? 0.0f : c->weight_decay,
        .shrink = (float)(1.0 - lr * decimal(c->weight_decay)),
        .clip_norm = c->clip_norm,
    };
    if (adam) {
        u->neg_lr = (float)-(lr / (1.0 - pow(decay, (double)t)));
        u->bc2_sqrt = (float)sqrt(1.0 - pow(decimal(c->beta2), (double)t));
    }
}
