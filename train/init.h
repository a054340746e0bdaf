/* init.h - the starting weights of a model to train.
 *
 * As PyTorch initialises the same modules, so a model trained here starts
 * where it would start there: recurrent layers, the residual projections
 * and the attention queries uniform in +-1/sqrt(H), the embedding N(0, 1),
 * the head uniform in +-1/sqrt(fan_in); static attention logits 0 (uniform
 * attention).  Then, as the papers advise, each recurrent matrix's H x H
 * gate blocks are made orthogonal, and an LSTM's forget-gate bias starts at
 * forget_bias so the cell remembers from the first step.
 */
#ifndef RRN_INIT_H
#define RRN_INIT_H

#include <stdint.h>

#include "model.h"

struct init_options {
    int orthogonal;     /* recurrent gate blocks orthogonal */
    float forget_bias;  /* added to b_ih's forget gate (LSTM) */
};

/* 0, or -1 when out of memory (the orthogonal factorisations' buffers). */
int model_init(struct model *m, const struct init_options *o, uint64_t seed);

#endif
