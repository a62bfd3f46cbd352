// Fused bf16 layers with their backward passes for training on CUDA (src/fused.rs): RMSNorm,
// rotary embedding and SiLU-gated products. Each replaces a chain of ~10 elementwise kernels
// (and the float32 intermediates autograd would keep for the backward) with one kernel.
// Arithmetic in float32, rounding to bf16 where transformers' bf16 path rounds.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define NORM_THREADS 256
// Hidden sizes up to NORM_THREADS * 32 = 8192 (the backward's largest instance, below).

__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < NORM_THREADS / 32; i++) t += shared[i];
    return t;
}

// y = bf16(bf16(x * rstd) * w), rstd = 1 / sqrt(mean(x^2) + eps); one block a row, grid-stride.
extern "C" __global__ void rms_norm_fwd(const bf16* __restrict__ x, const float* __restrict__ w, bf16* __restrict__ y,
                                        float* __restrict__ rstd_out, int rows, int h, float eps) {
    __shared__ float red[NORM_THREADS / 32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16* xr = x + (long)r * h;
        float ss = 0.f;
        for (int j = threadIdx.x; j < h; j += NORM_THREADS) {
            float v = __bfloat162float(xr[j]);
            ss += v * v;
        }
        float rstd = rsqrtf(block_sum(ss, red) / h + eps);
        for (int j = threadIdx.x; j < h; j += NORM_THREADS) {
            float n = __bfloat162float(__float2bfloat16(__bfloat162float(xr[j]) * rstd));
            y[(long)r * h + j] = __float2bfloat16(n * __bfloat162float(__float2bfloat16(w[j])));
        }
        if (threadIdx.x == 0) rstd_out[r] = rstd;
    }
}

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, xhat = x * rstd;
// dw[j] += sum_rows dy * bf16(xhat) (float32, atomically across blocks).
// COLS columns a thread (hidden <= 256 * COLS), instantiated per size: the row's x and dy and the
// rounded weight stay in registers, so the kernel reads each once, and a thread's unused columns
// cost neither registers nor predicated instructions (a single 32-column version ran at a
// quarter occupancy with 60% of its lanes predicated off at hidden 2048).
template <int COLS>
__device__ void rms_norm_bwd_impl(const bf16* __restrict__ x, const float* __restrict__ w,
                                  const bf16* __restrict__ dy, const float* __restrict__ rstd_in,
                                  bf16* __restrict__ dx, float* __restrict__ dw, int rows, int h) {
    __shared__ float red[NORM_THREADS / 32];
    float wr[COLS], dwp[COLS];
#pragma unroll
    for (int c = 0; c < COLS; c++) {
        int j = threadIdx.x + c * NORM_THREADS;
        wr[c] = j < h ? __bfloat162float(__float2bfloat16(w[j])) : 0.f;
        dwp[c] = 0.f;
    }
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long off = (long)r * h;
        const float rstd = rstd_in[r];
        float xh[COLS], d[COLS];
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < COLS; c++) {
            int j = threadIdx.x + c * NORM_THREADS;
            xh[c] = j < h ? __bfloat162float(x[off + j]) * rstd : 0.f;
            d[c] = j < h ? __bfloat162float(dy[off + j]) : 0.f;
            dot += d[c] * wr[c] * xh[c];
            dwp[c] += d[c] * __bfloat162float(__float2bfloat16(xh[c]));
        }
        float mean = block_sum(dot, red) / h;
#pragma unroll
        for (int c = 0; c < COLS; c++) {
            int j = threadIdx.x + c * NORM_THREADS;
            if (j < h) dx[off + j] = __float2bfloat16(rstd * (d[c] * wr[c] - xh[c] * mean));
        }
    }
#pragma unroll
    for (int c = 0; c < COLS; c++) {
        int j = threadIdx.x + c * NORM_THREADS;
        if (j < h) atomicAdd(dw + j, dwp[c]);
    }
}

#define RMS_NORM_BWD(COLS)                                                                                    \
    extern "C" __global__ void rms_norm_bwd_c##COLS(const bf16* x, const float* w, const bf16* dy,            \
                                                   const float* rstd, bf16* dx, float* dw, int rows, int h) { \
        rms_norm_bwd_impl<COLS>(x, w, dy, rstd, dx, dw, rows, h);                                            \
    }
RMS_NORM_BWD(1)
RMS_NORM_BWD(2)
RMS_NORM_BWD(4)
RMS_NORM_BWD(8)
RMS_NORM_BWD(12)
RMS_NORM_BWD(16)
RMS_NORM_BWD(24)
RMS_NORM_BWD(32)

