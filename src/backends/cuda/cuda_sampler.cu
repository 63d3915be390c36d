// Token sampling on the GPU by the host sampler's rules (backends/sampler.cpp): repetition penalty
// over the distinct ids of a device-resident window, temperature, top-k, softmax over the kept
// candidates, min-p against the top probability, top-p, then one draw from a counter-based random
// stream (seed, draw number). Many rows at once, each with its own parameters: the rows'
// arguments, windows and counters are staged in device memory (CudaBackend::stage_sampling), so
// the kernels read nothing from the host and a captured decode step replays them.
//
// A step is four kernels. The three passes over the whole vocabulary are spread over many blocks
// (one block alone reads 128K logits at only ~25 GB/s); the decisions are taken by one block:
//   1. prep:   the penalty (in place, as the host does to its vector), per-block maxima;
//   2. hist:   a histogram of the distance below the max (1024 bins): counts and fixed-point
//              probability weights (exact integer sums, so every block and every replay agrees);
//   3. gather: from the histogram every block works out the same plan and gathers candidates:
//      - sorted:   when the bins that surely hold the final set have <= 4096 ids, all of them;
//      - boundary: (top-k off) the one bin where top-p or min-p cuts; the bins above it are kept
//                  whole;
//   4. finish (one block): sorted: sort, then cut and draw exactly as the host does. Boundary: the
//      cut inside the sorted boundary bin, then a draw that picks a bin by its weight and, when it
//      is not the boundary, the id inside it with one light pass. Otherwise (top-k above 4096
//      ids, a bin too full to sort): exact thresholds on the logits' order-preserving keys,
//      narrowing a key window 1024-fold per pass, then a drawing pass.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "backends/cuda/cuda_internal.cuh"
#include "backends/sampler.h"

