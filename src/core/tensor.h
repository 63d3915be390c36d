// A host tensor view: dtype, shape and a pointer into memory owned elsewhere (usually a mapped
// safetensors file). `keepalive` pins the owner so a view can outlive the object that made it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace qf {

struct TensorView {
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::shared_ptr<const void> keepalive;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(size_t i) const { return shape.at(i); }
  size_t rank() const { return shape.size(); }
  template <typename T> const T* as() const { return static_cast<const T*>(data); }
  std::string shape_str() const;
};

// Owned fp32 copy of any F32/F16/BF16 view.
std::vector<float> to_f32(const TensorView& t);

}  // namespace qf