// Rotary embedding of x (tokens, heads, d), the first `rot` dims rotated with cos/sin
// (tokens, rot) as transformers' rotate_half: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; the rest
// copied. backward != 0 applies the transpose (the gradient): y1 = x1 c1 + x2 s2,
// y2 = x2 c2 - x1 s1.
extern "C" __global__ void rope_bf16(const bf16* __restrict__ x, const bf16* __restrict__ cosv,
                                     const bf16* __restrict__ sinv, bf16* __restrict__ y, int tokens, int heads,
                                     int d, int rot, int backward) {
    const int half = rot / 2;
    const long total = (long)tokens * heads * (d - half);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const int k = i % (d - half);
        const long th = i / (d - half);  // token * heads + head
        const int t = th / heads;
        const bf16* xr = x + th * d;
        bf16* yr = y + th * d;
        if (k < half) {
            float x1 = __bfloat162float(xr[k]), x2 = __bfloat162float(xr[k + half]);
            float c1 = __bfloat162float(cosv[(long)t * rot + k]), c2 = __bfloat162float(cosv[(long)t * rot + k + half]);
            float s1 = __bfloat162float(sinv[(long)t * rot + k]), s2 = __bfloat162float(sinv[(long)t * rot + k + half]);
            if (backward) {
                yr[k] = __float2bfloat16(x1 * c1 + x2 * s2);
                yr[k + half] = __float2bfloat16(x2 * c2 - x1 * s1);
            } else {
                yr[k] = __float2bfloat16(x1 * c1 - x2 * s1);
                yr[k + half] = __float2bfloat16(x2 * c2 + x1 * s2);
            }
        } else {
            int j = k + half;  // rot..d: not rotated
            yr[j] = xr[j];
        }
    }
}

// rope_heads_bf16's 8-byte accesses (four bf16 widened to float, and back, rounding to nearest).
__device__ __forceinline__ float4 load_bf16x4(const bf16* p) {
    uint2 raw = *reinterpret_cast<const uint2*>(p);
    float2 lo = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.x));
    float2 hi = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&raw.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ void store_bf16x4_rn(bf16* p, float a, float b, float c, float d) {
    __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    uint2 raw;
    raw.x = *reinterpret_cast<uint32_t*>(&lo);
    raw.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(p) = raw;
}

// Heads of d elements between row-strided buffers, four pairs (or eight copied elements) a
// thread: head h of token t is read at in + t * in_row + h * d and written at
// out + t * out_row + h * d. mode 0 rotates (RoPE), 1 applies the transposed rotation (its
// gradient), 2 copies. With a layer's q, k and v projected by one stacked product, this splits
// that product's rows into contiguous rotated q and k and a copied v, and joins their gradients
// back, in place of strided copies and a concatenation. Whole heads rotated, d a multiple of 8,
// every row 8-byte aligned (the caller checks); the same arithmetic as rope_bf16, so the same
// bits. Also RoPE's common case on contiguous heads: rope_bf16 (a pair a thread, 2-byte
// accesses, 64-bit divisions) ran at about a third of the memory bandwidth.
extern "C" __global__ void rope_heads_bf16(const bf16* __restrict__ in, long in_row, const bf16* __restrict__ cosv,
                                           const bf16* __restrict__ sinv, bf16* __restrict__ out, long out_row,
                                           int tokens, int heads, int d, int mode) {
    const unsigned half = d / 2, quads = half / 4;
    const unsigned total = (unsigned)tokens * heads * quads;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const unsigned th = i / quads;
        const unsigned k = (i - th * quads) * 4;
        const unsigned t = th / heads, h = th - t * heads;
        const bf16* xr = in + (size_t)t * in_row + (size_t)h * d;
        bf16* yr = out + (size_t)t * out_row + (size_t)h * d;
        if (mode == 2) {
            *reinterpret_cast<uint2*>(yr + k) = *reinterpret_cast<const uint2*>(xr + k);
            *reinterpret_cast<uint2*>(yr + k + half) = *reinterpret_cast<const uint2*>(xr + k + half);
            continue;
        }
        const float4 x1 = load_bf16x4(xr + k), x2 = load_bf16x4(xr + k + half);
        const size_t cr = (size_t)t * d + k;
        const float4 c1 = load_bf16x4(cosv + cr), c2 = load_bf16x4(cosv + cr + half);
        const float4 s1 = load_bf16x4(sinv + cr), s2 = load_bf16x4(sinv + cr + half);
        if (mode == 1) {
            store_bf16x4_rn(yr + k, x1.x * c1.x + x2.x * s2.x, x1.y * c1.y + x2.y * s2.y,
                            x1.z * c1.z + x2.z * s2.z, x1.w * c1.w + x2.w * s2.w);
            store_bf16x4_rn(yr + k + half, x2.x * c2.x - x1.x * s1.x, x2.y * c2.y - x1.y * s1.y,
                            x2.z * c2.z - x1.z * s1.z, x2.w * c2.w - x1.w * s1.w);
        } else {
            store_bf16x4_rn(yr + k, x1.x * c1.x - x2.x * s1.x, x1.y * c1.y - x2.y * s1.y,
                            x1.z * c1.z - x2.z * s1.z, x1.w * c1.w - x2.w * s1.w);
            store_bf16x4_rn(yr + k + half, x2.x * c2.x + x1.x * s2.x, x2.y * c2.y + x1.y * s2.y,
                            x2.z * c2.z + x1.z * s2.z, x2.w * c2.w + x1.w * s2.w);
        }
    }
}