namespace qf {
namespace cuda {

namespace {
constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = kThreads;     // one histogram bin per thread when scanning bins
constexpr int kCap = 4 * kThreads;  // candidates sorted in shared memory (4 per thread)
constexpr int kMaxBlocks = 128;     // blocks of the passes over the whole vocabulary
constexpr float kFixed = 1099511627776.0f;  // 2^40: probability weights as integers, so sums are exact
// Blocks of the passes over a vocabulary (four logits per thread and group).
int pass_blocks(int64_t vocab) {
  return static_cast<int>(std::clamp<int64_t>(((vocab + 3) / 4 + kThreads - 1) / kThreads, 1, kMaxBlocks));
}
}  // namespace

// Device-side state that each step reads and advances.
struct SamplerCounters {
  unsigned long long draw;  // the random stream's draw number: ids in the sequence so far
  int len;                  // ids in the window
  int head;                 // the window slot the next id goes to
};

// What the kernels of one step hand each other.
struct SamplerScratch {
  unsigned long long partial[kMaxBlocks];  // per block of the first kernel: its largest (key, id)
  unsigned int nonfinite[kMaxBlocks];      // and whether it saw a NaN or an infinity
  unsigned int count[kBins];               // histogram of the distance below the max
  unsigned long long mass[kBins];          // and the fixed-point weight in each bin
  unsigned int n_cand;
  unsigned long long cand[kCap];           // gathered candidates, (key << 32) | ~id
};

namespace {

struct SampleArgs {
  int vocab;
  int blocks;  // of the passes over the whole vocabulary
  float temperature, top_p, min_p, penalty;
  int top_k;
  unsigned long long seed;
  int32_t* window;
  float* scratch;
  int window_size;  // 0: no penalty
  SamplerCounters* counters;
  SamplerScratch* step;
  int32_t* token;
  int* pos;
};

struct Shared {
  union {
    unsigned long long cand[kCap];  // (key << 32) | ~id: one descending sort orders by logit, then id
    struct {
      unsigned int count[kBins];
      unsigned long long mass[kBins];
    } hist;
  };
  unsigned int red32[kWarps + 1];
  unsigned long long red64[kWarps + 1];
  double redd[kWarps + 1];
  int b_k, b_p, next_p, next_m, n_cand, b_count, found, winner, pick, n_m, n_p, jbin;
  unsigned int n, base, cut_c, cut_before_c;
  unsigned long long cut_before_m, offset, above;
  double total;
};

// ---- keys and per-element quantities ------------------------------------------------------------

// NaN sorts below everything (as -inf); -0 equals +0.
__device__ __forceinline__ float clean(float v) { return v != v ? -INFINITY : (v == 0.0f ? 0.0f : v); }

// Order-preserving unsigned key of a float (larger logit, larger key).
__device__ __forceinline__ uint32_t key_of(float v) {
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float value_of(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
__device__ __forceinline__ unsigned long long pack(uint32_t key, int id) {
  return (static_cast<unsigned long long>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}
__device__ __forceinline__ int id_of(unsigned long long p) {
  return static_cast<int>(0xffffffffu - static_cast<uint32_t>(p));
}

// What every pass computes from one logit. The _rn intrinsics keep the compiler from contracting
// differently in different passes: the bin and weight of a logit must be the same everywhere.
struct Ctx {
  float mx;       // the largest logit (after the penalty)
  float temp;
  float inv_bin;  // histogram bins per logit unit below the max
  float dmax;     // distances at or beyond this are not binned and weigh 0 (e^-30 at most)
  __device__ float e(float v) const { return expf(__fdiv_rn(__fsub_rn(v, mx), temp)); }
  __device__ int bin_of_distance(float d) const {
    const float b = __fmul_rn(d, inv_bin);
    return b < static_cast<float>(kBins) ? static_cast<int>(b) : kBins;
  }
  __device__ int bin(float v) const { return bin_of_distance(__fsub_rn(mx, v)); }
  static __device__ unsigned long long fixed(float e) { return __float2ull_rn(e * kFixed); }
  __device__ unsigned long long weight(float v) const { return bin(v) < kBins ? fixed(e(v)) : 0ull; }
};

// ---- block-wide primitives ----------------------------------------------------------------------

// Exclusive prefix of v over the threads in order; *total receives the sum. Deterministic (a fixed
// order of additions), also for doubles. tmp holds kWarps + 1 values.
template <typename T>
__device__ T block_exclusive_scan(T v, T* tmp, T* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  T excl = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) excl = T(0);
  if (lane == 31) tmp[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    T wi = lane < kWarps ? tmp[lane] : T(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T n = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += n;
    }
    T we = __shfl_up_sync(0xffffffffu, wi, 1);
    if (lane == 0) we = T(0);
    if (lane < kWarps) tmp[lane] = we;
    if (lane == 31) tmp[kWarps] = wi;
  }
  __syncthreads();
  const T r = tmp[warp] + excl;
  *total = tmp[kWarps];
  __syncthreads();
  return r;
}

template <typename T>
__device__ T block_sum(T v, T* tmp) {
  T total;
  block_exclusive_scan(v, tmp, &total);
  return total;
}

__device__ unsigned long long block_max(unsigned long long v, unsigned long long* tmp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) tmp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? tmp[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) tmp[kWarps] = v;
  }
  __syncthreads();
  v = tmp[kWarps];
  __syncthreads();
  return v;
}

// Four consecutive logits (group g: ids 4g .. 4g+3); those past n read as -inf.
__device__ __forceinline__ float4 load4(const float* p, int n, int g, bool aligned) {
  const int i = 4 * g;
  if (aligned && i + 3 < n) return reinterpret_cast<const float4*>(p)[g];
  return make_float4(i < n ? p[i] : -INFINITY, i + 1 < n ? p[i + 1] : -INFINITY, i + 2 < n ? p[i + 2] : -INFINITY,
                     i + 3 < n ? p[i + 3] : -INFINITY);
}

__device__ __forceinline__ float lane_of(const float4& v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// f(id, logit) for the groups of four ids g = first, first + stride, ... (4g .. 4g+3). A block
// pass uses (threadIdx.x, kThreads): thread t sees the groups t, t + 1024, ..., the order the draw
// walk relies on. Full groups are read as float4 with four loads in flight per thread, without
// branches between them: one block has to hide L2 latency by itself.
template <typename F>
__device__ __forceinline__ void for_each_group(const float* p, int n, bool aligned, int first, int stride, F&& f) {
  const int groups = (n + 3) >> 2;
  int g = first;
  if (aligned) {
    const int full = n >> 2;
    const float4* p4 = reinterpret_cast<const float4*>(p);
    for (; g + 3 * stride < full; g += 4 * stride) {
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) v[u] = p4[g + u * stride];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = 4 * (g + u * stride);
        f(i, v[u].x);
        f(i + 1, v[u].y);
        f(i + 2, v[u].z);
        f(i + 3, v[u].w);
      }
    }
    for (; g < full; g += stride) {
      const float4 v = p4[g];
      f(4 * g, v.x);
      f(4 * g + 1, v.y);
      f(4 * g + 2, v.z);
      f(4 * g + 3, v.w);
    }
  }
  for (; g < groups; g += stride) {  // the last, partial group; every group when unaligned
    const float4 v = load4(p, n, g, false);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (4 * g + j < n) f(4 * g + j, lane_of(v, j));
  }
}

template <typename F>
__device__ __forceinline__ void for_each_logit(const float* p, int n, bool aligned, F&& f) {
  for_each_group(p, n, aligned, threadIdx.x, kThreads, f);
}

// The same over the whole grid (the passes spread over many blocks).
template <typename F>
__device__ __forceinline__ void for_each_logit_grid(const float* p, int n, bool aligned, F&& f) {
  for_each_group(p, n, aligned, blockIdx.x * kThreads + threadIdx.x, gridDim.x * kThreads, f);
}

// Descending bitonic sort of s[0, n) (n a power of two) in shared memory.
__device__ void bitonic_sort_desc(unsigned long long* s, int n) {
  for (int k = 2; k <= n; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int q = threadIdx.x; q < n / 2; q += kThreads) {
        const int i = ((q & ~(j - 1)) << 1) | (q & (j - 1));
        const unsigned long long x = s[i], y = s[i + j];
        const bool desc = (i & k) == 0;
        if (desc ? x < y : x > y) {
          s[i] = y;
          s[i + j] = x;
        }
      }
      __syncthreads();
    }
}

// ---- exact thresholds (the path for large candidate sets) ---------------------------------------

// The kept ids are those with key > key, and the first m (lowest ids) of the c_full with key == key.
struct Cut {
  uint32_t key = 0;  // 0 (below every logit's key): no cut
  uint32_t m = 0, c = 0, c_full = 0;
  unsigned long long mass_above = 0;  // fixed-point weight of the ids with a larger key
};

// The shortest prefix, in the order (logit descending, id ascending), of the ids at or above
// `lower` (of its tie group only lower->m) whose count reaches `target` (by_mass false) or whose
// fixed-point weight does. The answer is looked for in the key window [klo, khi] first; each pass
// counts what lies above the window itself, so a poor first window only costs passes.
__device__ Cut find_cut(const float* L, int V, bool aligned, const Ctx& c, bool by_mass, unsigned long long target,
                        const Cut* lower, uint32_t klo, uint32_t khi, uint32_t kmax, Shared& sh) {
  const int tid = threadIdx.x;
  const uint32_t floor_key = lower ? lower->key : 0u;
  klo = max(klo, floor_key);
  khi = min(khi, kmax);
  if (klo > khi) klo = khi;
  for (int pass = 0; pass < 16; ++pass) {
    int shift = 0;
    while (shift < 32 && ((khi - klo) >> shift) >= static_cast<uint32_t>(kBins)) ++shift;
    sh.hist.count[tid] = 0;
    sh.hist.mass[tid] = 0;
    __syncthreads();
    unsigned int ac = 0;
    unsigned long long am = 0;
    for_each_logit(L, V, aligned, [&](int, float raw) {
      const float v = clean(raw);
      const uint32_t k = key_of(v);
      if (k < klo || (lower && k <= floor_key)) return;
      const unsigned long long w = c.weight(v);
      if (k > khi) {
        ++ac;
        am += w;
        return;
      }
      const int b = static_cast<int>((k - klo) >> shift);
      atomicAdd(&sh.hist.count[b], 1u);
      if (w) atomicAdd(&sh.hist.mass[b], w);
    });
    if (lower && tid == 0 && lower->m > 0 && floor_key >= klo) {  // the part of the tie group that counts
      const unsigned long long w = c.weight(value_of(floor_key)) * lower->m;
      if (floor_key > khi) {
        ac += lower->m;
        am += w;
      } else {
        const int b = static_cast<int>((floor_key - klo) >> shift);
        atomicAdd(&sh.hist.count[b], lower->m);
        atomicAdd(&sh.hist.mass[b], w);
      }
    }
    __syncthreads();
    const unsigned int above_c = block_sum(ac, sh.red32);
    const unsigned long long above_m = block_sum(am, sh.red64);
    // Thread t takes bin kBins-1-t: the scan runs from the largest keys down.
    const int b = kBins - 1 - tid;
    const unsigned int bc = sh.hist.count[b];
    const unsigned long long bm = sh.hist.mass[b];
    unsigned int tot_c;
    unsigned long long tot_m;
    const unsigned int ex_c = block_exclusive_scan(bc, sh.red32, &tot_c);
    const unsigned long long ex_m = block_exclusive_scan(bm, sh.red64, &tot_m);
    const unsigned long long before = by_mass ? above_m + ex_m : static_cast<unsigned long long>(above_c + ex_c);
    const unsigned long long after = before + (by_mass ? bm : bc);
    if (tid == 0) sh.found = kThreads;
    __syncthreads();
    if (before < target && after >= target) {  // one thread at most: the sums only grow
      sh.found = tid;
      sh.cut_c = bc;
      sh.cut_before_c = above_c + ex_c;
      sh.cut_before_m = above_m + ex_m;
    }
    __syncthreads();
    const int t = sh.found;
    const bool above_reached = (by_mass ? above_m : static_cast<unsigned long long>(above_c)) >= target;
    __syncthreads();  // sh.found and the bins are rewritten by the next pass
    if (above_reached) {  // the answer lies above the window
      klo = khi + 1;
      khi = kmax;
      continue;
    }
    if (t == kThreads) {  // below it
      if (klo <= floor_key) break;  // nothing below: cannot happen for a reachable target
      khi = klo - 1;
      klo = floor_key;
      continue;
    }
    const uint32_t bsel = static_cast<uint32_t>(kBins - 1 - t);
    if (shift == 0) {
      Cut r;
      r.key = klo + bsel;
      r.c = sh.cut_c;
      r.mass_above = sh.cut_before_m;
      if (by_mass) {
        const unsigned long long w = c.weight(value_of(r.key));
        const unsigned long long need = target - sh.cut_before_m;
        const unsigned long long m = w ? (need + w - 1) / w : r.c;
        r.m = static_cast<uint32_t>(max(1ull, min(m, static_cast<unsigned long long>(r.c))));
      } else {
        r.m = static_cast<uint32_t>(target - sh.cut_before_c);
      }
      r.c_full = (lower && r.key == floor_key) ? lower->c_full : r.c;
      return r;
    }
    const uint32_t nlo = klo + (bsel << shift);
    const unsigned long long nhi = static_cast<unsigned long long>(nlo) + ((1ull << shift) - 1);
    khi = static_cast<uint32_t>(min(static_cast<unsigned long long>(khi), nhi));
    klo = nlo;
  }
  // Not reached (defensive): keep everything at or above the floor.
  Cut r;
  if (lower) r = *lower;
  return r;
}

// The id of the m-th (1-based) logit with this key, in id order.
__device__ int nth_tied_id(const float* L, int V, uint32_t key, int m, Shared& sh) {
  int seen = 0;
  for (int base = 0; base < V; base += kThreads) {
    const int i = base + threadIdx.x;
    const bool tie = i < V && key_of(clean(L[i])) == key;
    const int cnt = __syncthreads_count(tie);
    if (seen + cnt >= m) {
      unsigned int dummy;
      const unsigned int rank = block_exclusive_scan(tie ? 1u : 0u, sh.red32, &dummy) + (tie ? 1u : 0u);
      if (tie && seen + static_cast<int>(rank) == m) sh.pick = i;
      __syncthreads();
      const int r = sh.pick;
      __syncthreads();
      return r;
    }
    seen += cnt;
  }
  return V - 1;
}

// Picks the id at fixed-point offset pick_offset(total) of the weights kept_weight(id, logit) gives,
// with the ids in a fixed order (thread by thread): per-thread sums, a block scan, then warp 0 walks
// the winning thread's groups. A draw when the offset is uniform in [0, total).
template <typename W, typename O>
__device__ int draw_pass(const float* L, int V, bool aligned, W&& kept_weight, O&& pick_offset, int fallback,
                         Shared& sh) {
  if (threadIdx.x == 0) {  // stays if nothing were kept (cannot happen: the largest logit always is)
    sh.winner = 0;
    sh.offset = 0;
    sh.pick = fallback;
  }
  unsigned long long s = 0;
  for_each_logit(L, V, aligned, [&](int i, float raw) { s += kept_weight(i, raw); });
  unsigned long long total;
  const unsigned long long before = block_exclusive_scan(s, sh.red64, &total);
  const unsigned long long r = pick_offset(total);
  if (before <= r && r < before + s) {
    sh.winner = threadIdx.x;
    sh.offset = r - before;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int t = sh.winner;
    unsigned long long off = sh.offset;
    const int groups = (V + 3) >> 2;
    const int ng = t < groups ? (groups - 1 - t) / kThreads + 1 : 0;
    for (int base = 0; base < ng; base += 32) {
      const int k = base + lane;
      const int g = t + k * kThreads;
      unsigned long long w[4] = {0, 0, 0, 0};
      if (k < ng) {
        const float4 v = load4(L, V, g, aligned);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (4 * g + j < V) w[j] = kept_weight(4 * g + j, lane_of(v, j));
      }
      const unsigned long long gs = w[0] + w[1] + w[2] + w[3];
      unsigned long long incl = gs;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
      }
      const unsigned int hit = __ballot_sync(0xffffffffu, incl > off);
      if (hit) {
        if (lane == __ffs(hit) - 1) {
          unsigned long long rem = off - (incl - gs);
          int pick = 4 * g + 3;
          for (int j = 0; j < 4; ++j) {
            if (rem < w[j]) {
              pick = 4 * g + j;
              break;
            }
            rem -= w[j];
          }
          sh.pick = pick;
        }
        break;
      }
      off -= __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  const int pick = sh.pick;
  __syncthreads();
  return pick;
}

// ---- the step ------------------------------------------------------------------------------------

// The largest logit (packed with its id) from the per-block maxima of the first kernel.
__device__ unsigned long long global_max(const SampleArgs& a, unsigned long long* red) {
  unsigned long long v = 0;
  for (int i = threadIdx.x; i < a.blocks; i += kThreads) v = max(v, a.step->partial[i]);
  return block_max(v, red);
}

__device__ Ctx make_ctx(const SampleArgs& a, float mx) {
  Ctx c;
  c.mx = mx;
  c.temp = a.temperature;
  c.dmax = 30.0f * fmaxf(a.temperature, 0.5f);
  c.inv_bin = static_cast<float>(kBins) / c.dmax;
  return c;
}

__device__ __forceinline__ bool topk_on(const SampleArgs& a) { return a.top_k > 0 && a.top_k < a.vocab; }

enum Path : int { kSorted, kBoundary, kExact };

// What the histogram says about a step; every block that works it out gets the same.
struct Plan {
  int path;
  int bstar;  // kSorted: the candidates are the ids in bins <= bstar (kBins: every id)
  int b;      // kBoundary: bins < b are kept whole, bin b is cut id by id (kBins: no cut)
  int b_k, b_p, b_m;             // where top-k, top-p (against every id) and min-p cut
  unsigned long long total_m;    // fixed-point weight of every id
  unsigned long long target_p;   // top-p's share of it
  unsigned int cnt;              // this thread's bin (bin threadIdx.x): its count,
  unsigned long long ms, before; // weight, and the weight of the bins before it
};

__device__ Plan make_plan(const SampleArgs& a, const Ctx& c, Shared& sh) {
  const int tid = threadIdx.x;
  const int V = a.vocab;
  const bool topk = topk_on(a), topp = a.top_p < 1.0f, minp = a.min_p > 0.0f;
  Plan pl;
  pl.cnt = a.step->count[tid];
  pl.ms = a.step->mass[tid];
  unsigned int total_c;
  const unsigned int cum_c = block_exclusive_scan(pl.cnt, sh.red32, &total_c) + pl.cnt;
  pl.before = block_exclusive_scan(pl.ms, sh.red64, &pl.total_m);
  const unsigned long long cum_m = pl.before + pl.ms;
  if (tid == 0) {
    sh.b_k = sh.b_p = sh.next_p = sh.next_m = kBins;
    sh.n_cand = V;
    sh.b_count = 0;
  }
  __syncthreads();
  pl.target_p =
      topp ? max(1ull, static_cast<unsigned long long>(ceil(static_cast<double>(a.top_p) * pl.total_m))) : 0ull;
  if (topk && cum_c >= static_cast<unsigned int>(a.top_k)) atomicMin(&sh.b_k, tid);
  if (topp && cum_m >= pl.target_p) atomicMin(&sh.b_p, tid);
  // min-p keeps e >= min_p, i.e. distances up to -T ln(min_p).
  pl.b_m = minp ? c.bin_of_distance(-a.temperature * logf(a.min_p)) : kBins;
  __syncthreads();
  pl.b_k = sh.b_k;
  pl.b_p = sh.b_p;
  // The host's cuts come from float and double sums that may round across a bin edge: the sorted
  // path keeps the next non-empty bin too.
  if (pl.cnt > 0 && tid > pl.b_p) atomicMin(&sh.next_p, tid);
  if (pl.cnt > 0 && tid > pl.b_m) atomicMin(&sh.next_m, tid);
  __syncthreads();
  const int bp_plus = pl.b_p >= kBins ? kBins : (sh.next_p < kBins ? sh.next_p : pl.b_p);
  const int bm_plus = pl.b_m >= kBins ? kBins : (sh.next_m < kBins ? sh.next_m : pl.b_m);
  // Bins that surely hold the final set. With top-p the top-k set is needed whole (its sum
  // normalises the probabilities the nucleus is cut by).
  if (topk) pl.bstar = topp ? pl.b_k : min(pl.b_k, bm_plus);
  else pl.bstar = min(topp ? bp_plus : kBins, minp ? bm_plus : kBins);
  pl.b = min(topp ? pl.b_p : kBins, minp ? pl.b_m : kBins);
  if (pl.bstar < kBins && tid == pl.bstar) sh.n_cand = static_cast<int>(cum_c);
  if (pl.b < kBins && tid == pl.b) sh.b_count = static_cast<int>(pl.cnt);
  __syncthreads();
  if (sh.n_cand <= kCap) pl.path = kSorted;
  else if (!topk && sh.b_count <= kCap) pl.path = kBoundary;
  else pl.path = kExact;
  __syncthreads();  // the shared fields are reused
  return pl;
}

// Candidates the gather kernel left, into shared memory, sorted (logit descending, then id).
__device__ int load_sorted_candidates(const SampleArgs& a, Shared& sh) {
  const int n = min(static_cast<int>(a.step->n_cand), kCap);
  int P = 1;
  while (P < n) P <<= 1;
  for (int i = threadIdx.x; i < P; i += kThreads) sh.cand[i] = i < n ? a.step->cand[i] : 0ull;  // 0 sorts last
  __syncthreads();
  bitonic_sort_desc(sh.cand, P);
  return n;
}

// The sorted path: cut and draw the way Sampler::sample does.
__device__ int finish_sorted(const SampleArgs& a, const Ctx& c, const Plan& pl, unsigned long long rnd, Shared& sh) {
  const int tid = threadIdx.x;
  const bool topk = topk_on(a);
  const int n = load_sorted_candidates(a, sh);
  const int nk = topk ? min(a.top_k, n) : n;
  float e[4];
  double zpart = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * tid + j;
    e[j] = i < nk ? c.e(value_of(static_cast<uint32_t>(sh.cand[i] >> 32))) : 0.0f;
    zpart += e[j];
  }
  // The softmax sum: over the top-k, or over every id when top-p cuts against them all.
  const bool z_all = !topk && a.top_p < 1.0f;
  const double Z = z_all ? static_cast<double>(pl.total_m) / kFixed : block_sum(zpart, sh.redd);
  float p[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) p[j] = static_cast<float>(static_cast<double>(e[j]) / Z);
  const float p0 = static_cast<float>(1.0 / Z);  // e of the largest logit is exactly 1
  if (tid == 0) {
    sh.n_m = nk;
    sh.n_p = nk;
  }
  double run = 0, cum[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    run += 4 * tid + j < nk ? static_cast<double>(p[j]) : 0.0;
    cum[j] = run;
  }
  double dummy;
  const double before = block_exclusive_scan(run, sh.redd, &dummy);  // also orders sh.n_* before use
#pragma unroll
  for (int j = 0; j < 4; ++j) cum[j] += before;
  const float floor_p = p0 * a.min_p;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * tid + j;
    if (i >= nk) break;
    if (a.min_p > 0.0f && i >= 1 && p[j] < floor_p) atomicMin(&sh.n_m, i);
    if (a.top_p < 1.0f && cum[j] >= static_cast<double>(a.top_p)) atomicMin(&sh.n_p, i + 1);
  }
  __syncthreads();
  const int nf = max(1, min(sh.n_m, sh.n_p));
  if (4 * tid <= nf - 1 && nf - 1 < 4 * tid + 4) {
    sh.total = cum[nf - 1 - 4 * tid];
    sh.pick = nf - 1;
  }
  __syncthreads();
  const double u = static_cast<double>(rnd >> 11) * 0x1.0p-53;
  const double r = u * sh.total;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * tid + j;
    if (i < nf && r < cum[j]) atomicMin(&sh.pick, i);
  }
  __syncthreads();
  const int id = id_of(sh.cand[sh.pick]);
  __syncthreads();
  return id;
}

