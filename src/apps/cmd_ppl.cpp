// qforge ppl: perplexity of a text file over non-overlapping windows (no BOS); with --kld-base,
// also the quality of a quantized model against its base (KL divergence, top-1 agreement).
#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "apps/commands.h"
#include "backends/backend.h"
#include "core/error.h"
#include "core/file_reader.h"
#include "core/log.h"
#include "core/sizes.h"
#include "model/config.h"
#include "model/model.h"
#include "runtime/kl_divergence.h"
#include "runtime/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace qf::app {

namespace {

struct PplArgs {
  CommonOptions common;
  std::string file;
  int64_t ctx = 512;
  int64_t max_windows = 0;
  std::string kld_base;
  int64_t kld_windows = 48;
  int64_t batch = 1;
  std::string kv_cache = "fp16";
  bool quiet = false;
};

std::string without_cr(std::string_view text) {
  // Texts saved on Windows (like the staged wikitext copy) end lines in CRLF.
  std::string clean;
  clean.reserve(text.size());
  for (char ch : text)
    if (ch != '\r') clean.push_back(ch);
  return clean;
}

// Where a prefix of a text may be cut for tokenizing: after its last newline, else its last
// space, else at a UTF-8 character boundary. Tokens far before the cut are those of the whole text.
size_t safe_cut(const std::string& prefix) {
  const size_t half = prefix.size() / 2;
  size_t nl = prefix.rfind('\n');
  if (nl != std::string::npos && nl >= half) return nl + 1;
  size_t sp = prefix.rfind(' ');
  if (sp != std::string::npos && sp >= half) return sp + 1;
  size_t cut = prefix.size();
  while (cut > 0 && (static_cast<unsigned char>(prefix[cut - 1]) & 0xC0) == 0x80) --cut;
  return cut > 0 ? cut - 1 : 0;
}

// The text's tokens, or, when only `need` tokens (> 0) are used, the first `need` of them: the
// file is read and tokenized in growing prefixes (doubling) until the prefix holds `need` tokens
// and a margin, so a 64 MiB file scored over one window reads and tokenizes a few kilobytes.
std::vector<int32_t> read_tokens(const PplArgs& a, const Tokenizer& tok, int64_t need) {
  Step step(str("tokenizing ", a.file));
  FileReader in(a.file);
  constexpr int64_t kMargin = 64;  // tokens past the last one used, so the cut cannot change it
  std::string prefix;
  std::vector<int32_t> ids;
  size_t want = need > 0 ? std::max<size_t>(64 << 10, static_cast<size_t>(need) * 16) : SIZE_MAX;
  for (;;) {
    const bool whole = !in.read_into(prefix, want - prefix.size());
    const size_t cut = whole ? prefix.size() : safe_cut(prefix);
    ids = tok.encode(without_cr(std::string_view(prefix).substr(0, cut)), /*add_special=*/false);
    if (whole) break;
    if (static_cast<int64_t>(ids.size()) >= need + kMargin) {
      ids.resize(static_cast<size_t>(need));
      const std::string of = in.size() ? " of " + format_bytes(static_cast<double>(*in.size())) : "";
      std::fprintf(stderr, "%s: read the first %s%s, %zu tokens for the windows asked for; %lld-token windows\n",
                   a.file.c_str(), format_bytes(static_cast<double>(cut)).c_str(), of.c_str(), ids.size(),
                   static_cast<long long>(a.ctx));
      return ids;
    }
    want *= 2;
  }
  std::fprintf(stderr, "%s: %zu tokens, %lld-token windows\n", a.file.c_str(), ids.size(),
               static_cast<long long>(a.ctx));
  return ids;
}

// Tokens the windows need: all of the text (0) unless --max-windows bounds them.
int64_t tokens_needed(const PplArgs& a) {
  return a.max_windows > 0 ? checked_mul(a.max_windows, a.ctx, "--max-windows x --ctx") : 0;
}

// The memory check's plan: --batch windows at a time (the KV cache for them), logits for every
// position.
MemoryPlan window_plan(const PplArgs& a, const ModelConfig& c, bool warn = true) {
  if (warn && a.ctx > c.max_position)
    log_warn("--ctx ", a.ctx, " is above the model's trained context of ", c.max_position,
             " tokens (max_position_embeddings): positions past it are extrapolated");
  MemoryPlan p;
  p.context = checked_mul(a.ctx, a.batch, "--ctx x --batch");
  p.rows = p.context;
  p.all_logits = true;
  return p;
}

// Speed counts the text's tokens per second, through every model compared.
void print_summary(const PplArgs& a, const PerplexityResult& r, const char* models) {
  std::fprintf(stderr, "%lld windows, %lld tokens scored, %.1f s (%.1f tok/s%s)\n", static_cast<long long>(r.windows),
               static_cast<long long>(r.tokens_scored), r.seconds,
               r.seconds > 0 ? static_cast<double>(r.windows * a.ctx) / r.seconds : 0.0, models);
}

int run_ppl(const PplArgs& a) {
  LoadedModel lm = load_model(a.common, [&](const ModelConfig& c, const Tokenizer&) { return window_plan(a, c); });
  auto& model = lm.model;
  const std::vector<int32_t> ids = read_tokens(a, *lm.tokenizer, tokens_needed(a));
  Step step("scoring");
  // Through the engine's batched forward pass over a paged cache (--batch windows at a time).
  const auto r = perplexity_batched(*model, ids, a.ctx, a.batch, a.max_windows, parse_kv_format(a.kv_cache),
                                    [&](int64_t done, int64_t total, double ppl) {
    if (!a.quiet) std::fprintf(stderr, "\r  window %lld/%lld  ppl %.4f", static_cast<long long>(done),
                               static_cast<long long>(total), ppl);
  });
  if (!a.quiet) std::fprintf(stderr, "\n");
  std::printf("ppl %.4f\n", r.ppl);
  print_summary(a, r, "");
  return 0;
}

int run_kld(const PplArgs& a) {
  // Checked here rather than by CLI11, so that the error is the usual one line.
  if (!std::filesystem::is_directory(a.kld_base)) fail("--kld-base ", a.kld_base, ": no such folder");
  if (!std::filesystem::is_regular_file(std::filesystem::path(a.kld_base) / "config.json"))
    fail("--kld-base ", a.kld_base, ": no config.json (not a model folder)");
  // Compare the configs first: a mismatch fails before gigabytes of weights are loaded.
  check_comparable(load_config(a.common.model_dir), load_config(a.kld_base));
  LoadedModel lm = load_model(a.common, [&](const ModelConfig& c, const Tokenizer&) { return window_plan(a, c); });
  std::unique_ptr<Model> base;
  {
    Step step(str("loading ", a.kld_base));
    base = Model::load(a.kld_base, *lm.backend, [&](const ModelConfig& c) { return window_plan(a, c, false); });  // same device
  }
  const std::vector<int32_t> ids = read_tokens(a, *lm.tokenizer, tokens_needed(a));
  Step step("scoring");
  const auto r = kl_divergence(*lm.model, *base, ids, a.ctx, a.max_windows, a.kld_windows,
                               [&](int64_t done, int64_t total, double ppl, double kld) {
                                 if (!a.quiet)
                                   std::fprintf(stderr, "\r  window %lld/%lld  ppl %.4f  kld %.6f",
                                                static_cast<long long>(done), static_cast<long long>(total), ppl, kld);
                               });
  if (!a.quiet) std::fprintf(stderr, "\n");
  std::printf("ppl %.4f\n", r.quant.ppl);
  std::printf("base_ppl %.4f\n", r.base.ppl);
  std::printf("ppl_ratio %.6f\n", r.ppl_ratio);
  std::printf("kld %.6f\n", r.kld_mean);
  std::printf("kld_median %.6f\n", r.kld_median);
  std::printf("kld_p99 %.6f\n", r.kld_p99);
  std::printf("kld_max %.6f\n", r.kld_max);
  std::printf("top1 %.6f\n", r.top1);
  std::printf("delta_p_mean %.6f\n", r.delta_p_mean);
  std::printf("delta_p_rms %.6f\n", r.delta_p_rms);
  std::printf("kld_tokens %lld\n", static_cast<long long>(r.kld_tokens));
  print_summary(a, r.quant, ", both models");
  return 0;
}

}  // namespace

