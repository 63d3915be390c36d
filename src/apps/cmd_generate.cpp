// qforge generate: stream a continuation of a prompt to stdout; statistics go to stderr.
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <memory>
#include <optional>

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
  int64_t max_tokens = 128;
  int64_t ctx = kNotGiven;
  static constexpr int64_t kNotGiven = INT64_MIN;
  SamplerParams sampling;
  SeedOption seed;
};

int run_generate(const GenerateArgs& a) {
  std::vector<int32_t> prompt;
  int64_t ctx = 0;
  LoadedModel lm = load_model(a.common, [&](const ModelConfig& config, const Tokenizer& tok) {
    Step step("tokenizing the prompt");
    prompt = tok.encode(a.prompt, /*add_special=*/!a.no_bos);
    if (prompt.empty()) {
      // An empty prompt starts from BOS alone (the way a model is sampled unconditionally).
      const auto bos = tok.info().bos_id ? *tok.info().bos_id
                                          : (config.bos_id ? static_cast<int32_t>(*config.bos_id) : -1);
      if (bos < 0) fail("-p: the prompt is empty and the model has no BOS token to start from");
      prompt.push_back(bos);
    }
    ctx = choose_context(config.max_position, static_cast<int64_t>(prompt.size()), a.max_tokens,
                         a.ctx == GenerateArgs::kNotGiven ? std::nullopt : std::optional<int64_t>(a.ctx));
    MemoryPlan plan;
    plan.context = ctx;
    plan.rows = std::min<int64_t>(static_cast<int64_t>(prompt.size()), GenerateOptions{}.prefill_chunk);
    return plan;
  });
  auto& backend = lm.backend;
  auto& model = lm.model;
  const Tokenizer& tok = *lm.tokenizer;
  GenerateOptions opt;
  opt.max_tokens = a.max_tokens;
  opt.context = ctx;
  opt.sampling = a.sampling;
  opt.sampling.seed = resolve_seed(a.seed);
  opt.stop_at_eos = !a.ignore_eos;
  opt.use_graph = !a.no_graph;
  for (int64_t id : model->config().eos_ids) opt.eos_ids.push_back(static_cast<int32_t>(id));
  if (tok.info().eos_id) opt.eos_ids.push_back(*tok.info().eos_id);

  Step step("generating");
  StreamDecoder stream(tok);
  for (int32_t id : prompt) stream.push(id);  // context for spacing; the prompt is not echoed
  const GenerateStats st = generate(*model, prompt, opt, [&](int32_t id) {
    const std::string piece = stream.push(id);
    if (!piece.empty()) write_stdout(piece);  // fails at once on a full disk or a closed stdout
    return true;
  });
  std::string rest = stream.flush();
  if (isatty(fileno(stdout))) rest += '\n';
  write_stdout(rest);
  std::fprintf(stderr, "\n[%s] prompt: %lld tokens, %.1f tok/s | generated: %lld tokens, %.1f tok/s%s\n",
               backend->name().c_str(), static_cast<long long>(st.prompt_tokens), st.prefill_tps(),
               static_cast<long long>(st.generated_tokens), st.decode_tps(),
               st.hit_eos ? " (EOS)" : st.hit_context ? str(" (context of ", ctx, " full)").c_str() : "");
  return 0;
}

}  // namespace

void register_generate(CLI::App& app, std::function<int()>* run) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt (text on stdout, statistics on stderr)");
  add_common_options(cmd, &a->common);
  cmd->add_option("-p,--prompt", a->prompt, "Prompt text (empty: start from BOS)");
  cmd->add_option("-n,--max-tokens", a->max_tokens,
                  "Tokens to generate at most (-1 = until EOS or the context is full; 0 = only read the prompt)")
      ->capture_default_str()
      ->check(integer_in(-1, INT_MAX, "-1 (until EOS or the context is full), 0, or a token count up to 2147483647"));
  cmd->add_option("-c,--ctx", a->ctx,
                  "Context size in tokens; 0 or -1 = the model's trained context (max_position_embeddings). "
                  "Default: prompt + max tokens, at most the trained context. A prompt that does not fit is "
                  "refused; above the trained context works with a warning")
      ->check(integer_in(-1, INT_MAX, "-1 or 0 (the model's trained context) or a token count up to 2147483647"));
  cmd->add_option("--temperature", a->sampling.temperature, "Sampling temperature; 0 = greedy")
      ->capture_default_str()
      ->check(real_in(0, HUGE_VAL));
  cmd->add_option("--top-k", a->sampling.top_k, "Keep the k most likely tokens (0 = off)")
      ->capture_default_str()
      ->check(integer_in(0, INT_MAX, "0 (off) or a token count up to 2147483647"));
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass (1 = off)")
      ->capture_default_str()
      ->check(real_in(0, 1, /*lo_open=*/true));
  cmd->add_option("--min-p", a->sampling.min_p, "Drop tokens below min-p x the top probability (0 = off)")
      ->capture_default_str()
      ->check(real_in(0, 1, false, /*hi_open=*/true));
  cmd->add_option("--repeat-penalty", a->sampling.repeat_penalty, "Penalty for recently seen tokens (1 = off)")
      ->capture_default_str()
      ->check(real_in(0, HUGE_VAL, /*lo_open=*/true));
  cmd->add_option("--repeat-last-n", a->sampling.repeat_last_n, "Window of the repeat penalty (-1 = all)")
      ->capture_default_str()
      ->check(integer_in(-1, INT_MAX, "-1 (all), 0 (off) or a token count up to 2147483647"));
  add_seed_option(cmd, &a->seed, "Random seed of the sampler");
  cmd->add_flag("--no-bos", a->no_bos, "Do not add the BOS token to the prompt");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Keep generating past the end-of-sequence token");
  cmd->add_flag("--no-graph", a->no_graph, "Decode eagerly instead of replaying a CUDA graph (the tokens are the same)");
  cmd->callback([run, a] { *run = [a] { return run_generate(*a); }; });
}

}  // namespace qf::app
