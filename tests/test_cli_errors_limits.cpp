// Issue 9, the limits of options and inputs: every case ends with a correct result or one
// "qforge: error: <file or option>: <what and the limit>" line and exit status 1 -- never a
// crash, a hang, garbage output or a silent success. Built under ASan+UBSan in CI (parser label).
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <fstream>
#include <limits>
#include <system_error>

#include "backends/cpu/cpu_backend.h"
#include "core/sizes.h"
#include "core/thread_pool.h"
#include "formats/safetensors.h"
#include "runtime/generator.h"
#include "backends/sampler.h"
#include "test_util.h"

#if defined(__SANITIZE_ADDRESS__)
#define QF_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QF_TEST_ASAN 1
#endif
#endif

namespace qf {
namespace {

namespace fs = std::filesystem;

const char* kStories = "models/stories260K-hf/model.safetensors";  // max_position_embeddings 512

std::string stories() { return (test::data_dir() / "models/stories260K-hf").string(); }

using test::CliRun;
using test::slurp;
CliRun run(const std::string& args) { return test::run_cli(args); }

// Exit 1, and the last stderr line is one "qforge: error: " line holding every needle, of sane
// length (no 300-digit bounds), with nothing on stdout.
void expect_error(const std::string& args, std::initializer_list<std::string> needles) {
  const CliRun r = run(args);
  EXPECT_EQ(r.rc, 1) << args << "\n" << r.err;
  const std::string last = r.last_line();
  EXPECT_EQ(last.rfind("qforge: error: ", 0), 0u) << args << "\n" << r.err;
  EXPECT_LT(last.size(), 400u) << last;
  for (const auto& n : needles) EXPECT_NE(last.find(n), std::string::npos) << "wanted '" << n << "' in: " << r.err;
  EXPECT_TRUE(r.out.empty()) << args << ": " << r.out;
}

// ---- item 1: context sizes ----------------------------------------------------------------------

TEST(CliLimits, CheckedSizeArithmetic) {
  EXPECT_EQ(checked_mul(1 << 20, 1 << 20, "x"), int64_t{1} << 40);
  test::expect_error([] { checked_mul(int64_t{1} << 62, 4, "the KV cache"); }, "the KV cache");
  test::expect_error([] { checked_product({2, 32, 8, 128, int64_t{4611686018427387904}}, "KV"); }, "too large");
  test::expect_error([] { checked_mul(-1, 4, "rows"); }, "rows");
  test::expect_error([] { checked_add(std::numeric_limits<int64_t>::max(), 1, "--depth + -n"); }, "--depth + -n");
  CpuBackend cpu(1);
  test::expect_error([&] { cpu.kv_cache_bytes(32, 8, 128, int64_t{4611686018427387904}); }, "KV cache");
  EXPECT_EQ(format_bytes(140.2e9), "140.2 GB");
}

TEST(CliLimits, ChooseContextRules) {
  // Not given: prompt + max tokens, at most the trained context; -n -1 = the trained context.
  EXPECT_EQ(choose_context(512, 10, 20, std::nullopt), 30);
  EXPECT_EQ(choose_context(512, 10, 1000, std::nullopt), 512);
  EXPECT_EQ(choose_context(512, 10, -1, std::nullopt), 512);
  EXPECT_EQ(choose_context(512, 10, 0, std::nullopt), 10);  // -n 0: the prompt only
  // 0 and -1 = the trained context (llama.cpp's -c 0).
  EXPECT_EQ(choose_context(512, 10, 20, 0), 512);
  EXPECT_EQ(choose_context(512, 10, 20, -1), 512);
  EXPECT_EQ(choose_context(512, 10, 20, 64), 64);
  EXPECT_EQ(choose_context(512, 600, 20, 2048), 2048);  // explicitly raised: allowed (with a warning)
  test::expect_error([] { choose_context(512, 600, 20, std::nullopt); }, "trained context of 512");
  test::expect_error([] { choose_context(512, 600, 20, 0); }, "600 tokens");
  test::expect_error([] { choose_context(512, 64, 20, 64); }, "--ctx 64: the prompt is too long (64 tokens");
  EXPECT_EQ(choose_context(512, 64, 0, 64), 64);  // -n 0: a prompt that fills the context is fine
}

TEST(CliLimits, HugeContextIsRefusedNotWrapped) {
  QF_REQUIRE_DATA(kStories);
  // Above any sane bound: a range message with sane numbers (was a segfault / vector::_M_default_append).
  expect_error("generate -m " + stories() + " -p hi -n 4 --ctx 4611686018427387904", {"--ctx", "2147483647"});
  expect_error("generate -m " + stories() + " -p hi -n 4 --ctx 2305843009213693952", {"--ctx", "2147483647"});
  // In range but far beyond memory: the estimate refuses before allocating.
  expect_error("generate -m " + stories() + " -p hi -n 4 --ctx 2147483647 --temperature 0",
               {"needs ~", "KV cache", "available"});
  expect_error("bench --random tiny --device cpu -p 8 -n 2 -r 1 --depth 4611686018427387904", {"--depth", "2147483647"});
  expect_error("bench --random tiny --device cpu -p 8 -n 2 -r 1 --depth 2000000000",
               {"tiny on cpu", "needs ~", "KV cache", "available"});
  expect_error("ppl -m " + stories() + " -f " + (test::data_dir() / "models/stories260K-hf/config.json").string() +
                   " --ctx 4611686018427387904",
               {"--ctx", "2147483647"});
}

TEST(CliLimits, PromptAndContext) {
  QF_REQUIRE_DATA(kStories);
  std::string long_prompt;
  for (int i = 0; i < 160; ++i) long_prompt += "Once upon a time ";  // ~640 tokens > 512 trained
  expect_error("generate -m " + stories() + " -p 'Once upon a time there was a little girl' -n 4 --ctx 4",
               {"--ctx 4", "prompt is too long"});
  expect_error("generate -m " + stories() + " -p '" + long_prompt + "' -n 4",
               {"-p", "trained context of 512", "--ctx"});
  // Raised explicitly: runs, with a warning.
  const CliRun r = run("generate -m " + stories() + " -p '" + long_prompt + "' -n 4 --temperature 0 --ctx 1024");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.err.find("above the model's trained context of 512"), std::string::npos) << r.err;
  // 0 and -1: the trained context.
  for (const char* c : {"0", "-1"}) {
    const CliRun z = run("generate -m " + stories() + " -p 'Once upon a time' -n 8 --temperature 0 --ctx " + c);
    EXPECT_EQ(z.rc, 0) << c << ": " << z.err;
    EXPECT_FALSE(z.out.empty()) << c;
  }
}

// ---- item 2: threads ----------------------------------------------------------------------------

TEST(CliLimits, ThreadPoolStartsAllWorkersOrNone) {
  alarm(120);  // a regression hangs forever: fail loudly instead
  ThreadPool::set_spawn_hook_for_testing([](int i) {
    if (i == 5) throw std::system_error(EAGAIN, std::generic_category(), "thread creation");
  });
  const std::string msg = test::error_of([] { ThreadPool pool(16); });
  ThreadPool::set_spawn_hook_for_testing({});
  EXPECT_NE(msg.find("cannot start 16 threads"), std::string::npos) << msg;
  EXPECT_NE(msg.find("thread 6"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  // The pool works afterwards.
  ThreadPool pool(4);
  std::atomic<int64_t> sum{0};
  pool.parallel_for(1000, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sum += i;
  });
  EXPECT_EQ(sum.load(), 999 * 1000 / 2);
  alarm(0);
}

TEST(CliLimits, ThreadsUnderAnAddressSpaceLimit) {
#ifdef QF_TEST_ASAN
  GTEST_SKIP() << "ulimit -v and AddressSanitizer's shadow memory do not mix (the unit test above covers it)";
#endif
  QF_REQUIRE_DATA(kStories);
  // The smallest address-space limit (1, 2, 4 or 8 GiB) the binary starts under: a CUDA build maps
  // cuBLAS at startup (over 1 GiB of address space), a CPU-only build far less.
  std::string out, err;
  int64_t base_kb = 0;
  for (int64_t gib : {1, 2, 4, 8}) {
    if (test::run_command("sh -c 'ulimit -v " + std::to_string(gib << 20) + "; exec " + test::binary() + " --version'",
                          &out, &err) == 0) {
      base_kb = gib << 20;
      break;
    }
  }
  if (base_kb == 0) GTEST_SKIP() << "qforge does not start under an 8 GiB address-space limit here: " << err;
  // Each thread reserves an 8 MiB stack: 4000 of them (31 GiB) cannot fit in 1 GiB above that.
  const std::string limit = std::to_string(base_kb + (1 << 20));
  const int rc = test::run_command("sh -c 'ulimit -v " + limit + "; exec timeout 120 " + test::binary() +
                                       " generate --device cpu -m " + stories() + " -p hi -n 2 -t 4000 --temperature 0'",
                                   &out, &err);
  EXPECT_EQ(rc, 1) << "(124 = hung) " << err;
  EXPECT_NE(err.find("qforge: error: -t 4000: cannot start 4000 threads"), std::string::npos) << err;
}

// ---- item 3: options ----------------------------------------------------------------------------

TEST(CliLimits, NumberOptionsRefuseNanInfAndRanges) {
  QF_REQUIRE_DATA(kStories);
  const std::string g = "generate -m " + stories() + " -p hi ";
  for (const char* v : {"nan", "inf", "-inf", "-1", "1e39", "abc"}) expect_error(g + "--temperature " + v, {"--temperature"});
  for (const char* v : {"nan", "0", "1.5", "inf"}) expect_error(g + "--top-p " + v, {"--top-p", "(0, 1]"});
  for (const char* v : {"nan", "1", "-0.1"}) expect_error(g + "--min-p " + v, {"--min-p", "[0, 1)"});
  for (const char* v : {"nan", "0", "-1", "inf"}) expect_error(g + "--repeat-penalty " + v, {"--repeat-penalty"});
  expect_error(g + "--top-k -1", {"--top-k", "2147483647"});
  expect_error(g + "--top-k nan", {"--top-k"});
  expect_error(g + "--repeat-last-n -2", {"--repeat-last-n"});
  expect_error(g + "-n -5", {"--max-tokens", "-1", "2147483647"});
  expect_error(g + "-n 99999999999999999999", {"--max-tokens"});
  expect_error(g + "-t 5000", {"--threads", "4096"});
  expect_error(g + "-t -2", {"--threads"});
  expect_error(g + "--seed -2", {"--seed", "-1"});
  expect_error(g + "--seed 18446744073709551616", {"--seed"});
  expect_error("bench --random tiny --device cpu --bandwidth nan", {"--bandwidth"});
  expect_error("bench --random tiny --device cpu -n 0", {"--gen-tokens", "1 to 2147483647"});
  expect_error("bench --random tiny --device cpu -p -1", {"--prompt-tokens"});
  const std::string text = (test::data_dir() / "models/stories260K-hf/config.json").string();
  expect_error("ppl -m " + stories() + " -f " + text + " --ctx 1", {"--ctx"});
  expect_error("ppl -m " + stories() + " -f " + text + " --max-windows -1", {"--max-windows"});
  const std::string c = "convert -i " + stories() + " -o " + test::tmp_dir("limits_convert").string() + "/out ";
  for (const char* v : {"nan", "inf", "-inf"}) expect_error(c + "-b " + v, {"--bits", "finite"});
  for (const char* v : {"nan", "0", "-0.1", "inf"}) expect_error(c + "--damp " + v, {"--damp"});
  for (const char* v : {"nan", "inf"}) expect_error(c + "--sampled-share " + v, {"--sampled-share", "finite"});
  expect_error(c + "--shard-size nan", {"--shard-size"});
  expect_error(c + "--head-bits 99", {"--head-bits"});
  expect_error(c + "-t -3", {"--threads"});
}

TEST(CliLimits, SeedMinusOneIsRandomAndRepeatable) {
  QF_REQUIRE_DATA(kStories);
  const std::string g = "generate -m " + stories() + " -p 'Once upon a time' -n 24 --temperature 1.0 ";
  const CliRun r = run(g + "--seed -1");
  ASSERT_EQ(r.rc, 0) << r.err;
  const size_t at = r.err.find("seed: ");
  ASSERT_NE(at, std::string::npos) << r.err;
  const std::string seed = r.err.substr(at + 6, r.err.find(' ', at + 6) - at - 6);
  const CliRun again = run(g + "--seed " + seed);
  ASSERT_EQ(again.rc, 0) << again.err;
  EXPECT_EQ(again.out, r.out) << "seed " << seed;
}

TEST(CliLimits, ThreadsAllCoresAndTokenCounts) {
  QF_REQUIRE_DATA(kStories);
  const std::string g = "generate -m " + stories() + " -p 'Once upon a time' --temperature 0 ";
  const CliRun ref = run(g + "-n 16");
  ASSERT_EQ(ref.rc, 0) << ref.err;
  for (const char* t : {"-1", "0"}) {
    const CliRun r = run(g + "-n 16 -t " + t);
    EXPECT_EQ(r.rc, 0) << r.err;
    EXPECT_EQ(r.out, ref.out) << "-t " << t;
  }
  // -n 0: read the prompt, generate nothing.
  const CliRun zero = run(g + "-n 0");
  EXPECT_EQ(zero.rc, 0) << zero.err;
  EXPECT_TRUE(zero.out.empty()) << zero.out;
  EXPECT_NE(zero.err.find("generated: 0 tokens"), std::string::npos) << zero.err;
  // -n -1: until EOS or the context is full (here a 48-token context).
  const CliRun all = run(g + "-n -1 --ctx 48 --ignore-eos");
  EXPECT_EQ(all.rc, 0) << all.err;
  EXPECT_EQ(all.out.rfind(ref.out, 0), 0u) << all.out;  // greedy: the 16 tokens come first
  // Every position is used: ctx - prompt tokens + 1 (the last token sampled is not fed back).
  const size_t pp = all.err.find("prompt: ");
  ASSERT_NE(pp, std::string::npos) << all.err;
  const long prompt_tokens = std::atol(all.err.c_str() + pp + 8);
  EXPECT_NE(all.err.find(str("generated: ", 48 - prompt_tokens + 1, " tokens")), std::string::npos) << all.err;
}

// ---- item 4: runtime ----------------------------------------------------------------------------

// A copy of stories260K-hf whose final norm weight is `value`. Non-finite weights are refused at
// load; a finite 3e38 passes that check and overflows the head's sums to inf / NaN at run time.
fs::path broken_model(const std::string& name, float value) {
  const fs::path src = test::data_dir() / "models/stories260K-hf";
  const fs::path dir = test::tmp_dir(name);
  for (const char* f : {"config.json", "tokenizer.json", "tokenizer_config.json"}) fs::copy_file(src / f, dir / f);
  auto file = SafetensorsFile::open(src / "model.safetensors");
  std::vector<TensorToWrite> out;
  std::vector<std::vector<float>> keep;
  for (const auto& [tname, view] : file->tensors()) {
    const void* data = view.data;
    if (tname == "model.norm.weight") {
      keep.emplace_back(static_cast<size_t>(view.numel()), value);
      data = keep.back().data();
    }
    out.push_back({tname, view.dtype, view.shape, data});
  }
  write_safetensors(dir / "model.safetensors", out);
  return dir;
}

TEST(CliLimits, NonFiniteLogitsStopWithOneLine) {
  QF_REQUIRE_DATA(kStories);
  for (float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    const fs::path m = broken_model("limits_bad", bad);
    expect_error("generate -m " + m.string() + " -p 'Once upon a time' -n 8", {"model.norm.weight", "must be finite"});
  }
  const fs::path nan_model = broken_model("limits_nan", 3e38f);
  for (const fs::path& m : {nan_model}) {
    for (const char* sampling : {"--temperature 0", "--temperature 0.8 --top-k 40 --seed 3"})
      expect_error("generate -m " + m.string() + " -p 'Once upon a time' -n 8 " + sampling,
                   {m.string(), "non-finite logits", "NaN"});
  }
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
  expect_error("ppl -q -m " + nan_model.string() + " -f " + (test::data_dir() / "text/heldout/heldout.txt").string() +
                   " --ctx 64 --max-windows 2",
               {nan_model.string(), "non-finite logits", "window 1"});
  // The host sampler: -1 for a non-finite row, whatever the settings.
  SamplerParams p;
  Sampler s(p);
  std::vector<float> row{0.f, 1.f, std::nanf(""), 2.f};
  EXPECT_EQ(s.sample(row, {}), Sampler::kNonFinite);
  p.temperature = 0;
  Sampler greedy(p);
  row = {0.f, std::numeric_limits<float>::infinity(), 1.f};
  EXPECT_EQ(greedy.sample(row, {}), Sampler::kNonFinite);
}

// The device paths of the same rules: the argmax and sampler kernels flag non-finite logits (the
// step's token becomes -1, embedded as zeros) and the device's free memory is checked first.
TEST(CliLimits, GpuStopsOnNonFiniteLogitsAndChecksMemory) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA(kStories);
  const fs::path m = broken_model("limits_nan_gpu", 3e38f);
  for (const char* sampling : {"--temperature 0", "--temperature 0.8 --top-k 40 --seed 3"})
    expect_error("generate --device cuda -m " + m.string() + " -p 'Once upon a time' -n 8 " + sampling,
                 {m.string(), "non-finite logits"});
  expect_error("bench --random llama2-7b --device cuda -p 8 -n 2 -r 1 --depth 2000000000",
               {"llama2-7b on cuda", "needs ~", "KV cache", "available"});
}

TEST(CliLimits, PplReadsOnlyWhatItsWindowsNeed) {
  QF_REQUIRE_DATA(kStories);
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
  const fs::path heldout = test::data_dir() / "text/heldout/heldout.txt";
  const std::string text = slurp(heldout);
  const fs::path big = test::tmp_dir("limits_ppl") / "big.txt";
  {
    std::ofstream out(big, std::ios::binary);
    out << text;
    const std::string filler(1 << 20, 'x');  // one unbreakable 1 MiB "word": tokenizing it all is slow
    for (int i = 0; i < 48; ++i) out << filler << '\n';
  }
  const std::string args = " --ctx 128 --max-windows 3 -q";
  const CliRun small = run("ppl -m " + stories() + " -f " + heldout.string() + args);
  ASSERT_EQ(small.rc, 0) << small.err;
  const CliRun large = run("ppl -m " + stories() + " -f " + big.string() + args);
  ASSERT_EQ(large.rc, 0) << large.err;
  EXPECT_EQ(large.out, small.out);  // the same tokens of the same windows
  EXPECT_NE(large.err.find("read the first"), std::string::npos) << large.err;
  EXPECT_LT(large.seconds, 60.0) << large.err;
}

TEST(CliLimits, FullStdoutIsAnError) {
  QF_REQUIRE_DATA(kStories);
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  std::string out, err;
  int rc = test::run_command("sh -c '" + test::binary() + " generate -m " + stories() +
                                 " -p \"Once upon a time\" -n 16 --temperature 0 >/dev/full'",
                             &out, &err);
  EXPECT_EQ(rc, 1) << err;
  EXPECT_NE(err.find("qforge: error: stdout: "), std::string::npos) << err;
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
  rc = test::run_command("sh -c '" + test::binary() + " ppl -q -m " + stories() + " -f " +
                             (test::data_dir() / "text/heldout/heldout.txt").string() +
                             " --ctx 64 --max-windows 1 >/dev/full'",
                         &out, &err);
  EXPECT_EQ(rc, 1) << err;
  EXPECT_NE(err.find("qforge: error: stdout: "), std::string::npos) << err;
}

// ---- item 5: memory -----------------------------------------------------------------------------

TEST(CliLimits, MemoryIsCheckedBeforeAllocating) {
  if (host_memory_available() > (400ull << 30)) GTEST_SKIP() << "this machine could hold a 70B model in RAM";
  // Refused at once (it used to fill the RAM first).
  const CliRun r = run("bench --random llama2-70b --device cpu -p 8 -n 2 -r 1 --depth 0");
  EXPECT_EQ(r.rc, 1) << r.err;
  EXPECT_LT(r.seconds, 30.0);
  const std::string last = r.last_line();
  for (const char* n : {"qforge: error: llama2-70b on cpu", "needs ~", "GB (weights 1", "KV cache", "GB available"})
    EXPECT_NE(last.find(n), std::string::npos) << "wanted '" << n << "' in: " << r.err;
}

TEST(CliLimits, AllocationFailureSaysWhat) {
#ifdef QF_TEST_ASAN
  GTEST_SKIP() << "ulimit -v and AddressSanitizer's shadow memory do not mix";
#endif
  QF_REQUIRE_DATA(kStories);
  if (host_memory_available() < (4ull << 30)) GTEST_SKIP() << "needs 4 GB of free memory for the estimate to pass";
  // 3,000,000 positions x 1,280 bytes = 3.8 GB of KV cache: passes the MemAvailable estimate,
  // fails under a 2 GB address-space limit.
  std::string out, err;
  const int rc = test::run_command("sh -c 'ulimit -v 2000000; exec " + test::binary() + " generate -m " + stories() +
                                       " -p hi -n 2 -t 1 --ctx 3000000'",
                                   &out, &err);
  EXPECT_EQ(rc, 1) << err;
  EXPECT_NE(err.find("qforge: error: "), std::string::npos) << err;
  EXPECT_NE(err.find("out of memory: the fp16 KV cache of 30000"), std::string::npos) << err;
  EXPECT_NE(err.find("use a smaller --ctx"), std::string::npos) << err;
  // An allocation without its own message names the step it failed in: here reading a 3 GB text.
  const fs::path big = test::tmp_dir("limits_oom") / "sparse.txt";
  { std::ofstream(big).put('a'); }
  fs::resize_file(big, 3ull << 30);
  const int rc2 = test::run_command("sh -c 'ulimit -v 1500000; exec " + test::binary() + " ppl -m " + stories() +
                                        " -f " + big.string() + "'",
                                    &out, &err);
  fs::remove(big);
  EXPECT_EQ(rc2, 1) << err;
  EXPECT_NE(err.find("qforge: error: tokenizing " + big.string() + ": out of memory"), std::string::npos) << err;
  EXPECT_NE(err.find("ulimit -v"), std::string::npos) << err;
}

}  // namespace
}  // namespace qf
