/* cuda_fused.cu - the CUDA backend's recurrence fused (--recurrence
 * fused): a step's recurrent product computed inside its cell's kernel
 * (recurrent_step_kernel), and dynamic attention's queries by the same
 * tiles (query_kernel).  Its twin on the CPU is the products' path,
 * backend_cpu.c's gemm and cell step.
 *
 * cuBLAS's product for a step of a batch (64 x 512 by 2048 x 512 in the
 * benchmark) is a split-K pair of kernels on an H100, 19.6 us at 6.8
 * TFLOP/s, with the gates then written out and read back by the cell
 * kernel.  Fused, a block takes a tile of rows and the units of one tile,
 * all G gates of each (FUSED_COLS columns of the product), and runs their
 * cell as soon as its sums are done: one launch a step, and the gates
 * never leave the block.  Dynamic attention adds a launch before it: the
 * query's product, by tiles the same way, since a row's weights need its
 * whole query (query_kernel).  It computes in FP32 only: in TF32 and BF16
 * the tensor cores' products are cuBLAS's.
 */
#include "backend_cuda.cuh"

#define FUSED_COLS 16

/* The widest window of dynamic attention the fused step takes: a block
 * keeps each of its rows' K weights in shared memory.  Wider windows take
 * the products' path. */
#define FUSED_WINDOW 32

/* Dynamic attention's scores go from query_kernel to recurrent_step_kernel
 * in parts, one for each tile of FUSED_COLS units of the query:
 * query_tiles(H) parts a score, those of row i's score j one after
 * another at score_parts(s, i, j), in the row's hg. */
static inline __host__ __device__ int query_tiles(int H)
{
    return (H + FUSED_COLS - 1) / FUSED_COLS;
}

inline __device__ float *score_parts(const cell_step &s, int i, int j)
{
    return s.hg + (long)i * gates_of(s.cell) * s.H + (long)j * query_tiles(s.H);
}

/* A tile of ROWS rows by FUSED_COLS columns: 8, 16, 32 or 64 rows, the
 * fewest that hold a step's rows (fused_rows), so that a small batch does
 * not multiply rows of zeros.  The 256
 * threads split the sum over H into SLICES groups of ROWS threads, each
 * thread holding 4 rows by 4 columns of it; H is staged KC at a time, KS
 * of it a slice, every thread bringing H4 float4s of h and W4 of W. */
template <int ROWS> struct tile_shape {
    static constexpr int SLICES = CELL_THREADS / ROWS;
    static constexpr int KC = 4 * SLICES > 64 ? 4 * SLICES : 64;
    static constexpr int KS = KC / SLICES;
    static constexpr int LD = KC + 4; /* a row of the staged h and W */
    static constexpr int H4 = ROWS * KC / 4 / CELL_THREADS;
    static constexpr int W4 = FUSED_COLS * KC / 4 / CELL_THREADS;
    static constexpr int STAGED = (ROWS + FUSED_COLS) * LD, SUMS = SLICES * ROWS * FUSED_COLS;
    static constexpr int SHARED = STAGED > SUMS ? STAGED : SUMS; /* floats */
    static_assert(ROWS % 4 == 0 && KS % 4 == 0, "a thread's rows and k come 4 at a time");
    static_assert(H4 * CELL_THREADS * 4 == ROWS * KC && W4 * CELL_THREADS * 4 == FUSED_COLS * KC,
                  "every thread stages whole float4s");
};

/* Up to 4 floats of p, those past avail zero: one 16-byte load where the
 * row allows it (vec: H a multiple of 4 and aligned pointers). */
__device__ float4 load4(const float *p, int avail, bool vec)
{
    if (vec && avail >= 4)
        return *(const float4 *)p;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (avail > 0)
        v.x = p[0];
    if (avail > 1)
        v.y = p[1];
    if (avail > 2)
        v.z = p[2];
    if (avail > 3)
        v.w = p[3];
    return v;
}

/* Every thread of the block: rows r0 .. r0 + ROWS - 1 of hprev (n rows, H
 * wide) times the FUSED_COLS rows of w that the tile's columns name
 * (w_row(c), or -1 for a column of zeros), summed over H: returns shared
 * memory holding row r, column c at r FUSED_COLS + c.  The first stage of
 * w is loaded before ready() is called, and nothing else is read before
 * it: ready is where a kernel waits for the one before it (inputs_ready).  A thread's rows
 * are rg + ROWS/4 j and its columns cg + 4 c, which keeps the loads of a
 * quarter warp on distinct banks; one float4 of h and one of W per row
 * and column every 4 k, so 8 loads of 16 bytes from shared memory feed 64
 * multiply-adds.  The next stage is loaded into registers while this
 * one's products run, so that global memory's latency hides behind them. */
