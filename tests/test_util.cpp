#include "test_util.h"

#include "core/error.h"
#include "engine/engine.h"
#include "runtime/generator.h"
#include "tokenizer/tokenizer.h"
#include "model/model.h"
#include "backends/sampler.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <random>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace qf::test {

std::filesystem::path data_dir() {
  if (const char* env = std::getenv("QFORGE_TEST_DATA")) return env;
  return QFORGE_TEST_DATA;
}

bool has_data(const std::string& rel) { return std::filesystem::exists(data_dir() / rel); }

std::filesystem::path tmp_dir(const std::string& name) {
  // Per process: CTest runs the cases of one binary as parallel processes.
  auto p = std::filesystem::path(QFORGE_TMP) / (name + "_" + std::to_string(getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

std::string binary() { return QFORGE_BINARY; }

void write_file(const std::filesystem::path& p, const std::string& content) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << content;
}

std::vector<int32_t> greedy(Model& m, const std::vector<int32_t>& ids, int n_new, std::vector<float>* first_logits,
                            bool engine) {
  std::vector<int32_t> out;
  if (engine) {  // one request through the engine: its decode graphs where the backend records them
    GenerateOptions g;
    g.max_tokens = n_new;
    g.stop_at_eos = false;
    g.sampling.temperature = 0;
    const GenerateStats st = generate(m, ids, g, [&](int32_t id) {
      out.push_back(id);
      return true;
    });
    if (n_new > 2 && m.backend().name().rfind("cpu", 0) != 0 && st.graph_steps == 0)
      fail(m.backend().name(), ": the engine replayed no decode graph");
    return out;
  }
  const int64_t capacity = static_cast<int64_t>(ids.size()) + n_new;
  auto cache = m.new_cache(capacity);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab));
  m.forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *cache, logits.data());
  if (first_logits) *first_logits = logits;
  int64_t pos = static_cast<int64_t>(ids.size());
  int32_t id = argmax(logits.data(), m.config().vocab);
  out.push_back(id);
  while (static_cast<int>(out.size()) < n_new) {
    m.forward(&id, 1, pos++, *cache, logits.data());
    id = argmax(logits.data(), m.config().vocab);
    out.push_back(id);
  }
  return out;
}

void expect_chunked_prefill_matches(Model& m, double tol) {
  const std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315};
  std::vector<float> a(static_cast<size_t>(m.config().vocab)), b(a.size());
  auto one_shot = m.new_cache(32);
  m.forward(ids.data(), 12, 0, *one_shot, a.data());
  auto chunked = m.new_cache(32);
  m.forward(ids.data(), 5, 0, *chunked, b.data());
  m.forward(ids.data() + 5, 7, 5, *chunked, b.data());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], tol) << i;
}

