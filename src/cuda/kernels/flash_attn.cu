// Variable-length causal flash attention, forward and backward (the FlashAttention-2 algorithm),
// for packsft's padding-free batches. Compiled to PTX by src/cuda/kernels/build.rs (feature
// `flash-attn`) and launched from src/flash.rs.
//
// Layout: q (tokens, heads, D), k and v (tokens, kv_heads, D), bf16, contiguous. Sequence `s`
// occupies tokens [seq_start[s], seq_start[s] + seq_len[s]); tokens outside every sequence
// (padding of a padded batch) are neither queries nor keys and their outputs and gradients stay 0.
// Query head h reads key/value head h / (heads / kv_heads) (GQA/MQA).
//
// Query t of a sequence sees key s of the same sequence iff s <= t and, with a sliding window W,
// t - s < W (W keys including itself, transformers' semantics; window <= 0 means none).
//
// Soft-capping (Gemma 2's attn_logit_softcapping, the `_cap` kernels): a score x = scale * q.k
// becomes cap * tanh(x / cap) before the mask and the softmax; the backward multiplies dS by the
// derivative 1 - tanh^2 before it meets Q or K. The plain kernels are the same template without
// it (CAP = false), so models without soft-capping pay nothing for it.
//
// Tensor cores: mma.sync m16n8k16 (bf16 in, f32 accumulate). The accumulator layout of one MMA
// is the A-operand layout of the next, so P = softmax(S) feeds P·V from registers.
// Fragment layout per lane (g = lane / 4, t = lane % 4):
//   A 16x16: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C 16x8 : c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
// Softmax runs in the log2 domain (exp2f); the saved log-sum-exp is log2-based too.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define WARPS 4
#define THREADS (WARPS * 32)
#define BM 64   // query rows per block (16 per warp)
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ uint32_t pack2(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void sts32(bf16* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

// Four 8x8 matrices, transposed on load: lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const bf16* p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// Four 8x8 matrices as stored: lanes 8i..8i+7 give the row addresses of matrix i. One
// instruction instead of four 32-bit loads per fragment.
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16* p) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

// A fragment of rows m0.., columns k0.. of a row-major [m][k] tile: matrices (rows 0-7, k 0-7),
// (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) are a0..a3.
__device__ __forceinline__ void load_a(uint32_t a[4], const bf16* s, int stride, int m0, int k0, int lane) {
    ldsm_x4(a, s + (m0 + (lane & 15)) * stride + k0 + (lane >> 4) * 8);
}

// B fragments (k0..k0+15) of B = N^T, N a row-major [n][k] tile, for two n-tiles: r[0], r[1]
// for n0..n0+7 and r[2], r[3] for n0+8..n0+15.
__device__ __forceinline__ void load_b_nk_x2(uint32_t r[4], const bf16* s, int stride, int n0, int k0, int lane) {
    ldsm_x4(r, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * stride + k0 + ((lane >> 3) & 1) * 8);
}

// B fragments for columns n0..n0+15 (two n-tiles) of a row-major [k][n] tile, rows k0..k0+15:
// r[0], r[1] for n0..n0+7 and r[2], r[3] for n0+8..n0+15.
__device__ __forceinline__ void load_b_kn_x2(uint32_t r[4], const bf16* s, int stride, int k0, int n0, int lane) {
    ldsm_x4_t(r, s + (k0 + (lane & 15)) * stride + n0 + (lane >> 4) * 8);
}

// acc (16 x N) = rows m0..m0+15 of A times B^T, A and B row-major tiles with D columns (stride
// D + 8): S = Q K^T and its relatives, the accumulator in C layout.
template <int D, int N>
__device__ __forceinline__ void mma_rows_abt(float (&acc)[N / 8][4], const bf16* A, int m0, const bf16* B,
                                             int lane) {
#pragma unroll
    for (int j = 0; j < N / 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t a[4];
        load_a(a, A, D + 8, m0, kk * 16, lane);
#pragma unroll
        for (int j = 0; j < N / 8; j += 2) {
            uint32_t b[4];
            load_b_nk_x2(b, B, D + 8, j * 8, kk * 16, lane);
            mma16816(acc[j], a, b[0], b[1]);
            mma16816(acc[j + 1], a, b[2], b[3]);
        }
    }
}

// acc (16 x D) += P M, P (16 x K) in registers in C layout (rounded to bf16: the C layout of one
// MMA is the A layout of the next), M a row-major [K][D] tile (stride D + 8).
template <int D, int K>
__device__ __forceinline__ void mma_regs_b(float (&acc)[D / 8][4], const float (&p)[K / 8][4], const bf16* M,
                                           int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        uint32_t a[4] = {pack2(p[2 * kk][0], p[2 * kk][1]), pack2(p[2 * kk][2], p[2 * kk][3]),
                         pack2(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int i = 0; i < D / 16; i++) {
            uint32_t b[4];
            load_b_kn_x2(b, M, D + 8, kk * 16, i * 16, lane);
            mma16816(acc[2 * i], a, b[0], b[1]);
            mma16816(acc[2 * i + 1], a, b[2], b[3]);
        }
    }
}

// 16 bytes global → shared without a register round trip (zero-filled where !valid).
__device__ __forceinline__ void cp_async16(bf16* smem, const bf16* gmem, bool valid) {
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
}

// One float (zero-filled where !valid; gmem must still be a readable address).
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem, bool valid) {
    uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copies `rows` rows of D bf16 (global row stride `gstride` elements) into shared memory (row
// stride D + 8) with cp.async, so the next tile streams in while the warps compute on the current
// one; rows at or past `valid` are zero-filled so that masked products never meet NaN. The caller
// commits the group and waits for it (cp_async_wait) before the block synchronises.
template <int D>
__device__ __forceinline__ void load_tile_async(bf16* s, const bf16* g, long gstride, int rows, int valid) {
    constexpr int CH = D / 8;
    for (int i = threadIdx.x; i < rows * CH; i += THREADS) {
        int r = i / CH, c = i % CH;
        bool ok = r < valid;
        // Row 0 of a tile is always inside its sequence: a readable address for the zero fill.
        cp_async16(s + r * (D + 8) + c * 8, ok ? g + r * gstride + c * 8 : g, ok);
    }
}

// A score in the log2 domain: x * sl2, or with soft-capping (CAP) tanh(x * inv_cap) * cap_l2
// (inv_cap = scale / cap, cap_l2 = cap * log2 e), its tanh left in `th` for the backward's
// derivative 1 - th^2.
template <bool CAP>
__device__ __forceinline__ float score_l2(float x, float sl2, float inv_cap, float cap_l2, float& th) {
    if (CAP) {
        th = tanhf(x * inv_cap);
        return th * cap_l2;
    }
    th = 0.f;
    return x * sl2;
}

__device__ __forceinline__ bool visible(int qi, int kj, int len, int window) {
    return kj <= qi && qi < len && (window <= 0 || qi - kj < window);
}

// The first key tile (of BN keys) that a query tile starting at q0 can see: 0, or with a sliding
// window the tile holding key q0 - window + 1.
template <int BN>
__device__ __forceinline__ int first_key_tile(int q0, int window) {
    return window > 0 ? max(0, q0 - window + 1) / BN * BN : 0;
}

// Starts loading the K tile and the V tile of kv head hk (BN rows from token `row`, the first
// `valid` of them inside the sequence) into dst and dst + BN * (D + 8).
template <int D, int BN>
__device__ __forceinline__ void load_kv_tile_async(bf16* dst, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                                   int row, int valid, int kv_heads, int hk) {
    load_tile_async<D>(dst, k + ((long)row * kv_heads + hk) * D, (long)kv_heads * D, BN, valid);
    load_tile_async<D>(dst + BN * (D + 8), v + ((long)row * kv_heads + hk) * D, (long)kv_heads * D, BN, valid);
}

// Forward: one block per (query tile of BM rows of one sequence, head).
// lse: (heads, tokens) float, log2 domain.
template <int D, int BN, bool CAP>
__device__ void fwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                           bf16* __restrict__ o, float* __restrict__ lse, const int* __restrict__ tiles,
                           const int* __restrict__ seq_start, const int* __restrict__ seq_len, int tokens,
                           int heads, int kv_heads, float scale, int window, float softcap) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int S = D + 8;
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* KVs = Qs + BM * S;  // two buffers of (K tile, V tile)

    const int seq = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int base = seq_start[seq], len = seq_len[seq];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float sl2 = scale * LOG2E, inv_cap = CAP ? scale / softcap : 0.f, cap_l2 = softcap * LOG2E;

    // The Q tile streams in with the first K/V tile (one wait for both).
    load_tile_async<D>(Qs, q + ((long)(base + q0) * heads + h) * D, (long)heads * D, BM, len - q0);

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    const int qrow = q0 + warp * 16;  // this warp's first query row
    const int kend = min(len, q0 + BM);
    const int kbeg = first_key_tile<BN>(q0, window);
    auto issue = [&](int k0, int b) {
        load_kv_tile_async<D, BN>(KVs + b * 2 * BN * S, k, v, base + k0, len - k0, kv_heads, hk);
    };
    if (kbeg < kend) issue(kbeg, 0);
    cp_async_commit();
    int buf = 0;
    for (int k0 = kbeg; k0 < kend; k0 += BN, buf ^= 1) {
        if (k0 + BN < kend) issue(k0 + BN, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16* Ks = KVs + buf * 2 * BN * S;
        const bf16* Vs = Ks + BN * S;
        // Keys past this warp's last row, or before its window, contribute nothing.
        if (!(k0 > qrow + 15 || (window > 0 && k0 + BN - 1 <= qrow - window))) {
        float s[BN / 8][4];
        mma_rows_abt<D, BN>(s, Qs, warp * 16, Ks, lane);
        float mx[2] = {m[0], m[1]};
        // Most tiles are wholly visible to the warp's 16 rows (below the diagonal, inside the
        // sequence and the window): only the others pay for the per-element mask.
        const bool full = k0 + BN - 1 <= qrow && k0 + BN <= len && (window <= 0 || qrow + 15 - k0 < window);
        if (full) {
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float th, x = score_l2<CAP>(s[j][e], sl2, inv_cap, cap_l2, th);
                    s[j][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
        } else {
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int qi = qrow + g + (e >> 1) * 8, kj = k0 + j * 8 + 2 * t + (e & 1);
                    float th, x = visible(qi, kj, len, window) ? score_l2<CAP>(s[j][e], sl2, inv_cap, cap_l2, th)
                                                               : -INFINITY;
                    s[j][e] = x;
                    mx[e >> 1] = fmaxf(mx[e >> 1], x);
                }
        }
        float alpha[2], mu[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
            mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row with nothing visible yet
            alpha[r] = exp2f(m[r] - mu[r]);
            m[r] = mx[r];
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            acc[i][0] *= alpha[0];
            acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1];
            acc[i][3] *= alpha[1];
        }
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = exp2f(s[j][e] - mu[e >> 1]);
                s[j][e] = p;
                l[e >> 1] += p;
            }
        mma_regs_b<D, BN>(acc, s, Vs, lane);
        }
        __syncthreads();  // the next iteration loads into this buffer
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffff, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = qrow + g + r * 8;
        if (qi >= len) continue;
        float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        bf16* orow = o + ((long)(base + qi) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; i++) sts32(orow + i * 8 + 2 * t, pack2(acc[i][2 * r] * inv, acc[i][2 * r + 1] * inv));
        if (t == 0) lse[(long)h * tokens + base + qi] = l[r] > 0.f ? m[r] + log2f(l[r]) : INFINITY;
    }
}

