/* model_json.h - a model a test describes by its config JSON, its weights
 * drawn as `rrnserve train` draws a new model's (train/init.c, forget
 * bias 1). */
#ifndef RRN_TEST_MODEL_JSON_H
#define RRN_TEST_MODEL_JSON_H

#include <stdint.h>

#include "model.h"

/* Fails the test, with the parser's or the allocator's message, where the
 * config or the model cannot be made.  orthogonal: init.orthogonal. */
void model_from_json(const char *json, int orthogonal, uint64_t seed, struct model *m);

#endif
