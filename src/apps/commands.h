// The qforge subcommands. Each registers its options on the CLI11 app and runs when selected.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace qf::app {

// Options every model command shares.
struct CommonOptions {
  std::string model_dir;
  std::string device = "cpu";
  int threads = 0;
  bool verbose = false;
};
void add_common_options(CLI::App* cmd, CommonOptions* o);

// Each returns the process exit code.
void register_generate(CLI::App& app, std::function<int()>* run);
void register_ppl(CLI::App& app, std::function<int()>* run);
void register_inspect(CLI::App& app, std::function<int()>* run);

}  // namespace qf::app
