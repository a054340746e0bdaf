/* checkpoint.h - a training run saved at a step, to be resumed there.
 *
 * NAME.ckpt.safetensors is a weight file whose metadata holds the run's
 * configuration and its state (step, generators, data position, learning
 * curve); beside it, NAME.ckpt.safetensors.state holds the optimizer's
 * moments, the streams' carried states and the best weights so far.  A
 * run resumed from one continues exactly as the uninterrupted run would.
 * A state that could not have come from this run (another model, batch or
 * corpus, or a damaged file) is refused with a message naming the file.
 */
#ifndef RRN_CHECKPOINT_H
#define RRN_CHECKPOINT_H

#include <stddef.h>

#include "run.h"

int checkpoint_save(struct run *r, const char *path, char *err, size_t errlen);
/* After the run's data, engine and optimizer are set up: puts back what
 * the checkpoint at path holds beyond the weights. */
int checkpoint_restore(struct run *r, const char *path, char *err, size_t errlen);

#endif
