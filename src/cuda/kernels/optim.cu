// Fused optimizer kernels for float32 master weights on CUDA (src/fused.rs): the global gradient
// norm accumulated on the device, one AdamW pass that clips, updates the moments and the weight
// in a single read and write of each (instead of ~20 elementwise kernels and a host round trip
// per parameter) and writes the next step's bf16 compute copy, and the bf16 copies alone.
//
// All are bound by memory bandwidth: they read and write 16 bytes per thread and loop where the
// buffers are 16-byte aligned (candle's allocations are), element by element otherwise.
//
// A gradient is float32 or bf16 (the weight matrices' gradients, as cuBLAS writes them for bf16
// compute, and as PyTorch's autocast makes them): read as bf16 it is widened exactly, so both
// give the same update, and the optimizer reads 2 bytes a weight less in each pass.

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// One parameter of a multi-tensor launch (the layout of `Slot` in src/fused.rs): a launch
// covers every parameter of the model, cut into chunks of CHUNK elements; `prefix[i]` is the
// first chunk of slot i, so a block finds its slot by binary search. One launch per pass instead
// of one per parameter: ~600 launches a step fewer, and no tail of tiny kernels for the norms.
struct Slot {
    float* p;         // weight (AdamW) or source (cast)
    const void* g;    // gradient: float32, or bf16 where g_bf16
    float* m;
    float* v;
    __nv_bfloat16* copy;  // bf16 copy of the updated weight, or null
    uint64_t n;
    float decay, bc1, bc2_sqrt;
    uint32_t g_bf16;
};

// Four gradient elements from i on (i a multiple of 4, where grad_vec allows the wide load), and
// one element.
__device__ __forceinline__ float4 grad4(const Slot& s, uint64_t i) {
    if (s.g_bf16) {
        uint2 raw = *reinterpret_cast<const uint2*>(reinterpret_cast<const __nv_bfloat16*>(s.g) + i);
        float2 lo = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.x));
        float2 hi = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.y));
        return make_float4(lo.x, lo.y, hi.x, hi.y);
    }
    return *reinterpret_cast<const float4*>(reinterpret_cast<const float*>(s.g) + i);
}
__device__ __forceinline__ float grad1(const Slot& s, uint64_t i) {
    return s.g_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(s.g)[i])
                    : reinterpret_cast<const float*>(s.g)[i];
}
// Whether the gradient allows grad4: 16-byte aligned float32, 8-byte aligned bf16.
__device__ __forceinline__ bool grad_vec(const Slot& s) {
    return ((uintptr_t)s.g & (s.g_bf16 ? 7 : 15)) == 0;
}

#define CHUNK 16384

__device__ __forceinline__ int slot_of(const uint32_t* prefix, int nslots, uint32_t chunk) {
    int lo = 0, hi = nslots;  // prefix[lo] <= chunk < prefix[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (prefix[mid] <= chunk) lo = mid; else hi = mid;
    }
    return lo;
}

// The slot that chunk `c` belongs to, and the chunk's element range [start, end) within it.
__device__ __forceinline__ const Slot& chunk_range(const Slot* slots, const uint32_t* prefix, int nslots,
                                                   uint32_t c, uint64_t& start, uint64_t& end) {
    const int si = slot_of(prefix, nslots, c);
    const Slot& s = slots[si];
    start = (uint64_t)(c - prefix[si]) * CHUNK;
    end = min(start + CHUNK, s.n);
    return s;
}

