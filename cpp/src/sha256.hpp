// SHA-256 (FIPS 180-4) of a file, for the manifest's checksums; kept here so the host needs no crypto library.
#pragma once
#include <string>

namespace dspark {
std::string sha256_file(const std::string& path);  // lowercase hex; throws std::runtime_error if unreadable
}
