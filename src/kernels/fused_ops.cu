// Fused bf16 layers with their backward passes for training on CUDA (src/fused.rs): RMSNorm,
// rotary embedding and SiLU-gated products. Each replaces a chain of ~10 elementwise kernels
// (and the float32 intermediates autograd would keep for the backward) with one kernel.
// Arithmetic in float32, rounding to bf16 where transformers' bf16 path rounds.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define NORM_THREADS 256
#define NORM_COLS 32  // hidden size up to NORM_THREADS * NORM_COLS = 8192

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
extern "C" __global__ void rms_norm_bwd(const bf16* __restrict__ x, const float* __restrict__ w,
                                        const bf16* __restrict__ dy, const float* __restrict__ rstd_in,
                                        bf16* __restrict__ dx, float* __restrict__ dw, int rows, int h) {
    __shared__ float red[NORM_THREADS / 32];
    float dwp[NORM_COLS];
#pragma unroll
    for (int c = 0; c < NORM_COLS; c++) dwp[c] = 0.f;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long off = (long)r * h;
        const float rstd = rstd_in[r];
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < NORM_COLS; c++) {
            int j = threadIdx.x + c * NORM_THREADS;
            if (j < h) {
                float xh = __bfloat162float(x[off + j]) * rstd;
                float d = __bfloat162float(dy[off + j]);
                float wj = __bfloat162float(__float2bfloat16(w[j]));
                dot += d * wj * xh;
                dwp[c] += d * __bfloat162float(__float2bfloat16(xh));
            }
        }
        float mean = block_sum(dot, red) / h;
#pragma unroll
        for (int c = 0; c < NORM_COLS; c++) {
            int j = threadIdx.x + c * NORM_THREADS;
            if (j < h) {
                float xh = __bfloat162float(x[off + j]) * rstd;
                float g = __bfloat162float(dy[off + j]) * __bfloat162float(__float2bfloat16(w[j]));
                dx[off + j] = __float2bfloat16(rstd * (g - xh * mean));
            }
        }
    }
#pragma unroll
    for (int c = 0; c < NORM_COLS; c++) {
        int j = threadIdx.x + c * NORM_THREADS;
        if (j < h) atomicAdd(dw + j, dwp[c]);
    }
}

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

__device__ __forceinline__ float sigmoidf(float g) { return 1.f / (1.f + expf(-g)); }

// y = silu(g) * u.
extern "C" __global__ void silu_mul_fwd(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                        bf16* __restrict__ y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gv = __bfloat162float(g[i]);
        float s = __bfloat162float(__float2bfloat16(gv * sigmoidf(gv)));
        y[i] = __float2bfloat16(s * __bfloat162float(u[i]));
    }
}

// dg = dy * u * silu'(g), du = dy * silu(g); silu'(g) = sig(g) (1 + g (1 - sig(g))).
extern "C" __global__ void silu_mul_bwd(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                        const bf16* __restrict__ dy, bf16* __restrict__ dg, bf16* __restrict__ du,
                                        long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gv = __bfloat162float(g[i]), uv = __bfloat162float(u[i]), d = __bfloat162float(dy[i]);
        float sg = sigmoidf(gv);
        dg[i] = __float2bfloat16(d * uv * sg * (1.f + gv * (1.f - sg)));
        du[i] = __float2bfloat16(d * __bfloat162float(__float2bfloat16(gv * sg)));
    }
}

// y = a + b (bf16, rounded once, as candle's add), 8 elements per 16-byte load.
extern "C" __global__ void add_bf16(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                    bf16* __restrict__ y, uint64_t n) {
    const uint64_t tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    const uint64_t nv = (((uintptr_t)a | (uintptr_t)b | (uintptr_t)y) & 15) == 0 ? n / 8 : 0;
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
