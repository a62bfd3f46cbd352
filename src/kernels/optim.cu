// Fused optimizer kernels for float32 master weights on CUDA (src/fused.rs): the global gradient
// norm accumulated on the device, one AdamW pass per parameter that clips, updates the moments
// and the weight in a single read and write of each (instead of ~20 elementwise kernels and a
// host round trip per parameter), and the per-step bf16 copies of the weights.
//
// All are bound by memory bandwidth: they read and write 16 bytes per thread and loop where the
// buffers are 16-byte aligned (candle's allocations are), element by element otherwise.

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// sumsq[0] += sum(g^2) over n elements (double accumulator: 1e9 float32 squares). One atomic
// per block, so the host launches few blocks (each loops).
extern "C" __global__ void grad_sumsq_f32(const float* __restrict__ g, uint64_t n, double* __restrict__ sumsq) {
    double acc = 0.0;
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nv = aligned16(g) ? n / 4 : 0;
    const float4* g4 = reinterpret_cast<const float4*>(g);
    for (uint64_t i = tid; i < nv; i += stride) {
        float4 x = g4[i];
        acc += (double)(x.x * x.x) + (double)(x.y * x.y) + (double)(x.z * x.z) + (double)(x.w * x.w);
    }
    for (uint64_t i = nv * 4 + tid; i < n; i += stride) {
        float x = g[i];
        acc += (double)(x * x);
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    __shared__ double warp_sums[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
        if (lane == 0) atomicAdd(sumsq, acc);
    }
}

// sumsq[0] += 0 * x[0]: leaves the sum as it is for a finite x and makes it NaN otherwise, so a
// non-finite loss stops the update as a non-finite gradient norm does, without the host reading
// the loss before it enqueues the step.
extern "C" __global__ void sumsq_guard(const double* __restrict__ x, double* __restrict__ sumsq) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *sumsq += 0.0 * x[0];
}

struct AdamW {
    float coef, lr, beta1, beta2, eps, decay, bc1, bc2_sqrt;
    __device__ __forceinline__ void apply(float& p, float g, float& m, float& v) const {
        if (coef != 1.f) g *= coef;
        float mi = beta1 * m + (1.f - beta1) * g;
        float vi = beta2 * v + (1.f - beta2) * (g * g);
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p = p * decay - lr * ((mi / bc1) / denom);
        m = mi;
        v = vi;
    }
};

// torch.nn.utils.clip_grad_norm_ (coef = max_norm / (norm + 1e-6), at most 1) then
// torch.optim.AdamW: p *= 1 - lr * wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps). A non-finite norm changes nothing: the
// trainer reports it and stops with the last good weights.
extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, uint64_t n, const double* __restrict__ sumsq,
                                     float max_norm, float lr, float beta1, float beta2, float eps,
                                     float decay, float bc1, float bc2_sqrt) {
    double norm = sqrt(*sumsq);
    if (!isfinite(norm)) return;
    AdamW a{1.f, lr, beta1, beta2, eps, decay, bc1, bc2_sqrt};
    if (max_norm > 0.f) {
        double c = (double)max_norm / (norm + 1e-6);
        if (c < 1.0) a.coef = (float)c;
    }
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const bool vec = aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v);
    const uint64_t nv = vec ? n / 4 : 0;
    for (uint64_t i = tid; i < nv; i += stride) {
        float4 pi = reinterpret_cast<float4*>(p)[i];
        float4 gi = reinterpret_cast<const float4*>(g)[i];
        float4 mi = reinterpret_cast<float4*>(m)[i];
        float4 vi = reinterpret_cast<float4*>(v)[i];
        a.apply(pi.x, gi.x, mi.x, vi.x);
        a.apply(pi.y, gi.y, mi.y, vi.y);
        a.apply(pi.z, gi.z, mi.z, vi.z);
        a.apply(pi.w, gi.w, mi.w, vi.w);
        reinterpret_cast<float4*>(p)[i] = pi;
        reinterpret_cast<float4*>(m)[i] = mi;
        reinterpret_cast<float4*>(v)[i] = vi;
    }
    for (uint64_t i = nv * 4 + tid; i < n; i += stride) {
        float pi = p[i], mi = m[i], vi = v[i];
        a.apply(pi, g[i], mi, vi);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

// y = bf16(x), round to nearest even (as candle's cast), into an existing buffer.
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, uint64_t n) {
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nv = aligned16(x) && ((uintptr_t)y & 7) == 0 ? n / 4 : 0;
    for (uint64_t i = tid; i < nv; i += stride) {
        float4 a = reinterpret_cast<const float4*>(x)[i];
        __nv_bfloat162 lo = __floats2bfloat162_rn(a.x, a.y), hi = __floats2bfloat162_rn(a.z, a.w);
        uint2 out;
        out.x = *reinterpret_cast<uint32_t*>(&lo);
        out.y = *reinterpret_cast<uint32_t*>(&hi);
        reinterpret_cast<uint2*>(y)[i] = out;
    }
    for (uint64_t i = nv * 4 + tid; i < n; i += stride) y[i] = __float2bfloat16_rn(x[i]);
}
