/* cuda.h - what the binary under test says of the CUDA backend, for the
 * tests of how it decides to load it and what it says when it cannot
 * (engine/backend.c). */
#ifndef RRN_TEST_CUDA_H
#define RRN_TEST_CUDA_H

/* A CUDA library that is not there, for RRN_CUDA_LIBRARY. */
#define CUDA_MISSING_LIBRARY "/nonexistent/librrnserve-cuda.so"

/* Why the binary has no CUDA backend when RRN_CUDA_LIBRARY is
 * CUDA_MISSING_LIBRARY: a reason found before the library is looked for
 * (a build without CUDA, no NVIDIA driver), as this test binary finds it,
 * or else that the library cannot be loaded. */
const char *cuda_missing_library_says(void);

/* A new folder holding CUDA's stub of the driver library as libcuda.so.1,
 * and in env a shell assignment that puts it first on a command's
 * LD_LIBRARY_PATH: the command then finds a driver, which reports no GPU,
 * so that it loads its CUDA library where no driver is installed (and says
 * there is no GPU, or why the library did not load).  0, or -1 where the
 * toolkit has no stub. */
int cuda_stub_driver(char dir[64], char env[160]);
void cuda_stub_driver_remove(const char *dir);

#endif
