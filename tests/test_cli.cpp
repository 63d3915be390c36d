// End to end through the qforge binary: exact greedy text, perplexity, inspect.
#include <cstdlib>

#include "test_util.h"

namespace qf {
namespace {

using test::slurp;

std::string model(const std::string& name) { return (test::data_dir() / "models" / name).string(); }

TEST(Cli, Stories260kGreedyTextIsExact) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  std::string out, err;
  const int rc = test::run_command(test::binary() + " generate -m " + model("stories260K-hf") +
                                       " -p '' -n 200 --temperature 0 --ignore-eos",
                                   &out, &err);
  ASSERT_EQ(rc, 0) << err;
  EXPECT_EQ(out, slurp(test::data_dir() / "models/stories260K/expected_greedy_t0_n200.txt"));
  EXPECT_NE(err.find("tok/s"), std::string::npos) << err;  // statistics go to stderr only
}

TEST(Cli, TestModelGreedyContinuation) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/model.safetensors.index.json");
  std::string out, err;
  const int rc = test::run_command(
      test::binary() + " generate -m " + model("testmodel-llama-20m") +
          " -p 'Once upon a time, there was a little' -n 32 --temperature 0", &out, &err);
  ASSERT_EQ(rc, 0) << err;
  // transformers' greedy_32_text for this prompt (reference_outputs.json)
  EXPECT_EQ(out, " girl named Tim. She was a very happy day.\nThe girl was so excited to be happy. She was so happy and she was so happy. She");
}

TEST(Cli, SamplingIsSeededAndBounded) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  std::string a, b, err;
  const std::string cmd = test::binary() + " generate -m " + model("stories260K-hf") +
                          " -p 'Once upon a time' -n 40 --temperature 0.9 --top-k 20 --top-p 0.9 "
                          "--min-p 0.02 --repeat-penalty 1.1 --seed 7";
  ASSERT_EQ(test::run_command(cmd, &a, &err), 0) << err;
  ASSERT_EQ(test::run_command(cmd, &b, &err), 0) << err;
  EXPECT_EQ(a, b);
  EXPECT_FALSE(a.empty());
}

TEST(Cli, HeldoutPerplexity) {
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
  QF_REQUIRE_DATA("models/testmodel-llama-20m/config.json");
  std::string out, err;
  const int rc = test::run_command(test::binary() + " ppl -q -m " + model("testmodel-llama-20m") + " -f " +
                                       (test::data_dir() / "text/heldout/heldout.txt").string() + " --ctx 512",
                                   &out, &err);
  ASSERT_EQ(rc, 0) << err;
  ASSERT_EQ(out.rfind("ppl ", 0), 0u) << out;
  const double ppl = std::atof(out.c_str() + 4);
  EXPECT_NEAR(ppl, 114.49467, 114.49467 * 0.005) << err;
  std::cerr << "held-out ppl " << ppl << " (transformers 114.4947); " << err;
}

TEST(Cli, InspectDescribesTheModel) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/config.json");
  std::string out, err;
  ASSERT_EQ(test::run_command(test::binary() + " inspect -m " + model("testmodel-llama-20m"), &out, &err), 0) << err;
  for (const char* s : {"LlamaForCausalLM", "4 heads x 64, 2 KV heads (GQA)", "parameters    20.52 M",
                        "model.layers.5.mlp.down_proj", "spm-bpe", "F16 x"})
    EXPECT_NE(out.find(s), std::string::npos) << s << "\n" << out;
}

// Every subcommand defaults to --device auto: the GPU when one can be used, else the CPU, with the
// same result as naming it.
TEST(Cli, DeviceAutoIsTheDefault) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  const std::string gen = "generate -m " + model("stories260K-hf") + " -p 'Once upon a time' -n 12 --temperature 0";
  const test::CliRun def = test::run_cli(gen), automatic = test::run_cli(gen + " --device auto");
  ASSERT_EQ(def.rc, 0) << def.err;
  ASSERT_EQ(automatic.rc, 0) << automatic.err;
  EXPECT_EQ(def.out, automatic.out);
  std::string why;
  const bool gpu = test::cuda_available(&why);
  const test::CliRun named = test::run_cli(gen + (gpu ? " --device cuda" : " --device cpu"));
  ASSERT_EQ(named.rc, 0) << named.err;
  EXPECT_EQ(def.out, named.out);
  EXPECT_NE(def.err.find(gpu ? "[cuda:0" : "[cpu"), std::string::npos) << def.err;
  const test::CliRun bench = test::run_cli("bench --random tiny -p 8 -n 2 -r 1 --depth 0");
  ASSERT_EQ(bench.rc, 0) << bench.err;
  EXPECT_NE(bench.out.find(gpu ? "on cuda:0" : "on cpu"), std::string::npos) << bench.out;
  const test::CliRun bad = test::run_cli(gen + " --device tpu");
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.last_line().find("use auto, cpu, cuda or cuda:N"), std::string::npos) << bad.err;
}

