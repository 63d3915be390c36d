// qforge convert on a tiny random Llama written by the test (no shared data needed): the
// optimizer against brute force, the self-contained output folder, resume after real kills at
// every stage (byte-identical output), refused jobs and bad inputs.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <random>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "core/dtype.h"
#include "core/json_file.h"
#include "formats/safetensors.h"
#include "model/model.h"
#include "quant/calibration.h"
#include "quant/optimizer.h"
#include "test_util.h"

namespace qf {
namespace {

namespace fs = std::filesystem;

// A 2-layer Llama: hidden 64, FFN 160, 4 heads of 16 (2 KV heads), vocab 256.
fs::path write_tiny_model(const fs::path& dir, const std::string& model_type = "llama") {
  fs::create_directories(dir);
  const int64_t H = 64, F = 160, V = 256, L = 2, KV = 32;
  const json config = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", model_type},
                       {"hidden_size", H}, {"intermediate_size", F}, {"num_hidden_layers", L},
                       {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", V},
                       {"max_position_embeddings", 256}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                       {"bos_token_id", 1}, {"eos_token_id", 2}, {"tie_word_embeddings", false},
                       {"torch_dtype", "float16"}};
  test::write_file(dir / "config.json", config.dump(2));
  test::write_file(dir / "generation_config.json", R"({"bos_token_id": 1, "eos_token_id": 2})");
  test::write_file(dir / "tokenizer_config.json", R"({"chat_template": "{{ messages }}"})");
  std::vector<std::vector<uint16_t>> store;
  std::vector<TensorToWrite> tensors;
  uint64_t seed = 7;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float scale, bool ones = false) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    const std::vector<float> v = test::randn(static_cast<size_t>(n), seed++, scale);
    std::vector<uint16_t> h(static_cast<size_t>(n));
    for (size_t i = 0; i < h.size(); ++i) h[i] = f32_to_fp16(ones ? 1.0f + 0.1f * v[i] : v[i]);
    store.push_back(std::move(h));
    tensors.push_back({name, DType::F16, shape, nullptr});
  };
  add("model.embed_tokens.weight", {V, H}, 1.0f);
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H}, 1.0f, true);
    add(p + "self_attn.q_proj.weight", {H, H}, 1.0f / 8);
    add(p + "self_attn.k_proj.weight", {KV, H}, 1.0f / 8);
    add(p + "self_attn.v_proj.weight", {KV, H}, 1.0f / 8);
    add(p + "self_attn.o_proj.weight", {H, H}, 1.0f / 8);
    add(p + "post_attention_layernorm.weight", {H}, 1.0f, true);
    add(p + "mlp.gate_proj.weight", {F, H}, 1.0f / 8);
    add(p + "mlp.up_proj.weight", {F, H}, 1.0f / 8);
    add(p + "mlp.down_proj.weight", {H, F}, 1.0f / 12);
  }
  add("model.norm.weight", {H}, 1.0f, true);
  add("lm_head.weight", {V, H}, 1.0f / 8);
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].data = store[i].data();
  write_safetensors(dir / "model.safetensors", tensors);
  return dir;
}

const char* kSmall = " --rows 6 --length 32 --measure-tokens 64 --device cpu -q";

std::string convert_cmd(const fs::path& in, const fs::path& out, const std::string& extra = "",
                        const std::string& bits = "4.0") {
  return test::binary() + " convert -i " + in.string() + " -o " + out.string() + " -b " + bits + kSmall + " " + extra;
}

int run(const std::string& cmd, std::string* err = nullptr) {
  std::string out, e;
  const int rc = test::run_command(cmd, &out, &e);
  if (err) *err = e;
  return rc;
}

using test::slurp;

// Every file of a folder (relative name -> bytes).
std::map<std::string, std::string> folder(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) out[fs::relative(e.path(), dir).string()] = slurp(e.path());
  return out;
}

void expect_same_folder(const fs::path& a, const fs::path& b, const std::string& what) {
  const auto fa = folder(a), fb = folder(b);
  std::vector<std::string> na, nb;
  for (const auto& [k, v] : fa) na.push_back(k);
  for (const auto& [k, v] : fb) nb.push_back(k);
  ASSERT_EQ(na, nb) << what;
  for (const auto& [k, v] : fa) EXPECT_TRUE(v == fb.at(k)) << what << ": " << k << " differs";
}

std::string one_line(const std::string& err) {
  std::string e = err;
  while (!e.empty() && e.back() == '\n') e.pop_back();
  return e;
}