std::vector<std::pair<int32_t, double>> sampler_distribution(std::vector<float> logits, const SamplerParams& p,
                                                             const std::vector<int32_t>& history) {
  const auto n = static_cast<int64_t>(logits.size());
  if (p.repeat_penalty != 1.0f && p.repeat_last_n != 0) {
    const size_t window = p.repeat_last_n < 0 ? history.size()
                                              : std::min(history.size(), static_cast<size_t>(p.repeat_last_n));
    const std::unordered_set<int32_t> seen(history.end() - static_cast<std::ptrdiff_t>(window), history.end());
    for (int32_t id : seen) {
      if (id < 0 || id >= n) continue;
      float& l = logits[static_cast<size_t>(id)];
      l = l > 0 ? l / p.repeat_penalty : l * p.repeat_penalty;
    }
  }
  if (p.temperature == 0.0f) return {{argmax(logits.data(), n), 1.0}};
  std::vector<std::pair<float, int32_t>> c;
  for (int64_t i = 0; i < n; ++i) c.emplace_back(logits[static_cast<size_t>(i)], static_cast<int32_t>(i));
  std::sort(c.begin(), c.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  if (p.top_k > 0 && p.top_k < n) c.resize(static_cast<size_t>(p.top_k));
  const float mx = c[0].first;
  double sum = 0;
  for (auto& x : c) {
    x.first = std::exp((x.first - mx) / p.temperature);
    sum += x.first;
  }
  for (auto& x : c) x.first = static_cast<float>(x.first / sum);
  size_t keep = c.size();
  if (p.min_p > 0) {
    const float floor = c[0].first * p.min_p;
    keep = 1;
    while (keep < c.size() && c[keep].first >= floor) ++keep;
  }
  if (p.top_p < 1.0f) {
    double cum = 0;
    size_t k = 0;
    while (k < keep) {
      cum += c[k].first;
      ++k;
      if (cum >= p.top_p) break;
    }
    keep = std::max<size_t>(1, k);
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += c[i].first;
  std::vector<std::pair<int32_t, double>> out;
  for (size_t i = 0; i < keep; ++i) out.emplace_back(c[i].second, c[i].first / total);
  return out;
}

void expect_draws_match(const std::vector<int32_t>& draws, const std::vector<std::pair<int32_t, double>>& dist,
                        const std::string& what) {
  const double N = static_cast<double>(draws.size());
  std::unordered_map<int32_t, size_t> index;
  for (size_t i = 0; i < dist.size(); ++i) index[dist[i].first] = i;
  std::vector<double> count(dist.size(), 0.0);
  size_t outside = 0;
  int32_t first_outside = -1;
  for (int32_t id : draws) {
    const auto it = index.find(id);
    if (it == index.end()) {
      if (outside++ == 0) first_outside = id;
    } else {
      count[it->second] += 1;
    }
  }
  EXPECT_EQ(outside, 0u) << what << ": draws outside the " << dist.size() << " candidates, e.g. id " << first_outside;
  // Chi-square over bins of consecutive candidates (dist is in rank order) expecting >= 20 draws.
  std::vector<std::pair<double, double>> bins;  // (observed, expected)
  double obs = 0, expd = 0;
  for (size_t i = 0; i < dist.size(); ++i) {
    obs += count[i];
    expd += N * dist[i].second;
    if (expd >= 20) {
      bins.emplace_back(obs, expd);
      obs = expd = 0;
    }
  }
  if (expd > 0) {
    if (bins.empty()) bins.emplace_back(obs, expd);
    else {
      bins.back().first += obs;
      bins.back().second += expd;
    }
  }
  double chi2 = 0;
  for (const auto& [o, e] : bins) chi2 += (o - e) * (o - e) / e;
  const double df = static_cast<double>(bins.size()) - 1;
  if (df >= 1) {
    // Wilson-Hilferty quantile of chi-square(df) at z = 5.
    const double a = 2.0 / (9.0 * df);
    const double crit = df * std::pow(1 - a + 5.0 * std::sqrt(a), 3);
    EXPECT_LT(chi2, crit) << what << ": chi-square over " << bins.size() << " bins";
  }
  // Total variation against its expected sampling noise: each candidate's expected |count - N p|
  // exactly (De Moivre's binomial mean absolute deviation). The normal approximation is off by a
  // few percent where candidates expect about one draw each (flat logits, many candidates), which
  // is more than the 5-sigma margin there.
  const auto mean_abs_dev = [](double n, double p) {
    const double k = std::floor(n * p) + 1;
    if (p <= 0 || k > n) return 0.0;
    const double log_choose = std::lgamma(n + 1) - std::lgamma(k + 1) - std::lgamma(n - k + 1);
    return 2 * k * std::exp(log_choose + k * std::log(p) + (n - k + 1) * std::log1p(-p));
  };
  double tv = 0, noise = 0, var = 0;
  for (size_t i = 0; i < dist.size(); ++i) {
    const double p = dist[i].second;
    tv += 0.5 * std::abs(count[i] / N - p);
    noise += 0.5 * mean_abs_dev(N, p) / N;
    var += 0.25 * (1 - 2 / M_PI) * p * (1 - p) / N;
  }
  EXPECT_LT(tv, noise + 5 * std::sqrt(var) + 0.002) << what << ": total variation (noise " << noise << ")";
}

void attend_one_sequence(Backend& b, SequenceCache& cache, float* q, float* k, const float* v, int64_t layer,
                         int64_t pos, int64_t rows, const AttentionParams& p, float* out, bool rope) {
  const std::vector<int32_t> tokens(static_cast<size_t>(rows), 0);
  const Batch batch = cache.batch(tokens.data(), rows, pos, false);
  b.prepare_batch(batch, *cache.paged, 1);
  if (rope) b.rope_paged_attention(q, k, v, *cache.paged, layer, batch.seqs, p, out);
  else b.paged_attention(q, k, v, *cache.paged, layer, batch.seqs, p, out);
}

void naive_attention(const float* q, const std::vector<float>& k_hist, const std::vector<float>& v_hist, int64_t pos,
                     const AttentionParams& p, float* out) {
  const int64_t D = p.head_dim, kvd = p.n_kv_heads * D, group = p.n_heads / p.n_kv_heads;
  const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
  for (int64_t h = 0; h < p.n_heads; ++h) {
    const int64_t kvh = h / group;
    std::vector<double> s;
    double mx = -1e300;
    for (int64_t j = first; j <= pos; ++j) {
      double d = 0;
      for (int64_t i = 0; i < D; ++i) d += double(q[h * D + i]) * k_hist[static_cast<size_t>(j * kvd + kvh * D + i)];
      s.push_back(d * p.scale);
      mx = std::max(mx, s.back());
    }
    double sum = 0;
    for (auto& x : s) sum += (x = std::exp(x - mx));
    for (int64_t i = 0; i < D; ++i) {
      double r = 0;
      for (int64_t j = first; j <= pos; ++j) r += s[static_cast<size_t>(j - first)] / sum * v_hist[static_cast<size_t>(j * kvd + kvh * D + i)];
      out[h * D + i] = static_cast<float>(r);
    }
  }
}

std::vector<float> randn(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(needle), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "multi-line error: " << msg;
  }
}

bool cuda_available(std::string* why) {
#ifdef QFORGE_HAVE_CUDA
  if (cuda_device_count() > 0) return true;
  *why = "no CUDA device present";
#else
  *why = "built without CUDA";
#endif
  return false;
}

int run_command(const std::string& cmd, std::string* out, std::string* err) {
  static int counter = 0;
  auto dir = std::filesystem::path(QFORGE_TMP) / "cmd";
  std::filesystem::create_directories(dir);
  const std::string tag = std::to_string(getpid()) + "_" + std::to_string(counter++);
  const auto out_path = dir / ("out_" + tag), err_path = dir / ("err_" + tag);
  const std::string full = cmd + " >" + out_path.string() + " 2>" + err_path.string() + " </dev/null";
  const int status = std::system(full.c_str());
  if (out) *out = slurp(out_path);
  if (err) *err = slurp(err_path);
  std::filesystem::remove(out_path);
  std::filesystem::remove(err_path);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string CliRun::last_line() const {
  std::string e = err;
  while (!e.empty() && e.back() == '\n') e.pop_back();
  const size_t nl = e.rfind('\n');
  return nl == std::string::npos ? e : e.substr(nl + 1);
}

CliRun run_cli(const std::string& args) {
  CliRun r;
  const auto t0 = std::chrono::steady_clock::now();
  r.rc = run_command(binary() + " " + args, &r.out, &r.err);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

void expect_fused_linear_matches(Backend& b, const std::vector<const DeviceLinear*>& ws,
                                 const std::vector<std::vector<float>>& W, const std::vector<std::vector<float>>& bias,
                                 FusedLinear::Input input, FusedLinear::Output output, uint64_t seed, double tol,
                                 int64_t rows) {
  const int count = static_cast<int>(ws.size());
  ASSERT_TRUE(count >= 1 && count <= 3 && W.size() == ws.size());
  const int64_t K = ws[0]->in_features;
  const std::vector<float> x = randn(static_cast<size_t>(rows * K), seed, 1.f);
  std::vector<float> norm = randn(static_cast<size_t>(K), seed + 1, 0.2f);
  for (auto& g : norm) g += 1.f;
  const float eps = 1e-5f;
  // Host reference, row by row.
  std::vector<double> xin(x.begin(), x.end());
  if (input == FusedLinear::Input::RmsNorm)
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(x[static_cast<size_t>(r * K + k)]) * x[static_cast<size_t>(r * K + k)];
      const double inv = 1.0 / std::sqrt(ss / static_cast<double>(K) + eps);
      for (int64_t k = 0; k < K; ++k)
        xin[static_cast<size_t>(r * K + k)] = x[static_cast<size_t>(r * K + k)] * inv * norm[static_cast<size_t>(k)];
    }
  std::vector<std::vector<double>> prod(ws.size());
  for (int i = 0; i < count; ++i) {
    const auto& Wi = W[static_cast<size_t>(i)];
    const int64_t N = ws[static_cast<size_t>(i)]->out_features;
    ASSERT_EQ(Wi.size(), static_cast<size_t>(N * K));
    const bool has_bias = i < static_cast<int>(bias.size()) && !bias[static_cast<size_t>(i)].empty();
    prod[static_cast<size_t>(i)].assign(static_cast<size_t>(rows * N), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double a = has_bias ? bias[static_cast<size_t>(i)][static_cast<size_t>(n)] : 0.0;
        for (int64_t k = 0; k < K; ++k) a += Wi[static_cast<size_t>(n * K + k)] * xin[static_cast<size_t>(r * K + k)];
        prod[static_cast<size_t>(i)][static_cast<size_t>(r * N + n)] = a;
      }
  }
  const int outs = output == FusedLinear::Output::SwiGLU ? 1 : count;
  std::vector<std::vector<float>> y0(static_cast<size_t>(outs)), want(static_cast<size_t>(outs));
  for (int i = 0; i < outs; ++i) {
    const size_t n = static_cast<size_t>(rows * ws[static_cast<size_t>(i)]->out_features);
    y0[static_cast<size_t>(i)] = randn(n, seed + 10 + static_cast<uint64_t>(i), 1.f);
    want[static_cast<size_t>(i)].resize(n);
    for (size_t j = 0; j < n; ++j) {
      double v = prod[static_cast<size_t>(i)][j];
      if (output == FusedLinear::Output::Accumulate) v += y0[static_cast<size_t>(i)][j];
      if (output == FusedLinear::Output::SwiGLU) v = v / (1.0 + std::exp(-v)) * prod[1][j];
      want[static_cast<size_t>(i)][j] = static_cast<float>(v);
    }
  }
  // The backend.
  DeviceBuffer dx = b.alloc(x.size()), dn = b.alloc(norm.size());
  b.upload(dx.data(), x.data(), x.size());
  b.upload(dn.data(), norm.data(), norm.size());
  std::vector<DeviceBuffer> dy;
  FusedLinear op;
  op.input = input;
  op.output = output;
  op.x = dx.data();
  op.norm = dn.data();
  op.eps = eps;
  op.count = count;
  op.rows = rows;
  for (int i = 0; i < count; ++i) op.w[i] = ws[static_cast<size_t>(i)];
  for (int i = 0; i < outs; ++i) {
    dy.push_back(b.alloc(y0[static_cast<size_t>(i)].size()));
    b.upload(dy.back().data(), y0[static_cast<size_t>(i)].data(), y0[static_cast<size_t>(i)].size());
    op.y[i] = dy.back().data();
  }
  ASSERT_TRUE(b.fused_linear(op)) << "the backend did not fuse this op";
  for (int i = 0; i < outs; ++i) {
    std::vector<float> got(y0[static_cast<size_t>(i)].size());
    b.download(got.data(), dy[static_cast<size_t>(i)].data(), got.size());
    double num = 0, den = 0;
    for (size_t j = 0; j < got.size(); ++j) {
      ASSERT_TRUE(std::isfinite(got[j])) << "output " << i << " element " << j;
      num += (got[j] - want[static_cast<size_t>(i)][j]) * static_cast<double>(got[j] - want[static_cast<size_t>(i)][j]);
      den += static_cast<double>(want[static_cast<size_t>(i)][j]) * want[static_cast<size_t>(i)][j];
    }
    EXPECT_LT(std::sqrt(num / std::max(den, 1e-30)), tol) << "output " << i << " of " << outs;
  }
}

EngineOptions one_batch_options() {
  EngineOptions opt;
  opt.num_blocks = 64;
  opt.block_size = 16;
  opt.token_budget = 256;
  opt.max_running = 8;
  opt.max_context = 256;
  return opt;
}

SamplerParams story_sampling() {
  SamplerParams s;
  s.temperature = 0.9f;
  s.top_k = 40;
  s.top_p = 0.95f;
  s.min_p = 0.02f;
  s.repeat_penalty = 1.1f;
  s.seed = 7;
  return s;
}

void expect_engine_batch_equals_alone(Model& m, const Tokenizer& tok, const EngineOptions& opt, int n_new,
                                      bool preemption, const SamplerParams* sampling) {
  const char* texts[] = {"Once upon a time", "The little dog", "Lily wanted to play with her",
                         "One day, a big bear went to the park and saw", "Tim", "The sun was hot. The children",
                         "Once upon a time, there was a girl named Sue. She liked", "Ben and his mom"};
  SamplerParams greedy_params;
  greedy_params.temperature = 0;
  const auto params_of = [&](size_t i) {
    SamplerParams p = sampling ? *sampling : greedy_params;
    if (sampling) p.seed = sampling->seed + i;
    return p;
  };
  std::vector<std::vector<int32_t>> prompts, alone;
  for (const char* t : texts) {
    prompts.push_back(tok.encode(t, /*add_special=*/true));
    if (!sampling) {
      alone.push_back(greedy(m, prompts.back(), n_new));
      continue;
    }
    GenerateOptions g;
    g.max_tokens = n_new;
    g.stop_at_eos = false;
    g.sampling = params_of(prompts.size() - 1);
    std::vector<int32_t> out;
    generate(m, prompts.back(), g, [&](int32_t id) {
      out.push_back(id);
      return true;
    });
    alone.push_back(out);
  }
  Engine engine(m, opt);
  for (size_t i = 0; i < prompts.size(); ++i) engine.add({static_cast<SeqId>(i), prompts[i], n_new, {}}, params_of(i));
  engine.run_to_completion();
  const auto finished = engine.take_finished();
  ASSERT_EQ(finished.size(), prompts.size());
  for (const Finished& f : finished) EXPECT_EQ(f.output, alone[static_cast<size_t>(f.id)]) << "prompt " << f.id;
  if (preemption) {
    EXPECT_GT(engine.scheduler().preemptions(), 0);
  }
  EXPECT_EQ(engine.blocks().used_blocks(), 0);
}

}  // namespace qf::test
