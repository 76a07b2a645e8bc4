#!/usr/bin/env bash
# Download Debian trixie's onnxruntime source tarball (onnxruntime_1.21.0+dfsg.orig.tar.xz, MIT) into
# $1 and unpack only MLAS (onnxruntime/core/mlas) from it. apt runs with a private sources list, state
# and cache under $1, so the system's apt configuration is untouched. Nothing of it is committed:
# the build compiles MLAS's x86-64 convolution kernels from $1.
set -euo pipefail
dir=$1
source "$(dirname "${BASH_SOURCE[0]}")/private_apt.sh"
private_apt_setup "$dir" deb-src
cd "$dir"
# Only the orig tarball is needed (the .dsc and the Debian patches are not, and may 404).
apt-get "${apt_opts[@]}" source --download-only onnxruntime >/dev/null 2>&1 || true
tarball=$(ls onnxruntime_*.orig.tar.xz 2>/dev/null | head -1)
test -n "$tarball" || { echo "fetch_mlas_source: no onnxruntime orig tarball downloaded" >&2; exit 1; }
rm -rf src && mkdir src
tar xJf "$tarball" -C src --strip-components=1 --wildcards '*/onnxruntime/core/mlas/lib/x86_64/*' \
    '*/onnxruntime/core/mlas/inc/*' '*/LICENSE'
rm -f "$tarball"
test -f src/onnxruntime/core/mlas/lib/x86_64/SconvKernelFma3.S
rm -rf "$dir/apt"  # the package index is not needed any more
