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
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    // A bad command line is one error line and exit status 1, like every other failure.
    std::string msg;
    for (unsigned char ch : std::string(e.what())) {
      if (ch == '\n') msg += ' ';
      else if (ch < 0x20 || ch == 0x7f) msg += "?";
      else msg += static_cast<char>(ch);
    }
    std::fprintf(stderr, "qforge: error: %s (run with --help for the options)\n", msg.c_str());
    return 1;
  }
  run = [command = std::move(run)] { return qf::app::run_command(command); };
  try {
    return run();
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "qforge: error: %s\n", e.what());
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "qforge: error: out of memory\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qforge: error: %s\n", e.what());
  }
  return 1;
}
