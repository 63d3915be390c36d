// qforge: quantize and run LLMs. Dispatches to the subcommands in apps/cmd_*.cpp; every failure
// ends as one "qforge: error: ..." line on stderr and a non-zero exit.
#include <cstdio>
#include <exception>
#include <functional>
#include <new>
#include <string>

#include "apps/commands.h"
#include "core/error.h"
#include "core/log.h"

namespace {

// The one line every failure ends with. Messages quote file contents and command-line values,
// so they are escaped here (control bytes, invalid UTF-8 -> \xNN) and cut at a sane length: a
// file can neither forge a second "qforge: error:" line nor send escape sequences to the terminal.
void print_error(const char* msg, const char* suffix = "") {
  constexpr size_t kMaxMessageBytes = 4096;
  std::fprintf(stderr, "qforge: error: %s%s\n", qf::escape_text(msg, kMaxMessageBytes).c_str(), suffix);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"qforge: quantize large language models to any bit rate and run them fast.\n"
               "Runs Hugging Face Llama-family folders (FP16/BF16/FP32, EXL2, GPTQ) on the CPU or an NVIDIA GPU.",
               "qforge"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "qforge 0.1.0");
  std::function<int()> run;
  qf::app::register_generate(app, &run);
  qf::app::register_ppl(app, &run);
  qf::app::register_inspect(app, &run);
  qf::app::register_bench(app, &run);
  qf::app::register_convert(app, &run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version print as CLI11 formats them; a bad command line is one error line
    // like every other failure (option values are typed by the user and may hold any bytes).
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);
    print_error(e.what(), " (see --help)");
    return 1;
  }
  run = [command = std::move(run)] { return qf::app::run_command(command); };
  try {
    return run();
  } catch (const qf::Error& e) {
    print_error(e.what());
  } catch (const std::bad_alloc&) {
    print_error("out of memory");
  } catch (const std::exception& e) {
    print_error(e.what());
  }
  return 1;
}
