// qforge generate: stream a continuation of a prompt to stdout; statistics go to stderr.
#include <unistd.h>

#include <cstdio>
#include <memory>

#include "apps/commands.h"
#include "backends/backend.h"
#include "core/log.h"
#include "model/model.h"
#include "runtime/generator.h"
#include "tokenizer/tokenizer.h"

namespace qf::app {

namespace {

struct GenerateArgs {
  CommonOptions common;
  std::string prompt;
  bool no_bos = false;
  bool ignore_eos = false;
  bool no_graph = false;
  int max_tokens = 128;
  int64_t ctx = 0;
  SamplerParams sampling;
};

int run_generate(const GenerateArgs& a) {
  LoadedModel lm = load_model(a.common);
  auto& backend = lm.backend;
  auto& model = lm.model;
  const Tokenizer& tok = *lm.tokenizer;
  std::vector<int32_t> prompt = tok.encode(a.prompt, /*add_special=*/!a.no_bos);
  if (prompt.empty()) {
    // An empty prompt starts from BOS alone (the way a model is sampled unconditionally).
    const auto bos = tok.info().bos_id ? *tok.info().bos_id
                                        : (model->config().bos_id ? static_cast<int32_t>(*model->config().bos_id) : -1);
    if (bos < 0) fail("the prompt is empty and the model has no BOS token to start from");
    prompt.push_back(bos);
  }
  GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  opt.context = a.ctx;
  opt.sampling = a.sampling;
  opt.stop_at_eos = !a.ignore_eos;
  opt.use_graph = !a.no_graph;
  for (int64_t id : model->config().eos_ids) opt.eos_ids.push_back(static_cast<int32_t>(id));
  if (tok.info().eos_id) opt.eos_ids.push_back(*tok.info().eos_id);

  StreamDecoder stream(tok);
  for (int32_t id : prompt) stream.push(id);  // context for spacing; the prompt is not echoed
  const GenerateStats st = generate(*model, prompt, opt, [&](int32_t id) {
    const std::string piece = stream.push(id);
    if (!piece.empty()) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
    }
    return true;
  });
  const std::string rest = stream.flush();
  std::fwrite(rest.data(), 1, rest.size(), stdout);
  if (isatty(fileno(stdout))) std::fputc('\n', stdout);
  std::fflush(stdout);
  std::fprintf(stderr, "\n[%s] prompt: %lld tokens, %.1f tok/s | generated: %lld tokens, %.1f tok/s%s\n",
               backend->name().c_str(), static_cast<long long>(st.prompt_tokens), st.prefill_tps(),
               static_cast<long long>(st.generated_tokens), st.decode_tps(), st.hit_eos ? " (EOS)" : "");
  return 0;
}

}  // namespace

void register_generate(CLI::App& app, std::function<int()>* run) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt (text on stdout, statistics on stderr)");
  add_common_options(cmd, &a->common);
  cmd->add_option("-p,--prompt", a->prompt, "Prompt text (empty: start from BOS)");
  cmd->add_option("-n,--max-tokens", a->max_tokens, "Tokens to generate at most")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--ctx", a->ctx, "Context size in tokens (default: prompt + max tokens)");
  cmd->add_option("--temperature", a->sampling.temperature, "Sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", a->sampling.top_k, "Keep the k most likely tokens (0 = off)")->capture_default_str();
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass (1 = off)")->capture_default_str();
  cmd->add_option("--min-p", a->sampling.min_p, "Drop tokens below min-p x the top probability (0 = off)")->capture_default_str();
  cmd->add_option("--repeat-penalty", a->sampling.repeat_penalty, "Penalty for recently seen tokens (1 = off)")->capture_default_str();
  cmd->add_option("--repeat-last-n", a->sampling.repeat_last_n, "Window of the repeat penalty (-1 = all)")->capture_default_str();
  cmd->add_option("--seed", a->sampling.seed, "Random seed")->capture_default_str();
  cmd->add_flag("--no-bos", a->no_bos, "Do not add the BOS token to the prompt");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Keep generating past the end-of-sequence token");
  cmd->add_flag("--no-graph", a->no_graph, "Decode eagerly instead of replaying a CUDA graph (the tokens are the same)");
  cmd->callback([run, a] { *run = [a] { return run_generate(*a); }; });
}

}  // namespace qf::app
