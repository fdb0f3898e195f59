#!/usr/bin/env bash
# Installs the Debian 12 packages collapse builds against (skipped when they are all present).
set -euo pipefail
pkgs=(cmake g++ make pkg-config libyaml-cpp-dev nlohmann-json3-dev libgtest-dev libopenblas-dev liblapacke-dev libcli11-dev
      clang libclang-rt-14-dev libomp-14-dev)  # scripts/fuzz.sh: clang, libFuzzer (libclang_rt.fuzzer), OpenMP for clang
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi
