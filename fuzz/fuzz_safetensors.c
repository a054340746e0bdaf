/* fuzz_safetensors.c - libFuzzer target for the weight-file reader: the
 * input is written to a temporary file, which goes through st_open (header,
 * dtypes, shapes, offsets, metadata), every tensor's conversion to float32,
 * and model_load_st (config, tensor names and shapes, values).
 *
 * model_load_st is given the checksum the file claims, so that inputs get
 * past the checksum to the checks behind it; model_load, which computes
 * the checksum itself, is run too.  A loaded model also gets its
 * tokenizer.  A refusal without a message aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model.h"
#include "safetensors.h"
#include "tokenizer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The one temporary file, rewritten for each input and removed at exit. */
static char path[64];

static void remove_file(void)
{
    unlink(path);
}

static int write_input(const uint8_t *data, size_t size)
{
    if (!path[0]) {
        snprintf(path, sizeof path, "/tmp/rrn_fuzz_st_XXXXXX");
        int fd = mkstemp(path);
        if (fd < 0)
            return -1;
        close(fd);
        atexit(remove_file);
    }
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t n = fwrite(data, 1, size, f);
    return fclose(f) == 0 && n == size ? 0 : -1;
}

static void load(const struct st_file *f)
{
    char err[512];
    struct model m;
    const char *claimed = st_meta_get(f, "data_sha256");
    if (claimed && strlen(claimed) != 64)
        claimed = NULL;
    if (model_load_st(f, claimed, &m, err, sizeof err) != 0) {
        if (!err[0])
            abort();
        return;
    }
    struct tokenizer tk;
    if (tokenizer_init(&tk, &m.cfg, err, sizeof err) == 0)
        tokenizer_free(&tk);
    struct model_tensor *list;
    int n;
    if (model_tensors(&m, &list, &n) == 0)
        free(list);
    model_free(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    struct st_file f;
    if (write_input(data, size) != 0)
        abort();
    if (st_open(path, &f, err, sizeof err) != 0) {
        if (!err[0])
            abort();
        return 0;
    }
    for (int i = 0; i < f.n_tensors; i++) {
        const struct st_tensor *t = &f.tensors[i];
        if (st_find(&f, t->name) == NULL || t->nbytes > f.data_size)
            abort();
        float *x = malloc(sizeof *x * (size_t)(t->numel ? t->numel : 1));
        if (!x)
            abort();
        st_to_f32(t, x);
        free(x);
    }
    char hex[65];
    st_data_sha256(&f, hex);
    load(&f);
    st_close(&f);

    struct model m;
    if (model_load(path, &m, err, sizeof err) == 0)
        model_free(&m);
    return 0;
}
