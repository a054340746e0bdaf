/* cuda.c - what the binary under test says of the CUDA backend. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "cuda.h"

const char *cuda_missing_library_says(void)
{
    /* The tests are built as the binary is, so they find the same reasons,
     * but for the library, which is their own (one folder up). */
    const char *why = backend_cuda_unavailable();
    if (why && (strstr(why, "without CUDA") || strstr(why, "no CUDA driver")))
        return why;
    return "cannot load the CUDA backend: " CUDA_MISSING_LIBRARY;
}

/* Where the toolkit that built this tree keeps it (the Makefile's nvcc
 * found at /usr/local/cuda). */
#define STUB "/usr/local/cuda/lib64/stubs/libcuda.so"

int cuda_stub_driver(char dir[64], char env[160])
{
    if (access(STUB, R_OK) != 0)
        return -1;
    char link[128];
    snprintf(dir, 64, "/tmp/rrn_stub_XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(link, sizeof link, "%s/libcuda.so.1", dir);
    assert_int_equal(symlink(STUB, link), 0);
    /* Before the path there is, which may hold the binary's own libraries
     * (tools/gpu-run.sh's bundle). */
    snprintf(env, 160, "LD_LIBRARY_PATH='%s'${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}", dir);
    return 0;
}

void cuda_stub_driver_remove(const char *dir)
{
    char link[128];
    snprintf(link, sizeof link, "%s/libcuda.so.1", dir);
    unlink(link);
    rmdir(dir);
}