template <int ROWS, typename WRow, typename Ready>
__device__ const float *tile_product(const float *hprev, int n, int H, int r0, const float *w, WRow w_row,
                                     Ready ready)
{
    using T = tile_shape<ROWS>;
    __shared__ __align__(16) float shared[T::SHARED];
    float *hs = shared, *ws = shared + ROWS * T::LD;
    const int tid = threadIdx.x, slice = tid / ROWS, rg = tid % ROWS / 4, cg = tid % 4;
    const bool vec = H % 4 == 0 && (uintptr_t)hprev % 16 == 0 && (uintptr_t)w % 16 == 0;
    float4 hnext[T::H4], wnext[T::W4];
    auto fetch_h = [&](int k0) {
        for (int m = 0; m < T::H4; m++) {
            const int x = tid + m * CELL_THREADS, i = r0 + x / (T::KC / 4), k = 4 * (x % (T::KC / 4));
            hnext[m] = load4(hprev + (long)i * H + k0 + k, i < n ? H - k0 - k : 0, vec);
        }
    };
    auto fetch_w = [&](int k0) {
        for (int m = 0; m < T::W4; m++) {
            const int x = tid + m * CELL_THREADS, wr = w_row(x / (T::KC / 4)), k = 4 * (x % (T::KC / 4));
            wnext[m] = load4(w + (wr >= 0 ? (long)wr * H : 0) + k0 + k, wr >= 0 ? H - k0 - k : 0, vec);
        }
    };
    fetch_w(0);
    ready();
    fetch_h(0);
    float acc[4][4] = {};
    for (int k0 = 0; k0 < H; k0 += T::KC) {
        for (int m = 0; m < T::H4; m++) {
            const int x = tid + m * CELL_THREADS;
            *(float4 *)&hs[x / (T::KC / 4) * T::LD + 4 * (x % (T::KC / 4))] = hnext[m];
        }
        for (int m = 0; m < T::W4; m++) {
            const int x = tid + m * CELL_THREADS;
            *(float4 *)&ws[x / (T::KC / 4) * T::LD + 4 * (x % (T::KC / 4))] = wnext[m];
        }
        __syncthreads();
        if (k0 + T::KC < H) {
            fetch_h(k0 + T::KC);
            fetch_w(k0 + T::KC);
        }
        const int ks = slice * T::KS, kn = H - k0;
        for (int k = ks; k < ks + T::KS && k < kn; k += 4) {
            float4 hv[4], wv[4];
            for (int j = 0; j < 4; j++)
                hv[j] = *(const float4 *)&hs[(rg + ROWS / 4 * j) * T::LD + k];
            for (int c = 0; c < 4; c++)
                wv[c] = *(const float4 *)&ws[(cg + 4 * c) * T::LD + k];
            for (int j = 0; j < 4; j++)
                for (int c = 0; c < 4; c++) {
                    float v = acc[j][c];
                    v = fmaf(hv[j].x, wv[c].x, v);
                    v = fmaf(hv[j].y, wv[c].y, v);
                    v = fmaf(hv[j].z, wv[c].z, v);
                    acc[j][c] = fmaf(hv[j].w, wv[c].w, v);
                }
        }
        __syncthreads();
    }
    /* The slices' sums, where h and W were ([slice][row][column]), then
     * added in order into the first slice's place, every thread taking
     * its share of the tile. */
    for (int j = 0; j < 4; j++)
        for (int c = 0; c < 4; c++)
            shared[(slice * ROWS + rg + ROWS / 4 * j) * FUSED_COLS + cg + 4 * c] = acc[j][c];
    __syncthreads();
    for (int x = tid; x < ROWS * FUSED_COLS; x += CELL_THREADS) {
        float v = shared[x];
        for (int q = 1; q < T::SLICES; q++)
            v += shared[q * ROWS * FUSED_COLS + x];
        shared[x] = v;
    }
    __syncthreads();
    return shared;
}

/* A product over n rows and some units, per_tile units a tile (their
 * gates FUSED_COLS columns at most): the block's first row and unit, and
 * how many blocks the product takes. */
template <int ROWS> __device__ void tile_of_block(int units, int per_tile, int *r0, int *u0)
{
    const int unit_tiles = (units + per_tile - 1) / per_tile;
    *u0 = blockIdx.x % unit_tiles * per_tile;
    *r0 = blockIdx.x / unit_tiles * ROWS;
}

static int tile_blocks(int n, int rows, int units, int per_tile)
{
    return (units + per_tile - 1) / per_tile * ((n + rows - 1) / rows);
}

/* Every thread of a fused kernel, before it touches anything but the
 * weights.  Where the kernel was launched to overlap the one before it in
 * its stream (programmatic dependent launch, sm_90 on; launch_on), it
 * waits here until that one has finished and its writes are seen, and then
 * lets the next such kernel start: a layer's steps are a chain of them, so
 * that each step's blocks are scheduled and load their first weights while
 * the step before still runs, instead of after it.  Launched otherwise,
 * both calls return at once. */