// The boundary path (top-k off): the bins before pl.b are kept whole; the ids of bin pl.b, sorted,
// are cut by top-p (the fixed-point weight before an id still short of its share) and min-p.
__device__ int finish_boundary(const SampleArgs& a, const float* L, bool aligned, const Ctx& c, const Plan& pl,
                               unsigned long long rnd, int fallback, Shared& sh) {
  const int tid = threadIdx.x;
  if (tid == 0) sh.above = pl.total_m;  // no boundary bin: every binned id is kept
  __syncthreads();
  if (pl.b < kBins && tid == pl.b) sh.above = pl.before;
  const int n = pl.b < kBins ? load_sorted_candidates(a, sh) : 0;  // syncs
  const unsigned long long above = sh.above;
  const bool cut_p = a.top_p < 1.0f && pl.b == pl.b_p;
  const bool cut_m = a.min_p > 0.0f && pl.b == pl.b_m;
  unsigned long long w[4], run = 0;
  int id[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * tid + j;
    w[j] = 0;
    id[j] = -1;
    if (i < n) {
      const float v = value_of(static_cast<uint32_t>(sh.cand[i] >> 32));
      w[j] = c.weight(v);
      id[j] = id_of(sh.cand[i]);
      if (cut_m && c.e(v) < a.min_p) w[j] = 0;  // min-p: a suffix of the sorted bin
    }
    run += w[j];
  }
  unsigned long long before_cut;
  {
    // Top-p: an id is kept while the weight before it is short of the share (a prefix).
    unsigned long long raw[4], rr = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = 4 * tid + j;
      raw[j] = i < n ? c.weight(value_of(static_cast<uint32_t>(sh.cand[i] >> 32))) : 0ull;
      rr += raw[j];
    }
    unsigned long long dummy;
    before_cut = above + block_exclusive_scan(rr, sh.red64, &dummy);
    if (cut_p) {
      run = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (before_cut >= pl.target_p) w[j] = 0;
        before_cut += raw[j];
        run += w[j];
      }
    }
  }
  unsigned long long kept;
  const unsigned long long kept_before = block_exclusive_scan(run, sh.red64, &kept);
  const unsigned long long total = above + kept;
  const unsigned long long r = __umul64hi(rnd, total);  // uniform in [0, total)
  if (tid == 0) {
    sh.pick = fallback;
    sh.jbin = -1;
  }
  __syncthreads();
  if (r >= above) {  // an id of the boundary bin
    unsigned long long acc = above + kept_before;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (w[j] && acc <= r && r < acc + w[j]) sh.pick = id[j];
      acc += w[j];
    }
    __syncthreads();
    const int pick = sh.pick;
    __syncthreads();
    return pick;
  }
  // A whole bin, chosen by its weight; then the id inside it by one light pass.
  if (tid < pl.b && pl.ms && pl.before <= r && r < pl.before + pl.ms) {
    sh.jbin = tid;
    sh.offset = r - pl.before;
  }
  __syncthreads();
  const int jb = sh.jbin;
  const unsigned long long off = sh.offset;
  __syncthreads();
  if (jb < 0) return fallback;  // cannot happen: the bins before the boundary hold `above`
  return draw_pass(
      L, a.vocab, aligned,
      [&](int, float raw) -> unsigned long long {
        const float v = clean(raw);
        return c.bin(v) == jb ? c.weight(v) : 0ull;
      },
      [&](unsigned long long) { return off; }, fallback, sh);
}

