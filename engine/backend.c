/* backend.c - choosing a backend at run time.
 *
 * The CUDA backend is built only when nvcc was found at build time
 * (RRN_CUDA), and then as a library of its own, loaded the first time a
 * CUDA device is asked for or looked for; "auto" takes it when it loads and
 * the driver reports a GPU, and falls back to the CPU otherwise.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"

/* Test hook: while the file RRN_FAULT_FILE names exists, backend_sync
 * fails as a device fault would, on any backend, so that the tests can
 * drive how the server copes with a failing device on machines without
 * one.  Unset, it costs a pointer test. */
static pthread_once_t fault_once = PTHREAD_ONCE_INIT;
static const char *fault_file;

static void fault_init(void)
{
    const char *f = getenv("RRN_FAULT_FILE");
    fault_file = f && *f ? f : NULL;
}

int backend_sync(struct backend *be)
{
    pthread_once(&fault_once, fault_init);
    int rc = be->ops->sync(be);
    if (rc == 0 && fault_file && access(fault_file, F_OK) == 0) {
        snprintf(be->err, sizeof be->err, "injected device fault (RRN_FAULT_FILE %s exists)", fault_file);
        return -1;
    }
    return rc;
}

#ifdef RRN_CUDA
/* The CUDA backend (the .cu files of engine/) is RRN_CUDA_LIBRARY, a
 * shared library that links the CUDA runtime and cuBLAS, rather than part
 * of the binary: linked in, cuBLAS's 600 MB are mapped and relocated at
 * every start (0.6 s of every `rrnserve run` on the CPU), and the binary does
 * not start at all where CUDA is not installed.  The dynamic linker finds
 * it by the binary's run path: beside the binary (a build folder) or in
 * ../lib/rrnserve (installed); the environment's RRN_CUDA_LIBRARY names
 * another file (an operator's own build; the tests' missing one).  Once
 * loaded it stays: the CUDA runtime cannot be unloaded safely. */
static pthread_once_t cuda_once = PTHREAD_ONCE_INIT;
static cuda_gpu_present_fn *cuda_gpu_present;
static cuda_backend_create_fn *cuda_backend_create;
static char cuda_load_error[512];

static void cuda_load(void)
{
#ifdef RRN_CUDA_DRIVER
    /* Without the NVIDIA driver's library no GPU can be used, and loading
     * the backend only for the CUDA runtime to say so would map and
     * relocate cuBLAS: 0.5 s and 150 MB more memory for every server of
     * this build on a machine without a GPU (--device auto, the default).
     * The driver stays loaded; the runtime would load it again anyway. */
    if (!dlopen(RRN_CUDA_DRIVER, RTLD_LAZY | RTLD_LOCAL)) {
        snprintf(cuda_load_error, sizeof cuda_load_error, "no CUDA driver: %s", dlerror());
        return;
    }
#endif
    const char *path = getenv("RRN_CUDA_LIBRARY");
    if (!path || !*path)
        path = RRN_CUDA_LIBRARY;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib) {
        /* POSIX's way from dlsym's object pointer to a function pointer. */
        *(void **)&cuda_gpu_present = dlsym(lib, "cuda_gpu_present");
        *(void **)&cuda_backend_create = dlsym(lib, "cuda_backend_create");
    }
    if (!lib || !cuda_gpu_present || !cuda_backend_create) {
        snprintf(cuda_load_error, sizeof cuda_load_error, "cannot load the CUDA backend: %s", dlerror());
        cuda_gpu_present = NULL;
        cuda_backend_create = NULL;
    }
}

const char *backend_cuda_unavailable(void)
{
    pthread_once(&cuda_once, cuda_load);
    if (!cuda_gpu_present)
        return cuda_load_error;
    return cuda_gpu_present() ? NULL : "no CUDA GPU is available";
}