TEST(ConvertOptimizer, MatchesBruteForce) {
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 200; ++trial) {
    const size_t S = 2 + rng() % 4, O = 2 + rng() % 4;
    std::vector<std::vector<SlotOption>> slots(S);
    for (auto& s : slots)
      for (size_t o = 0; o < O; ++o) s.push_back({static_cast<int64_t>(1000 + rng() % 9000), (rng() % 1000) / 1000.0});
    int64_t lo = 0, hi = 0;
    for (auto& s : slots) {
      int64_t mn = INT64_MAX, mx = 0;
      for (auto& o : s) mn = std::min(mn, o.bits), mx = std::max(mx, o.bits);
      lo += mn, hi += mx;
    }
    const int64_t budget = lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
    double best = INFINITY;
    std::vector<size_t> c(S, 0);
    for (size_t code = 0;; ++code) {
      size_t k = code;
      int64_t bits = 0;
      for (size_t s = 0; s < S; ++s) c[s] = k % O, k /= O, bits += slots[s][c[s]].bits;
      if (k) break;
      if (bits <= budget) best = std::min(best, strategy_objective(slots, c));
    }
    const Strategy st = choose_options(slots, budget);
    ASSERT_TRUE(st.fits);
    EXPECT_LE(st.bits, budget);
    // Exact up to the budget's discretisation (1/40000 of it per slot).
    EXPECT_NEAR(st.objective, best, 1e-12 + 1e-9 * best) << "trial " << trial;
  }
  std::vector<std::vector<SlotOption>> slots = {{{100, 0.1}, {200, 0.01}}, {{100, 0.1}}};
  EXPECT_FALSE(choose_options(slots, 150).fits);
}

// A file's rows and self-sampled ones interleave evenly: every prefix (the measurement reads the
// first rows) holds the sampled share, rounded down, and each row appears once, in order.
TEST(ConvertCalibration, SampledRowsSpreadEvenlyAmongTheFileRows) {
  for (const auto& [nf, ns] : std::vector<std::pair<int, int>>{{50, 50}, {70, 30}, {3, 1}, {5, 0}, {1, 9}}) {
    CalibrationRows file, own;
    file.length = own.length = 2;
    file.dataset = "f.parquet";
    own.dataset = "self-sampled (seed 1)";
    for (int i = 0; i < nf; ++i) file.rows.push_back({0, i});
    for (int i = 0; i < ns; ++i) own.rows.push_back({1, i});
    const CalibrationRows mixed = mix_rows(file, own);
    ASSERT_EQ(mixed.count(), nf + ns);
    int seen[2] = {0, 0};
    for (int64_t i = 0; i < mixed.count(); ++i) {
      const auto& r = mixed.rows[static_cast<size_t>(i)];
      EXPECT_EQ(r[1], seen[r[0]]++) << "rows keep their order";
      EXPECT_EQ(seen[1], static_cast<int>(ns * (i + 1) / (nf + ns))) << "prefix of " << i + 1 << " rows";
    }
    EXPECT_EQ(mixed.dataset, ns ? "f.parquet + " + std::to_string(ns) + " rows self-sampled (seed 1)" : "f.parquet");
  }
}

TEST(Convert, WritesASelfContainedFolderThatLoads) {
  const fs::path dir = test::tmp_dir("convert_folder");
  const fs::path in = write_tiny_model(dir / "in"), out = dir / "out";
  std::string err;
  ASSERT_EQ(run(convert_cmd(in, out, "--shard-size 0.05"), &err), 0) << err;
  for (const char* f : {"config.json", "generation_config.json", "tokenizer_config.json", "quantization_report.json",
                        "measurement.json", "model.safetensors.index.json"})
    EXPECT_TRUE(fs::exists(out / f)) << f;
  EXPECT_FALSE(fs::exists(out / ".qforge-convert"));
  EXPECT_EQ(slurp(out / "tokenizer_config.json"), slurp(in / "tokenizer_config.json"));
  const json config = read_json_file(out / "config.json");
  EXPECT_EQ(config["quantization_config"]["quant_method"], "exl2");
  EXPECT_EQ(config["quantization_config"]["bits"], 4.0);
  EXPECT_EQ(config["quantization_config"]["head_bits"], 6);
  EXPECT_EQ(config["quantization_config"]["calibration"]["rows"], 6);
  const json report = read_json_file(out / "quantization_report.json");
  EXPECT_LE(report["decoder_bpw"].get<double>(), 4.0);
  EXPECT_GT(report["decoder_bpw"].get<double>(), 3.0);
  EXPECT_EQ(report["blocks"].size(), 4u);

  auto b = make_backend(parse_device("cpu"));
  auto m = Model::load(out, *b);
  EXPECT_EQ(m->weights().layers[0].q.format, LinearFormat::EXL2);
  EXPECT_EQ(m->weights().head.format, LinearFormat::EXL2);
  auto base = Model::load(in, *b);
  auto c1 = m->new_cache(16), c2 = base->new_cache(16);
  const std::vector<int32_t> ids = {1, 17, 99, 3, 200, 45, 7, 8};
  std::vector<float> lq(256), lb(256);
  m->forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *c1, lq.data());
  base->forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *c2, lb.data());
  double d = 0, n = 0;
  for (size_t i = 0; i < lq.size(); ++i) {
    ASSERT_TRUE(std::isfinite(lq[i]));
    d += (lq[i] - lb[i]) * (lq[i] - lb[i]);
    n += lb[i] * lb[i];
  }
  // 4 bits from 192 calibration tokens on random weights: close, not exact.
  EXPECT_LT(std::sqrt(d / n), 0.3) << "the quantized model's logits are far from the original's";
}

