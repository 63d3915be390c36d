#include <sys/resource.h>

#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <random>
#include <stdexcept>

#include "apps/commands.h"
#include "backends/cpu/cpu_backend.h"
#include "core/log.h"
#include "core/sizes.h"

namespace qf::app {

namespace {

std::string fmt_real(double v) {
  if (std::isinf(v)) return v > 0 ? "infinity" : "-infinity";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// The whole of s as a number (strtod / strtoll accept a prefix; an option value must be all number).
bool parse_real(const std::string& s, double* v) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  *v = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size();
}
bool parse_integer(const std::string& s, int64_t* v) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(s.c_str(), &end, 10);
  if (end != s.c_str() + s.size() || errno == ERANGE) return false;
  *v = x;
  return true;
}

// An option value in a message: printable, short.
std::string shown(const std::string& s) {
  std::string out;
  for (unsigned char ch : s.substr(0, 64)) {
    if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    } else {
      out += static_cast<char>(ch);
    }
  }
  if (s.size() > 64) out += "...";
  return "'" + out + "'";
}

std::string g_step;         // the innermost Step
std::string g_failed_step;  // the innermost Step an exception left

}  // namespace

CLI::Validator real_in(double lo, double hi, bool lo_open, bool hi_open) {
  std::string range;
  if (std::isinf(lo) && std::isinf(hi)) {
    range = "";
  } else if (std::isinf(hi)) {
    range = str(lo_open ? "> " : ">= ", fmt_real(lo));
  } else {
    range = str("in ", lo_open ? "(" : "[", fmt_real(lo), ", ", fmt_real(hi), hi_open ? ")" : "]");
  }
  return CLI::Validator(
      [=](std::string& s) -> std::string {
        double v = 0;
        // Beyond FLT_MAX a float option would hold infinity.
        if (!parse_real(s, &v) || !std::isfinite(v) || std::fabs(v) > 3.40282347e38)
          return str(shown(s), " is not allowed: use a finite number", range.empty() ? "" : " ", range);
        const bool ok = (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
        if (!ok) return str(shown(s), " is out of range: use a number ", range);
        return std::string();
      },
      range.empty() ? std::string("NUMBER") : "NUMBER " + range);
}

CLI::Validator integer_in(int64_t lo, int64_t hi, const std::string& allowed) {
  const std::string what = allowed.empty() ? str("an integer from ", lo, " to ", hi) : allowed;
  return CLI::Validator(
      [=](std::string& s) -> std::string {
        int64_t v = 0;
        if (!parse_integer(s, &v) || v < lo || v > hi) return str(shown(s), " is not allowed: use ", what);
        return std::string();
      },
      "INT");
}

void add_threads_option(CLI::App* cmd, int* threads) {
  cmd->add_option("-t,--threads", *threads, "CPU threads (-1 or 0 = all cores)")
      ->capture_default_str()
      ->check(integer_in(-1, 4096, "-1 or 0 (all cores) or a thread count from 1 to 4096"));
}

void add_seed_option(CLI::App* cmd, SeedOption* seed, const std::string& help) {
  cmd->add_option_function<std::string>(
         "--seed",
         [seed](const std::string& s) {
           seed->random = s == "-1";
           if (!seed->random) seed->value = std::strtoull(s.c_str(), nullptr, 10);
         },
         help + " (-1 = random, printed so that the run can be repeated; default " + std::to_string(seed->value) + ")")
      ->check(CLI::Validator(
          [](std::string& s) -> std::string {
            if (s == "-1") return std::string();
            bool digits = !s.empty() && s.size() <= 20;
            for (char ch : s) digits = digits && ch >= '0' && ch <= '9';
            errno = 0;
            if (digits) std::strtoull(s.c_str(), nullptr, 10);
            if (!digits || errno == ERANGE)
              return str(shown(s), " is not allowed: use -1 (a random seed) or an integer from 0 to ", UINT64_MAX);
            return std::string();
          },
          "SEED"));
}

uint64_t resolve_seed(const SeedOption& seed) {
  if (!seed.random) return seed.value;
  std::random_device rd;
  const uint64_t t = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const uint64_t s = ((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ (t * 0x9e3779b97f4a7c15ULL)) >> 1;
  std::fprintf(stderr, "seed: %" PRIu64 " (--seed -1; repeat this run with --seed %" PRIu64 ")\n", s, s);
  return s;
}

void add_common_options(CLI::App* cmd, CommonOptions* o) {
  cmd->add_option("-m,--model", o->model_dir, "Model folder (config.json, *.safetensors, tokenizer.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--device", o->device, "auto (the GPU when there is one), cpu, cuda or cuda:N")->capture_default_str();
  add_threads_option(cmd, &o->threads);
  cmd->add_flag("-v,--verbose", o->verbose, "Print loading details to stderr");
}

LoadedModel load_model(const CommonOptions& o, const LoadPlanFn& plan) {
  if (o.verbose) set_log_level(LogLevel::Info);
  DeviceSpec spec = parse_device(o.device);
  spec.threads = o.threads;
  LoadedModel m;
  m.backend = make_backend(spec);
  Step step(str("loading ", o.model_dir));
  m.model = Model::load(o.model_dir, *m.backend, [&](const ModelConfig& c) {
    m.tokenizer = std::make_unique<Tokenizer>(Tokenizer::load(o.model_dir));
    return plan ? plan(c, *m.tokenizer) : MemoryPlan{};
  });
  return m;
}

Step::Step(std::string what) : previous_(std::move(g_step)), exceptions_(std::uncaught_exceptions()) {
  g_step = std::move(what);
  g_failed_step.clear();
}
Step::~Step() {
  if (std::uncaught_exceptions() > exceptions_ && g_failed_step.empty()) g_failed_step = g_step;
  g_step = std::move(previous_);
}

void write_stdout(std::string_view text) {
  errno = 0;
  const size_t n = text.empty() ? 0 : std::fwrite(text.data(), 1, text.size(), stdout);
  if (n != text.size() || std::fflush(stdout) != 0)
    fail("stdout: the output could not be written (", errno ? std::strerror(errno) : "write error", ")");
}

void check_stdout() {
  errno = 0;
  const bool flushed = std::fflush(stdout) == 0;
  const int err = errno;
  if (!flushed || std::ferror(stdout))
    fail("stdout: the output could not be written (", err ? std::strerror(err) : "write error", ")");
}

int run_command(const std::function<int()>& command) {
  g_failed_step.clear();
  auto step = [] { return g_failed_step.empty() ? std::string("qforge") : g_failed_step; };
  try {
    const int rc = command();
    check_stdout();
    return rc;
  } catch (const std::bad_alloc&) {
    std::string limit;
    struct rlimit rl {};
    if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
      limit = str("; the address-space limit (ulimit -v) is ", format_bytes(static_cast<double>(rl.rlim_cur)));
    fail(step(), ": out of memory (", format_bytes(static_cast<double>(host_memory_available())),
         " of memory available", limit, ")");
  } catch (const std::length_error& e) {
    fail(step(), ": a size is too large to allocate (", e.what(), ")");
  }
}

}  // namespace qf::app
