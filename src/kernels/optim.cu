// Fused optimizer kernels for float32 master weights on CUDA (src/fused.rs): the global gradient
// norm accumulated on the device, and one AdamW pass per parameter that clips, updates the
// moments and the weight in a single read and write of each, instead of ~20 elementwise kernels
// and a host round trip per parameter.

#include <stdint.h>

// sumsq[0] += sum(g^2) over n elements (double accumulator: 1e9 float32 squares).
extern "C" __global__ void grad_sumsq_f32(const float* __restrict__ g, uint64_t n, double* __restrict__ sumsq) {
    double acc = 0.0;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
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
    float coef = 1.f;
    if (max_norm > 0.f) {
        double c = (double)max_norm / (norm + 1e-6);
        if (c < 1.0) coef = (float)c;
    }
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        float gi = g[i];
        if (coef != 1.f) gi *= coef;
        float mi = beta1 * m[i] + (1.f - beta1) * gi;
        float vi = beta2 * v[i] + (1.f - beta2) * (gi * gi);
        float pi = p[i] * decay;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi - lr * ((mi / bc1) / denom);
        m[i] = mi;
        v[i] = vi;
    }
}
