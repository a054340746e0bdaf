/* cuda_bf16.h - the part of CUDA's bfloat16 header that the CUDA backend
 * (engine's .cu files) uses, for the CPU emulator (see cuda_runtime.h): the
 * type, and FP32 to BF16 rounded to the nearest, ties to even, NaN
 * kept a NaN, as __float2bfloat16_rn does. */
#ifndef RRN_CUDA_EMU_BF16_H
#define RRN_CUDA_EMU_BF16_H

#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    uint16_t bits;
};

static inline __nv_bfloat16 __float2bfloat16_rn(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return __nv_bfloat16{(uint16_t)((u >> 16) | 0x40u)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(uint16_t)(u >> 16)};
}

#endif