__device__ void inputs_ready()
{
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    cudaGridDependencySynchronize();
    cudaTriggerProgrammaticLaunchCompletion();
#endif
}

/* Every thread of the block: the attention weights of the tile's rows
 * into a, each row's K at row K (dynamic) or one window for every row
 * (static), and to s.attn from the blocks of the first units. */
template <int ROWS> __device__ void tile_attention(const cell_step &s, int r0, int u0, float *a)
{
    const int H = s.H, n = s.n, K = s.attn_window, tid = threadIdx.x;
    if (s.attn_mode == ATTN_DYNAMIC) {
        /* Row i's score j: the query kernel's parts of it, one a tile of
         * the query, added in the tiles' order; then each row's softmax,
         * a thread a row.  Every block of the row's tile works them out
         * for itself. */
        const int tiles = query_tiles(H);
        const float scale = 1.0f / sqrtf((float)H);
        /* By 16-byte loads where every score's parts start aligned: a
         * thread's loads are what the step waits on here. */
        const bool vec = tiles % 4 == 0 && (uintptr_t)s.hg % 16 == 0;
        for (int x = tid; x < ROWS * K; x += blockDim.x) {
            const int i = r0 + x / K;
            float score = 0.0f;
            if (i < n) {
                const float *part = score_parts(s, i, x % K);
                for (int q = 0; q < tiles; q += 4) {
                    const float4 p = load4(part + q, tiles - q, vec);
                    score += p.x;
                    score += p.y;
                    score += p.z;
                    score += p.w;
                }
            }
            a[x] = score * scale;
        }
        __syncthreads();
        for (int row = tid; row < ROWS; row += blockDim.x) {
            const int i = r0 + row;
            softmax_window(a + row * K, K, s.attn && u0 == 0 && i < n ? s.attn + (long)i * K : (float *)0);
        }
        __syncthreads();
    } else {
        for (int j = tid; j < K; j += blockDim.x)
            a[j] = s.attn_logits[j];
        window_weights(a, K, (float *)0);
        if (s.attn && u0 == 0)
            for (int x = tid; x < ROWS * K; x += blockDim.x) {
                const int i = r0 + x / K;
                if (i < n)
                    s.attn[(long)i * K + x % K] = a[x % K];
            }
    }
}

/* The cell kernel with the recurrent product done inside: each tile's
 * (row, unit) runs cell_unit from its gates' sums, as cell_step_kernel
 * does from hg in memory.  A tile holds FUSED_COLS / G units: 4 of the
 * LSTM, 5 of the GRU (one column unused), 16 of a plain RNN. */
template <int G, int ROWS> __global__ void __launch_bounds__(CELL_THREADS)
    recurrent_step_kernel(struct cell_step s, const float *hprev, const float *w)
{
    constexpr int U = FUSED_COLS / G;
    static_assert(8 * FUSED_WINDOW >= CONFIG_MAX_ATTN_WINDOW, "a static window fits the smallest tile's weights");
    __shared__ float a[ROWS * FUSED_WINDOW];
    const int H = s.H, n = s.n, K = s.attn_window, tid = threadIdx.x;
    int r0, u0;
    tile_of_block<ROWS>(H, U, &r0, &u0);
    /* Column c is gate c / U of unit u0 + c % U: W's row g H + u0 + u. */
    const float *sums = tile_product<ROWS>(
        hprev, n, H, r0, w,
        [&](int c) {
            const int g = c / U, unit = u0 + c % U;
            return g < G && unit < H ? g * H + unit : -1;
        },
        [&] {
            inputs_ready();
            if (attends(s))
                tile_attention<ROWS>(s, r0, u0, a);
        });
    for (int x = tid; x < ROWS * U; x += blockDim.x) {
        const int row = x / U, u = x % U, i = r0 + row, k = u0 + u;
        if (i >= n || k >= H)
            continue;
        float hv[4];
        for (int g = 0; g < G; g++)
            hv[g] = sums[row * FUSED_COLS + g * U + u];
        const float *aw = !attends(s) ? (const float *)0 : s.attn_mode == ATTN_DYNAMIC ? a + row * K : a;
        cell_unit(s, cell_row_of(s, i), k, hv, aw);
    }
}

/* Dynamic attention's queries, q = hprev W_q^T, by the tiles of the
 * recurrent product: FUSED_COLS units of q a tile.  A row's scores need
 * its whole query, which no tile has, so each tile also leaves its part of
 * them, q . h_{t-1-j} over its units alone, in the row's hg (which the
 * fused step does not otherwise use; score_parts), for
 * recurrent_step_kernel to add up in order.  Added in a fixed order
 * rather than by atomics, the scores do not depend on how the blocks
 * ran. */