// Everything else (top-k above what sorts in shared memory, a bin too full): exact cuts by key over
// the whole vocabulary, then a drawing pass. One block; slower, and rare.
__device__ int finish_exact(const SampleArgs& a, const float* L, bool aligned, const Ctx& c, const Plan& pl,
                            uint32_t kmax, unsigned long long rnd, int fallback, Shared& sh) {
  const int V = a.vocab;
  const bool topk = topk_on(a), topp = a.top_p < 1.0f, minp = a.min_p > 0.0f;
  const float mx = c.mx;
  auto window_of_bin = [&](int b, uint32_t* lo, uint32_t* hi) {
    const float dlo = b >= kBins ? c.dmax : static_cast<float>(b) / c.inv_bin;
    const float dhi = b >= kBins ? INFINITY : static_cast<float>(b + 1) / c.inv_bin;
    const float slack = 1e-5f * (fabsf(mx) + c.dmax) + 1e-30f;
    *lo = b >= kBins ? 0u : key_of(mx - dhi - slack);
    *hi = min(kmax, key_of(mx - dlo + slack));
  };
  Cut ck, cut;
  if (topk) {
    uint32_t lo, hi;
    window_of_bin(pl.b_k, &lo, &hi);
    ck = find_cut(L, V, aligned, c, false, static_cast<unsigned long long>(a.top_k), nullptr, lo, hi, kmax, sh);
    cut = ck;
  }
  if (topp) {
    uint32_t lo = ck.key, hi = kmax;
    unsigned long long zf = pl.total_m;
    if (topk) zf = ck.mass_above + c.weight(value_of(ck.key)) * ck.m;
    else window_of_bin(pl.b_p, &lo, &hi);
    const unsigned long long target =
        max(1ull, static_cast<unsigned long long>(ceil(static_cast<double>(a.top_p) * static_cast<double>(zf))));
    cut = find_cut(L, V, aligned, c, true, target, topk ? &ck : nullptr, lo, hi, kmax, sh);
  }
  const uint32_t cut_key = cut.key;
  int cut_id = V;
  if (cut.key != 0u && cut.m < cut.c_full) cut_id = nth_tied_id(L, V, cut.key, static_cast<int>(cut.m), sh);
  const float min_p = minp ? a.min_p : 0.0f;
  return draw_pass(
      L, V, aligned,
      [&](int i, float raw) -> unsigned long long {
        const float v = clean(raw);
        const uint32_t k = key_of(v);
        if (k < cut_key || (k == cut_key && i > cut_id)) return 0ull;
        if (c.bin(v) >= kBins) return 0ull;
        const float e = c.e(v);
        if (e < min_p) return 0ull;
        return Ctx::fixed(e);
      },
      [&](unsigned long long total) { return __umul64hi(rnd, total); }, fallback, sh);
}

