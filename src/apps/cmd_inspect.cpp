// qforge inspect: what a model folder holds (architecture, shapes, dtypes, sizes, per-layer
// formats and bits per weight, tokenizer) without running it.
#include <cstdio>
#include <map>
#include <memory>
#include <optional>

#include "apps/commands.h"
#include "core/log.h"
#include "formats/quant_linear.h"
#include "model/config.h"
#include "model/weights.h"
#include "tokenizer/tokenizer.h"

namespace qf::app {

namespace {

struct InspectArgs {
  std::string model_dir;
  bool tensors = false;
  bool layers = true;
};

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) { b /= 1024; ++u; }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", b, units[u]);
  return buf;
}

// Names and tokens come from the files: escaped (no control bytes or broken UTF-8 reach the
// terminal) and cut at a sane length.
std::string esc(std::string_view s) { return escape_text(s, 200); }

int run_inspect(const InspectArgs& a) {
  const ModelConfig c = load_config(a.model_dir);
  const TensorStore store = TensorStore::open_dir(a.model_dir);
  for (const auto& n : store.notes()) std::printf("note: %s\n", esc(n).c_str());
  const ModelWeights w = load_weights(c, store, {.scan_large = false});  // shapes only: no NaN scan of the data

  std::printf("model         %s\n", esc(a.model_dir).c_str());
  std::printf("architecture  %s (model_type %s)\n", esc(c.arch->hf_class).c_str(), esc(c.model_type).c_str());
  std::printf("layers        %lld, hidden %lld, FFN %lld, vocab %lld\n", (long long)c.n_layers, (long long)c.hidden,
              (long long)c.intermediate, (long long)c.vocab);
  std::printf("attention     %lld heads x %lld, %lld KV heads%s%s\n", (long long)c.n_heads, (long long)c.head_dim,
              (long long)c.n_kv_heads, c.n_kv_heads < c.n_heads ? " (GQA)" : "",
              c.attention_bias ? ", q/k/v bias" : "");
  std::printf("rope          %s, theta %g", c.rope.type.c_str(), c.rope.theta);
  if (c.rope.type != "default") std::printf(", factor %g", c.rope.factor);
  std::printf("\ncontext       %lld%s\n", (long long)c.max_position,
              c.sliding_window ? str(", sliding window ", c.sliding_window).c_str() : "");
  std::printf("norm eps      %g, embeddings %s\n", c.rms_eps, c.tie_embeddings ? "tied" : "untied");
  if (!c.quant.method.empty()) std::printf("quantization  %s (config bits %g)\n", esc(c.quant.method).c_str(), c.quant.bits);

  // Parameter count and storage by dtype.
  std::map<std::string, std::pair<int64_t, size_t>> by_dtype;
  for (const auto& name : store.names()) {
    const auto& t = store.get(name);
    auto& e = by_dtype[std::string(dtype_name(t.dtype))];
    ++e.first;
    e.second += t.nbytes();
  }
  std::printf("tensors       %zu in %zu file(s), %s:", store.names().size(), store.files().size(),
              human_bytes(static_cast<double>(store.total_bytes())).c_str());
  for (const auto& [dt, e] : by_dtype) std::printf(" %s x%lld", dt.c_str(), (long long)e.first);
  std::printf("\n");

  int64_t params = w.embed.numel() + w.final_norm.numel();
  double dec_bits = 0, dec_weights = 0;
  auto account = [&](const LinearWeight& l) {
    params += l.in_features * l.out_features + (l.bias ? l.bias->numel() : 0);
    dec_bits += 8.0 * static_cast<double>(l.storage_bytes());
    dec_weights += static_cast<double>(l.in_features * l.out_features);
  };
  for (const auto& l : w.layers) {
    params += l.attn_norm.numel() + l.ffn_norm.numel();
    for (const LinearWeight* x : l.linears()) account(*x);
  }
  const double decoder_bpw = dec_bits / dec_weights;
  const bool tied = w.head.name == c.arch->embed;
  if (!tied) params += w.head.in_features * w.head.out_features;
  const double head_bits = 8.0 * static_cast<double>(w.head.storage_bytes());
  const double with_head_bpw = (dec_bits + head_bits) / (dec_weights + static_cast<double>(w.head.in_features * w.head.out_features));
  std::printf("parameters    %.2f M\n", static_cast<double>(params) / 1e6);
  std::printf("bits/weight   decoder %.3f, with head %.3f (head %s, %.2f bpw%s)\n", decoder_bpw, with_head_bpw,
              linear_format_name(w.head.format), w.head.bits_per_weight(), tied ? ", tied to embeddings" : "");

  if (a.layers) {
    std::printf("\n%-44s %-6s %-14s %8s  %s\n", "linear layer", "format", "shape (out,in)", "bpw", "detail");
    auto row = [&](const LinearWeight& l) {
      std::string detail = l.format == LinearFormat::Dense ? std::string(dtype_name(l.weight.dtype))
                                                           : l.quant->describe();
      std::printf("%-44s %-6s %6lld,%-7lld %8.3f  %s\n", esc(l.name).c_str(), linear_format_name(l.format),
                  (long long)l.out_features, (long long)l.in_features, l.bits_per_weight(), esc(detail).c_str());
    };
    for (const auto& l : w.layers)
      for (const LinearWeight* x : l.linears()) row(*x);
    row(w.head);
  }
  if (a.tensors) {
    std::printf("\n%-60s %-5s %s\n", "tensor", "dtype", "shape");
    for (const auto& name : store.names()) {
      const auto& t = store.get(name);
      std::printf("%-60s %-5s %s\n", esc(name).c_str(), std::string(dtype_name(t.dtype)).c_str(), t.shape_str().c_str());
    }
  }

  // The tokenizer: none at all is a fact about the folder (weights only); one that is present but
  // does not load is an error, as it is for generate and ppl: described so far, then exit 1.
  std::printf("\n");
  if (!Tokenizer::present(a.model_dir)) {
    std::printf("tokenizer     none (no tokenizer.json, or vocab.json + merges.txt)\n");
    return 0;
  }
  std::optional<Tokenizer> tok;
  try {
    tok.emplace(Tokenizer::load(a.model_dir));
  } catch (const Error&) {
    std::printf("tokenizer     does not load (error below)\n");
    std::fflush(stdout);
    throw;
  }
  const auto& i = tok->info();
  std::printf("tokenizer     %s, %d tokens (%d added), %d merges\n", i.kind.c_str(), i.vocab_size, i.n_added, i.n_merges);
  auto id = [&](const std::optional<int32_t>& x) {
    return x ? str(*x, " ", quote_for_error(tok->id_to_token(*x))) : std::string("none");
  };
  std::printf("special       bos %s, eos %s, unk %s; add bos %s\n", id(i.bos_id).c_str(), id(i.eos_id).c_str(),
              id(i.unk_id).c_str(), i.add_bos ? "yes" : "no");
  if (!i.pre_tokenizer.empty()) std::printf("pre-tokenizer %s\n", escape_text(i.pre_tokenizer, 1000).c_str());
  std::printf("chat template %s\n", i.chat_template ? "yes" : "no");
  return 0;
}

}  // namespace

void register_inspect(CLI::App& app, std::function<int()>* run) {
  auto a = std::make_shared<InspectArgs>();
  auto* cmd = app.add_subcommand("inspect", "Describe a model folder: architecture, shapes, dtypes, sizes, bits per weight, tokenizer");
  cmd->add_option("-m,--model", a->model_dir, "Model folder")->required()->check(CLI::ExistingDirectory);
  cmd->add_flag("--tensors", a->tensors, "Also list every tensor");
  cmd->add_flag("!--no-layers", a->layers, "Do not list the linear layers");
  cmd->callback([run, a] { *run = [a] { return run_inspect(*a); }; });
}

}  // namespace qf::app
