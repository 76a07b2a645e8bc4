#!/usr/bin/env bash
# Download Debian trixie's libonnxruntime-dev (headers only) into $1 and unpack
# it with dpkg -x. apt runs with a private sources list, state and cache under
# $1, so the system's apt configuration and packages are untouched.
set -euo pipefail
dir=$1
source "$(dirname "${BASH_SOURCE[0]}")/private_apt.sh"
private_apt_setup "$dir" deb
cd "$dir"
apt-get "${apt_opts[@]}" download libonnxruntime-dev
dpkg -x libonnxruntime-dev_*.deb "$dir/x"
test -f "$dir/x/usr/include/onnxruntime/onnxruntime_c_api.h"
