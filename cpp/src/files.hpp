// The few questions the host asks the filesystem: is this a folder, how big is this file, what does it hold.
#pragma once

#include <optional>
#include <string>

namespace dspark {

bool is_dir(const std::string& path);
// size of a regular file, or -1 when there is none
long long file_size(const std::string& path);
// the whole file, or nothing when it cannot be opened (callers say what was missing and how to make it)
std::optional<std::string> read_file(const std::string& path);

}  // namespace dspark