// 1. The penalty, each id by the block whose groups hold it (every window slot reads before any
// writes, so the slots of a repeated id all store the same value, computed from the original),
// then per-block maxima.
// Block 0 also clears what the later kernels accumulate.
__device__ __forceinline__ void sample_prep_kernel_body(const SampleArgs& a, float* logits) {
  pdl_wait();
  __shared__ unsigned long long red[kWarps + 1];
  const int tid = threadIdx.x;
  const int V = a.vocab;
  float* L = logits;
  const bool aligned = (reinterpret_cast<uintptr_t>(L) & 15) == 0;
  if (blockIdx.x == 0) {
    for (int i = tid; i < kBins; i += kThreads) {
      a.step->count[i] = 0;
      a.step->mass[i] = 0;
    }
    if (tid == 0) a.step->n_cand = 0;
  }
  const int span = static_cast<int>(gridDim.x) * kThreads;
  auto mine = [&](int id) { return id >= 0 && id < V && ((id >> 2) % span) / kThreads == static_cast<int>(blockIdx.x); };
  const int wlen = a.window_size > 0 ? min(a.counters->len, a.window_size) : 0;
  for (int i = tid; i < wlen; i += kThreads)
    if (mine(a.window[i])) a.scratch[i] = L[a.window[i]];
  __syncthreads();
  for (int i = tid; i < wlen; i += kThreads) {
    const int id = a.window[i];
    if (!mine(id)) continue;
    const float l = a.scratch[i];
    L[id] = l > 0 ? l / a.penalty : l * a.penalty;
  }
  __syncthreads();
  unsigned long long best = 0;
  int bad = 0;  // a NaN or an infinity: broken weights; the step's token becomes -1
  for_each_logit_grid(L, V, aligned, [&](int i, float v) {
    best = max(best, pack(key_of(clean(v)), i));
    bad |= !(fabsf(v) <= FLT_MAX);
  });
  bad = __syncthreads_or(bad);
  best = block_max(best, red);  // largest logit, lowest id among equals
  if (tid == 0) {
    a.step->partial[blockIdx.x] = best;
    a.step->nonfinite[blockIdx.x] = bad ? 1u : 0u;
  }
}

