/* model.h - a model's weights in host memory, as float32.
 *
 * model_load reads a weight file (safetensors, F32/F16/BF16), checks its
 * checksum, parses the config and checks that exactly the tensors the config
 * calls for are present with the right shapes; the weights are converted to
 * float32 into one owned allocation.  model_save writes the inverse.
 * Backends copy what they need from here (the CPU backend uses it as is).
 */
#ifndef RRN_MODEL_H
#define RRN_MODEL_H

#include <stddef.h>

#include "config.h"
#include "safetensors.h"


/* One layer in one direction. */
struct layer_dir_params {
    float *w_ih;        /* [G*H, in] */
    float **w_hh;       /* M pointers, each [G*H, H]; w_hh[0] is weight_hh_l{k} */
    float *b_ih;        /* [G*H] */
    float *b_hh;        /* [G*H] */
    float *peephole;    /* [H] or NULL */
    float *attn_logits; /* [K] or NULL (static attention) */
    float *attn_query;  /* [H, H] or NULL (dynamic attention) */
};

struct layer_params {
    int in;                         /* width of the layer's input */
    struct layer_dir_params dir[2]; /* dir[1] only when bidirectional */
    float *residual_proj;           /* [out, in_of(y^{l-2})] or NULL */
    int residual_from;              /* width of y^{l-2}, when residual */
};

struct model {
    struct model_config cfg;
    int vocab;          /* V */
    float *embedding;   /* [V, E] */
    struct layer_params *layers;
    int head_out;       /* C or V */
    float *head_w;      /* [head_out, H*dirs] */
    float *head_b;      /* [head_out] */
    float *arena;       /* every float above lives here */
    size_t n_params;
    char sha256[65];    /* of the data section */
};

/* One tensor the config calls for: its name, shape and where it goes.
 * Used by the loader, the writer and the trainer, so the naming rules of
 * MODELS.md live in one place. */
struct model_tensor {
    char name[64];
    int ndim;
    long shape[2];
    float *data;
};

/* The full list of tensors of a model, in a fixed order.  *out is malloc'd. */
int model_tensors(const struct model *m, struct model_tensor **out, int *n);

/* Allocate (zeroed) weights for a config; takes ownership of cfg, which is
 * left zeroed (and its contents freed when the call fails). */
int model_alloc(struct model *m, struct model_config *cfg, char *err, size_t errlen);

int model_load(const char *path, struct model *m, char *err, size_t errlen);

/* model_load on a file already opened with st_open, for callers that also
 * show the file's raw contents (rrnserve info).  sha256 is the data
 * section's hex SHA-256 when the caller has computed it already, else NULL.
 * The weights are copied, so f may be closed afterwards. */
int model_load_st(const struct st_file *f, const char *sha256, struct model *m, char *err,
                  size_t errlen);

/* Write m to path with the format's metadata plus n_extra more entries
 * (a trainer records how the model was made). */
int model_save(const struct model *m, const char *path, const struct st_meta *extra, int n_extra, char *err,
               size_t errlen);
void model_free(struct model *m);

#endif
