/* gemm.h - batch-invariant single-precision matrix product C = A * B^T.
 *
 * The CPU engine needs a sequence's result to be the same bits whether it
 * runs alone or in any batch.  BLAS libraries do not promise that: OpenBLAS
 * picks different kernels, tails and small-matrix paths by shape, so the
 * float32 result for one row of A changes with M and with the row's position.
 * gemm_nt fixes the arithmetic of each output element by construction; see
 * gemm.c for the exact order of operations.
 */
#ifndef RRN_GEMM_H
#define RRN_GEMM_H

#include <stddef.h>

/* Row-major C[i][j] = (beta != 0 ? C[i][j] : 0) + dot(A[i][0:K], B[j][0:K])
 * for 0 <= i < M, 0 <= j < N; A is [M][lda], B is [N][ldb], C is [M][ldc].
 * beta must be 0 or 1; with beta 0, C is only written (it may hold NaNs).
 *
 * The value of C[i][j] depends only on the K values of row i of A, row j of
 * B and, with beta 1, the old C[i][j]: bit for bit, whatever M, N, i, j, the
 * leading dimensions, pointer alignment, thread count and instruction set,
 * as long as the floating-point environment is the default one (round to
 * nearest, no flush-to-zero / denormals-are-zero).
 *
 * Thread-safe.  Large products are split over weight rows (N) across the
 * engine's worker pool (pool.h); when another caller holds the pool, the
 * call runs on the calling thread alone instead of waiting for it. */
void gemm_nt(int M, int N, int K, const float *A, int lda, const float *B, int ldb, float beta, float *C,
             int ldc);

/* The same product with B rearranged once by gemm_pack, for a B that many
 * products share (a model's weights): the kernels then read it as one
 * contiguous stream, two rows side by side in each 16-float load, instead of
 * gathering those pairs from two rows.  The bits are gemm_nt's. */
size_t gemm_pack_floats(int N, int K);
void gemm_pack(int N, int K, const float *B, int ldb, float *packed);
void gemm_nt_packed(int M, int N, int K, const float *A, int lda, const float *packed, float beta, float *C,
                    int ldc);

/* The kernels gemm_nt can run, narrowest first. */
enum gemm_isa { GEMM_SCALAR, GEMM_AVX2, GEMM_AVX512 };

/* For tests and benchmarks: the widest kernels gemm_nt may use from now on
 * (by default GEMM_AVX512, i.e. the widest this CPU has); all give the same
 * bits.  Returns the kernels it will use, narrower than asked where the CPU
 * lacks them.  Process-wide. */
enum gemm_isa gemm_nt_limit_isa(enum gemm_isa widest);

#endif
