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

LoadedModel load_model(const CommonOptions& o) {
  if (o.verbose) set_log_level(LogLevel::Info);
  DeviceSpec spec = parse_device(o.device);
  spec.threads = o.threads;
  LoadedModel m;
  m.backend = make_backend(spec);
  m.model = Model::load(o.model_dir, *m.backend);
  m.tokenizer = std::make_unique<Tokenizer>(Tokenizer::load(o.model_dir));
  return m;
}

}  // namespace qf::app
