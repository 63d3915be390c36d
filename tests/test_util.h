// Helpers shared by the tests: where the shared data is, and skipping when it is absent.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "backends/backend.h"

namespace qf {
class Model;
class Tokenizer;
struct EngineOptions;
struct SamplerParams;
}

namespace qf::test {

std::filesystem::path data_dir();                      // ../shared/data (or QFORGE_TEST_DATA env)
bool has_data(const std::string& rel);                 // data_dir()/rel exists
std::filesystem::path tmp_dir(const std::string& name);  // fresh, empty scratch folder (per process)
std::string binary();  // path of the qforge CLI
void write_file(const std::filesystem::path& p, const std::string& content);
// Greedy continuation of `ids` (n_new tokens) one call at a time (Model::forward), or with
// `engine` as one request through the engine (generate(); on a GPU it must replay decode graphs).
// first_logits receives the prefill's last-position logits (not with `engine`).
std::vector<int32_t> greedy(Model& m, const std::vector<int32_t>& ids, int n_new,
                            std::vector<float>* first_logits = nullptr, bool engine = false);
// Each of 8 different story prompts decoded (n_new tokens) in one batch through the engine gives
// the tokens it gives alone: greedy() above, or with `sampling` (prompt i seeded sampling.seed + i)
// generate() of runtime/generator.h. gtest expectations, and every block free afterwards; with
// `preemption` the options must also make the scheduler preempt.
void expect_engine_batch_equals_alone(Model& m, const Tokenizer& tok, const EngineOptions& opt, int n_new,
                                      bool preemption, const SamplerParams* sampling = nullptr);
// Eight prompts in one batch: 64 blocks of 16, a 256-token budget, a context of 256.
EngineOptions one_batch_options();
// Sampling with every rule on (T 0.9, top-k 40, top-p 0.95, min-p 0.02, penalty 1.1, seed 7).
SamplerParams story_sampling();
// Prefill of 12 stories260K-style ids in one call and in two chunks (5 + 7) must give the same
// last-position logits within `tol`.
void expect_chunked_prefill_matches(Model& m, double tol);
// n normal(0, scale) floats from a fixed seed.
std::vector<float> randn(size_t n, uint64_t seed, float scale = 1.f);

// Rows [pos, pos + rows) of the one sequence of `cache` through b's paged attention of layer
// `layer` (their keys and values appended first); with `rope`, RoPE on the way
// (Backend::rope_paged_attention).
void attend_one_sequence(Backend& b, SequenceCache& cache, float* q, float* k, const float* v, int64_t layer,
                         int64_t pos, int64_t rows, const AttentionParams& p, float* out, bool rope = false);
// Causal attention of one query row at position `pos` over the keys and values of positions
// 0..pos (k_hist, v_hist: [position][n_kv_heads * head_dim]), in double: out [n_heads * head_dim].
void naive_attention(const float* q, const std::vector<float>& k_hist, const std::vector<float>& v_hist, int64_t pos,
                     const AttentionParams& p, float* out);
// A = P H P^T + damp I for H [K][K] (float or double) with A[i][j] = H[perm[i]][perm[j]] and a zero
// diagonal entry counted as 1: the matrix Backend::gptq_inverse_factor factors and GPTQ's proxy
// loss is measured in.
template <typename T>
std::vector<double> damped(const std::vector<T>& H, const std::vector<int32_t>& perm, int64_t K, double damp) {
  std::vector<double> A(static_cast<size_t>(K * K));
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) {
      double v = H[static_cast<size_t>(perm[static_cast<size_t>(i)] * K + perm[static_cast<size_t>(j)])];
      if (i == j) v = (v == 0 ? 1.0 : v) + damp;
      A[static_cast<size_t>(i * K + j)] = v;
    }
  return A;
}
// The qf::Error message fn() throws, or "" when it throws none.
std::string error_of(const std::function<void()>& fn);
// Expects fn() to throw a qf::Error whose message is one line and contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle);
// The distribution Sampler::sample draws from, by its rules (penalty, top-k, softmax with
// temperature, min-p, top-p), as (id, probability) in the order the host ranks the candidates
// (logit descending; equal logits by id). Greedy gives the argmax with probability 1.
std::vector<std::pair<int32_t, double>> sampler_distribution(std::vector<float> logits, const SamplerParams& p,
                                                             const std::vector<int32_t>& history);
// Checks draws against a distribution: no id outside it, a chi-square test over the candidates
// (the smaller ones merged in rank order until each bin expects >= 20 draws; p ~ 3e-7 of a false
// alarm) and a total-variation bound from the sampling noise.
void expect_draws_match(const std::vector<int32_t>& draws, const std::vector<std::pair<int32_t, double>>& dist,
                        const std::string& what);
// True when a CUDA device can be used; otherwise *why says why not.
bool cuda_available(std::string* why);
// Runs a shell command, returns exit code; stdout and stderr captured.
int run_command(const std::string& cmd, std::string* out, std::string* err);
// The whole file as bytes ("" when it cannot be read).
std::string slurp(const std::filesystem::path& p);
// One run of the qforge CLI: exit status, captured output and wall time.
struct CliRun {
  int rc = 0;
  std::string out, err;
  double seconds = 0;
  std::string last_line() const;  // the last line of stderr (the error line, after any warnings)
};
CliRun run_cli(const std::string& args);  // binary() + " " + args

// `rows` activation rows through Backend::fused_linear, checked against the same op on the host
// from plain matrices W[i] ([N_i, K] row-major, with biases, empty = none): random x, norm weights
// and starting outputs (for Accumulate). Expects the backend to fuse it, and every output within
// `tol` relative RMS error of the host result.
void expect_fused_linear_matches(Backend& b, const std::vector<const DeviceLinear*>& ws,
                                 const std::vector<std::vector<float>>& W, const std::vector<std::vector<float>>& bias,
                                 FusedLinear::Input input, FusedLinear::Output output, uint64_t seed, double tol,
                                 int64_t rows = 1);

}  // namespace qf::test

// Skips the current test when no CUDA device can be used (CI has none).
#define QF_REQUIRE_GPU()                                                   \
  do {                                                                     \
    std::string qf_why_;                                                   \
    if (!::qf::test::cuda_available(&qf_why_)) GTEST_SKIP() << qf_why_;    \
  } while (0)

// Skips the current test with a clear message when a shared-data path is missing.
#define QF_REQUIRE_DATA(rel)                                                              \
  do {                                                                                    \
    if (!::qf::test::has_data(rel))                                                       \
      GTEST_SKIP() << "shared test data not found: " << (::qf::test::data_dir() / (rel)) \
                   << " (clone with ../shared beside the checkout to run this test)";     \
  } while (0)
