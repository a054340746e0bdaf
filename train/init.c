/* init.c - PyTorch-like initialisation with orthogonal recurrent blocks
 * (see init.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <lapacke.h>

#include "init.h"
#include "rng.h"

static void uniform(float *x, size_t n, float bound, struct rng *r)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)((2.0 * rng_uniform(r) - 1.0) * bound);
}

/* Standard normal by Box-Muller. */
static double normal(struct rng *r)
{
    double u = 1.0 - rng_uniform(r), v = rng_uniform(r);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* An H x H orthogonal matrix into a block of rows with stride ld, drawn as
 * torch.nn.init.orthogonal_ draws one: the orthogonal factor of a Gaussian
 * matrix's QR factorisation (LAPACK, in double), each of its vectors
 * times the sign of R's diagonal there, which makes it uniform over the
 * orthogonal matrices (LAPACK's own signs would not).  LAPACK reads the
 * row-major draw A as the column-major A^T = QR, so the rows written, Q's
 * columns, are A's rows orthonormalised in order, as Gram-Schmidt gives
 * them. */
static int orthogonal(float *x, int H, int ld, struct rng *r)
{
    double *a = malloc(sizeof(double) * (size_t)H * H), *tau = malloc(sizeof(double) * (size_t)H);
    signed char *sign = malloc((size_t)H);
    int rc = -1;
    if (!a || !tau || !sign)
        goto out;
    for (size_t i = 0; i < (size_t)H * H; i++)
        a[i] = normal(r);
    if (LAPACKE_dgeqrf(LAPACK_COL_MAJOR, H, H, a, H, tau))
        goto out;
    for (int i = 0; i < H; i++)
        sign[i] = a[(size_t)i * H + i] < 0 ? -1 : 1;
    if (LAPACKE_dorgqr(LAPACK_COL_MAJOR, H, H, H, a, H, tau))
        goto out;
    for (int i = 0; i < H; i++)
        for (int k = 0; k < H; k++)
            x[(size_t)i * ld + k] = (float)(sign[i] * a[(size_t)i * H + k]);
    rc = 0;
out:
    free(a);
    free(tau);
    free(sign);
    return rc;
}

int model_init(struct model *m, const struct init_options *o, uint64_t seed)
{
    const struct model_config *c = &m->cfg;
    const int H = c->hidden, G = config_gates(c), D = config_directions(c);
    const float bound = 1.0f / sqrtf((float)H);
    struct rng r;
    rng_seed(&r, seed);
    for (size_t i = 0; i < (size_t)m->vocab * c->embed_dim; i++)
        m->embedding[i] = (float)normal(&r);
    for (int l = 0; l < c->layers; l++) {
        struct layer_params *lp = &m->layers[l];
        for (int d = 0; d < D; d++) {
            struct layer_dir_params *p = &lp->dir[d];
            uniform(p->w_ih, (size_t)G * H * lp->in, bound, &r);
            uniform(p->b_ih, (size_t)G * H, bound, &r);
            uniform(p->b_hh, (size_t)G * H, bound, &r);
            for (int j = 0; j < c->skip_matrices; j++) {
                uniform(p->w_hh[j], (size_t)G * H * H, bound, &r);
                for (int g = 0; o->orthogonal && g < G; g++)
                    if (orthogonal(p->w_hh[j] + (size_t)g * H * H, H, H, &r))
                        return -1;
            }
            if (c->cell == CELL_LSTM)
                for (int k = 0; k < H; k++)
                    p->b_ih[H + k] += o->forget_bias;
            if (p->peephole)
                uniform(p->peephole, (size_t)H, bound, &r);
            if (p->attn_logits)
                memset(p->attn_logits, 0, sizeof(float) * (size_t)c->attn_window);
            if (p->attn_query)
                uniform(p->attn_query, (size_t)H * H, bound, &r);
        }
        if (lp->residual_proj)
            uniform(lp->residual_proj, (size_t)config_output_width(c) * lp->residual_from,
                    1.0f / sqrtf((float)lp->residual_from), &r);
    }
    int W = config_output_width(c);
    uniform(m->head_w, (size_t)m->head_out * W, 1.0f / sqrtf((float)W), &r);
    uniform(m->head_b, (size_t)m->head_out, 1.0f / sqrtf((float)W), &r);
    return 0;
}
