#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace qf::test {

std::filesystem::path data_dir() {
  if (const char* env = std::getenv("QFORGE_TEST_DATA")) return env;
  return QFORGE_TEST_DATA;
}

bool has_data(const std::string& rel) { return std::filesystem::exists(data_dir() / rel); }

std::filesystem::path tmp_dir(const std::string& name) {
  // Per process: CTest runs the cases of one binary as parallel processes.
  auto p = std::filesystem::path(QFORGE_TMP) / (name + "_" + std::to_string(getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

std::string binary() { return QFORGE_BINARY; }

void write_file(const std::filesystem::path& p, const std::string& content) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << content;
}

int run_command(const std::string& cmd, std::string* out, std::string* err) {
  static int counter = 0;
  auto dir = std::filesystem::path(QFORGE_TMP) / "cmd";
  std::filesystem::create_directories(dir);
  const std::string tag = std::to_string(getpid()) + "_" + std::to_string(counter++);
  const auto out_path = dir / ("out_" + tag), err_path = dir / ("err_" + tag);
  const std::string full = cmd + " >" + out_path.string() + " 2>" + err_path.string() + " </dev/null";
  const int status = std::system(full.c_str());
  auto slurp = [](const std::filesystem::path& p) {
    std::ifstream in(p, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  if (out) *out = slurp(out_path);
  if (err) *err = slurp(err_path);
  std::filesystem::remove(out_path);
  std::filesystem::remove(err_path);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

}  // namespace qf::test
