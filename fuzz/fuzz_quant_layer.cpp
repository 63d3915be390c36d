// The tensor set of one quantized linear layer, EXL2 or GPTQ, through the loader's path for a
// layer (model/weights.cpp: load_linear -> formats/quant_detect.cpp -> Exl2Linear::load or
// GptqLinear::load), with the quantization hints from a config.json read by load_config.
//
// The input is structured, so that mutations reach the validation of shapes and codes instead
// of dying in the safetensors framing (fuzz_safetensors_file covers that):
//   part 1: JSON  {"quantization_config": {...}, "quantize_config": {...},   (both optional)
//                  "in": K, "out": N, "bias": false,
//                  "tensors": {"q_weight": {"dtype": "I32", "shape": [P, N],
//                                           "values": [...] | "iota": true | (neither)}, ...}}
//   part 2: bytes for the tensors that have neither "values" nor "iota", in name order, cycled.
// Tensor names are suffixes of the layer "model.layers.0.mlp.down_proj". The tensors are laid
// out back to back in one buffer as in a safetensors data section (so alignment is as in a real
// file) and handed to the loader as a TensorStore.
//
// Besides crashes: a layer that holds two formats at once (EXL2 and a dense .weight, or EXL2 and
// GPTQ) must not load as one of them, and a GPTQ layer must not load under a fractional
// quantization_config.bits. A layer that loads is dequantized and tile-decoded as the CPU
// backend does.
#include <cmath>
#include <map>

#include "core/json_file.h"
#include "formats/exl2.h"
#include "formats/gptq.h"
#include "fuzz_common.h"
#include "model/config.h"
#include "model/weights.h"

using namespace qf;

namespace {

const std::string kPrefix = "model.layers.0.mlp.down_proj";
constexpr int64_t kMaxFeatures = 1 << 14, kMaxWeights = 1 << 20;  // harness limits, not findings
constexpr uint64_t kMaxTensorBytes = 8u << 20;

// One value of a JSON number stored as `dt` at p (the harness's own conversions, free of UB).
void store_value(DType dt, const json& v, uint8_t* p) {
  double d = v.is_number() ? v.get<double>() : 0.0;
  if (!std::isfinite(d)) d = 0;
  int64_t i = v.is_number_integer() ? v.get<int64_t>()
              : v.is_number_unsigned() ? static_cast<int64_t>(v.get<uint64_t>())
              : static_cast<int64_t>(std::fmax(-9.2e18, std::fmin(9.2e18, d)));
  switch (dt) {
    case DType::F32: { const float f = static_cast<float>(d); std::memcpy(p, &f, 4); break; }
    case DType::F64: std::memcpy(p, &d, 8); break;
    case DType::F16: { const uint16_t h = f32_to_fp16(static_cast<float>(d)); std::memcpy(p, &h, 2); break; }
    case DType::BF16: { const uint16_t h = f32_to_bf16(static_cast<float>(d)); std::memcpy(p, &h, 2); break; }
    default: std::memcpy(p, &i, dtype_size(dt)); break;  // little-endian: the low bytes
  }
}

// Spec fields of the wrong type read as absent (the spec is the harness's, not the loader's, input).
int64_t spec_int(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : 0;
}
bool spec_bool(const json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

struct Layer {
  std::map<std::string, TensorView> views;
  std::shared_ptr<std::vector<uint8_t>> buffer;
};

// The tensors the spec describes, or nullopt when the spec is outside the harness's limits.
std::optional<Layer> build_layer(const json& tensors, std::string_view bytes) {
  struct Entry { std::string name; DType dt; std::vector<int64_t> shape; uint64_t offset, size; const json* spec; };
  std::vector<Entry> entries;
  uint64_t total = 0;
  for (auto it = tensors.begin(); it != tensors.end(); ++it) {
    const json& t = it.value();
    if (!t.is_object() || !t.contains("dtype") || !t["dtype"].is_string() || !t.contains("shape") || !t["shape"].is_array())
      return std::nullopt;
    Entry e{kPrefix + "." + it.key(), DType::F32, {}, total, 0, &t};
    if (!dtype_from_name(t["dtype"].get<std::string>(), &e.dt)) return std::nullopt;
    uint64_t numel = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0 || d.get<int64_t>() > int64_t{1} << 24) return std::nullopt;
      e.shape.push_back(d.get<int64_t>());
      numel *= static_cast<uint64_t>(e.shape.back());
      if (numel > kMaxTensorBytes) return std::nullopt;
    }
    e.size = numel * dtype_size(e.dt);
    total += e.size;
    if (total > kMaxTensorBytes) return std::nullopt;
    entries.push_back(std::move(e));
  }
  Layer layer;
  layer.buffer = std::make_shared<std::vector<uint8_t>>(total);
  uint8_t* base = layer.buffer->data();
  size_t cursor = 0;
  for (const Entry& e : entries) {
    uint8_t* p = base + e.offset;
    const size_t es = dtype_size(e.dt), n = e.size / es;
    const json* values = e.spec->contains("values") && (*e.spec)["values"].is_array() && !(*e.spec)["values"].empty()
                             ? &(*e.spec)["values"] : nullptr;
    const bool iota = spec_bool(*e.spec, "iota");
    for (size_t i = 0; i < n; ++i) {
      if (values) store_value(e.dt, (*values)[i % values->size()], p + i * es);
      else if (iota) store_value(e.dt, json(static_cast<int64_t>(i)), p + i * es);
      else
        for (size_t b = 0; b < es && !bytes.empty(); ++b) p[i * es + b] = static_cast<uint8_t>(bytes[cursor++ % bytes.size()]);
    }
    TensorView v;
    v.dtype = e.dt;
    v.shape = e.shape;
    v.data = p;
    v.keepalive = std::shared_ptr<const void>(layer.buffer, p);
    layer.views.emplace(e.name, std::move(v));
  }
  return layer;
}