template <int ROWS> __global__ void __launch_bounds__(CELL_THREADS)
    query_kernel(struct cell_step s, const float *hprev, const float *w_q)
{
    const int H = s.H, K = s.attn_window;
    int r0, u0;
    tile_of_block<ROWS>(H, FUSED_COLS, &r0, &u0);
    const float *sums = tile_product<ROWS>(
        hprev, s.n, H, r0, w_q, [&](int c) { return u0 + c < H ? u0 + c : -1; }, [] { inputs_ready(); });
    for (int x = threadIdx.x; x < ROWS * FUSED_COLS; x += blockDim.x) {
        const int row = x / FUSED_COLS, c = x % FUSED_COLS, i = r0 + row;
        if (i < s.n && u0 + c < H)
            s.q[(long)i * H + u0 + c] = sums[x];
    }
    const bool vec = H % 4 == 0 && (uintptr_t)s.ring % 16 == 0;
    for (int x = threadIdx.x; x < ROWS * K; x += blockDim.x) {
        const int row = x / K, j = x % K, i = r0 + row;
        if (i >= s.n)
            continue;
        const float *h = cell_hist(s, cell_row_of(s, i), j + 2), *q = sums + row * FUSED_COLS;
        float part = 0.0f;
        for (int c = 0; h && c < FUSED_COLS; c += 4) {
            const float4 hv = load4(h + u0 + c, H - u0 - c, vec);
            part += q[c] * hv.x;
            part += q[c + 1] * hv.y;
            part += q[c + 2] * hv.z;
            part += q[c + 3] * hv.w;
        }
        score_parts(s, i, j)[u0 / FUSED_COLS] = part;
    }
}

/* Both kernels read the weights before inputs_ready, so they overlap the
 * kernel before them only where nothing can have just written the weights:
 * in training the optimizer rewrites them between batches, in inference
 * nothing does. */
template <int ROWS> static void fused_step(struct backend *be, const struct cell_step *s, const float *hprev,
                                           const float *w, const float *w_q)
{
    const int G = gates_of(s->cell), U = FUSED_COLS / G;
    const bool overlap = impl_of(be)->overlap && !s->cache;
    if (attends(*s) && s->attn_mode == ATTN_DYNAMIC)
        launch_on(be, overlap, query_kernel<ROWS>, tile_blocks(s->n, ROWS, s->H, FUSED_COLS), CELL_THREADS, *s,
                  hprev, w_q);
    launch_on(be, overlap,
              G == 4   ? recurrent_step_kernel<4, ROWS>
              : G == 3 ? recurrent_step_kernel<3, ROWS>
                       : recurrent_step_kernel<1, ROWS>,
              tile_blocks(s->n, ROWS, s->H, U), CELL_THREADS, *s, hprev, w);
}

/* The most rows a tile takes; a step of more takes several tiles.  64
 * unless built otherwise: tools/gpu-bundle.sh builds the benchmark with 32
 * and 16 too, for tools/gpu-run.sh bench to time the trade between a
 * tile's reuse of each W it loads (more rows) and the blocks a step
 * spreads over the SMs (fewer). */
#ifndef FUSED_ROWS_MAX
#define FUSED_ROWS_MAX 64
#endif

static_assert(FUSED_ROWS_MAX == 8 || FUSED_ROWS_MAX == 16 || FUSED_ROWS_MAX == 32 || FUSED_ROWS_MAX == 64,
              "a tile has 8, 16, 32 or 64 rows");

/* The rows of a tile for a step of n rows. */
static int fused_rows(int n)
{
    int rows = 8;
    while (rows < n && rows < FUSED_ROWS_MAX)
        rows *= 2;
    return rows;
}

int cuda_recurrent_step(struct backend *be, const struct cell_step *s, const float *hprev, const float *w,
                        const float *w_q)
{
    /* Dynamic attention's parts of scores, K a tile of the query, must fit
     * the row's hg, and its weights the block's shared memory. */
    const int parts = s->attn_window * query_tiles(s->H);
    if (be->recurrence != RECURRENCE_FUSED || impl_of(be)->precision != PRECISION_FP32 ||
        (attends(*s) && s->attn_mode == ATTN_DYNAMIC &&
         (s->attn_window > FUSED_WINDOW || parts > gates_of(s->cell) * s->H)))
        return 0;
    if (s->n <= 0)
        return 1;
    switch (fused_rows(s->n)) {
    case 8:
        fused_step<8>(be, s, hprev, w, w_q);
        break;
    case 16:
        fused_step<16>(be, s, hprev, w, w_q);
        break;
    case 32:
        fused_step<32>(be, s, hprev, w, w_q);
        break;
    default:
        fused_step<64>(be, s, hprev, w, w_q);
        break;
    }
    return 1;
}

