// Times the host side of measuring one Llama-2-7B layer (not a test: prints milliseconds): the
// act-order arrangement of each projection (arrange_weight), and packing + loading every distinct candidate mix
// of block_options() (58 for attention, 47 for the MLP), serially and as the measurement runs
// them (on host threads, 8 in flight). GPTQ itself runs on the device (bench/gptq_bench).
//   build/bench/convert_host_bench [-t THREADS]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <deque>
#include <future>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "formats/linear_weight.h"
#include "quant/exl2_pack.h"
#include "quant/gptq_solver.h"
#include "quant/options.h"

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// Codes as GPTQ would return them for `spec` (uniform in each group's range), reproducible.
qf::GptqCodes random_codes(int64_t K, int64_t N, const std::vector<qf::GptqGroup>& groups, uint64_t seed) {
  qf::GptqCodes c;
  c.K = K;
  c.N = N;
  c.q.resize(static_cast<size_t>(K * N));
  c.qscale.resize(groups.size() * static_cast<size_t>(N));
  c.scale_max.assign(groups.size(), 0x3c00);
  std::mt19937_64 rng(seed);
  int64_t row = 0;
  for (const auto& g : groups) {
    const uint64_t levels = 1ull << g.bits;
    for (int64_t i = 0; i < g.rows * N; ++i) c.q[static_cast<size_t>(row * N + i)] = static_cast<uint8_t>(rng() % levels);
    row += g.rows;
  }
  for (auto& q : c.qscale) q = static_cast<uint8_t>(1 + rng() % 16);
  return c;
}

struct Projection {
  const char* name;
  int64_t K, N;
  qf::BlockKind kind;
  size_t index;  // in block_projections(kind)
};

}  // namespace

int main(int argc, char** argv) {
  try {
    int threads = 0;
    for (int i = 1; i + 1 < argc; ++i)
      if (std::string(argv[i]) == "-t") threads = std::atoi(argv[i + 1]);
    if (threads > 0) qf::ThreadPool::set_global_threads(threads);
    std::printf("host threads: %d\n", qf::ThreadPool::global().size());
    const Projection projections[] = {
        {"q_proj", 4096, 4096, qf::BlockKind::Attention, 0}, {"k_proj", 4096, 4096, qf::BlockKind::Attention, 1},
        {"v_proj", 4096, 4096, qf::BlockKind::Attention, 2}, {"o_proj", 4096, 4096, qf::BlockKind::Attention, 3},
        {"gate_proj", 4096, 11008, qf::BlockKind::Mlp, 0},   {"up_proj", 4096, 11008, qf::BlockKind::Mlp, 1},
        {"down_proj", 11008, 4096, qf::BlockKind::Mlp, 2},
    };
    double serial_total = 0, overlapped_total = 0, arrange_total = 0;
    for (const Projection& p : projections) {
      // The arrangement (GPTQ's act-order rows from the fp16 weight), as the solver does it.
      auto w = std::make_shared<std::vector<uint16_t>>(static_cast<size_t>(p.K * p.N), 0x2000);
      qf::LinearWeight lw;
      lw.name = p.name;
      lw.in_features = p.K;
      lw.out_features = p.N;
      lw.weight = qf::TensorView{qf::DType::F16, {p.N, p.K}, w->data(), w};
      std::vector<int32_t> perm(static_cast<size_t>(p.K));
      for (int64_t i = 0; i < p.K; ++i) perm[static_cast<size_t>(i)] = static_cast<int32_t>(i);
      std::shuffle(perm.begin(), perm.end(), std::mt19937(1));
      auto t0 = Clock::now();
      const std::vector<float> arranged = qf::arrange_weight(lw, perm, std::vector<char>(perm.size(), 0));
      const double arrange_ms = ms_since(t0);
      arrange_total += arrange_ms;

      // The distinct mixes of this projection, with their codes made beforehand (untimed).
      std::map<std::string, qf::LinearSpec> mixes;
      for (const auto& o : qf::block_options(p.kind)) mixes.emplace(o.specs[p.index].describe(), o.specs[p.index]);
      std::vector<std::pair<qf::LinearSpec, qf::GptqCodes>> work;
      uint64_t seed = 1;
      for (const auto& [d, spec] : mixes) work.emplace_back(spec, random_codes(p.K, p.N, spec.groups(p.K), seed++));
      const auto pack_one = [&](const std::pair<qf::LinearSpec, qf::GptqCodes>& x) {
        auto t = std::make_shared<qf::Exl2Tensors>(qf::pack_exl2(x.second, x.first.groups(p.K), perm));
        return qf::exl2_linear(t, p.name);
      };
      t0 = Clock::now();
      for (const auto& x : work) pack_one(x);
      const double serial_ms = ms_since(t0);
      t0 = Clock::now();
      std::deque<std::future<qf::LinearWeight>> inflight;
      for (const auto& x : work) {
        inflight.push_back(std::async(std::launch::async, pack_one, std::cref(x)));
        if (inflight.size() >= 8) inflight.front().get(), inflight.pop_front();
      }
      while (!inflight.empty()) inflight.front().get(), inflight.pop_front();
      const double overlapped_ms = ms_since(t0);
      serial_total += serial_ms;
      overlapped_total += overlapped_ms;
      std::printf("%-9s K=%-5lld N=%-5lld arrange %6.1f ms; %2zu mixes: pack+load %7.1f ms serial (%5.1f each), %7.1f ms on threads\n",
                  p.name, static_cast<long long>(p.K), static_cast<long long>(p.N), arrange_ms, work.size(), serial_ms,
                  serial_ms / static_cast<double>(work.size()), overlapped_ms);
    }
    std::printf("per layer: arrange %.2f s, pack+load %.2f s serial, %.2f s on threads; 32 layers: %.0f s / %.0f s\n",
                arrange_total / 1e3, serial_total / 1e3, overlapped_total / 1e3, 32 * (arrange_total + serial_total) / 1e3,
                32 * (arrange_total + overlapped_total) / 1e3);
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "convert_host_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