__device__ __forceinline__ float sigmoidf(float g) { return 1.f / (1.f + expf(-g)); }

// Eight bf16 at a time through one 16-byte access where every buffer is 16-byte aligned (one bf16
// a thread made these kernels issue-bound at about half the memory bandwidth), the tail and
// unaligned buffers one at a time; the arithmetic per element is the same either way.
struct Bf16x8 {
    uint4 raw;
    __device__ __forceinline__ float get(int i) const {
        return __bfloat162float(reinterpret_cast<const bf16*>(&raw)[i]);
    }
    __device__ __forceinline__ void set(int i, float v) { reinterpret_cast<bf16*>(&raw)[i] = __float2bfloat16(v); }
};

__device__ __forceinline__ bool all_aligned16(const void* a, const void* b, const void* c, const void* d = nullptr,
                                              const void* e = nullptr) {
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d | (uintptr_t)e) & 15) == 0;
}

__device__ __forceinline__ float silu_mul_one(float gv, float uv) {
    return __bfloat162float(__float2bfloat16(gv * sigmoidf(gv))) * uv;
}

// y = silu(g) * u.
extern "C" __global__ void silu_mul_fwd(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                        bf16* __restrict__ y, long n) {
    const long tid = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    const long nv = all_aligned16(g, u, y) ? n / 8 : 0;
    for (long i = tid; i < nv; i += stride) {
        Bf16x8 gv{reinterpret_cast<const uint4*>(g)[i]}, uv{reinterpret_cast<const uint4*>(u)[i]}, out;
#pragma unroll
        for (int e = 0; e < 8; e++) out.set(e, silu_mul_one(gv.get(e), uv.get(e)));
        reinterpret_cast<uint4*>(y)[i] = out.raw;
    }
    for (long i = nv * 8 + tid; i < n; i += stride)
        y[i] = __float2bfloat16(silu_mul_one(__bfloat162float(g[i]), __bfloat162float(u[i])));
}

// dg = dy * u * silu'(g), du = dy * silu(g); silu'(g) = sig(g) (1 + g (1 - sig(g))).
__device__ __forceinline__ void silu_mul_grad_one(float gv, float uv, float d, float& dg, float& du) {
    float sg = sigmoidf(gv);
    dg = d * uv * sg * (1.f + gv * (1.f - sg));
    du = d * __bfloat162float(__float2bfloat16(gv * sg));
}

extern "C" __global__ void silu_mul_bwd(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                        const bf16* __restrict__ dy, bf16* __restrict__ dg, bf16* __restrict__ du,
                                        long n) {
    const long tid = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    const long nv = all_aligned16(g, u, dy, dg, du) ? n / 8 : 0;
    for (long i = tid; i < nv; i += stride) {
        Bf16x8 gv{reinterpret_cast<const uint4*>(g)[i]}, uv{reinterpret_cast<const uint4*>(u)[i]},
            dv{reinterpret_cast<const uint4*>(dy)[i]}, og, ou;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            float a, b;
            silu_mul_grad_one(gv.get(e), uv.get(e), dv.get(e), a, b);
            og.set(e, a);
            ou.set(e, b);
        }
        reinterpret_cast<uint4*>(dg)[i] = og.raw;
        reinterpret_cast<uint4*>(du)[i] = ou.raw;
    }
    for (long i = nv * 8 + tid; i < n; i += stride) {
        float a, b;
        silu_mul_grad_one(__bfloat162float(g[i]), __bfloat162float(u[i]), __bfloat162float(dy[i]), a, b);
        dg[i] = __float2bfloat16(a);
        du[i] = __float2bfloat16(b);
    }
}

