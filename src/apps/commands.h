// The qforge subcommands. Each registers its options on the CLI11 app and runs when selected.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <memory>
#include <string>

#include "backends/backend.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace qf::app {

// Options every model command shares.
struct CommonOptions {
  std::string model_dir;
  std::string device = "cpu";
  int threads = 0;
  bool verbose = false;
};
void add_common_options(CLI::App* cmd, CommonOptions* o);

// What a model command works on: the backend, the model on it, and the model's tokenizer.
struct LoadedModel {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
};
LoadedModel load_model(const CommonOptions& o);

// Each returns the process exit code.
void register_generate(CLI::App& app, std::function<int()>* run);
void register_ppl(CLI::App& app, std::function<int()>* run);
void register_inspect(CLI::App& app, std::function<int()>* run);
void register_bench(CLI::App& app, std::function<int()>* run);
void register_convert(CLI::App& app, std::function<int()>* run);

}  // namespace qf::app
