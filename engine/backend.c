/* backend.c - choosing a backend at run time.
 *
 * The CUDA backend is compiled in only when nvcc was found at build time
 * (RRN_CUDA); "auto" then takes it when the driver reports a GPU, and falls
 * back to the CPU otherwise.
 */
#include <stdio.h>

#include "backend.h"

enum device_kind backend_resolve(enum device_kind kind)
{
#ifdef RRN_CUDA
    if (kind == DEVICE_AUTO)
        return backend_cuda_available() ? DEVICE_CUDA : DEVICE_CPU;
#endif
    return kind == DEVICE_AUTO ? DEVICE_CPU : kind;
}

struct backend *backend_create(enum device_kind kind, char *err, size_t errlen)
{
    switch (kind) {
    case DEVICE_CPU:
        return backend_cpu_create(err, errlen);
    case DEVICE_CUDA:
#ifdef RRN_CUDA
        return backend_cuda_create(err, errlen);
#else
        snprintf(err, errlen, "this binary was built without CUDA (rebuild with nvcc installed)");
        return NULL;
#endif
    case DEVICE_AUTO:
        return backend_create(backend_resolve(kind), err, errlen);
    }
    snprintf(err, errlen, "unknown device");
    return NULL;
}

void backend_destroy(struct backend *be)
{
    if (be)
        be->ops->destroy(be);
}

const char *backend_compiled(void)
{
#ifdef RRN_CUDA
    return "cpu cuda";
#else
    return "cpu";
#endif
}
