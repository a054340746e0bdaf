/* registry.h - the models a server serves: every *.safetensors file of a
 * folder, each named by its file name without the extension, each loaded,
 * given its tokenizer, an engine on the chosen device and a batcher.
 *
 * Lookups hand out counted references, so a reload (SIGHUP) can swap a
 * model while requests to the old one finish on the old one.  A file that
 * fails to load on reload is logged and the model it would replace keeps
 * serving; a file that is gone stops being served.
 */
#ifndef RRN_REGISTRY_H
#define RRN_REGISTRY_H

#include <stdatomic.h>
#include <time.h>

#include "backend.h"
#include "batcher.h"
#include "model.h"
#include "tokenizer.h"

struct served_model {
    char *name;
    char *path;
    struct model model;
    struct tokenizer tk;
    struct backend *be;
    struct batcher *batcher;
    size_t derived_bytes; /* what the engine made from the weights (token tables, packed copies) */
    time_t modified;      /* when its weight file was last written */
    atomic_int refs;
};

struct registry_options {
    const char *dir;
    enum device_kind device;
    enum precision precision;
    enum recurrence recurrence;
    struct batcher_options batch;
};

struct registry;

/* Loads every model of the folder.  A folder that cannot be read is an
 * error; a file that cannot be loaded is logged and skipped. */
struct registry *registry_open(const struct registry_options *opt, char *err, size_t errlen);
/* Stops every batcher (finishing the jobs they hold) and frees it all. */
void registry_close(struct registry *r);

/* A reference to the named model, or NULL when there is none. */
struct served_model *registry_get(struct registry *r, const char *name);
void served_model_release(struct served_model *m);

/* References to every model, sorted by name; *out is malloc'd. */
int registry_list(struct registry *r, struct served_model ***out, int *n);

/* Re-reads the folder; returns the number of files that failed to load. */
int registry_reload(struct registry *r);

/* "cpu" or "cuda": the device the engines run on. */
const char *registry_device(const struct registry *r);

#endif
