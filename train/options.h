/* options.h - the configuration of a training run (docs/training.md): a
 * JSON file, or the one a checkpoint was made with, with flags set on top
 * (--optim.lr 0.001 sets {"optim": {"lr": 0.001}}), checked whole before
 * anything runs; every error names the key at fault.
 */
#ifndef RRN_OPTIONS_H
#define RRN_OPTIONS_H

#include <cjson/cJSON.h>

#include "backend.h"
#include "data.h"
#include "init.h"
#include "optim.h"

enum synthetic_task { SYNTH_NONE, SYNTH_ADDING, SYNTH_REMEMBER };

struct options {
    cJSON *root;               /* the whole configuration, as run */
    char **train, **valid;     /* data paths */
    int n_train, n_valid;
    struct split split;        /* classify: the validation lines */
    enum synthetic_task synthetic;
    int synth_length, synth_dim, synth_train, synth_valid;
    struct optim_config optim;
    struct init_options init;
    int vocab_max_size, vocab_min_count; /* a word list built from the data */
    int batch, bptt;
    double epochs;
    long steps;                /* -1: from epochs (0 trains none, as epochs 0) */
    float dropout, dropout_embed;
    double state_reset;        /* lm: chance a window starts from the zero state */
    unsigned long long seed;
    long valid_every, checkpoint_every, log_every;
    int keep_best;             /* write the weights of the best validation */
    const char *init_from;     /* start from this weight file's weights */
    const char *out;
    enum device_kind device;
    enum precision precision;
    enum recurrence recurrence;
};

/* The configuration in the JSON file at path, or the one the checkpoint at
 * path was made with; NULL with a message in err. */
cJSON *options_read_file(const char *path, char *err, size_t errlen);
cJSON *options_read_checkpoint(const char *path, char *err, size_t errlen);
/* Sets the value at a dotted path ("optim.lr"), making objects on the way;
 * the value is taken as JSON when it parses as JSON, else as a string, and
 * null removes the key.  A
 * path the configuration cannot have (an unknown key at its top or in
 * "optim") is refused, as the command line's mistake. */
int options_set(cJSON *root, const char *path, const char *value, char *err, size_t errlen);
/* Checks root and fills o, whose strings point into root. */
int options_parse(cJSON *root, struct options *o, char *err, size_t errlen);
void options_free(struct options *o);

#endif
