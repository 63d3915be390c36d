// Token sampling on the GPU by the host sampler's rules (runtime/sampler.cpp): repetition penalty
// over the distinct ids of a device-resident window, temperature, top-k, softmax over the kept
// candidates, min-p against the top probability, top-p, then one draw from a counter-based random
// stream (seed, draw number). Everything it needs lives on the device and its parameters are
// kernel arguments, so a captured decode graph replays it.
//
// One block of 1024 threads per step; the logits are read a few times from L2:
//   1. the penalty (in place, as the host does to its vector), then the max;
//   2. a histogram of the distance below the max (1024 bins) that bounds the candidates;
//   3a. when those candidates are few (<= 4096), they are gathered into shared memory, sorted, and
//       cut and drawn from exactly as the host does;
//   3b. otherwise exact thresholds on the logits' order-preserving integer keys (top-k by count,
//       top-p by fixed-point probability mass), each found by narrowing a key window 1024-fold per
//       pass, then one pass that draws among the ids kept.
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "backends/cuda/cuda_internal.cuh"
#include "runtime/sampler.h"

namespace qf {
namespace cuda {

// Device-side state that each step reads and advances.
struct SamplerCounters {
  unsigned long long draw;  // the random stream's draw number: ids in the sequence so far
  int len;                  // ids in the window
  int head;                 // the window slot the next id goes to
};

struct DeviceSampler {
  ~DeviceSampler() {
    cudaFree(window);
    cudaFree(scratch);
    cudaFree(counters);
  }
  SamplerParams params;
  int size = 0;      // window slots in use (0: no repetition penalty)
  int capacity = 0;  // window slots allocated
  int32_t* window = nullptr;
  float* scratch = nullptr;  // one float per window slot (the penalty reads all, then writes)
  SamplerCounters* counters = nullptr;
};

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = kThreads;  // one histogram bin per thread when scanning bins
constexpr int kCap = 4 * kThreads;  // candidates sorted in shared memory (4 per thread)
constexpr float kFixed = 1099511627776.0f;  // 2^40: probability weights as integers, so sums are exact

struct SampleArgs {
  float* logits;
  int vocab;
  float temperature, top_p, min_p, penalty;
  int top_k;
  unsigned long long seed;
  int32_t* window;
  float* scratch;
  int window_size;  // 0: no penalty
  SamplerCounters* counters;
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
  int b_k, b_p, next_p, next_m, n_cand, found, winner, pick, n_m, n_p;
  unsigned int n, cut_c, cut_before_c;
  unsigned long long cut_before_m, offset;
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

// f(id, logit) for every logit. Thread t visits the groups t, t + 1024, t + 2048, ... (the order the
// draw relies on), with four 16-byte loads in flight: one block must hide L2 latency by itself.
template <typename F>
__device__ __forceinline__ void for_each_logit(const float* p, int n, bool aligned, F&& f) {
  const int groups = (n + 3) >> 2;
  int g = threadIdx.x;
  for (; g + 3 * kThreads < groups; g += 4 * kThreads) {
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = load4(p, n, g + u * kThreads, aligned);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = 4 * (g + u * kThreads);
      f(i, v[u].x);
      f(i + 1, v[u].y);
      f(i + 2, v[u].z);
      f(i + 3, v[u].w);
    }
  }
  for (; g < groups; g += kThreads) {
    const float4 v = load4(p, n, g, aligned);
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (4 * g + j < n) f(4 * g + j, lane_of(v, j));
  }
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

// Draws one id among those the cut keeps (and min-p, when on), with probability proportional to
// the fixed-point weights: per-thread sums, a block scan, then warp 0 walks the winning thread's ids.
__device__ int draw_pass(const float* L, int V, bool aligned, const Ctx& c, uint32_t cut_key, int cut_id,
                         float min_p, unsigned long long rnd, int fallback, Shared& sh) {
  auto kept_weight = [&](int i, float raw) -> unsigned long long {
    const float v = clean(raw);
    const uint32_t k = key_of(v);
    if (k < cut_key || (k == cut_key && i > cut_id)) return 0ull;
    if (c.bin(v) >= kBins) return 0ull;
    const float e = c.e(v);
    if (e < min_p) return 0ull;
    return Ctx::fixed(e);
  };
  if (threadIdx.x == 0) {  // stays if nothing were kept (the largest logit always is)
    sh.winner = 0;
    sh.offset = 0;
    sh.pick = fallback;
  }
  unsigned long long s = 0;
  for_each_logit(L, V, aligned, [&](int i, float raw) { s += kept_weight(i, raw); });
  unsigned long long total;
  const unsigned long long before = block_exclusive_scan(s, sh.red64, &total);
  const unsigned long long r = __umul64hi(rnd, total);  // uniform in [0, total)
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

// ---- the step -----------------------------------------------------------------------------------

// Candidates gathered in shared memory (all ids whose bin is <= bstar), sorted, then cut and drawn
// from the way Sampler::sample does.
__device__ int sample_sorted(const SampleArgs& a, const float* L, bool aligned, const Ctx& c, int bstar, bool topk,
                             double z_all, bool have_z_all, unsigned long long rnd, Shared& sh) {
  const int tid = threadIdx.x;
  const int V = a.vocab;
  if (tid == 0) sh.n = 0;
  __syncthreads();
  for_each_logit(L, V, aligned, [&](int i, float raw) {
    const float v = clean(raw);
    if (bstar < kBins && c.bin(v) > bstar) return;
    const unsigned int slot = atomicAdd(&sh.n, 1u);
    if (slot < kCap) sh.cand[slot] = pack(key_of(v), i);
  });
  __syncthreads();
  const int n = min(static_cast<int>(sh.n), kCap);
  int P = 1;
  while (P < n) P <<= 1;
  for (int i = n + tid; i < P; i += kThreads) sh.cand[i] = 0;  // sorts last
  __syncthreads();
  bitonic_sort_desc(sh.cand, P);

  const int nk = topk ? min(a.top_k, n) : n;
  float e[4];
  double zpart = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = 4 * tid + j;
    e[j] = i < nk ? c.e(value_of(static_cast<uint32_t>(sh.cand[i] >> 32))) : 0.0f;
    zpart += e[j];
  }
  // The softmax sum: over the top-k, or over the whole vocabulary when top-p cuts against it.
  const double Z = have_z_all ? z_all : block_sum(zpart, sh.redd);
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

__device__ int sample_nongreedy(const SampleArgs& a, const float* L, bool aligned, float mx, uint32_t kmax,
                                int argmax, unsigned long long rnd, Shared& sh) {
  const int tid = threadIdx.x;
  const int V = a.vocab;
  Ctx c;
  c.mx = mx;
  c.temp = a.temperature;
  c.dmax = 30.0f * fmaxf(a.temperature, 0.5f);
  c.inv_bin = static_cast<float>(kBins) / c.dmax;
  const bool topk = a.top_k > 0 && a.top_k < V;
  const bool topp = a.top_p < 1.0f;
  const bool minp = a.min_p > 0.0f;
  if (!topk && !topp && !minp) return draw_pass(L, V, aligned, c, 0u, V, 0.0f, rnd, argmax, sh);

  // Histogram of the distance below the max: counts, and for top-p over the whole vocabulary the
  // fixed-point mass and the softmax sum.
  const bool need_mass = topp && !topk;
  sh.hist.count[tid] = 0;
  sh.hist.mass[tid] = 0;
  __syncthreads();
  double z = 0;
  for_each_logit(L, V, aligned, [&](int, float raw) {
    const float v = clean(raw);
    const int b = c.bin(v);
    if (b >= kBins) return;
    atomicAdd(&sh.hist.count[b], 1u);
    if (need_mass) {
      const float e = c.e(v);
      z += e;
      atomicAdd(&sh.hist.mass[b], Ctx::fixed(e));
    }
  });
  __syncthreads();
  const unsigned int cnt = sh.hist.count[tid];
  const unsigned long long ms = sh.hist.mass[tid];
  unsigned int total_c;
  unsigned long long total_m;
  const unsigned int cum_c = block_exclusive_scan(cnt, sh.red32, &total_c) + cnt;
  const unsigned long long cum_m = block_exclusive_scan(ms, sh.red64, &total_m) + ms;
  const double z_all = need_mass ? block_sum(z, sh.redd) : 0.0;
  if (tid == 0) {
    sh.b_k = sh.b_p = sh.next_p = sh.next_m = kBins;
    sh.n_cand = V;
  }
  __syncthreads();
  const unsigned long long target_p =
      need_mass ? max(1ull, static_cast<unsigned long long>(ceil(static_cast<double>(a.top_p) * total_m))) : 0ull;
  if (topk && cum_c >= static_cast<unsigned int>(a.top_k)) atomicMin(&sh.b_k, tid);
  if (need_mass && cum_m >= target_p) atomicMin(&sh.b_p, tid);
  // min-p keeps e >= min_p, i.e. distances up to -T ln(min_p).
  const int b_m = minp ? c.bin_of_distance(-a.temperature * logf(a.min_p)) : kBins;
  __syncthreads();
  const int b_k = sh.b_k, b_p = sh.b_p;
  // The host's cuts come from float and double sums that may round across a bin edge: keep the
  // next non-empty bin too.
  if (cnt > 0 && tid > b_p) atomicMin(&sh.next_p, tid);
  if (cnt > 0 && tid > b_m) atomicMin(&sh.next_m, tid);
  __syncthreads();
  const int bp_plus = b_p >= kBins ? kBins : (sh.next_p < kBins ? sh.next_p : b_p);
  const int bm_plus = b_m >= kBins ? kBins : (sh.next_m < kBins ? sh.next_m : b_m);
  // Bins that surely hold the final set. With top-p the top-k set is needed whole (its sum
  // normalises the probabilities the nucleus is cut by).
  int bstar;
  if (topk) bstar = topp ? b_k : min(b_k, bm_plus);
  else bstar = min(topp ? bp_plus : kBins, minp ? bm_plus : kBins);
  if (bstar < kBins && tid == bstar) sh.n_cand = static_cast<int>(cum_c);
  __syncthreads();
  if (sh.n_cand <= kCap) return sample_sorted(a, L, aligned, c, bstar, topk, z_all, need_mass, rnd, sh);

  // Too many candidates to sort: exact cuts by key, then a drawing pass.
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
    window_of_bin(b_k, &lo, &hi);
    ck = find_cut(L, V, aligned, c, false, static_cast<unsigned long long>(a.top_k), nullptr, lo, hi, kmax, sh);
    cut = ck;
  }
  if (topp) {
    uint32_t lo = ck.key, hi = kmax;
    unsigned long long zf = total_m;
    if (topk) zf = ck.mass_above + c.weight(value_of(ck.key)) * ck.m;
    else window_of_bin(b_p, &lo, &hi);
    const unsigned long long target =
        max(1ull, static_cast<unsigned long long>(ceil(static_cast<double>(a.top_p) * static_cast<double>(zf))));
    cut = find_cut(L, V, aligned, c, true, target, topk ? &ck : nullptr, lo, hi, kmax, sh);
  }
  int cut_id = V;
  if (cut.key != 0u && cut.m < cut.c_full) cut_id = nth_tied_id(L, V, cut.key, static_cast<int>(cut.m), sh);
  return draw_pass(L, V, aligned, c, cut.key, cut_id, minp ? a.min_p : 0.0f, rnd, argmax, sh);
}

__global__ void __launch_bounds__(kThreads, 1) sample_kernel(SampleArgs a) {
  pdl_wait();
  __shared__ Shared sh;
  const int tid = threadIdx.x;
  const int V = a.vocab;
  float* L = a.logits;
  const bool aligned = (reinterpret_cast<uintptr_t>(L) & 15) == 0;

  // Repetition penalty, once per distinct id: every slot reads before any writes, so repeated ids
  // all compute the same new value from the original.
  const unsigned long long draw = a.counters->draw;
  const int wlen = a.window_size > 0 ? min(a.counters->len, a.window_size) : 0;
  for (int i = tid; i < wlen; i += kThreads) {
    const int id = a.window[i];
    a.scratch[i] = id >= 0 && id < V ? L[id] : 0.0f;
  }
  __syncthreads();
  for (int i = tid; i < wlen; i += kThreads) {
    const int id = a.window[i];
    if (id < 0 || id >= V) continue;
    const float l = a.scratch[i];
    L[id] = l > 0 ? l / a.penalty : l * a.penalty;
  }
  __syncthreads();

  unsigned long long best = 0;
  for_each_logit(L, V, aligned, [&](int i, float v) { best = max(best, pack(key_of(clean(v)), i)); });
  best = block_max(best, sh.red64);  // largest logit, lowest id among equals
  const uint32_t kmax = static_cast<uint32_t>(best >> 32);
  const float mx = value_of(kmax);
  int tok = id_of(best);
  if (a.temperature > 0.0f && !isinf(mx)) {
    const unsigned long long rnd = mix64(mix64(a.seed ^ 0x5851f42d4c957f2dULL) + draw * 0x9e3779b97f4a7c15ULL);
    tok = sample_nongreedy(a, L, aligned, mx, kmax, tok, rnd, sh);
  }
  __syncthreads();  // every thread has read the counters and the window
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

}  // namespace
}  // namespace cuda

using namespace qf::cuda;

void CudaBackend::set_sampler(const SamplerParams& p, const std::vector<int32_t>& history, int64_t max_history) {
  QF_CHECK(!capturing_, "internal: set_sampler during CUDA graph capture");
  if (!sampler_) {
    auto s = std::make_shared<DeviceSampler>();
    QF_CUDA(cudaMalloc(&s->counters, sizeof(SamplerCounters)));
    sampler_ = s;
  }
  DeviceSampler& s = *sampler_;
  auto stream = stream_of(*this);
  QF_CUDA(cudaStreamSynchronize(stream));  // earlier steps may still use the window
  s.params = p;
  int64_t size = 0;
  if (p.repeat_penalty != 1.0f && p.repeat_last_n != 0)
    size = p.repeat_last_n > 0 ? p.repeat_last_n
                               : std::max<int64_t>(max_history, static_cast<int64_t>(history.size()) + 1);
  QF_CHECK(size < INT_MAX / 4, "repetition-penalty window too large: ", size);
  if (size > s.capacity) {
    cudaFree(s.window);
    cudaFree(s.scratch);
    s.window = nullptr;
    s.scratch = nullptr;
    s.capacity = 0;
    QF_CUDA(cudaMalloc(&s.window, static_cast<size_t>(size) * sizeof(int32_t)));
    QF_CUDA(cudaMalloc(&s.scratch, static_cast<size_t>(size) * sizeof(float)));
    s.capacity = static_cast<int>(size);
  }
  s.size = static_cast<int>(size);
  const size_t n = std::min(static_cast<size_t>(size), history.size());
  SamplerCounters c{};
  c.draw = history.size();
  c.len = static_cast<int>(n);
  c.head = size > 0 ? static_cast<int>(n % static_cast<size_t>(size)) : 0;
  if (n > 0)
    QF_CUDA(cudaMemcpyAsync(s.window, history.data() + (history.size() - n), n * sizeof(int32_t),
                            cudaMemcpyHostToDevice, stream));
  QF_CUDA(cudaMemcpyAsync(s.counters, &c, sizeof(c), cudaMemcpyHostToDevice, stream));
  QF_CUDA(cudaStreamSynchronize(stream));  // the sources are on this stack
}

void CudaBackend::sample_step(float* logits, int64_t vocab) {
  QF_CHECK(sampler_, "internal: sample_step before set_sampler");
  QF_CHECK(vocab > 0 && vocab < INT_MAX / 2, "sample_step: bad vocabulary size ", vocab);
  const DeviceSampler& s = *sampler_;
  const SamplerParams& p = s.params;
  if (p.temperature == 0.0f && s.size == 0) {  // plain greedy: the argmax kernel, as before
    argmax_step(logits, vocab);
    return;
  }
  SampleArgs a{};
  a.logits = logits;
  a.vocab = static_cast<int>(vocab);
  a.temperature = p.temperature;
  a.top_p = p.top_p;
  a.min_p = p.min_p;
  a.penalty = p.repeat_penalty;
  a.top_k = p.top_k;
  a.seed = p.seed;
  a.window = s.window;
  a.scratch = s.scratch;
  a.window_size = s.size;
  a.counters = s.counters;
  a.token = d_token_;
  a.pos = d_pos_;
  launch(sample_kernel, dim3(1), dim3(kThreads), 0, stream_of(*this), a);
  QF_CUDA_LAUNCH();
}

std::vector<int32_t> CudaBackend::sampler_window() {
  if (!sampler_ || sampler_->size == 0) return {};
  const DeviceSampler& s = *sampler_;
  auto stream = stream_of(*this);
  SamplerCounters c{};
  std::vector<int32_t> ring(static_cast<size_t>(s.size));
  QF_CUDA(cudaMemcpyAsync(&c, s.counters, sizeof(c), cudaMemcpyDeviceToHost, stream));
  QF_CUDA(cudaMemcpyAsync(ring.data(), s.window, ring.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  QF_CUDA(cudaStreamSynchronize(stream));
  std::vector<int32_t> out;
  if (c.len < s.size) return std::vector<int32_t>(ring.begin(), ring.begin() + c.len);
  out.insert(out.end(), ring.begin() + c.head, ring.end());
  out.insert(out.end(), ring.begin(), ring.begin() + c.head);
  return out;
}

}  // namespace qf