// 2. The histogram of the distance below the max, counts and fixed-point weights.
__device__ __forceinline__ void sample_hist_kernel_body(const SampleArgs& a, float* logits) {
  pdl_wait();
  if (!(a.temperature > 0.0f)) return;  // greedy
  __shared__ unsigned long long red[kWarps + 1];
  __shared__ unsigned int count[kBins];
  __shared__ unsigned long long mass[kBins];
  const int tid = threadIdx.x;
  const float mx = value_of(static_cast<uint32_t>(global_max(a, red) >> 32));
  if (isinf(mx)) return;
  const Ctx c = make_ctx(a, mx);
  count[tid] = 0;
  mass[tid] = 0;
  __syncthreads();
  const bool aligned = (reinterpret_cast<uintptr_t>(logits) & 15) == 0;
  for_each_logit_grid(logits, a.vocab, aligned, [&](int, float raw) {
    const float v = clean(raw);
    const int b = c.bin(v);
    if (b >= kBins) return;
    atomicAdd(&count[b], 1u);
    atomicAdd(&mass[b], Ctx::fixed(c.e(v)));
  });
  __syncthreads();
  if (count[tid]) {
    atomicAdd(&a.step->count[tid], count[tid]);
    atomicAdd(&a.step->mass[tid], mass[tid]);
  }
}