// Backward, pass 1 (dK, dV): one block per (key tile of BN = 64 keys of one sequence, query
// head); warp w owns keys 16w..16w+15 and loops over the query tiles that see them, recomputing
// P from the saved lse. dk, dv (tokens, heads, D) float per query head (dk unscaled), summed over
// a GQA group by flash_bwd_finalize. delta (heads, tokens) = rowsum(dO * O).
template <int D, bool CAP>
__device__ void bwd_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                           const bf16* __restrict__ dout, const float* __restrict__ lse,
                           const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv,
                           const int* __restrict__ tiles, const int* __restrict__ seq_start,
                           const int* __restrict__ seq_len, int tokens, int heads, int kv_heads, float scale,
                           int window, float softcap) {
    constexpr int BN = 64;
    constexpr int S = D + 8;
    // Two (Q, dO) buffers where shared memory allows (one for head_dim 256, within Ampere's).
    constexpr int NBUF = D <= 128 ? 2 : 1;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
    bf16* Vs = Ks + BN * S;
    bf16* QdO = Vs + BN * S;  // NBUF x (Q tile, dO tile)
    float* stats = reinterpret_cast<float*>(QdO + NBUF * 2 * BM * S);  // NBUF x (lse, delta)

    const int seq = tiles[2 * blockIdx.x], k0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int base = seq_start[seq], len = seq_len[seq];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float sl2 = scale * LOG2E, inv_cap = CAP ? scale / softcap : 0.f, cap_l2 = softcap * LOG2E;

    // K and V stream in with the first (Q, dO) tile (one wait for all).
    load_tile_async<D>(Ks, k + ((long)(base + k0) * kv_heads + hk) * D, (long)kv_heads * D, BN, len - k0);
    load_tile_async<D>(Vs, v + ((long)(base + k0) * kv_heads + hk) * D, (long)kv_heads * D, BN, len - k0);

    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[i][e] = dva[i][e] = 0.f;

    const int krow = k0 + warp * 16;  // this warp's first key
    int qend = len;
    if (window > 0) qend = min(len, k0 + BN - 1 + window);
    auto issue = [&](int q0, int b) {
        bf16* Qb = QdO + b * 2 * BM * S;
        load_tile_async<D>(Qb, q + ((long)(base + q0) * heads + h) * D, (long)heads * D, BM, len - q0);
        load_tile_async<D>(Qb + BM * S, dout + ((long)(base + q0) * heads + h) * D, (long)heads * D, BM,
                           len - q0);
        // The statistics too: a plain load here would stall every iteration on global memory.
        float* st = stats + b * 2 * BM;
        const long r0 = (long)h * tokens + base + q0;
        for (int i = threadIdx.x; i < BM; i += THREADS) {
            bool ok = q0 + i < len;
            cp_async4(st + i, lse + (ok ? r0 + i : r0), ok);
            cp_async4(st + BM + i, delta + (ok ? r0 + i : r0), ok);
        }
    };
    const int qbeg = k0 / BM * BM;
    if (NBUF == 2 && qbeg < qend) issue(qbeg, 0);
    cp_async_commit();
    int buf = 0;
    for (int q0 = qbeg; q0 < qend; q0 += BM, buf = (buf + 1) % NBUF) {
        if (NBUF == 2) {
            if (q0 + BM < qend) issue(q0 + BM, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            issue(q0, 0);
            cp_async_commit();
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* Qs = QdO + buf * 2 * BM * S;
        const bf16* dOs = Qs + BM * S;
        const float* lse_s = stats + buf * 2 * BM;
        const float* dlt_s = lse_s + BM;
        const bool active = !(q0 + BM - 1 < krow || (window > 0 && q0 - (krow + 15) >= window));
        if (active) {
            // S^T = K Q^T for this warp's 16 keys and the tile's BM queries, then P^T.
            float p[BM / 8][4];
            // The soft-cap's tanh per element (CAP only: one float array otherwise unused).
            float th[CAP ? BM / 8 : 1][4];
            mma_rows_abt<D, BM>(p, Ks, warp * 16, Qs, lane);
            // Wholly visible (every query of the tile after the warp's 16 keys, inside the
            // sequence and the window): no per-element mask.
            const bool full = krow + 15 <= q0 && q0 + BM <= len && (window <= 0 || q0 + BM - 1 - krow < window);
            if (full) {
#pragma unroll
                for (int j = 0; j < BM / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        float tj;
                        p[j][e] = exp2f(score_l2<CAP>(p[j][e], sl2, inv_cap, cap_l2, tj) -
                                        lse_s[j * 8 + 2 * t + (e & 1)]);
                        if (CAP) th[CAP ? j : 0][e] = tj;
                    }
            } else {
#pragma unroll
                for (int j = 0; j < BM / 8; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        int kj = krow + g + (e >> 1) * 8, ql = j * 8 + 2 * t + (e & 1);
                        float tj;
                        float x = score_l2<CAP>(p[j][e], sl2, inv_cap, cap_l2, tj);
                        p[j][e] = visible(q0 + ql, kj, len, window) && kj < len ? exp2f(x - lse_s[ql]) : 0.f;
                        if (CAP) th[CAP ? j : 0][e] = tj;
                    }
            }
            // dV += P^T dO
            mma_regs_b<D, BM>(dva, p, dOs, lane);
            // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta)
            float ds[BM / 8][4];
            mma_rows_abt<D, BM>(ds, Vs, warp * 16, dOs, lane);
#pragma unroll
            for (int j = 0; j < BM / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int ql = j * 8 + 2 * t + (e & 1);
                    ds[j][e] = p[j][e] * (ds[j][e] - dlt_s[ql]);
                    if (CAP) ds[j][e] *= 1.f - th[CAP ? j : 0][e] * th[CAP ? j : 0][e];
                }
            // dK += dS^T Q
            mma_regs_b<D, BM>(dka, ds, Qs, lane);
        }
        __syncthreads();  // the next iteration loads into this buffer
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int kj = krow + g + r * 8;
        if (kj >= len) continue;
        long off = ((long)(base + kj) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            *reinterpret_cast<float2*>(dk + off + i * 8 + 2 * t) = make_float2(dka[i][2 * r], dka[i][2 * r + 1]);
            *reinterpret_cast<float2*>(dv + off + i * 8 + 2 * t) = make_float2(dva[i][2 * r], dva[i][2 * r + 1]);
        }
    }
}

// Backward, pass 2 (dQ): one block per (query tile, head), as the forward: recomputes S and P
// from the saved lse, dP = dO V^T, dS = P * (dP - delta), and accumulates dQ = dS K * scale in
// registers, so no block writes another's rows (no atomics).
template <int D, int BN, bool CAP>
__device__ void bwd_dq_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const bf16* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ delta, bf16* __restrict__ dq, const int* __restrict__ tiles,
                              const int* __restrict__ seq_start, const int* __restrict__ seq_len, int tokens,
                              int heads, int kv_heads, float scale, int window, float softcap) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    constexpr int S = D + 8;
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* dOs = Qs + BM * S;
    bf16* KVs = dOs + BM * S;  // two buffers of (K tile, V tile)

    const int seq = tiles[2 * blockIdx.x], q0 = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int base = seq_start[seq], len = seq_len[seq];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float sl2 = scale * LOG2E, inv_cap = CAP ? scale / softcap : 0.f, cap_l2 = softcap * LOG2E;

    // Q and dO stream in with the first K/V tile (one wait for all).
    load_tile_async<D>(Qs, q + ((long)(base + q0) * heads + h) * D, (long)heads * D, BM, len - q0);
    load_tile_async<D>(dOs, dout + ((long)(base + q0) * heads + h) * D, (long)heads * D, BM, len - q0);
    const int qrow = q0 + warp * 16;
    float lse_r[2], dlt_r[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = qrow + g + r * 8;
        lse_r[r] = qi < len ? lse[(long)h * tokens + base + qi] : 0.f;
        dlt_r[r] = qi < len ? delta[(long)h * tokens + base + qi] : 0.f;
    }
    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    const int kend = min(len, q0 + BM);
    const int kbeg = first_key_tile<BN>(q0, window);
    auto issue = [&](int k0, int b) {
        load_kv_tile_async<D, BN>(KVs + b * 2 * BN * S, k, v, base + k0, len - k0, kv_heads, hk);
    };
    if (kbeg < kend) issue(kbeg, 0);
    cp_async_commit();
    int buf = 0;
    for (int k0 = kbeg; k0 < kend; k0 += BN, buf ^= 1) {
        if (k0 + BN < kend) issue(k0 + BN, buf ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const bf16* Ks = KVs + buf * 2 * BN * S;
        const bf16* Vs = Ks + BN * S;
        if (!(k0 > qrow + 15 || (window > 0 && k0 + BN - 1 <= qrow - window))) {
        float p[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) p[j][e] = dp[j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t aq[4], ao[4];
            load_a(aq, Qs, S, warp * 16, kk * 16, lane);
            load_a(ao, dOs, S, warp * 16, kk * 16, lane);
#pragma unroll
            for (int j = 0; j < BN / 8; j += 2) {
                uint32_t b[4];
                load_b_nk_x2(b, Ks, S, j * 8, kk * 16, lane);
                mma16816(p[j], aq, b[0], b[1]);
                mma16816(p[j + 1], aq, b[2], b[3]);
                load_b_nk_x2(b, Vs, S, j * 8, kk * 16, lane);
                mma16816(dp[j], ao, b[0], b[1]);
                mma16816(dp[j + 1], ao, b[2], b[3]);
            }
        }
        // As in the forward: the mask only where the tile is not wholly visible to the warp.
        const bool full = k0 + BN - 1 <= qrow && qrow + 15 < len && (window <= 0 || qrow + 15 - k0 < window);
        if (full) {
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e >> 1;
                    float tj;
                    dp[j][e] = exp2f(score_l2<CAP>(p[j][e], sl2, inv_cap, cap_l2, tj) - lse_r[r]) *
                               (dp[j][e] - dlt_r[r]);
                    if (CAP) dp[j][e] *= 1.f - tj * tj;
                }
        } else {
#pragma unroll
            for (int j = 0; j < BN / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int r = e >> 1, qi = qrow + g + r * 8, kj = k0 + j * 8 + 2 * t + (e & 1);
                    float tj;
                    float x = score_l2<CAP>(p[j][e], sl2, inv_cap, cap_l2, tj);
                    float pv = visible(qi, kj, len, window) ? exp2f(x - lse_r[r]) : 0.f;
                    dp[j][e] = pv * (dp[j][e] - dlt_r[r]);
                    if (CAP) dp[j][e] *= 1.f - tj * tj;
                }
        }
        mma_regs_b<D, BN>(acc, dp, Ks, lane);
        }
        __syncthreads();  // the next iteration loads into this buffer
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = qrow + g + r * 8;
        if (qi >= len) continue;
        bf16* row = dq + ((long)(base + qi) * heads + h) * D;
#pragma unroll
        for (int i = 0; i < D / 8; i++) sts32(row + i * 8 + 2 * t, pack2(acc[i][2 * r] * scale, acc[i][2 * r + 1] * scale));
    }
}

