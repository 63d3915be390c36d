// qforge ppl: perplexity of a text file over non-overlapping windows (no BOS).
#include <cstdio>
#include <memory>

#include "apps/commands.h"
#include "backends/backend.h"
#include "core/json_file.h"
#include "core/log.h"
#include "model/model.h"
#include "runtime/perplexity.h"
#include "tokenizer/tokenizer.h"

namespace qf::app {

namespace {

struct PplArgs {
  CommonOptions common;
  std::string file;
  int64_t ctx = 512;
  int64_t max_windows = 0;
  bool quiet = false;
};

int run_ppl(const PplArgs& a) {
  LoadedModel lm = load_model(a.common);
  auto& model = lm.model;
  const Tokenizer& tok = *lm.tokenizer;
  std::string text = read_text_file(a.file);
  // Texts saved on Windows (like the staged wikitext copy) end lines in CRLF.
  std::string clean;
  clean.reserve(text.size());
  for (char ch : text) if (ch != '\r') clean.push_back(ch);
  const std::vector<int32_t> ids = tok.encode(clean, /*add_special=*/false);
  std::fprintf(stderr, "%s: %zu tokens, %lld-token windows\n", a.file.c_str(), ids.size(),
               static_cast<long long>(a.ctx));
  const auto r = perplexity(*model, ids, a.ctx, a.max_windows, [&](int64_t done, int64_t total, double ppl) {
    if (!a.quiet) std::fprintf(stderr, "\r  window %lld/%lld  ppl %.4f", static_cast<long long>(done),
                               static_cast<long long>(total), ppl);
  });
  if (!a.quiet) std::fprintf(stderr, "\n");
  std::printf("ppl %.4f\n", r.ppl);
  std::fprintf(stderr, "%lld windows, %lld tokens scored, %.1f s (%.1f tok/s)\n", static_cast<long long>(r.windows),
               static_cast<long long>(r.tokens_scored), r.seconds,
               r.seconds > 0 ? static_cast<double>(r.windows * a.ctx) / r.seconds : 0.0);
  return 0;
}

}  // namespace

void register_ppl(CLI::App& app, std::function<int()>* run) {
  auto a = std::make_shared<PplArgs>();
  auto* cmd = app.add_subcommand("ppl", "Perplexity of a text file (non-overlapping windows, no BOS; prints 'ppl X' on stdout)");
  add_common_options(cmd, &a->common);
  cmd->add_option("-f,--file", a->file, "Text file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--ctx", a->ctx, "Window size in tokens")->capture_default_str();
  cmd->add_option("--max-windows", a->max_windows, "Score at most this many windows (0 = all)")->capture_default_str();
  cmd->add_flag("-q,--quiet", a->quiet, "No progress line");
  cmd->callback([run, a] { *run = [a] { return run_ppl(*a); }; });
}

}  // namespace qf::app