TEST(Convert, MeasurementIsReusable) {
  const fs::path dir = test::tmp_dir("convert_measure");
  const fs::path in = write_tiny_model(dir / "in");
  std::string err;
  ASSERT_EQ(run(convert_cmd(in, dir / "full"), &err), 0) << err;
  ASSERT_EQ(run(convert_cmd(in, dir / "m", "--measure-only"), &err), 0) << err;
  EXPECT_TRUE(fs::exists(dir / "m" / "measurement.json"));
  EXPECT_FALSE(fs::exists(dir / "m" / "config.json"));
  ASSERT_EQ(run(convert_cmd(in, dir / "reuse", "--measurement " + (dir / "m" / "measurement.json").string()), &err), 0)
      << err;
  // Same tensors as measuring inline (only the report's reference perplexity is missing).
  EXPECT_EQ(slurp(dir / "full" / "model.safetensors"), slurp(dir / "reuse" / "model.safetensors"));
  // A measurement of another model is refused.
  const fs::path other = dir / "other";
  fs::create_directories(other);
  test::write_file(other / "measurement.json", R"({"measurement": {"model.layers.0.self_attn": []}})");
  EXPECT_NE(run(convert_cmd(in, dir / "bad", "--measurement " + (other / "measurement.json").string()), &err), 0);
  EXPECT_NE(err.find("no measurement for"), std::string::npos) << err;
}

// Kills the conversion for real (SIGKILL) at each named point, resumes, and compares with an
// uninterrupted run byte for byte.
TEST(ConvertResume, AfterKillAtEveryStageTheOutputIsIdentical) {
  const fs::path dir = test::tmp_dir("convert_resume");
  const fs::path in = write_tiny_model(dir / "in");
  std::string err;
  ASSERT_EQ(run(convert_cmd(in, dir / "ref"), &err), 0) << err;
  for (const char* point : {"calibrate", "measure:0", "measure:1", "optimize", "quantize:0", "quantize:1", "head",
                            "compile:start", "compile:written"}) {
    const fs::path out = dir / (std::string("kill_") + point);
    const std::string env = std::string("QFORGE_CHECKPOINT_SECONDS=0 QFORGE_CONVERT_KILL_AT=") + point + " ";
    EXPECT_EQ(run(env + convert_cmd(in, out), &err), 128 + SIGKILL) << point << ": " << err;
    if (std::string(point) != "compile:written") {
      EXPECT_FALSE(fs::exists(out / "config.json")) << point;
    }
    EXPECT_NE(run(convert_cmd(in, out), &err), 0) << point << ": a job there, no --resume";
    EXPECT_NE(err.find("--resume"), std::string::npos) << err;
    ASSERT_EQ(run(convert_cmd(in, out, "--resume"), &err), 0) << point << ": " << err;
    expect_same_folder(dir / "ref", out, point);
  }
}

