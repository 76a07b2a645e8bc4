#!/usr/bin/env bash
# Download Debian trixie's libonnxruntime-dev (headers only) into $1 and unpack
# it with dpkg -x. apt runs with a private sources list, state and cache under
# $1, so the system's apt configuration and packages are untouched.
set -euo pipefail
dir=$1
mkdir -p "$dir/apt/lists/partial" "$dir/apt/cache/archives/partial"
cat > "$dir/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
opts=(-o "Dir::Etc::sourcelist=$dir/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$dir/apt/lists" -o "Dir::Cache=$dir/apt/cache"
      -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root" -qq)
apt-get "${opts[@]}" update
cd "$dir"
apt-get "${opts[@]}" download libonnxruntime-dev
dpkg -x libonnxruntime-dev_*.deb "$dir/x"
test -f "$dir/x/usr/include/onnxruntime/onnxruntime_c_api.h"
