/* fuzz_config.c - libFuzzer target for config_parse, the parser of a weight
 * file's "config" metadata (engine/config.c).
 *
 * The input is taken as the JSON text.  A config that parses must also
 * print (config_to_json, config_to_json_pretty), parse again from what was
 * printed to the same JSON, and give a tokenizer or a clean refusal; any
 * other outcome aborts, so libFuzzer reports it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *json = malloc(size + 1), err[256];
    if (!json)
        return 0;
    memcpy(json, data, size);
    json[size] = 0;
    struct model_config cfg;
    if (config_parse(json, &cfg, err, sizeof err) != 0) {
        if (!err[0])
            abort(); /* every refusal says why */
        free(json);
        return 0;
    }
    char *once = config_to_json(&cfg), *pretty = config_to_json_pretty(&cfg);
    if (!once || !pretty)
        abort();
    struct model_config again;
    if (config_parse(once, &again, err, sizeof err) != 0) {
        fprintf(stderr, "a printed config does not parse: %s\n%s\n", err, once);
        abort();
    }
    char *twice = config_to_json(&again);
    if (!twice || strcmp(once, twice) != 0) {
        fprintf(stderr, "the config changed on a round trip:\n%s\n%s\n", once, twice ? twice : "(null)");
        abort();
    }
    /* The derived sizes the loader relies on. */
    if (config_gates(&cfg) < 1 || config_directions(&cfg) < 1 || (config_vocab(&cfg) < 1) != (cfg.input_dim > 0) ||
        config_head_out(&cfg) < 1 || config_output_width(&cfg) < 1)
        abort();
    for (int l = 0; l < cfg.layers; l++)
        if (config_layer_input(&cfg, l) < 1)
            abort();
    struct tokenizer tk;
    if (tokenizer_init(&tk, &cfg, err, sizeof err) == 0)
        tokenizer_free(&tk);
    free(twice);
    free(once);
    free(pretty);
    config_free(&again);
    config_free(&cfg);
    free(json);
    return 0;
}
