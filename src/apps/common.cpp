#include "apps/commands.h"
#include "core/log.h"

namespace qf::app {

void add_common_options(CLI::App* cmd, CommonOptions* o) {
  cmd->add_option("-m,--model", o->model_dir, "Model folder (config.json, *.safetensors, tokenizer.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--device", o->device, "cpu, cuda or cuda:N")->capture_default_str();
  cmd->add_option("-t,--threads", o->threads, "CPU threads (0 = all cores)")->capture_default_str();
  cmd->add_flag("-v,--verbose", o->verbose, "Print loading details to stderr");
}

}  // namespace qf::app
