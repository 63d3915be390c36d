#include "quant/sequential_quantizer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "quant/measurement.h"
#include "runtime/perplexity.h"

namespace qf {

HostStates embed_rows(Backend& b, const TensorView& embed, const std::vector<std::vector<int32_t>>& rows,
                      int64_t length, int64_t hidden) {
  HostStates s;
  s.rows = static_cast<int64_t>(rows.size());
  s.data.resize(static_cast<size_t>(s.rows * length * hidden));
  auto table = b.make_embedding(embed);
  DeviceBuffer x = b.alloc(static_cast<size_t>(length * hidden));
  for (int64_t r = 0; r < s.rows; ++r) {
    b.embed(*table, rows[static_cast<size_t>(r)].data(), length, x.data());
    b.download(s.data.data() + r * length * hidden, x.data(), static_cast<size_t>(length * hidden));
  }
  return s;
}

BlockReport SequentialQuantizer::quantize_block(int64_t layer, BlockKind kind, const LayerWeights& w, DeviceLayer& l,
                                                const std::vector<LinearSpec>& specs, HostStates& states,
                                                QuantizedTensors& out) {
  Backend& b = q_.backend();
  const int64_t rf = q_.row_floats();
  const int64_t chunk = std::min(chunk_rows_, states.rows);
  DeviceBuffer x = b.alloc(static_cast<size_t>(chunk * rf)), ref0 = b.alloc(static_cast<size_t>(chunk * rf));
  BlockReport report;
  report.key = block_key(layer, kind);
  report.specs = specs;

  // Hessians from the unquantized block on the quantized model's states; the first chunk's
  // reference output is kept to measure this pass's error.
  BlockHessians h = q_.new_hessians(kind);
  for (int64_t r0 = 0; r0 < states.rows; r0 += chunk) {
    const int64_t n = std::min(chunk, states.rows - r0);
    float* dst = r0 == 0 ? ref0.data() : x.data();
    b.upload(dst, states.data.data() + r0 * rf, static_cast<size_t>(n * rf));
    q_.run(kind, l, dst, n, &h);
  }
  BlockQuantizer::Solvers solvers = q_.solvers(h, kind, report.key);
  q_.note_memory();
  h = BlockHessians{};

  const auto weights = block_weights(w, kind);
  QF_CHECK(specs.size() == weights.size(), "internal: ", specs.size(), " mixes for ", weights.size(), " projections");
  for (size_t p = 0; p < weights.size(); ++p) {
    GptqSolver& s = solvers.of(kind, p);
    auto t = s.quantize(s.arrange(*weights[p]), weights[p]->out_features, specs[p], weights[p]->bias, q_.scale_search());
    block_slot(l, kind, p) = b.make_linear(exl2_linear(t, weights[p]->name));
    out.linears.emplace_back(weights[p]->name, t);
    report.bits += specs[p].storage_bits(weights[p]->in_features, weights[p]->out_features);
    report.weights += weights[p]->in_features * weights[p]->out_features;
  }

  for (int64_t r0 = 0; r0 < states.rows; r0 += chunk) {
    const int64_t n = std::min(chunk, states.rows - r0);
    float* host = states.data.data() + r0 * rf;
    b.upload(x.data(), host, static_cast<size_t>(n * rf));
    q_.run(kind, l, x.data(), n);
    if (r0 == 0) report.error = q_.mean_relative_error(x.data(), ref0.data(), n);
    b.download(host, x.data(), static_cast<size_t>(n * rf));
  }
  return report;
}

std::shared_ptr<const Exl2Tensors> SequentialQuantizer::quantize_head(const LinearWeight& head,
                                                                      const TensorView& final_norm,
                                                                      const LinearSpec& spec, const HostStates& states) {
  Backend& b = q_.backend();
  const ModelConfig& c = q_.config();
  const int64_t rf = q_.row_floats();
  const int64_t chunk = std::min(chunk_rows_, states.rows);
  DeviceBuffer x = b.alloc(static_cast<size_t>(chunk * rf)), xn = b.alloc(static_cast<size_t>(chunk * rf));
  DeviceBuffer norm = b.make_vector(final_norm);
  DeviceBuffer H = q_.zero_square(c.hidden);
  for (int64_t r0 = 0; r0 < states.rows; r0 += chunk) {
    const int64_t n = std::min(chunk, states.rows - r0);
    b.upload(x.data(), states.data.data() + r0 * rf, static_cast<size_t>(n * rf));
    b.rmsnorm(x.data(), norm.data(), xn.data(), n * q_.length(), c.hidden, static_cast<float>(c.rms_eps));
    for (int64_t r = 0; r < n; ++r) b.hessian_accumulate(H.data(), xn.data() + r * rf, q_.length(), c.hidden);
  }
  GptqSolver s(b, H.data(), c.hidden, q_.damp(), head.name + " input");
  auto t = s.quantize(s.arrange(head), head.out_features, spec, head.bias, q_.scale_search());
  q_.note_memory();
  return t;
}

double SequentialQuantizer::calibration_perplexity(const DeviceLinear& head, const DeviceBuffer& final_norm,
                                                   const HostStates& states,
                                                   const std::vector<std::vector<int32_t>>& tokens, int64_t rows) {
  Backend& b = q_.backend();
  const ModelConfig& c = q_.config();
  const int64_t len = q_.length(), rf = q_.row_floats();
  const int64_t piece = std::min<int64_t>(len, 256);
  DeviceBuffer x = b.alloc(static_cast<size_t>(rf)), logits = b.alloc(static_cast<size_t>(piece * c.vocab));
  std::vector<float> host(static_cast<size_t>(piece * c.vocab));
  double nll = 0;
  int64_t count = 0;
  rows = std::min(rows, states.rows);
  for (int64_t r = 0; r < rows; ++r) {
    b.upload(x.data(), states.data.data() + r * rf, static_cast<size_t>(rf));
    const auto& row = tokens[static_cast<size_t>(r)];
    for (int64_t t0 = 0; t0 + 1 < len; t0 += piece) {
      const int64_t n = std::min(piece, len - 1 - t0);
      q_.runner().head(final_norm, head, x.data() + t0 * c.hidden, n, logits.data());
      b.download(host.data(), logits.data(), static_cast<size_t>(n * c.vocab));
      for (int64_t t = 0; t < n; ++t) {
        nll += token_nll(host.data() + t * c.vocab, c.vocab, row[static_cast<size_t>(t0 + t + 1)]);
        ++count;
      }
    }
  }
  return count ? std::exp(nll / static_cast<double>(count)) : 0.0;
}

}  // namespace qf
