/* cell_grad.h - the arithmetic of one element of the GRU's and LSTM's
 * backward step, and the layout of the cache the forward keeps for it,
 * shared by the CPU backend (backend_cpu.c) and its CUDA twin
 * (cuda_train.cu; backend_cuda.cuh for the forward's cache).  The
 * backends differ in how they walk the elements (a vectorized loop over a
 * row; a thread per element) and in the sums over rows, never in the
 * formulas, which live here once.
 *
 * cache is the row's cache as the forward wrote it (CELL_CACHE in
 * backend.h), dxg and dhg the row's gate gradients; element k of gate q
 * is at q * H + k.
 */
#ifndef RRN_CELL_GRAD_H
#define RRN_CELL_GRAD_H

#ifdef __CUDACC__
#define CELL_GRAD_FN __host__ __device__ static inline
#else
#define CELL_GRAD_FN static inline __attribute__((always_inline))
#endif

/* The forward's side of the cache: element k of the row's GRU (r, z, n,
 * W_hn h + b_hn) and LSTM (i, f, g, o, c_t) values, as the functions
 * below read them. */
CELL_GRAD_FN void gru_cache_element(int H, int k, float *cache, float r, float z, float n, float hn)
{
    cache[k] = r;
    cache[H + k] = z;
    cache[2 * H + k] = n;
    cache[3 * H + k] = hn;
}

CELL_GRAD_FN void lstm_cache_element(int H, int k, float *cache, float ig, float fg, float gg, float og, float c)
{
    cache[k] = ig;
    cache[H + k] = fg;
    cache[2 * H + k] = gg;
    cache[3 * H + k] = og;
    cache[4 * H + k] = c;
}

/* GRU, cache (r, z, n, W_hn h + b_hn): dh is dL/dh_t at k, hprev h_{t-1}
 * at k; what flows into h_{t-1} through z is added to *dhprev. */
CELL_GRAD_FN void gru_grad_element(int H, int k, float dh, const float *cache, float hprev, float *dhprev,
                                   float *dxg, float *dhg)
{
    float r = cache[k], z = cache[H + k], n = cache[2 * H + k], hn = cache[3 * H + k];
    float dn = dh * (1.0f - z) * (1.0f - n * n);
    float dz = dh * (hprev - n) * z * (1.0f - z);
    float dr = dn * hn * r * (1.0f - r);
    *dhprev += dh * z;
    dxg[k] = dhg[k] = dr;
    dxg[H + k] = dhg[H + k] = dz;
    dxg[2 * H + k] = dn;
    dhg[2 * H + k] = dn * r;
}

/* LSTM, cache (i, f, g, o, c_t): dh is dL/dh_t at k, tanh_c tanh(c_t) by
 * the backend's own tanh, cprev c_{t-1} (0 at the start), peep the
 * peephole weight when has_peep.  *dc holds dL/dc_t from later steps and
 * receives dL/dc_{t-1}; *dpo gets the output gate's pre-activation
 * gradient (for the peephole's).  Returns the whole dL/dc_t, which the
 * attention term needs. */
CELL_GRAD_FN float lstm_grad_element(int H, int k, float dh, const float *cache, float tanh_c, float cprev,
                                     int has_peep, float peep, float *dc, float *dpo, float *dxg, float *dhg)
{
    float ig = cache[k], fg = cache[H + k], gg = cache[2 * H + k], og = cache[3 * H + k];
    float po = dh * tanh_c * og * (1.0f - og);
    float d = *dc + dh * og * (1.0f - tanh_c * tanh_c);
    if (has_peep)
        d += po * peep;
    dxg[k] = dhg[k] = d * gg * ig * (1.0f - ig);
    dxg[H + k] = dhg[H + k] = d * cprev * fg * (1.0f - fg);
    dxg[2 * H + k] = dhg[2 * H + k] = d * ig * (1.0f - gg * gg);
    dxg[3 * H + k] = dhg[3 * H + k] = po;
    *dc = d * fg;
    *dpo = po;
    return d;
}

#endif
