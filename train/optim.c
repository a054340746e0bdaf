/* optim.c - the optimizers, the learning-rate schedule and gradient
 * clipping of optim.h.
 *
 * Each update follows PyTorch 1.13's single-tensor code (the torch/optim
 * sources) operation by operation, in float, with the scalar coefficients
 * worked out in double as Python does, so the parameters match PyTorch's
 * to float rounding.  tests/test_optim.c checks five steps of every optimizer
 * against values PyTorch produced.
 */
#include "optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct optim {
    struct optim_config c;
    size_t n;
    /* The moment estimates, one or two arrays of n floats back to back:
     * sgd: momentum buffer (when momentum != 0); rmsprop: square average,
     * then the momentum buffer (when momentum > 0); adam, adamw: first and
     * second moments; adadelta: square average and accumulated delta. */
    float *state;
    size_t state_len;
    /* The smoothing constants as the decimals they were written as (see
     * decimal()): PyTorch works out 1 - beta2, beta2^t and the like from
     * those. */
    double alpha, rho, beta1, beta2, weight_decay;
};

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

const char *optim_kind_name(enum optim_kind kind)
{
    return (int)kind >= 0 && (int)kind < N_KINDS ? kind_names[kind] : "unknown";
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

/* How many arrays of n floats of state the configuration needs. */
static size_t state_arrays(const struct optim_config *c)
{
    switch (c->kind) {
    case OPTIM_SGD:
        return c->momentum != 0.0f;
    case OPTIM_RMSPROP:
        return 1 + (c->momentum > 0.0f);
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
    case OPTIM_ADADELTA:
        return 2;
    }
    return 0;
}

struct optim *optim_new(const struct optim_config *c, size_t n_params)
{
    if ((int)c->kind < 0 || (int)c->kind >= N_KINDS)
        return NULL;
    struct optim *o = calloc(1, sizeof *o);
    if (!o)
        return NULL;
    o->c = *c;
    o->n = n_params;
    o->alpha = decimal(c->alpha);
    o->rho = decimal(c->rho);
    o->beta1 = decimal(c->beta1);
    o->beta2 = decimal(c->beta2);
    o->weight_decay = decimal(c->weight_decay);
    size_t arrays = state_arrays(c);
    if (n_params > 0 && arrays > 0) {
        if (n_params > (size_t)-1 / sizeof(float) / arrays) {
            free(o);
            return NULL;
        }
        o->state_len = arrays * n_params;
        /* Zero is where PyTorch starts every moment.  SGD starts its
         * momentum buffer as a copy of the first gradient instead, which
         * buf * momentum + d gives exactly from zero, since it has no
         * dampening. */
        o->state = calloc(o->state_len, sizeof(float));
        if (!o->state) {
            free(o);
            return NULL;
        }
    }
    return o;
}

void optim_free(struct optim *o)
{
    if (!o)
        return;
    free(o->state);
    free(o);
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

double optim_clip(float *grad, size_t n, float max_norm)
{
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += (double)grad[i] * grad[i];
    double norm = sqrt(sum);
    /* Unlike torch.nn.utils.clip_grad_norm_, no 1e-6 in the denominator:
     * the clipped norm is max_norm itself, to float rounding. */
    if (max_norm > 0.0f && norm > max_norm) {
        double scale = max_norm / norm;
        for (size_t i = 0; i < n; i++)
            grad[i] = (float)(grad[i] * scale);
    }
    return norm;
}

/* PyTorch folds L2 weight decay into the gradient: d_p = grad + wd * p. */
static float decayed(float g, float p, float wd)
{
    return wd != 0.0f ? g + wd * p : g;
}

static void step_sgd(const struct optim *o, float *p, const float *grad, double lr)
{
    float *buf = o->state;
    const float m = o->c.momentum, wd = o->c.weight_decay, neg_lr = (float)-lr;

    for (size_t i = 0; i < o->n; i++) {
        float d = decayed(grad[i], p[i], wd);
        if (m != 0.0f) {
            buf[i] = buf[i] * m + d;
            d = o->c.nesterov ? d + m * buf[i] : buf[i];
        }
        p[i] = p[i] + neg_lr * d;
    }
}

static void step_rmsprop(const struct optim *o, float *p, const float *grad, double lr)
{
    float *sq = o->state, *buf = o->state + o->n;
    const float alpha = o->c.alpha, one_minus = (float)(1.0 - o->alpha), eps = o->c.eps;
    const float m = o->c.momentum, wd = o->c.weight_decay, neg_lr = (float)-lr;

    for (size_t i = 0; i < o->n; i++) {
        float g = decayed(grad[i], p[i], wd);
        sq[i] = sq[i] * alpha + one_minus * g * g;
        float avg = sqrtf(sq[i]) + eps;
        if (m > 0.0f) {
            buf[i] = buf[i] * m + g / avg;
            p[i] = p[i] + neg_lr * buf[i];
        } else {
            p[i] = p[i] + neg_lr * g / avg;
        }
    }
}

/* Adam and AdamW; t is PyTorch's 1-based step count. */
static void step_adam(const struct optim *o, float *p, const float *grad, double lr, long t)
{
    float *m1 = o->state, *m2 = o->state + o->n;
    const float beta1 = o->c.beta1, beta2 = o->c.beta2;
    const float one_minus1 = (float)(1.0 - o->beta1), one_minus2 = (float)(1.0 - o->beta2);
    const float neg_step = (float)-(lr / (1.0 - pow(o->beta1, (double)t)));
    const float bc2_sqrt = (float)sqrt(1.0 - pow(o->beta2, (double)t));
    const float eps = o->c.eps;
    const int decoupled = o->c.kind == OPTIM_ADAMW;
    const float wd = decoupled ? 0.0f : o->c.weight_decay;
    const float shrink = (float)(1.0 - lr * o->weight_decay);

    for (size_t i = 0; i < o->n; i++) {
        if (decoupled)
            p[i] = p[i] * shrink;
        float g = decayed(grad[i], p[i], wd);
        m1[i] = m1[i] * beta1 + one_minus1 * g;
        m2[i] = m2[i] * beta2 + one_minus2 * g * g;
        float denom = sqrtf(m2[i]) / bc2_sqrt + eps;
        p[i] = p[i] + neg_step * m1[i] / denom;
    }
}

static void step_adadelta(const struct optim *o, float *p, const float *grad, double lr)
{
    float *sq = o->state, *acc = o->state + o->n;
    const float rho = o->c.rho, one_minus = (float)(1.0 - o->rho), eps = o->c.eps;
    const float wd = o->c.weight_decay, neg_lr = (float)-lr;

    for (size_t i = 0; i < o->n; i++) {
        float g = decayed(grad[i], p[i], wd);
        sq[i] = sq[i] * rho + one_minus * g * g;
        float std = sqrtf(sq[i] + eps);
        float delta = sqrtf(acc[i] + eps) / std * g;
        acc[i] = acc[i] * rho + one_minus * delta * delta;
        p[i] = p[i] + neg_lr * delta;
    }
}

void optim_step(struct optim *o, float *params, const float *grad, long step)
{
    /* PyTorch hands the update its lr as a Python float. */
    const double lr = decimal(optim_lr(&o->c, step));

    if (o->n == 0)
        return; /* and there is no state to point into */

    switch (o->c.kind) {
    case OPTIM_SGD:
        step_sgd(o, params, grad, lr);
        break;
    case OPTIM_RMSPROP:
        step_rmsprop(o, params, grad, lr);
        break;
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
        step_adam(o, params, grad, lr, step + 1);
        break;
    case OPTIM_ADADELTA:
        step_adadelta(o, params, grad, lr);
        break;
    }
}

size_t optim_state_len(const struct optim *o)
{
    return o->state_len;
}

float *optim_state(struct optim *o)
{
    return o->state;
}
