/* cublas.cc - cublasGemmEx emulated on the CPU (see cublas_v2.h): the
 * argument checks cuBLAS makes, a check that each operand lies inside one
 * device allocation (where a GPU would fault or read a neighbour's data),
 * and the product queued on the handle's stream, run by OpenBLAS.  A
 * workspace given to cuBLAS must be aligned device memory and serve one
 * stream only.  FP32 operands with the TF32 or BF16-allowing compute types
 * are rounded to TF32 (cuBLAS 13 ran its TF32 kernels for both on an
 * H100); BF16 operands are widened, the products summed in FP32.
 */
#include "cublas_v2.h"

#include <cblas.h>
#include <stdint.h>
#include <stdlib.h>

#include <mutex>
#include <set>
#include <vector>

struct emu_blas {
    cudaStream_t stream;
    void *workspace; /* the caller's, or NULL for cuBLAS's own */
};

/* Every handle given a workspace of the caller's: a workspace that two
 * handles on different streams hold would be written by both at once. */
static std::mutex handles_mu;
static std::set<cublasHandle_t> handles_with_workspace;

cublasStatus_t cublasCreate(cublasHandle_t *handle)
{
    *handle = new emu_blas();
    (*handle)->stream = NULL;
    (*handle)->workspace = NULL;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy(cublasHandle_t handle)
{
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    {
        std::lock_guard<std::mutex> lock(handles_mu);
        handles_with_workspace.erase(handle);
    }
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t s)
{
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = s;
    handle->workspace = NULL; /* as cuBLAS does: back to its own */
    return CUBLAS_STATUS_SUCCESS;
}

/* cuBLAS asks for device memory aligned to 256 bytes, as cudaMalloc's is. */
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes)
{
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes && (!cuda_emu::device_range(workspace, bytes) || (uintptr_t)workspace % 256))
        return CUBLAS_STATUS_INVALID_VALUE;
    std::lock_guard<std::mutex> lock(handles_mu);
    for (cublasHandle_t other : handles_with_workspace)
        if (other != handle && other->workspace == workspace && other->stream != handle->stream)
            cuda_emu::fault("cublasSetWorkspace: the workspace at %p already serves another stream's handle",
                            workspace);
    handle->workspace = workspace;
    handles_with_workspace.insert(handle);
    return CUBLAS_STATUS_SUCCESS;
}

/* The column-major rows x cols matrix at p with leading dimension ld must
 * lie in one device allocation. */
static void check_operand(const char *name, const void *p, int rows, int cols, int ld, size_t size)
{
    size_t values = (size_t)(cols - 1) * ld + rows;
    if (!cuda_emu::device_range(p, values * size))
        cuda_emu::fault("cublasGemmEx: %s (%d x %d, leading dimension %d) at %p does not lie in one device "
                        "allocation",
                        name, rows, cols, ld, p);
}

/* x rounded to the nearest value with `bits` mantissa bits, ties to even:
 * what TF32 keeps of an FP32 operand (10 bits). */
static float round_mantissa(float x, int bits)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u)
        return x;
    int drop = 23 - bits;
    u += ((1u << (drop - 1)) - 1) + ((u >> drop) & 1);
    u &= ~((1u << drop) - 1);
    memcpy(&x, &u, sizeof x);
    return x;
}

/* A copy of the operand's stored elements, rounded, in out: kept from
 * product to product, since fresh pages for every product of a weight
 * matrix cost more than the product. */
static const float *rounded(std::vector<float> &out, const float *p, int rows, int cols, int ld, int bits)
{
    out.resize((size_t)(cols - 1) * ld + rows);
    for (size_t i = 0; i < out.size(); i++)
        out[i] = round_mantissa(p[i], bits);
    return out.data();
}

/* A BF16 operand's stored elements as FP32 (the high half of the bits). */
static const float *widened(std::vector<float> &out, const uint16_t *p, int rows, int cols, int ld)
{
    out.resize((size_t)(cols - 1) * ld + rows);
    for (size_t i = 0; i < out.size(); i++) {
        uint32_t u = (uint32_t)p[i] << 16;
        memcpy(&out[i], &u, sizeof u);
    }
    return out.data();
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void *alpha, const void *A, cudaDataType_t Atype, int lda, const void *B,
                            cudaDataType_t Btype, int ldb, const void *beta, void *C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo)
{
    (void)algo;
    if (!handle)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool bf16 = Atype == CUDA_R_16BF;
    if (Atype != Btype || (Atype != CUDA_R_32F && !bf16) || Ctype != CUDA_R_32F)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    int bits;
    switch (computeType) {
    case CUBLAS_COMPUTE_32F:
        bits = 23;
        break;
    case CUBLAS_COMPUTE_32F_FAST_TF32:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
        bits = 10;
        break;
    default:
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    if (bf16 && bits != 23)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    const size_t size = bf16 ? sizeof(uint16_t) : sizeof(float);
    if ((transa != CUBLAS_OP_N && transa != CUBLAS_OP_T) || (transb != CUBLAS_OP_N && transb != CUBLAS_OP_T))
        return CUBLAS_STATUS_INVALID_VALUE;
    const int a_rows = transa == CUBLAS_OP_N ? m : k, a_cols = transa == CUBLAS_OP_N ? k : m;
    const int b_rows = transb == CUBLAS_OP_N ? k : n, b_cols = transb == CUBLAS_OP_N ? n : k;
    if (m < 0 || n < 0 || k < 0 || lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1) || !alpha || !beta)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!m || !n)
        return CUBLAS_STATUS_SUCCESS;
    if (k) {
        check_operand("A", A, a_rows, a_cols, lda, size);
        check_operand("B", B, b_rows, b_cols, ldb, size);
    }
    check_operand("C", C, m, n, ldc, sizeof(float));
    /* The host scalars are read by the call, as cuBLAS reads them. */
    const float al = *(const float *)alpha, be = *(const float *)beta;
    float *c = (float *)C;
    cudaError_t rc = cuda_emu::enqueue(handle->stream, [=]() {
        if (!k) {
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++)
                    c[(size_t)j * ldc + i] = be == 0.0f ? 0.0f : be * c[(size_t)j * ldc + i];
            return;
        }
        static thread_local std::vector<float> ar, br;
        const float *ap = (const float *)A, *bp = (const float *)B;
        if (bf16) {
            ap = widened(ar, (const uint16_t *)A, a_rows, a_cols, lda);
            bp = widened(br, (const uint16_t *)B, b_rows, b_cols, ldb);
        } else if (bits < 23) {
            ap = rounded(ar, ap, a_rows, a_cols, lda, bits);
            bp = rounded(br, bp, b_rows, b_cols, ldb, bits);
        }
        cblas_sgemm(CblasColMajor, transa == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                    transb == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, al, ap, lda, bp, ldb, be, c, ldc);
    });
    return rc == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