// 3. The plan, and the candidates it needs (block by block into shared memory, then one range of
// the global list per block).
__device__ __forceinline__ void sample_gather_kernel_body(const SampleArgs& a, float* logits) {
  pdl_wait();
  if (!(a.temperature > 0.0f)) return;
  __shared__ Shared sh;
  const int tid = threadIdx.x;
  const float mx = value_of(static_cast<uint32_t>(global_max(a, sh.red64) >> 32));
  if (isinf(mx)) return;
  const Ctx c = make_ctx(a, mx);
  const Plan pl = make_plan(a, c, sh);
  if (pl.path == kExact || (pl.path == kBoundary && pl.b >= kBins)) return;
  if (tid == 0) sh.n = 0;
  __syncthreads();
  const bool aligned = (reinterpret_cast<uintptr_t>(logits) & 15) == 0;
  for_each_logit_grid(logits, a.vocab, aligned, [&](int i, float raw) {
    const float v = clean(raw);
    const int b = c.bin(v);
    if (pl.path == kSorted ? (pl.bstar < kBins && b > pl.bstar) : b != pl.b) return;
    const unsigned int slot = atomicAdd(&sh.n, 1u);
    if (slot < kCap) sh.cand[slot] = pack(key_of(v), i);
  });
  __syncthreads();
  const unsigned int n = min(sh.n, static_cast<unsigned int>(kCap));
  if (tid == 0) sh.base = atomicAdd(&a.step->n_cand, n);
  __syncthreads();
  for (unsigned int i = tid; i < n; i += kThreads)
    if (sh.base + i < kCap) a.step->cand[sh.base + i] = sh.cand[i];
}

// 4. One block: the cut and the draw; then the token, the position, the window and the counter.
__device__ __forceinline__ void sample_finish_kernel_body(const SampleArgs& a, float* logits) {
  pdl_wait();
  __shared__ Shared sh;
  const int tid = threadIdx.x;
  const unsigned long long draw = a.counters->draw;
  const unsigned long long best = global_max(a, sh.red64);
  const uint32_t kmax = static_cast<uint32_t>(best >> 32);
  const float mx = value_of(kmax);
  int tok = id_of(best);
  if (a.temperature > 0.0f && !isinf(mx)) {
    const unsigned long long rnd = mix64(mix64(a.seed ^ 0x5851f42d4c957f2dULL) + draw * 0x9e3779b97f4a7c15ULL);
    const Ctx c = make_ctx(a, mx);
    const Plan pl = make_plan(a, c, sh);
    const bool aligned = (reinterpret_cast<uintptr_t>(logits) & 15) == 0;
    if (pl.path == kSorted) tok = finish_sorted(a, c, pl, rnd, sh);
    else if (pl.path == kBoundary) tok = finish_boundary(a, logits, aligned, c, pl, rnd, tok, sh);
    else tok = finish_exact(a, logits, aligned, c, pl, kmax, rnd, tok, sh);
  }
  int bad = 0;
  for (int i = tid; i < a.blocks; i += kThreads) bad |= a.step->nonfinite[i] != 0u;
  if (__syncthreads_or(bad)) tok = -1;  // non-finite logits: the caller stops with an error
  __syncthreads();  // every thread has read the counters
  if (tid == 0) {
    *a.token = tok;
    *a.pos += 1;
    a.counters->draw = draw + 1;
    if (a.window_size > 0) {
      SamplerCounters& s = *a.counters;
      a.window[s.head] = tok;
      s.head = (s.head + 1) % a.window_size;
      s.len = min(s.len + 1, a.window_size);
    }
  }
}


// Each step kernel over many rows, one per grid row, whose arguments the rows array holds
// (CudaBackend::stage_sampling writes it).
__global__ void __launch_bounds__(kThreads) sample_prep_rows_kernel(const SampleArgs* rows, float* logits) {
  const SampleArgs& a = rows[blockIdx.y];
  sample_prep_kernel_body(a, logits + static_cast<size_t>(blockIdx.y) * a.vocab);
}
__global__ void __launch_bounds__(kThreads) sample_hist_rows_kernel(const SampleArgs* rows, float* logits) {
  const SampleArgs& a = rows[blockIdx.y];
  sample_hist_kernel_body(a, logits + static_cast<size_t>(blockIdx.y) * a.vocab);
}
__global__ void __launch_bounds__(kThreads) sample_gather_rows_kernel(const SampleArgs* rows, float* logits) {
  const SampleArgs& a = rows[blockIdx.y];
  sample_gather_kernel_body(a, logits + static_cast<size_t>(blockIdx.y) * a.vocab);
}
__global__ void __launch_bounds__(kThreads, 1) sample_finish_rows_kernel(const SampleArgs* rows, float* logits) {
  const SampleArgs& a = rows[blockIdx.y];
  sample_finish_kernel_body(a, logits + static_cast<size_t>(blockIdx.y) * a.vocab);
}

}  // namespace
}  // namespace cuda

using namespace qf::cuda;

namespace cuda {
// What stage_sampling leaves for sample_staged and fetch_sampled. The ids come first in the staging
// buffer and the arguments next, at offsets that depend only on the row count, so a captured draw
// finds this step's rows where the last capture's were.
struct StagedSampling {
  int64_t rows = 0, vocab = 0;
  bool all_greedy = false;
  int blocks = 0;
  int32_t* ids = nullptr;          // device
  const SampleArgs* args = nullptr;  // device (unused when all_greedy)
  std::vector<char> host;
};
}  // namespace cuda

