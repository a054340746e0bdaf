/* cuda_runtime.h - the part of the CUDA runtime that the CUDA backend
 * (engine's .cu files) uses, emulated on the CPU so that its kernels and
 * its host code run (and are tested, under ASan and UBSan) on machines
 * without a GPU.
 *
 * It is a test tool, not a GPU: it says nothing of speed, and a result
 * that passes here has still to pass on a device.  What it does check is
 * what a GPU would fault on or silently get wrong, the things that code
 * never run on a device gets wrong first:
 *   - kernels run thread by thread, each CUDA thread a fiber, switching at
 *     __syncthreads and warp shuffles, with the real semantics: a barrier
 *     some threads of the block never reach, or a shuffle whose mask is not
 *     its warp, stops the program with a message; warps run in a random
 *     order and ahead of each other, so that a missing barrier shows;
 *   - device memory is malloc'ed (so ASan sees every access out of bounds)
 *     and starts as NaN bytes, not zeros; copies and cuBLAS operands must
 *     lie inside one allocation of the right kind;
 *   - streams run their work as late as CUDA allows (at a synchronize, or a
 *     copy that must complete), so host code that reads a result or reuses
 *     a pinned buffer before synchronizing sees stale data, as it may on a
 *     GPU; streams that wait on each other's events run their work in a
 *     random order that keeps only each stream's order and those waits, so
 *     a wait the code forgot shows;
 *   - a stream being captured records its work without running it; the
 *     calls a capture forbids (allocate, free, synchronize, copies from
 *     pageable memory, waits on events from outside it) fail and
 *     invalidate the capture; streams that join a capture through an event
 *     must be joined back before it ends; a graph replays the recorded
 *     work, each node after those it depends on and otherwise in a random
 *     order, reading its pointers and pinned buffers anew.
 *
 * Compiled as C++17 with g++ in place of nvcc (Makefile: test-cuda-emu).
 */
#ifndef RRN_CUDA_EMU_RUNTIME_H
#define RRN_CUDA_EMU_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <string.h>

#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
/* Shared by the fibers of a block, which run on one OS thread (and one
 * block at a time: the emulated device runs one thing at a time). */
#define __shared__ static __thread
#define __align__(n) __attribute__((aligned(n)))
/* A hint to nvcc's register allocation; nothing to the emulator. */
#define __launch_bounds__(...)

/* CUDA's vector type, aligned as on the device, so that a 16-byte load
 * from a misaligned address faults here too (UBSan's alignment check). */
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w)
{
    return float4{x, y, z, w};
}

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureMerge = 902,
    cudaErrorStreamCaptureUnjoined = 904,
    cudaErrorStreamCaptureIsolation = 905,
    cudaErrorStreamCaptureWrongThread = 908,
};
typedef enum cudaError_t cudaError;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};

enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
};

#define cudaStreamDefault 0x0
#define cudaStreamNonBlocking 0x1
#define cudaEventDisableTiming 0x2

typedef struct emu_stream *cudaStream_t;
typedef struct emu_graph *cudaGraph_t;
typedef struct emu_graph *cudaGraphExec_t;
typedef struct emu_event *cudaEvent_t;

/* Of the launch attributes, programmatic dependent launch only: the
 * kernel may start before the one before it in the stream ends, and must
 * wait for it with cudaGridDependencySynchronize (below). */
enum cudaLaunchAttributeID {
    cudaLaunchAttributeProgrammaticStreamSerialization = 6,
};

struct cudaLaunchAttribute {
    cudaLaunchAttributeID id;
    union {
        int programmaticStreamSerializationAllowed;
    } val;
};

struct cudaLaunchConfig_t {
    dim3 gridDim;
    dim3 blockDim;
    size_t dynamicSmemBytes;
    cudaStream_t stream;
    cudaLaunchAttribute *attrs;
    unsigned numAttrs;
};

enum cudaDeviceAttr {
    cudaDevAttrComputeCapabilityMajor = 75,
};

const char *cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetLastError(void);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaGetDevice(int *device);
/* The emulated device is of compute capability 9.0, a Hopper's, so that
 * the code for one runs here. */
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);

cudaError_t cudaMalloc(void **p, size_t bytes);
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t bytes);
cudaError_t cudaFreeHost(void *p);
template <typename T> static inline cudaError_t cudaMalloc(T **p, size_t bytes)
{
    return cudaMalloc((void **)p, bytes);
}
template <typename T> static inline cudaError_t cudaMallocHost(T **p, size_t bytes)
{
    return cudaMallocHost((void **)p, bytes);
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s);
cudaError_t cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t s);

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags);

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s);

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);

/* ---- what the emulator itself provides to the two headers ------------ */
namespace cuda_emu {

/* Work queued on a stream: run when the stream is synchronized, or kept
 * in a graph while it is captured.  Fails with a CUDA error code before
 * anything is queued when the call itself is invalid. */
cudaError_t enqueue(cudaStream_t s, std::function<void()> work);

/* Queue a launch of grid x block threads, each calling body(). */
cudaError_t launch(const cudaLaunchConfig_t *cfg, std::function<void()> body);


void syncthreads(void);
/* A thread of a launch waited for the kernel before it: every thread of a
 * launch with programmatic dependent launch must, once (launch checks). */
void grid_dependency_wait(void);
unsigned long long shfl_down(unsigned mask, unsigned long long bits, unsigned delta, int width);

/* The device allocation holding [p, p + bytes), or 0 when there is none;
 * for the cuBLAS emulation's operand checks. */
int device_range(const void *p, size_t bytes);

/* Stop the program, naming what the code did that a GPU would not allow. */
[[noreturn]] void fault(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

} /* namespace cuda_emu */

/* The running CUDA thread's coordinates, set by the scheduler each time it
 * switches to one.  __thread, not thread_local: GCC reaches an extern
 * thread_local through an initialisation wrapper, which its optimised
 * sanitizer builds get wrong (a null address); __thread variables have no
 * dynamic initialisation, so none.  Hence also a plain struct, as CUDA's
 * uint3. */
struct uint3 {
    unsigned x, y, z;
};
extern __thread uint3 threadIdx, blockIdx, blockDim, gridDim;

static inline void __syncthreads(void)
{
    cuda_emu::syncthreads();
}

/* Kernels run one after another here, so the wait has nothing to wait
 * for; it is counted, so that a kernel launched to overlap whose thread
 * never waits stops the program. */
static inline void cudaGridDependencySynchronize(void)
{
    cuda_emu::grid_dependency_wait();
}

static inline void cudaTriggerProgrammaticLaunchCompletion(void) {}

template <typename T> static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffle moves at most 8 bytes");
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof v);
    bits = cuda_emu::shfl_down(mask, bits, delta, width);
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* Each thread calls the kernel with its own copy of the arguments, as
 * converted to the kernel's parameter types at the launch. */
template <typename... Params, typename... Args>
static inline cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t *cfg, void (*kernel)(Params...),
                                             Args &&...args)
{
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    return cuda_emu::launch(cfg, [kernel, params]() {
        std::tuple<std::decay_t<Params>...> mine = params;
        std::apply(kernel, mine);
    });
}

#endif
