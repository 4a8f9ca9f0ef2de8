// Replays a block schedule (dspark::make_block_schedule) on round outcomes read from stdin, so the tests can hold
// its decisions against the Python runtime's on the same outcomes, which real timings would not repeat:
//
//   dspark-block-schedule-replay SPEC < commands
//   cap ROWS DEFAULT                     -> prints the draft length it allows
//   observe ROWS DRAFTED TOKENS SECONDS  (DRAFTED 0 or 1; SECONDS as Python's repr writes it)
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>

#include "scheduler.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: dspark-block-schedule-replay SPEC < commands\n";
    return 2;
  }
  try {
    auto schedule = dspark::make_block_schedule(argv[1]);
    if (!schedule) throw dspark::Error("give a schedule to replay, not 'off'");
    for (std::string line; std::getline(std::cin, line);) {
      std::istringstream in(line);
      std::string what;
      int rows = 0;
      in >> what >> rows;
      if (what == "cap") {
        int length = 0;
        in >> length;
        std::cout << schedule->cap(rows, length) << "\n";
      } else if (what == "observe") {
        int drafted = 0, tokens = 0;
        std::string seconds;
        in >> drafted >> tokens >> seconds;
        schedule->observe(rows, drafted != 0, tokens, std::strtod(seconds.c_str(), nullptr));
      } else {
        throw dspark::Error("unknown command '" + line + "': use cap ROWS DEFAULT or observe ROWS DRAFTED TOKENS "
                            "SECONDS");
      }
    }
  } catch (const dspark::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