void CudaBackend::stage_sampling(const std::vector<SampleRow>& rows, int64_t vocab) {
  QF_CHECK(!capturing_, "internal: stage_sampling during CUDA graph capture");
  const auto n = static_cast<int64_t>(rows.size());
  QF_CHECK(n > 0 && n <= 65535, "sampling: ", n, " rows in one step");
  QF_CHECK(vocab > 0 && vocab < INT_MAX / 2, "sampling: bad vocabulary size ", vocab);
  if (!staged_) staged_ = std::make_shared<StagedSampling>();
  StagedSampling& st = *staged_;
  st.rows = n;
  st.vocab = vocab;
  st.all_greedy = all_greedy(rows);
  // Windows: the last repeat_last_n ids (all of them for -1).
  std::vector<int64_t> win(static_cast<size_t>(n)), win_at(static_cast<size_t>(n));
  int64_t slots = 0;
  for (int64_t i = 0; i < n && !st.all_greedy; ++i) {
    const SampleRow& r = rows[static_cast<size_t>(i)];
    const int64_t w = penalty_window(*r.params, r.history_len);
    win[static_cast<size_t>(i)] = w;
    win_at[static_cast<size_t>(i)] = slots;
    slots += w;
  }
  QF_CHECK(slots < INT_MAX / 8, "sampling: repetition-penalty windows of ", slots, " ids");
  const size_t args_at = (static_cast<size_t>(n) * 4 + 15) / 16 * 16;
  const size_t counters_at = args_at + static_cast<size_t>(n) * sizeof(SampleArgs);
  const size_t windows_at = counters_at + static_cast<size_t>(n) * sizeof(SamplerCounters);
  const size_t pos_at = windows_at + static_cast<size_t>(slots) * 4;  // what is uploaded ends here
  const size_t penalty_at = pos_at + static_cast<size_t>(n) * 4;
  const size_t total = penalty_at + static_cast<size_t>(slots) * 4;
  auto* dev = static_cast<char*>(scratch(total, 9));
  st.ids = reinterpret_cast<int32_t*>(dev);
  st.args = reinterpret_cast<const SampleArgs*>(dev + args_at);
  if (st.all_greedy) return;  // the argmax kernel needs only the ids
  auto* step = static_cast<SamplerScratch*>(scratch(static_cast<size_t>(n) * sizeof(SamplerScratch), 10));
  st.host.assign(pos_at, 0);
  auto* args = reinterpret_cast<SampleArgs*>(st.host.data() + args_at);
  auto* counters = reinterpret_cast<SamplerCounters*>(st.host.data() + counters_at);
  auto* windows = reinterpret_cast<int32_t*>(st.host.data() + windows_at);
  const int blocks = pass_blocks(vocab);
  st.blocks = blocks;
  for (int64_t i = 0; i < n; ++i) {
    const SampleRow& r = rows[static_cast<size_t>(i)];
    const SamplerParams& p = *r.params;
    const int64_t w = win[static_cast<size_t>(i)], at = win_at[static_cast<size_t>(i)];
    if (w > 0) std::copy(r.history + (r.history_len - w), r.history + r.history_len, windows + at);
    SamplerCounters c{};
    c.draw = static_cast<unsigned long long>(r.history_len);
    c.len = static_cast<int>(w);
    c.head = 0;  // the finish kernel's append is not read again
    counters[i] = c;
    SampleArgs a{};
    a.vocab = static_cast<int>(vocab);
    a.blocks = blocks;
    a.temperature = p.temperature;
    a.top_p = p.top_p;
    a.min_p = p.min_p;
    a.penalty = p.repeat_penalty;
    a.top_k = p.top_k;
    a.seed = p.seed;
    a.window = reinterpret_cast<int32_t*>(dev + windows_at) + at;
    a.scratch = reinterpret_cast<float*>(dev + penalty_at) + at;
    a.window_size = static_cast<int>(w);
    a.counters = reinterpret_cast<SamplerCounters*>(dev + counters_at) + i;
    a.step = step + i;
    a.token = st.ids + i;
    a.pos = reinterpret_cast<int*>(dev + pos_at) + i;
    args[i] = a;
  }
  // Pageable memory: staged before the call returns.
  QF_CUDA(cudaMemcpyAsync(dev + args_at, st.host.data() + args_at, pos_at - args_at, cudaMemcpyHostToDevice,
                          stream_of(*this)));
}

void CudaBackend::sample_staged(float* logits) {
  QF_CHECK(staged_ && staged_->rows > 0, "internal: sample_staged before stage_sampling");
  const StagedSampling& st = *staged_;
  auto stream = stream_of(*this);
  if (st.all_greedy) {
    launch_argmax_rows(*this, logits, st.rows, st.vocab, st.ids);
    return;
  }
  const dim3 grid(static_cast<unsigned>(st.blocks), static_cast<unsigned>(st.rows));
  launch(sample_prep_rows_kernel, grid, dim3(kThreads), 0, stream, st.args, logits);
  launch(sample_hist_rows_kernel, grid, dim3(kThreads), 0, stream, st.args, logits);
  launch(sample_gather_rows_kernel, grid, dim3(kThreads), 0, stream, st.args, logits);
  launch(sample_finish_rows_kernel, dim3(1, static_cast<unsigned>(st.rows)), dim3(kThreads), 0, stream, st.args, logits);
  QF_CUDA_LAUNCH();
}

void CudaBackend::fetch_sampled(int32_t* ids_host) {
  QF_CHECK(staged_ && staged_->rows > 0, "internal: fetch_sampled before stage_sampling");
  auto stream = stream_of(*this);
  QF_CUDA(cudaMemcpyAsync(ids_host, staged_->ids, static_cast<size_t>(staged_->rows) * 4, cudaMemcpyDeviceToHost, stream));
  QF_CUDA(cudaStreamSynchronize(stream));
}

}  // namespace qf