// sumsq[0] += sum(g^2) over every slot's gradient (double accumulator: 1e9 float32 squares);
// one atomic per block, and few blocks (each strides over chunks).
extern "C" __global__ void grad_sumsq_multi(const Slot* __restrict__ slots, const uint32_t* __restrict__ prefix,
                                            int nslots, double* __restrict__ sumsq) {
    double acc = 0.0;
    const uint32_t chunks = prefix[nslots];
    for (uint32_t c = blockIdx.x; c < chunks; c += gridDim.x) {
        uint64_t start, end;
        const Slot& s = chunk_range(slots, prefix, nslots, c, start, end);
        const uint64_t vend = grad_vec(s) ? start + (end - start) / 4 * 4 : start;
        // Unrolled so that a thread has several loads in flight: one 8-byte bf16 load at a time
        // left the pass bound by latency, well under the memory bandwidth.
#pragma unroll 4
        for (uint64_t i = start + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x) {
            float4 x = grad4(s, i);
            acc += (double)(x.x * x.x) + (double)(x.y * x.y) + (double)(x.z * x.z) + (double)(x.w * x.w);
        }
        for (uint64_t i = vend + threadIdx.x; i < end; i += blockDim.x) {
            float x = grad1(s, i);
            acc += (double)(x * x);
        }
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

__device__ __forceinline__ void store_bf16x4(__nv_bfloat16* y, float4 a) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(a.x, a.y), hi = __floats2bfloat162_rn(a.z, a.w);
    uint2 out;
    out.x = *reinterpret_cast<uint32_t*>(&lo);
    out.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(y) = out;
}

// torch.nn.utils.clip_grad_norm_ (coef = max_norm / (norm + 1e-6), at most 1) then
// torch.optim.AdamW for every slot: p *= 1 - lr * wd; m = b1 m + (1 - b1) g;
// v = b2 v + (1 - b2) g^2; p -= lr * (m / bc1) / (sqrt(v) / sqrt(bc2) + eps); and the bf16 copy
// of the new weight where the slot has one (the next forward's compute weights, without a
// separate cast pass). A non-finite norm changes nothing: the trainer reports it and stops with
// the last good weights.
extern "C" __global__ void adamw_multi(const Slot* __restrict__ slots, const uint32_t* __restrict__ prefix,
                                       int nslots, const double* __restrict__ sumsq, float max_norm, float lr,
                                       float beta1, float beta2, float eps) {
    double norm = sqrt(*sumsq);
    if (!isfinite(norm)) return;
    float coef = 1.f;
    if (max_norm > 0.f) {
        double c = (double)max_norm / (norm + 1e-6);
        if (c < 1.0) coef = (float)c;
    }
    const uint32_t chunks = prefix[nslots];
    for (uint32_t c = blockIdx.x; c < chunks; c += gridDim.x) {
        uint64_t start, end;
        const Slot& s = chunk_range(slots, prefix, nslots, c, start, end);
        const AdamW a{coef, lr, beta1, beta2, eps, s.decay, s.bc1, s.bc2_sqrt};
        float *p = s.p, *m = s.m, *v = s.v;
        __nv_bfloat16* copy = s.copy;
        const bool vec = aligned16(p) && grad_vec(s) && aligned16(m) && aligned16(v) &&
                         ((uintptr_t)copy & 7) == 0;
        const uint64_t vend = vec ? start + (end - start) / 4 * 4 : start;
        for (uint64_t i = start + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x) {
            float4 pi = *reinterpret_cast<float4*>(p + i);
            float4 gi = grad4(s, i);
            float4 mi = *reinterpret_cast<float4*>(m + i);
            float4 vi = *reinterpret_cast<float4*>(v + i);
            a.apply(pi.x, gi.x, mi.x, vi.x);
            a.apply(pi.y, gi.y, mi.y, vi.y);
            a.apply(pi.z, gi.z, mi.z, vi.z);
            a.apply(pi.w, gi.w, mi.w, vi.w);
            *reinterpret_cast<float4*>(p + i) = pi;
            *reinterpret_cast<float4*>(m + i) = mi;
            *reinterpret_cast<float4*>(v + i) = vi;
            if (copy) store_bf16x4(copy + i, pi);
        }
        for (uint64_t i = vend + threadIdx.x; i < end; i += blockDim.x) {
            float pi = p[i], mi = m[i], vi = v[i];
            a.apply(pi, grad1(s, i), mi, vi);
            p[i] = pi;
            m[i] = mi;
            v[i] = vi;
            if (copy) copy[i] = __float2bfloat16_rn(pi);
        }
    }
}

// copy = bf16(p) for every slot (round to nearest even, as candle's cast), in place.
extern "C" __global__ void cast_bf16_multi(const Slot* __restrict__ slots, const uint32_t* __restrict__ prefix,
                                           int nslots) {
    const uint32_t chunks = prefix[nslots];
    for (uint32_t c = blockIdx.x; c < chunks; c += gridDim.x) {
        uint64_t start, end;
        const Slot& s = chunk_range(slots, prefix, nslots, c, start, end);
        const float* x = s.p;
        __nv_bfloat16* y = s.copy;
        const uint64_t vend = aligned16(x) && ((uintptr_t)y & 7) == 0 ? start + (end - start) / 4 * 4 : start;
        for (uint64_t i = start + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x)
            store_bf16x4(y + i, *reinterpret_cast<const float4*>(x + i));
        for (uint64_t i = vend + threadIdx.x; i < end; i += blockDim.x) y[i] = __float2bfloat16_rn(x[i]);
    }
}

// p[i] = float(g[i]) for every slot: gradients (bf16 or float32) widened into one flat float32
// buffer (each slot's p points at its place in it), in one launch, so that a data-parallel
// bucket costs one kernel and one collective instead of a cast and a copy per parameter.
extern "C" __global__ void widen_into_multi(const Slot* __restrict__ slots, const uint32_t* __restrict__ prefix,
                                            int nslots) {
    const uint32_t chunks = prefix[nslots];
    for (uint32_t c = blockIdx.x; c < chunks; c += gridDim.x) {
        uint64_t start, end;
        const Slot& s = chunk_range(slots, prefix, nslots, c, start, end);
        float* y = s.p;
        const uint64_t vend = grad_vec(s) && aligned16(y) ? start + (end - start) / 4 * 4 : start;
        for (uint64_t i = start + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x)
            *reinterpret_cast<float4*>(y + i) = grad4(s, i);
        for (uint64_t i = vend + threadIdx.x; i < end; i += blockDim.x) y[i] = grad1(s, i);
    }
}
