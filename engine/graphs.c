/* graphs.c - device work recorded once and replayed by shape, on backends
 * that record graphs (CUDA graphs; the CPU has none and runs work as it
 * comes).
 *
 * Why: a step of a small batch is a dozen short kernels and a forward over
 * T tokens a few hundred; launching them one by one costs a GPU more than
 * running them.  A recorded graph replays the same kernels, on the same
 * pointers with the same scalar arguments, for one launch.
 *
 * So a shape's key must hold everything on the host side that decides the
 * kernels and their arguments (rows per step, positions, which outputs),
 * and a graph is only good while the scratch buffers it points into stay
 * where they were (engine.ws_gen counts their reallocations).  A shape is
 * recorded the second time it comes: the first run grows the scratch, so
 * that nothing allocates while recording.  A recording that fails runs the
 * work as usual, and the shape is not recorded again.
 */
#include <stdlib.h>
#include <string.h>

#include "engine_internal.h"

/* Shapes remembered per engine, least recently used replaced first: room
 * for the 16 padded lengths of batches of up to 128 tokens
 * (backend_ops.pad_steps) and the steps' shapes beside them. */
#define GRAPH_SLOTS 32

struct graph_entry {
    unsigned char *key;
    size_t len;
    void *graph;
    void *out;          /* what work returned when it was recorded */
    unsigned ws_gen;    /* the scratch its pointers are into */
    int seen;           /* runs without a graph: 1 recorded next, -1 never */
    unsigned long long used;
};

struct graph_cache {
    struct graph_entry e[GRAPH_SLOTS];
    unsigned long long clock;
};

static void entry_clear(struct engine *e, struct graph_entry *g)
{
    if (g->graph)
        e->be->ops->graph_free(e->be, g->graph);
    free(g->key);
    memset(g, 0, sizeof *g);
}

/* The entry of this key, or a fresh one in the least recently used slot;
 * NULL when out of memory. */
static struct graph_entry *entry_for(struct engine *e, const void *key, size_t len)
{
    struct graph_cache *c = e->graphs;
    struct graph_entry *oldest = &c->e[0];
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        struct graph_entry *g = &c->e[i];
        if (g->key && g->len == len && memcmp(g->key, key, len) == 0)
            return g;
        if (g->used < oldest->used)
            oldest = g;
    }
    unsigned char *copy = malloc(len);
    if (!copy)
        return NULL;
    entry_clear(e, oldest);
    memcpy(copy, key, len);
    oldest->key = copy;
    oldest->len = len;
    return oldest;
}

void *engine_recorded(struct engine *e, const void *key, size_t len, engine_work work, void *arg)
{
    struct backend *be = e->be;
    if (!be->ops->capture_begin)
        return work(e, arg);
    if (!e->graphs && !(e->graphs = calloc(1, sizeof *e->graphs)))
        return work(e, arg);
    struct graph_entry *g = entry_for(e, key, len);
    if (!g)
        return work(e, arg);
    g->used = ++e->graphs->clock;
    if (g->graph && g->ws_gen == e->ws_gen)
        return be->ops->replay(be, g->graph) == 0 ? g->out : NULL;
    if (g->graph) {
        be->ops->graph_free(be, g->graph);
        g->graph = NULL;
    }
    if (g->seen != 1 || be->ops->capture_begin(be) != 0) {
        g->seen += !g->seen;
        backend_clear_error(be);
        return work(e, arg);
    }
    unsigned gen = e->ws_gen;
    void *out = work(e, arg);
    void *graph = be->ops->capture_end(be);
    if (graph && out && e->ws_gen == gen) {
        g->graph = graph;
        g->out = out;
        g->ws_gen = gen;
        return be->ops->replay(be, graph) == 0 ? out : NULL;
    }
    if (graph)
        be->ops->graph_free(be, graph);
    /* Nothing ran.  Scratch that grew is in place next time; a recording
     * that failed otherwise is not tried again for this shape. */
    if (e->ws_gen == gen)
        g->seen = -1;
    backend_clear_error(be);
    return work(e, arg);
}

void engine_drop_graphs(struct engine *e)
{
    for (int i = 0; e->graphs && i < GRAPH_SLOTS; i++)
        entry_clear(e, &e->graphs->e[i]);
    free(e->graphs);
    e->graphs = NULL;
}

size_t engine_graph_count(const struct engine *e)
{
    size_t count = 0;
    for (int i = 0; e->graphs && i < GRAPH_SLOTS; i++)
        count += e->graphs->e[i].graph != NULL;
    return count;
}