// Kills at moments the test does not choose (timed), possibly several times in one job.
TEST(ConvertResume, AfterKillsAtRandomMomentsTheOutputIsIdentical) {
  const fs::path dir = test::tmp_dir("convert_resume_timed");
  const fs::path in = write_tiny_model(dir / "in");
  std::string err;
  ASSERT_EQ(run(convert_cmd(in, dir / "ref"), &err), 0) << err;
  const fs::path out = dir / "out";
  bool first = true;
  int kills = 0;
  for (int delay_ms : {150, 300, 450, 600, 900, 1300}) {
    const std::string cmd = convert_cmd(in, out, first ? "" : "--resume");
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      setenv("QFORGE_CHECKPOINT_SECONDS", "0", 1);
      execl("/bin/sh", "sh", "-c", ("exec " + cmd + " >/dev/null 2>&1").c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) ++kills;
    first = false;
    if (fs::exists(out / "config.json") && !fs::exists(out / ".qforge-convert")) break;  // it finished first
  }
  if (fs::exists(out / ".qforge-convert")) {
    ASSERT_EQ(run(convert_cmd(in, out, "--resume"), &err), 0) << err;
  }
  EXPECT_GT(kills, 0);
  expect_same_folder(dir / "ref", out, "after timed kills");
}

TEST(ConvertResume, AJobWithOtherSettingsIsRefused) {
  const fs::path dir = test::tmp_dir("convert_mismatch");
  const fs::path in = write_tiny_model(dir / "in"), out = dir / "out";
  std::string err;
  EXPECT_EQ(run("QFORGE_CONVERT_KILL_AT=optimize " + convert_cmd(in, out), &err), 128 + SIGKILL);
  EXPECT_NE(run(convert_cmd(in, out, "--resume", "3.0"), &err), 0);
  EXPECT_NE(err.find("other settings ('bits' was 4.0, now 3.0)"), std::string::npos) << err;
  const fs::path in2 = write_tiny_model(dir / "in2");
  json c = read_json_file(in2 / "config.json");
  c["rms_norm_eps"] = 1e-6;
  test::write_file(in2 / "config.json", c.dump());
  EXPECT_NE(run(convert_cmd(in2, out, "--resume"), &err), 0);
  EXPECT_NE(err.find("the input model differs"), std::string::npos) << err;
}

TEST(ConvertErrors, BadInputsGiveOneLineAndNoFinishedLookingFolder) {
  const fs::path dir = test::tmp_dir("convert_errors");
  const fs::path in = write_tiny_model(dir / "in");
  const fs::path empty_cal = dir / "empty.txt", blank_cal = dir / "blank.jsonl";
  test::write_file(empty_cal, "");
  test::write_file(blank_cal, "\n\n");
  const fs::path gpt2 = dir / "gpt2";
  fs::create_directories(gpt2);
  test::write_file(gpt2 / "config.json", R"({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})");
  const fs::path corrupt = write_tiny_model(dir / "corrupt");
  test::write_file(corrupt / "model.safetensors", "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":");
  const fs::path nonempty = dir / "nonempty";
  fs::create_directories(nonempty);
  test::write_file(nonempty / "notes.txt", "mine");
  struct Case {
    std::string cmd, needle;
  };
  const std::vector<Case> cases = {
      {convert_cmd(dir / "missing", dir / "o1"), "no such model folder"},
      {convert_cmd(corrupt, dir / "o2"), "model.safetensors"},
      {convert_cmd(gpt2, dir / "o3"), "GPT2LMHeadModel"},
      {convert_cmd(in, dir / "o4", "-c " + empty_cal.string()), "holds no text"},
      {convert_cmd(in, dir / "o5", "-c " + blank_cal.string()), "holds no text"},
      {convert_cmd(in, dir / "o6", "-c " + (dir / "nope.parquet").string()), "no such calibration file"},
      {convert_cmd(in, dir / "o7", "", "1.5"), "between 2.0 and 8.0"},
      {convert_cmd(in, dir / "o8", "", "8.5"), "between 2.0 and 8.0"},
      {convert_cmd(in, dir / "o10", "-c " + empty_cal.string() + " --sampled-share 1"), "below 1"},
      {convert_cmd(in, nonempty), "not empty"},
      {"QFORGE_FAIL_WRITES_AFTER=200000 " + convert_cmd(in, dir / "o9"), "No space left on device"},
  };
  for (const auto& c : cases) {
    std::string err;
    EXPECT_NE(run(c.cmd, &err), 0) << c.cmd;
    const std::string line = one_line(err);
    EXPECT_EQ(line.find('\n'), std::string::npos) << c.cmd << "\n" << err;
    EXPECT_NE(line.find(c.needle), std::string::npos) << c.cmd << "\n" << err;
    EXPECT_EQ(line.rfind("qforge: error: ", 0), 0u) << err;
  }
  for (const char* o : {"o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9", "o10"})
    EXPECT_FALSE(fs::exists(dir / o / "config.json")) << o;
  EXPECT_EQ(slurp(nonempty / "notes.txt"), "mine");
}

}  // namespace
}  // namespace qf