// Each kernel twice: flash_*_d<D> (CAP = false) and flash_*_cap_d<D> (soft-capped scores), with
// one signature (`softcap` unused by the first) so that the launcher only changes the name.
#define FWD(D, BN, NAME, CAP)                                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                \
        const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const int* tiles, const int* seq_start, \
        const int* seq_len, int tokens, int heads, int kv_heads, float scale, int window, float softcap) {    \
        fwd_kernel<D, BN, CAP>(q, k, v, o, lse, tiles, seq_start, seq_len, tokens, heads, kv_heads, scale,     \
                               window, softcap);                                                              \
    }

#define BWD(D, NAME, CAP)                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                 \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,    \
        float* dk, float* dv, const int* tiles, const int* seq_start, const int* seq_len, int tokens, int heads, \
        int kv_heads, float scale, int window, float softcap) {                                                \
        bwd_kernel<D, CAP>(q, k, v, dout, lse, delta, dk, dv, tiles, seq_start, seq_len, tokens, heads,         \
                           kv_heads, scale, window, softcap);                                                   \
    }

#define BWD_DQ(D, BN, NAME, CAP)                                                                                 \
    extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                                 \
        const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,    \
        bf16* dq, const int* tiles, const int* seq_start, const int* seq_len, int tokens, int heads,           \
        int kv_heads, float scale, int window, float softcap) {                                                \
        bwd_dq_kernel<D, BN, CAP>(q, k, v, dout, lse, delta, dq, tiles, seq_start, seq_len, tokens, heads,      \
                                  kv_heads, scale, window, softcap);                                            \
    }

