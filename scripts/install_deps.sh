#!/usr/bin/env bash
# Installs the Debian 12 packages collapse builds against (skipped when they are all present).
set -euo pipefail
pkgs=(cmake g++ make pkg-config libyaml-cpp-dev nlohmann-json3-dev libgtest-dev libopenblas-dev liblapacke-dev libcli11-dev
      clang libclang-rt-14-dev libomp-14-dev)  # scripts/fuzz.sh: clang, libFuzzer (libclang_rt.fuzzer), OpenMP for clang
# The Python package (python/, pip install --no-build-isolation .) and its tests (tests/python).
pkgs+=(pybind11-dev python3-pybind11 python3-dev python3-venv python3-pip python3-setuptools python3-wheel python3-numpy
       python3-pytest python3-matplotlib python3-torch)
# The MPI component (libcollapse_mpi, `mpirun collapse analyze`) and its tests (tests/mpi).
pkgs+=(libopenmpi-dev openmpi-bin)
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