// bench --concurrency runs many requests at once through the engine and prints one row per count.
TEST(Cli, BenchConcurrencyTable) {
  const test::CliRun r = test::run_cli("bench --random tiny --device cpu --concurrency 1,3 -p 24 -n 6");
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_NE(r.out.find("| concurrency | output tok/s | per-stream tok/s | TTFT p50 / p99 (ms)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\n| 1 | "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\n| 3 | "), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("prompts of 12..24 random tokens, 6 new tokens each"), std::string::npos) << r.out;
  for (const char* bad : {"0", "1,x", "5000"}) {
    const test::CliRun e = test::run_cli(std::string("bench --random tiny --device cpu -n 2 --concurrency ") + bad);
    EXPECT_EQ(e.rc, 1) << bad;
    EXPECT_NE(e.last_line().find("--concurrency"), std::string::npos) << e.err;
  }
}

// The quantized cache option reaches the engine; prefix sharing reports the cached prompt tokens.
TEST(Cli, BenchKVCacheAndPrefixSharing) {
  const test::CliRun q = test::run_cli("bench --random tiny --device cpu --concurrency 2 -p 24 -n 4 --kv-cache q8");
  ASSERT_EQ(q.rc, 0) << q.err;
  EXPECT_NE(q.out.find("q8 KV cache in 16-token blocks"), std::string::npos) << q.out;
  const test::CliRun p = test::run_cli("bench --random tiny --device cpu --prefix-sharing 64 -r 1 --block-size 8");
  ASSERT_EQ(p.rc, 0) << p.err;
  EXPECT_NE(p.out.find("| new prefix (cold) | 80 | 0 | "), std::string::npos) << p.out;
  EXPECT_NE(p.out.find("| same 64-token prefix | 80 | 64 | "), std::string::npos) << p.out;
  EXPECT_NE(p.out.find("prefix sharing: the second request's first token comes"), std::string::npos) << p.out;
  const test::CliRun bad = test::run_cli("bench --random tiny --device cpu --concurrency 2 --kv-cache q5");
  EXPECT_NE(bad.rc, 0);
  EXPECT_NE(bad.err.find("--kv-cache"), std::string::npos) << bad.err;
}

// ppl on the engine: windows in batches and quantized caches; a cache the head size cannot hold
// is one line.
TEST(Cli, PplBatchedAndQuantizedCache) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/config.json");
  const std::string m = (test::data_dir() / "models/testmodel-llama-20m").string();
  const std::string f = (test::data_dir() / "text/heldout/heldout.txt").string();
  const std::string base = "ppl -q --device cpu -m " + m + " -f " + f + " --ctx 128 --max-windows 4";
  const test::CliRun one = test::run_cli(base);
  const test::CliRun two = test::run_cli(base + " --batch 2");
  const test::CliRun q8 = test::run_cli(base + " --batch 4 --kv-cache q8");
  ASSERT_EQ(one.rc, 0) << one.err;
  ASSERT_EQ(two.rc, 0) << two.err;
  ASSERT_EQ(q8.rc, 0) << q8.err;
  EXPECT_EQ(one.out, two.out);  // "ppl X" to 4 decimals: the same windows, the same sums
  const double p1 = std::stod(one.out.substr(4)), p8 = std::stod(q8.out.substr(4));
  EXPECT_NEAR(p8, p1, 0.01 * p1);
  QF_REQUIRE_DATA("models/stories260K-hf/config.json");
  const test::CliRun e = test::run_cli("ppl -q --device cpu -m " + (test::data_dir() / "models/stories260K-hf").string() +
                                       " -f " + f + " --ctx 64 --max-windows 2 --kv-cache q4");
  EXPECT_EQ(e.rc, 1);
  EXPECT_EQ(e.last_line(), "qforge: error: a q4 KV cache needs a head size that is a multiple of 32, not 8");
}

}  // namespace
}  // namespace qf
