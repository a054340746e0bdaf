/* cmd_info.c - `rrnserve info FILE`: what a weight file holds.
 *
 * Prints the config, the parameter count, the tensor table and whether the
 * data matches its checksum, then runs the full loader over the file and
 * builds its tokenizer, as the server and `run` do, so that the exit status
 * says whether they would accept it.  Everything the
 * file shows is printed even when it is not servable: someone debugging a
 * rejected file wants to see what is in it next to the reason.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "commands.h"
#include "config.h"
#include "model.h"
#include "safetensors.h"
#include "tokenizer.h"

static const char *dtype_name(enum st_dtype d)
{
    switch (d) {
    case ST_F32:
        return "F32";
    case ST_F16:
        return "F16";
    case ST_BF16:
        return "BF16";
    }
    return "?";
}

static void print_config(const struct st_file *f)
{
    const char *json = st_meta_get(f, "config");
    struct model_config cfg;
    if (!json) {
        printf("config: (missing)\n");
        return;
    }
    if (config_parse(json, &cfg, NULL, 0) != 0) {
        printf("config (invalid): %s\n", json);
        return;
    }
    char *pretty = config_to_json_pretty(&cfg);
    printf("config: %s\n", pretty ? pretty : "(out of memory)");
    free(pretty);
    config_free(&cfg);
}

static void print_tensors(const struct st_file *f)
{
    int width = 4;
    int64_t params = 0;
    for (int i = 0; i < f->n_tensors; i++) {
        int len = (int)strlen(f->tensors[i].name);
        width = len > width ? len : width;
        params += f->tensors[i].numel;
    }
    printf("parameters: %" PRId64 "\n", params);
    printf("tensors: %d (%zu bytes of data)\n", f->n_tensors, f->data_size);
    printf("  %-*s  %-5s  %-16s  %s\n", width, "name", "dtype", "shape", "bytes");
    for (int i = 0; i < f->n_tensors; i++) {
        const struct st_tensor *t = &f->tensors[i];
        char shape[256];
        size_t used = (size_t)snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < t->ndim && used < sizeof shape; d++)
            used += (size_t)snprintf(shape + used, sizeof shape - used, "%s%" PRId64, d ? ", " : "",
                                     t->shape[d]);
        if (used < sizeof shape)
            snprintf(shape + used, sizeof shape - used, "]");
        printf("  %-*s  %-5s  %-16s  %zu\n", width, t->name, dtype_name(t->dtype), shape, t->nbytes);
    }
}

int cmd_info(int argc, char **argv)
{
    const int help = argc == 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0);
    if (argc != 2 || help) {
        fprintf(help ? stdout : stderr, "usage: rrnserve info FILE\n"
                                        "Prints a weight file's config, its tensors and whether its checksum holds;\n"
                                        "exits 1 where run or serve would refuse the file (its tokenizer included).\n");
        return help ? 0 : 2;
    }
    const char *path = argv[1];
    char err[512];
    struct st_file f;
    if (st_open(path, &f, err, sizeof err) != 0) {
        fprintf(stderr, "rrnserve info: %s: %s\n", path, err);
        return 1;
    }

    printf("file: %s\n", path);
    for (int i = 0; i < f.n_meta; i++)
        if (strcmp(f.meta[i].key, "config") != 0 && strcmp(f.meta[i].key, "data_sha256") != 0)
            printf("%s: %s\n", f.meta[i].key, f.meta[i].value);
    print_config(&f);
    print_tensors(&f);

    /* Hashed once here and handed to the loader, which compares it with the
     * metadata again as part of its own checks. */
    char hex[65];
    st_data_sha256(&f, hex);
    const char *claimed = st_meta_get(&f, "data_sha256");
    if (!claimed)
        printf("data_sha256: missing (data hashes to %s)\n", hex);
    else if (strlen(claimed) == 64 && strcasecmp(claimed, hex) == 0)
        printf("data_sha256: ok %s\n", hex);
    else
        printf("data_sha256: mismatch: file says %s, data hashes to %s\n", claimed, hex);

    struct model m;
    struct tokenizer tk;
    int rc = 0;
    if (model_load_st(&f, hex, &m, err, sizeof err) != 0) {
        rc = 1;
    } else {
        /* Its token list is checked there (no token twice, none empty, one
         * code point each of a char tokenizer's). */
        rc = tokenizer_init(&tk, &m.cfg, err, sizeof err) != 0;
        if (!rc)
            tokenizer_free(&tk);
        model_free(&m);
    }
    if (rc) {
        fflush(stdout);
        fprintf(stderr, "rrnserve info: %s: %s\n", path, err);
    }
    st_close(&f);
    return rc;
}