void register_ppl(CLI::App& app, std::function<int()>* run) {
  auto a = std::make_shared<PplArgs>();
  auto* cmd = app.add_subcommand(
      "ppl",
      "Perplexity of a text file (non-overlapping windows, no BOS; prints 'ppl X' on stdout). With --kld-base, also "
      "compares the model (a quant) with its base model token by token and prints one 'key value' line per figure: "
      "base_ppl, ppl_ratio, kld (mean KL(base || quant), nats), kld_median, kld_p99, kld_max, top1 (share of tokens "
      "whose most likely next token agrees), delta_p_mean and delta_p_rms (p_quant - p_base of the actual next "
      "token), kld_tokens. The defaults (--ctx 512, KL over the first 48 windows, perplexity over all) are the "
      "protocol of the project's reference quality figures");
  add_common_options(cmd, &a->common);
  cmd->add_option("-f,--file", a->file, "Text file")->required()->check(CLI::ExistingFile);
  cmd->add_option("-c,--ctx", a->ctx, "Window size in tokens")
      ->capture_default_str()
      ->check(integer_in(2, INT_MAX, "a window of 2 to 2147483647 tokens"));
  cmd->add_option("--max-windows", a->max_windows,
                  "Score at most this many windows (0 = all); only the text they need is read and tokenized")
      ->capture_default_str()
      ->check(integer_in(0, INT_MAX, "0 (all) or a window count up to 2147483647"));
  auto* base_opt = cmd->add_option("--kld-base", a->kld_base,
                  "Base model folder (e.g. the FP16 original of -m): run both on the same windows and device and "
                  "report the quant's quality against it; needs the same vocabulary (the text is tokenized with "
                  "-m's tokenizer)");
  cmd->add_option("--kld-windows", a->kld_windows,
                  "KL divergence and top-1 over the first N windows (0 = every window scored); perplexities always "
                  "cover every window")
      ->capture_default_str()
      ->check(integer_in(0, INT_MAX, "0 (every window scored) or a window count up to 2147483647"))
      ->needs(base_opt);
  cmd->add_option("--batch", a->batch, "Windows scored in one forward pass (not with --kld-base)")
      ->capture_default_str()
      ->check(integer_in(1, 4096, "1 to 4096 windows"))
      ->excludes(base_opt);
  cmd->add_option("--kv-cache", a->kv_cache,
                  "KV cache: fp16 (the device's full precision; fp32 on the CPU), q8 or q4 (8- or 4-bit, one scale per "
                  "32 values) (not with --kld-base)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp16", "q8", "q4"}))
      ->excludes(base_opt);
  cmd->add_flag("-q,--quiet", a->quiet, "No progress line");
  cmd->callback([run, a] { *run = [a] { return a->kld_base.empty() ? run_ppl(*a) : run_kld(*a); }; });
}

}  // namespace qf::app