// y = a + b (bf16, rounded once, as candle's add), 8 elements per 16-byte load.
extern "C" __global__ void add_bf16(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                    bf16* __restrict__ y, uint64_t n) {
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nv = all_aligned16(a, b, y) ? n / 8 : 0;
    for (uint64_t i = tid; i < nv; i += stride) {
        uint4 x = reinterpret_cast<const uint4*>(a)[i];
        uint4 z = reinterpret_cast<const uint4*>(b)[i];
        const __nv_bfloat162* x2 = reinterpret_cast<const __nv_bfloat162*>(&x);
        const __nv_bfloat162* z2 = reinterpret_cast<const __nv_bfloat162*>(&z);
        uint4 out;
        __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
        for (int j = 0; j < 4; j++) o2[j] = __hadd2(x2[j], z2[j]);
        reinterpret_cast<uint4*>(y)[i] = out;
    }
    for (uint64_t i = nv * 8 + tid; i < n; i += stride) y[i] = __hadd(a[i], b[i]);
}

// Masked cross-entropy over the vocabulary, one block per row of logits (only rows that carry
// loss are passed in): the forward keeps the row's log-sum-exp for the backward, which writes
// the logits' gradient (softmax - onehot(target)) * g in one pass. Float32 arithmetic on bf16
// logits, as the float32 cast + log-sum-exp + gather chain it replaces, without materialising
// float32 logits.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

extern "C" __global__ void ce_fwd_bf16(const bf16* __restrict__ logits, const uint32_t* __restrict__ targets,
                                       float* __restrict__ lse_out, float* __restrict__ nll_out, int rows,
                                       int vocab) {
    __shared__ float sm[32], ss[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16* x = logits + (size_t)r * vocab;
        float m = -INFINITY, s = 0.f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float v = __bfloat162float(x[j]);
            if (v > m) {
                s = s * expf(m - v) + 1.f;
                m = v;
            } else {
                s += expf(v - m);
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
            lse_merge(m, s, m2, s2);
        }
        int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        __syncthreads();
        if (lane == 0) {
            sm[warp] = m;
            ss[warp] = s;
        }
        __syncthreads();
        if (warp == 0) {
            m = lane < (int)(blockDim.x / 32) ? sm[lane] : -INFINITY;
            s = lane < (int)(blockDim.x / 32) ? ss[lane] : 0.f;
            for (int o = 16; o > 0; o >>= 1) {
                float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
                lse_merge(m, s, m2, s2);
            }
            if (lane == 0) {
                float l = m + logf(s);
                uint32_t t = targets[r];
                lse_out[r] = l;
                nll_out[r] = t < (uint32_t)vocab ? l - __bfloat162float(x[t]) : __int_as_float(0x7fc00000);
            }
        }
    }
}

extern "C" __global__ void ce_bwd_bf16(const bf16* __restrict__ logits, const uint32_t* __restrict__ targets,
                                       const float* __restrict__ lse, const float* __restrict__ g,
                                       bf16* __restrict__ dx, int rows, int vocab) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16* x = logits + (size_t)r * vocab;
        bf16* d = dx + (size_t)r * vocab;
        float l = lse[r], gr = g[r];
        uint32_t t = targets[r];
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            float p = expf(__bfloat162float(x[j]) - l);
            d[j] = __float2bfloat16((p - (j == (int)t ? 1.f : 0.f)) * gr);
        }
    }
}

// Rows of a table: y[i] = table[idx[i]] (an embedding lookup, or picking the rows that carry
// loss), and its backward, the rows' gradients added into a zeroed table (atomics: an index can
// repeat). Candle's index_add loops over every index for every output element.
template <typename T>
__device__ void gather_rows(const T* __restrict__ table, const uint32_t* __restrict__ idx, T* __restrict__ y,
                            int n, int cols) {
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const T* src = table + (size_t)idx[i] * cols;
        T* dst = y + (size_t)i * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
    }
}

template <typename T>
__device__ void scatter_add_rows(const T* __restrict__ dy, const uint32_t* __restrict__ idx, T* __restrict__ dtable,
                                 int n, int cols) {
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const T* src = dy + (size_t)i * cols;
        T* dst = dtable + (size_t)idx[i] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) atomicAdd(dst + c, src[c]);
    }
}

extern "C" __global__ void gather_rows_f32(const float* t, const uint32_t* i, float* y, int n, int c) { gather_rows(t, i, y, n, c); }
extern "C" __global__ void gather_rows_bf16(const bf16* t, const uint32_t* i, bf16* y, int n, int c) { gather_rows(t, i, y, n, c); }
extern "C" __global__ void scatter_add_rows_f32(const float* d, const uint32_t* i, float* t, int n, int c) { scatter_add_rows(d, i, t, n, c); }
extern "C" __global__ void scatter_add_rows_bf16(const bf16* d, const uint32_t* i, bf16* t, int n, int c) { scatter_add_rows(d, i, t, n, c); }
