// The qforge subcommands. Each registers its options on the CLI11 app and runs when selected.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "backends/backend.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

namespace qf::app {

// ---- option checks ------------------------------------------------------------------------------
// Each refuses a bad value at parse time with one line that names the allowed values in words
// (never a 300-digit bound).
// A real number in [lo, hi] (an open end where lo_open / hi_open; hi may be infinity); NaN and
// infinities are always refused. real_in(-HUGE_VAL, HUGE_VAL): any finite number (the command
// checks the range itself).
CLI::Validator real_in(double lo, double hi, bool lo_open = false, bool hi_open = false);
// An integer in [lo, hi]; `allowed` describes the accepted values (default "an integer from lo to hi").
CLI::Validator integer_in(int64_t lo, int64_t hi, const std::string& allowed = "");

// -t/--threads: -1 or 0 = all cores, else 1 to 4096 threads.
void add_threads_option(CLI::App* cmd, int* threads);
// --seed: an unsigned 64-bit seed, or -1 for a random one (resolve_seed picks and prints it).
struct SeedOption {
  uint64_t value = 0;
  bool random = false;
};
void add_seed_option(CLI::App* cmd, SeedOption* seed, const std::string& help);
// The seed to use: the given one, or a random one that is printed on stderr so that the run can
// be repeated.
uint64_t resolve_seed(const SeedOption& seed);

// Options every model command shares.
struct CommonOptions {
  std::string model_dir;
  std::string device = "auto";
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
// Loads the model (its files validated), then the tokenizer, then asks `plan` what the run will
// allocate and checks that it fits before any weight is uploaded.
using LoadPlanFn = std::function<MemoryPlan(const ModelConfig&, const Tokenizer&)>;
LoadedModel load_model(const CommonOptions& o, const LoadPlanFn& plan = {});

// ---- running ------------------------------------------------------------------------------------
// What the command is doing now, for the line an allocation failure prints:
// "qforge: error: tokenizing text.txt: out of memory". Steps nest; the innermost is named.
class Step {
 public:
  explicit Step(std::string what);
  ~Step();
  Step(const Step&) = delete;
  Step& operator=(const Step&) = delete;

 private:
  std::string previous_;
  int exceptions_;
};

// Runs a command: std::bad_alloc and std::length_error become one line naming the current Step,
// and the command fails when anything written to stdout could not be written (a full disk).
int run_command(const std::function<int()>& command);
// Writes to stdout and flushes; fails with one line ("stdout: ...") when that does not succeed.
void write_stdout(std::string_view text);
// Flushes stdout; fails with one line when anything written to it was lost.
void check_stdout();

// Each returns the process exit code.
void register_generate(CLI::App& app, std::function<int()>* run);
void register_ppl(CLI::App& app, std::function<int()>* run);
void register_inspect(CLI::App& app, std::function<int()>* run);
void register_bench(CLI::App& app, std::function<int()>* run);
void register_convert(CLI::App& app, std::function<int()>* run);

}  // namespace qf::app