void use(const LinearWeight& w) {
  (void)w.storage_bytes();
  (void)w.bits_per_weight();
  if (!w.quant) return;
  const int64_t K = w.in_features, N = w.out_features;
  (void)w.quant->describe();
  std::vector<float> out(static_cast<size_t>(K * N));
  w.quant->dequantize(out.data());
  const int nt = static_cast<int>(std::min<int64_t>(N, 64));
  std::vector<float> tile(static_cast<size_t>(K * nt));
  if (const auto* e = dynamic_cast<const Exl2Linear*>(w.quant.get())) {
    e->decode_tile(N - nt, nt, 0, K, tile.data(), nt);
  } else if (const auto* g = dynamic_cast<const GptqLinear*>(w.quant.get())) {
    std::vector<float> scales(static_cast<size_t>(g->n_groups() * nt));
    std::vector<int32_t> zeros(scales.size());
    g->tile_params(N - nt, nt, scales.data(), zeros.data(), nt);
    g->decode_tile(N - nt, nt, 0, K, scales.data(), zeros.data(), tile.data(), nt);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 2);
  const json spec = json::parse(parts[0], nullptr, /*allow_exceptions=*/false);
  if (!spec.is_object() || !spec.contains("tensors") || !spec["tensors"].is_object()) return 0;
  const int64_t K = spec_int(spec, "in"), N = spec_int(spec, "out");
  if (K < 1 || N < 1 || K > kMaxFeatures || N > kMaxFeatures || K * N > kMaxWeights) return 0;
  const bool bias = spec_bool(spec, "bias");
  auto layer = build_layer(spec["tensors"], parts.size() > 1 ? parts[1] : std::string_view());
  if (!layer) return 0;

  // The config the hints come from: a fixed small Llama plus the spec's quantization settings.
  json config = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
                 {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"vocab_size", 32}};
  if (spec.contains("quantization_config")) config["quantization_config"] = spec["quantization_config"];
  const auto dir = fuzz::fresh_subdir("model");
  fuzz::write_file(dir / "config.json", config.dump());
  if (spec.contains("quantize_config")) fuzz::write_file(dir / "quantize_config.json", spec["quantize_config"].dump());

  fuzz::expect_errors([&] {
    const ModelConfig c = load_config(dir);
    const TensorStore store = TensorStore::from_views(std::move(layer->views));
    const LinearWeight w = load_linear(store, kPrefix, K, N, bias, quant_hints(c.quant));
    const bool exl2 = store.has(kPrefix + ".q_weight"), gptq = store.has(kPrefix + ".qweight"),
               dense = store.has(kPrefix + ".weight");
    if (exl2 + gptq + dense > 1)
      fuzz::finding(str("a layer with tensors of ", exl2 + gptq + dense, " formats (", exl2 ? "EXL2 .q_weight " : "",
                        gptq ? "GPTQ .qweight " : "", dense ? "dense .weight" : "", ") loaded as ",
                        linear_format_name(w.format)));
    if (w.format == LinearFormat::GPTQ && c.quant.bits != std::trunc(c.quant.bits))
      fuzz::finding(str("GPTQ layer loaded under quantization_config.bits ", c.quant.bits));
    use(w);
  });
  return 0;
}
