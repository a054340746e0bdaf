/* lazy_json.h - a JSON answer whose long arrays are written while it is
 * sent, an element at a time, instead of held whole.
 *
 * /attention of a 100,000-token text answers 52 MB of JSON; as one cJSON
 * tree, printed whole, it took some 350 MB while it was built, and eight
 * such answers at once 3 GB: the memory a client could make the server
 * take grew with its request, without a bound but the machine's.  So the
 * handler builds its answer's tree as usual but for the long arrays, each
 * a lazy_json_array node whose elements a function makes from the finished
 * job when they are due; the HTTP layer pulls the bytes with
 * lazy_json_read, and the answer holds the job's results and one element
 * at a time.
 */
#ifndef RRN_LAZY_JSON_H
#define RRN_LAZY_JSON_H

#include <stddef.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

struct lazy_json;

/* Element i of an array, made from ctx; NULL when out of memory (the
 * answer then ends there, and its connection is closed). */
typedef cJSON *lazy_item(const void *ctx, size_t i);

/* An answer whose elements are made from what owner holds: release(owner)
 * runs when the answer is freed (or right away when out of memory). */
struct lazy_json *lazy_json_new(void (*release)(void *owner), void *owner);
/* A node for the answer's tree standing for an array of n elements, each
 * item(ctx copy, i), in order; ctx (ctx_size bytes) is copied.  With z
 * NULL, the array itself, made now (an answer small enough to hold, or a
 * stream's event).  NULL when out of memory. */
cJSON *lazy_json_array(struct lazy_json *z, lazy_item *item, const void *ctx, size_t ctx_size, size_t n);
/* How many lazy arrays the answer has. */
int lazy_json_arrays(const struct lazy_json *z);
/* Prints root (taking it) around its lazy arrays; 0, or -1 when out of
 * memory. */
int lazy_json_finish(struct lazy_json *z, cJSON *root);
/* Up to max (>= 1) bytes of the answer into buf: how many, 0 at its end,
 * -1 when an element could not be made. */
ssize_t lazy_json_read(struct lazy_json *z, char *buf, size_t max);
void lazy_json_free(struct lazy_json *z);

#endif