#define ALL(D, BN)                                 \
    FWD(D, BN, flash_fwd_d##D, false)              \
    FWD(D, BN, flash_fwd_cap_d##D, true)           \
    BWD(D, flash_bwd_d##D, false)                  \
    BWD(D, flash_bwd_cap_d##D, true)               \
    BWD_DQ(D, BN, flash_bwd_dq_d##D, false)        \
    BWD_DQ(D, BN, flash_bwd_dq_cap_d##D, true)

ALL(64, 64)
ALL(80, 64)
ALL(96, 64)
ALL(128, 64)
ALL(256, 32)

// delta[h * tokens + n] = sum_d dO[n, h, d] * O[n, h, d] (the backward's row correction); a
// warp per (token, head), grid-stride.
extern "C" __global__ void flash_bwd_delta(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                           float* __restrict__ delta, int tokens, int heads, int d) {
    const int lane = threadIdx.x % 32;
    const long warps = (long)gridDim.x * blockDim.x / 32;
    for (long w = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32; w < (long)tokens * heads; w += warps) {
        const bf16* a = o + w * d;
        const bf16* b = dout + w * d;
        float s = 0.f;
        for (int j = lane; j < d; j += 32) s += __bfloat162float(a[j]) * __bfloat162float(b[j]);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        if (lane == 0) {
            int n = w / heads, h = w % heads;
            delta[(long)h * tokens + n] = s;
        }
    }
}

// flash_bwd_delta with 16-byte loads where o and dout are 16-byte aligned and d a multiple of 8
// (every compiled head dim): `lanes` (a power of two, at least d / 8) lanes a row, 8 elements a
// load, the row sums reduced within those lanes. Two-byte loads, a warp a row, had left the
// plain kernel at about a third of the memory bandwidth.
extern "C" __global__ void flash_bwd_delta_x8(const bf16* __restrict__ o, const bf16* __restrict__ dout,
                                              float* __restrict__ delta, int tokens, int heads, int d,
                                              int lanes) {
    const int lane = threadIdx.x % 32, sub = lane % lanes, per_warp = 32 / lanes;
    const long rows = (long)tokens * heads;
    const long warps = (long)gridDim.x * blockDim.x / 32;
    // Warp-uniform loop bounds: every lane reaches the shuffles.
    for (long r0 = (blockIdx.x * (long)blockDim.x + threadIdx.x) / 32 * per_warp; r0 < rows;
         r0 += warps * per_warp) {
        const long row = r0 + lane / lanes;
        float s = 0.f;
        if (row < rows) {
            for (int j = sub * 8; j < d; j += lanes * 8) {
                const uint4 a = *reinterpret_cast<const uint4*>(o + row * d + j);
                const uint4 b = *reinterpret_cast<const uint4*>(dout + row * d + j);
                const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
                const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float2 x = __bfloat1622float2(a2[e]), y = __bfloat1622float2(b2[e]);
                    s += x.x * y.x + x.y * y.y;
                }
            }
        }
        for (int off = lanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
        if (sub == 0 && row < rows) delta[(long)(row % heads) * tokens + row / heads] = s;
    }
}

// The backward's per-query-head float32 accumulators to bf16 gradients: dk (dv) of a key/value
// head = the sum over its query heads of dk_exp * scale (dv_exp).
extern "C" __global__ void flash_bwd_finalize(const float* __restrict__ dk_exp, const float* __restrict__ dv_exp,
                                              bf16* __restrict__ dk, bf16* __restrict__ dv, int tokens, int heads,
                                              int kv_heads, int d, float scale) {
    const long nkv = (long)tokens * kv_heads * d;
    const int group = heads / kv_heads;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < nkv; i += (long)gridDim.x * blockDim.x) {
        long n = i / ((long)kv_heads * d);
        int hk = (i / d) % kv_heads, j = i % d;
        const long base = (n * heads + (long)hk * group) * d + j;
        float sk = 0.f, sv = 0.f;
        for (int g = 0; g < group; g++) {
            sk += dk_exp[base + (long)g * d];
            sv += dv_exp[base + (long)g * d];
        }
        dk[i] = __float2bfloat16(sk * scale);
        dv[i] = __float2bfloat16(sv);
    }
}