static struct backend *cuda_create(char *err, size_t errlen)
{
    const char *why = backend_cuda_unavailable();
    if (why) {
        snprintf(err, errlen, "%s", why);
        return NULL;
    }
    return cuda_backend_create(err, errlen);
}
#else
const char *backend_cuda_unavailable(void)
{
    return "this binary was built without CUDA (rebuild with nvcc installed)";
}

static struct backend *cuda_create(char *err, size_t errlen)
{
    snprintf(err, errlen, "%s", backend_cuda_unavailable());
    return NULL;
}
#endif

int backend_cuda_available(void)
{
    return backend_cuda_unavailable() == NULL;
}

enum device_kind backend_resolve(enum device_kind kind)
{
    if (kind == DEVICE_AUTO)
        return backend_cuda_available() ? DEVICE_CUDA : DEVICE_CPU;
    return kind;
}

struct backend *backend_create(enum device_kind kind, char *err, size_t errlen)
{
    switch (kind) {
    case DEVICE_CPU:
        return backend_cpu_create(err, errlen);
    case DEVICE_CUDA:
        return cuda_create(err, errlen);
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

int backend_device_parse(const char *s, enum device_kind *dev)
{
    static const struct {
        const char *name;
        enum device_kind kind;
    } kinds[] = {{"auto", DEVICE_AUTO}, {"cpu", DEVICE_CPU}, {"cuda", DEVICE_CUDA}};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (strcmp(s, kinds[i].name) == 0) {
            *dev = kinds[i].kind;
            return 0;
        }
    return -1;
}

static const char *const precision_names[] = {"fp32", "tf32", "bf16"};
static const char *const recurrence_names[] = {"gemm", "fused"};

/* The index of s in names[n], or -1. */
static int name_index(const char *const *names, int n, const char *s)
{
    for (int i = 0; i < n; i++)
        if (strcmp(s, names[i]) == 0)
            return i;
    return -1;
}

int backend_precision_parse(const char *s, enum precision *p)
{
    int i = name_index(precision_names, (int)(sizeof precision_names / sizeof precision_names[0]), s);
    if (i >= 0)
        *p = (enum precision)i;
    return i >= 0 ? 0 : -1;
}

const char *backend_precision_name(enum precision p)
{
    return precision_names[p];
}

int backend_recurrence_parse(const char *s, enum recurrence *r)
{
    int i = name_index(recurrence_names, (int)(sizeof recurrence_names / sizeof recurrence_names[0]), s);
    if (i >= 0)
        *r = (enum recurrence)i;
    return i >= 0 ? 0 : -1;
}

const char *backend_recurrence_name(enum recurrence r)
{
    return recurrence_names[r];
}

void backend_describe(const char *device, enum precision p, enum recurrence r, char *buf, size_t len)
{
    snprintf(buf, len, "%s%s%s%s%s", device, p != PRECISION_FP32 ? ", " : "", p != PRECISION_FP32 ? precision_names[p] : "",
             r != RECURRENCE_GEMM ? ", " : "", r != RECURRENCE_GEMM ? recurrence_names[r] : "");
}

void backend_clear_error(struct backend *be)
{
    be->err[0] = '\0';
}

int backend_set_precision(struct backend *be, enum precision p, char *err, size_t errlen)
{
    if (!be->ops->set_precision) {
        if (p == PRECISION_FP32)
            return 0;
        snprintf(err, errlen, "the %s backend computes in fp32 only; %s needs the cuda device", be->ops->name,
                 backend_precision_name(p));
        return -1;
    }
    if (be->ops->set_precision(be, p) != 0) {
        snprintf(err, errlen, "%s", be->err);
        return -1;
    }
    return 0;
}

int backend_set_recurrence(struct backend *be, enum recurrence r, char *err, size_t errlen)
{
    if (r == RECURRENCE_FUSED && !be->ops->recurrent_step) {
        snprintf(err, errlen, "the %s backend has no fused recurrence; it needs the cuda device", be->ops->name);
        return -1;
    }
    be->recurrence = r;
    return 0;
}
