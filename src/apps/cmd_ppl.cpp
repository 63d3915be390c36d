// qforge ppl: perplexity of a text file over non-overlapping windows (no BOS); with --kld-base,
// also the quality of a quantized model against its base (KL divergence, top-1 agreement).
#include <cstdio>
#include <filesystem>
#include <memory>

#include "apps/commands.h"
#include "backends/backend.h"
#include "core/error.h"
#include "core/json_file.h"
#include "core/log.h"
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
  bool quiet = false;
};

std::vector<int32_t> read_tokens(const PplArgs& a, const Tokenizer& tok) {
  std::string text = read_text_file(a.file);
  // Texts saved on Windows (like the staged wikitext copy) end lines in CRLF.
  std::string clean;
  clean.reserve(text.size());
  for (char ch : text) if (ch != '\r') clean.push_back(ch);
  std::vector<int32_t> ids = tok.encode(clean, /*add_special=*/false);
  std::fprintf(stderr, "%s: %zu tokens, %lld-token windows\n", a.file.c_str(), ids.size(),
               static_cast<long long>(a.ctx));
  return ids;
}

// Speed counts the text's tokens per second, through every model compared.
void print_summary(const PplArgs& a, const PerplexityResult& r, const char* models) {
  std::fprintf(stderr, "%lld windows, %lld tokens scored, %.1f s (%.1f tok/s%s)\n", static_cast<long long>(r.windows),
               static_cast<long long>(r.tokens_scored), r.seconds,
               r.seconds > 0 ? static_cast<double>(r.windows * a.ctx) / r.seconds : 0.0, models);
}

int run_ppl(const PplArgs& a) {
  LoadedModel lm = load_model(a.common);
  auto& model = lm.model;
  const std::vector<int32_t> ids = read_tokens(a, *lm.tokenizer);
  const auto r = perplexity(*model, ids, a.ctx, a.max_windows, [&](int64_t done, int64_t total, double ppl) {
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
  LoadedModel lm = load_model(a.common);
  std::unique_ptr<Model> base = Model::load(a.kld_base, *lm.backend);  // same device as the quant
  const std::vector<int32_t> ids = read_tokens(a, *lm.tokenizer);
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
  cmd->add_option("--ctx", a->ctx, "Window size in tokens")->capture_default_str();
  cmd->add_option("--max-windows", a->max_windows, "Score at most this many windows (0 = all)")->capture_default_str();
  auto* base_opt = cmd->add_option("--kld-base", a->kld_base,
                  "Base model folder (e.g. the FP16 original of -m): run both on the same windows and device and "
                  "report the quant's quality against it; needs the same vocabulary (the text is tokenized with "
                  "-m's tokenizer)");
  cmd->add_option("--kld-windows", a->kld_windows,
                  "KL divergence and top-1 over the first N windows (0 = every window scored); perplexities always "
                  "cover every window")
      ->capture_default_str()
      ->needs(base_opt);
  cmd->add_flag("-q,--quiet", a->quiet, "No progress line");
  cmd->callback([run, a] { *run = [a] { return a->kld_base.empty() ? run_ppl(*a) : run_kld(*a); }; });
}

}  // namespace qf::app
