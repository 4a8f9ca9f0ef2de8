#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers and point at the onnxruntime wheel's shared library, for the C++ host.
#
# No PyPI package ships onnxruntime_c_api.h; Debian trixie's libonnxruntime-dev (MIT) does. Its .deb is fetched
# with apt-get through a private apt configuration (nothing is installed, the machine's apt sources and lists are
# left alone) and unpacked with dpkg-deb -x. The headers (C API 21) work with any newer library, because ONNX
# Runtime answers GetApi(N) for every N up to its own version. The library is the one the Python package loads,
# so the host and `dspark generate` run the same ONNX Runtime build.
#
# usage: cpp/fetch_ort_headers.sh [DEST] [PYTHON]   (DEST defaults to cpp/third_party/onnxruntime)
# Writes DEST/include/*.h and DEST/lib/libonnxruntime.so{,.1} (links to the wheel's file); prints DEST.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${1:-$HERE/third_party/onnxruntime}
PYTHON=${2:-python3}
SUITE=${ORT_HEADERS_SUITE:-trixie}
mkdir -p "$DEST/include" "$DEST/lib"

if [ ! -f "$DEST/include/onnxruntime_cxx_api.h" ]; then
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "error: apt-get and dpkg-deb are needed to fetch the ONNX Runtime headers (a Debian or Ubuntu machine);" \
         "elsewhere copy onnxruntime_c_api.h and onnxruntime_cxx_api.h (ONNX Runtime >= 1.21) into $DEST/include" >&2
    exit 2
  }
  W=$(mktemp -d)
  trap 'rm -rf "$W"' EXIT
  mkdir -p "$W"/lists/partial "$W"/cache/archives/partial "$W"/parts "$W"/out
  # the Debian mirror this machine already uses (the main archive, not -security)
  URI=$(apt-get indextargets --format '$(REPO_URI)' | grep -v security | grep -m1 debian || true)
  URI=${URI:-http://deb.debian.org/debian/}
  echo "deb ${URI} ${SUITE} main" > "$W"/sources.list
  O=(-o Dir::Etc::SourceList="$W"/sources.list -o Dir::Etc::SourceParts="$W"/parts
     -o Dir::State::Lists="$W"/lists -o Dir::Cache="$W"/cache -o APT::Sandbox::User="$(id -un)"
     -o Debug::NoLocking=1)
  if ! apt-get "${O[@]}" update -qq || ! (cd "$W" && apt-get "${O[@]}" download libonnxruntime-dev >/dev/null); then
    echo "error: could not fetch libonnxruntime-dev from Debian ${SUITE} at ${URI} (no network, or no Debian archive" \
         "keyring on this machine: apt-get install debian-archive-keyring); or copy onnxruntime_c_api.h and" \
         "onnxruntime_cxx_api.h (ONNX Runtime >= 1.21) into $DEST/include" >&2
    exit 2
  fi
  dpkg-deb -x "$W"/libonnxruntime-dev_*.deb "$W"/out
  cp -r "$W"/out/usr/include/onnxruntime/. "$DEST/include/"
  cp "$W"/out/usr/share/doc/libonnxruntime-dev/copyright "$DEST/include/COPYRIGHT.debian" 2>/dev/null || true
fi

# the wheel's library: libonnxruntime.so.<version> next to the onnxruntime package
CAPI=$("$PYTHON" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))') || {
  echo "error: $PYTHON cannot import onnxruntime; install dspark first (pip install -e .)" >&2; exit 2; }
SO=$(ls "$CAPI"/libonnxruntime.so.1.* 2>/dev/null | head -n1)
[ -n "$SO" ] || { echo "error: no libonnxruntime.so.1.* in $CAPI" >&2; exit 2; }
# SONAME is libonnxruntime.so.1 (run time); libonnxruntime.so is what the linker looks for
ln -sf "$SO" "$DEST/lib/libonnxruntime.so.1"
ln -sf "$SO" "$DEST/lib/libonnxruntime.so"
# ONNX Runtime loads execution providers (CUDA, TensorRT in the onnxruntime-gpu wheel) from its own folder
for provider in "$CAPI"/libonnxruntime_providers_*.so; do
  [ -e "$provider" ] && ln -sf "$provider" "$DEST/lib/$(basename "$provider")"
done
echo "$DEST"
