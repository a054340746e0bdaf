/* model_json.c - a model made from a config in a test (see model_json.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "config.h"
#include "init.h"
#include "model_json.h"

void model_from_json(const char *json, int orthogonal, uint64_t seed, struct model *m)
{
    char err[512];
    struct model_config cfg;
    if (config_parse(json, &cfg, err, sizeof err) || model_alloc(m, &cfg, err, sizeof err))
        fail_msg("%s", err);
    const struct init_options init = {orthogonal, 1.0f};
    if (model_init(m, &init, seed))
        fail_msg("model_init: out of memory");
}
