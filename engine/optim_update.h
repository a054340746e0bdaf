/* optim_update.h - the arithmetic of one optimizer step for one parameter,
 * shared by the CPU backend (backend_cpu.c) and its CUDA twin
 * (cuda_train.cu), so that the weights a training step leaves do not
 * depend on where it ran: the backends differ in how they walk the
 * parameters (a loop; a thread each) and how they sum the gradients'
 * squares for clipping, never in the formulas, which live here once.
 *
 * Each rule follows PyTorch 1.13's single-tensor code operation by
 * operation, in float; the step's scalars (learning rate, bias
 * corrections) are worked out once on the host, in double as Python does
 * (train/optim.c, optim_update_at).  Every product that feeds a sum goes
 * through OPTIM_MUL, which on a GPU is __fmul_rn: nvcc would otherwise
 * fuse it with the sum into one FMA, rounding once where the CPU and
 * PyTorch round twice, and the two backends would part by an ulp a step.
 */
#ifndef RRN_OPTIM_UPDATE_H
#define RRN_OPTIM_UPDATE_H

#include <math.h>
#include <stddef.h>

#ifdef __CUDACC__
#define OPTIM_FN __host__ __device__ static inline
#else
#define OPTIM_FN static inline __attribute__((always_inline))
#endif
#ifdef __CUDA_ARCH__
#define OPTIM_MUL(a, b) __fmul_rn((a), (b))
#else
#define OPTIM_MUL(a, b) ((a) * (b))
#endif

enum optim_kind { OPTIM_SGD, OPTIM_RMSPROP, OPTIM_ADAM, OPTIM_ADAMW, OPTIM_ADADELTA };

/* One step's update, its scalars as the rules read them. */
struct optim_update {
    enum optim_kind kind;
    int nesterov;        /* sgd */
    float neg_lr;        /* -lr; adam: -lr / (1 - beta1^t) */
    float momentum;      /* sgd, rmsprop; 0: none */
    float decay;         /* the first moving average's rate: rmsprop's alpha, adadelta's rho, adam's beta1 */
    float one_minus;     /* 1 - decay, from the decimal it was written as */
    float decay2;        /* adam's beta2 */
    float one_minus2;    /* 1 - beta2 */
    float bc2_sqrt;      /* adam: sqrt(1 - beta2^t) */
    float eps;
    float weight_decay;  /* L2 folded into the gradient (adamw: 0) */
    float shrink;        /* adamw: 1 - lr * weight_decay, applied to p first */
    float clip_norm;     /* > 0: the gradients are first scaled to an L2 norm of at most this */
};

/* How many arrays of n floats of state a kind keeps, back to back: sgd
 * its momentum buffer (when momentum != 0); rmsprop the square average,
 * then the momentum buffer (when momentum > 0); adam and adamw the first
 * and second moments; adadelta the square average and the accumulated
 * delta.  Zero is where PyTorch starts each of them (SGD starts its buffer
 * as a copy of the first gradient, which buf * momentum + d gives from
 * zero, since it has no dampening). */
OPTIM_FN int optim_state_arrays(enum optim_kind kind, float momentum)
{
    switch (kind) {
    case OPTIM_SGD:
        return momentum != 0.0f;
    case OPTIM_RMSPROP:
        return 1 + (momentum > 0.0f);
    case OPTIM_ADAM:
    case OPTIM_ADAMW:
    case OPTIM_ADADELTA:
        return 2;
    }
    return 0;
}

/* What the gradients are multiplied by for clipping, from the sum of their
 * squares: max_norm / norm when the norm is over max_norm > 0, else 1.
 * Unlike torch.nn.utils.clip_grad_norm_, no 1e-6 in the denominator: the
 * clipped norm is max_norm itself, to float rounding. */
OPTIM_FN double optim_clip_scale(double sum_squares, float max_norm)
{
    double norm = sqrt(sum_squares);
    return max_norm > 0.0f && norm > max_norm ? max_norm / norm : 1.0;
}

/* PyTorch folds L2 weight decay into the gradient: d_p = grad + wd * p. */
OPTIM_FN float optim_decayed(float g, float p, float wd)
{
    return wd != 0.0f ? g + OPTIM_MUL(wd, p) : g;
}

/* Parameter i of n: p its value, g its gradient (clipped), state the kind's
 * arrays (optim_state_arrays) of n floats each. */
OPTIM_FN void optim_update_element(const struct optim_update u, size_t n, size_t i, float *p, float g,
                                   float *state)
{
    switch (u.kind) {
    case OPTIM_SGD: {
        float d = optim_decayed(g, *p, u.weight_decay);
        if (u.momentum != 0.0f) {
            state[i] = OPTIM_MUL(state[i], u.momentum) + d;
            d = u.nesterov ? d + OPTIM_MUL(u.momentum, state[i]) : state[i];
        }
        *p = *p + OPTIM_MUL(u.neg_lr, d);
        break;
    }
    case OPTIM_RMSPROP: {
        g = optim_decayed(g, *p, u.weight_decay);
        state[i] = OPTIM_MUL(state[i], u.decay) + OPTIM_MUL(OPTIM_MUL(u.one_minus, g), g);
        float avg = sqrtf(state[i]) + u.eps;
        if (u.momentum > 0.0f) {
            state[n + i] = OPTIM_MUL(state[n + i], u.momentum) + g / avg;
            *p = *p + OPTIM_MUL(u.neg_lr, state[n + i]);
        } else {
            *p = *p + OPTIM_MUL(u.neg_lr, g) / avg;
        }
        break;
    }
    case OPTIM_ADAM:
    case OPTIM_ADAMW: {
        float wd = u.weight_decay;
        if (u.kind == OPTIM_ADAMW) {
            *p = OPTIM_MUL(*p, u.shrink);
            wd = 0.0f;
        }
        g = optim_decayed(g, *p, wd);
        state[i] = OPTIM_MUL(state[i], u.decay) + OPTIM_MUL(u.one_minus, g);
        state[n + i] = OPTIM_MUL(state[n + i], u.decay2) + OPTIM_MUL(OPTIM_MUL(u.one_minus2, g), g);
        float denom = sqrtf(state[n + i]) / u.bc2_sqrt + u.eps;
        *p = *p + OPTIM_MUL(u.neg_lr, state[i]) / denom;
        break;
    }
    case OPTIM_ADADELTA: {
        g = optim_decayed(g, *p, u.weight_decay);
        state[i] = OPTIM_MUL(state[i], u.decay) + OPTIM_MUL(OPTIM_MUL(u.one_minus, g), g);
        float delta = OPTIM_MUL(sqrtf(state[n + i] + u.eps) / sqrtf(state[i] + u.eps), g);
        state[n + i] = OPTIM_MUL(state[n + i], u.decay) + OPTIM_MUL(OPTIM_MUL(u.one_minus, delta), delta);
        *p = *p + OPTIM_MUL(u.neg_lr, delta);
        break;
    }
    }
}

#endif
