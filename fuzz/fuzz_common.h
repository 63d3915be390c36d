// What every fuzz target shares: a private scratch folder for parsers that only read files, the
// splitting of one input into several files, and the rule for what counts as a finding.
//
// A finding is anything but a clean qf::Error: a crash, a sanitizer report, another exception
// escaping (libFuzzer reports it as a deadly signal), a timeout, running out of memory, or a
// qf::Error whose message is not one line (README: "Every error is one line").
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "core/error.h"

namespace qf::fuzz {

// One input can hold several files, separated by this line (the dictionaries and seeds use it).
inline constexpr std::string_view kPartSeparator = "\n#qf-fuzz-part#\n";

// The input cut at the separators into at most `max_parts` parts (the last part keeps the rest).
std::vector<std::string_view> split_parts(const uint8_t* data, size_t size, size_t max_parts);

// A folder of our own for this process, emptied at exit; in /dev/shm when it can be, because
// targets rewrite files there for every input.
const std::filesystem::path& scratch_dir();
// scratch_dir()/name, removed and made again empty.
std::filesystem::path fresh_subdir(const std::string& name);
void write_file(const std::filesystem::path& path, std::string_view bytes);

// Stops the run as a finding: prints the reason and aborts (libFuzzer saves the input).
[[noreturn]] void finding(const std::string& what);

// The message of an expected error must be one line without control bytes.
void check_message(const char* what);

// Whether QFORGE_FUZZ_VERBOSE is set: then expected errors are printed (to see what a seed does).
bool verbose();

// Runs `parse`; a qf::Error is the expected outcome for bad input (its message is checked),
// anything else that escapes is left to libFuzzer.
template <typename F>
void expect_errors(F&& parse) {
  try {
    parse();
  } catch (const qf::Error& e) {
    if (verbose()) std::fprintf(stderr, "qforge-fuzz: expected error: %s\n", e.what());
    check_message(e.what());
  }
}

}  // namespace qf::fuzz
