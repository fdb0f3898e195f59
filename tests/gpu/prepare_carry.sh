#!/usr/bin/env bash
# Run HERE (a machine with network to Debian's mirror) before a device run. The device machine has
# CUDA, CMake and a compiler but not the project's Debian packages and no network: this downloads
# the .deb files (apt-get download, no install) into .carry/debs and copies the real data into
# .carry/data, both ignored by git; name `.carry` in the device tool's `carry`.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
rm -rf .carry/prefix  # device_check.sh's unpacked packages, if it ran here: not to be carried
mkdir -p .carry/debs .carry/data
grep -qx '/.carry/' .gitignore 2>/dev/null || echo '/.carry/' >> .gitignore
pkgs=(libyaml-cpp-dev libyaml-cpp0.7 nlohmann-json3-dev libgtest-dev googletest libcli11-dev
      libopenblas-dev libopenblas0 libopenblas0-pthread libopenblas-pthread-dev liblapacke liblapacke-dev
      liblapack3 liblapack-dev libblas3 libblas-dev libgfortran5
      # OpenMPI for tests/mpi's CUDA cases (device_check.sh step 5d), with its run-time libraries (~7 MB).
      openmpi-bin openmpi-common libopenmpi3 libopenmpi-dev libpmix2 libhwloc15 libhwloc-plugins
      libevent-core-2.1-7 libevent-pthreads-2.1-7 libfabric1 libucx0 libibverbs1 librdmacm1 libnl-3-200
      libnl-route-3-200 libpsm-infinipath1 libpsm2-2 libmunge2 libnuma1 libpciaccess0 libxnvctrl0
      # pybind11, pytest and wheel (pure Python, <1 MB) for step 7 when the device's python3 lacks them.
      pybind11-dev python3-pybind11 python3-pytest python3-pluggy python3-iniconfig python3-packaging
      python3-py python3-attr python3-tomli python3-exceptiongroup python3-wheel)
apt-get update -qq
(cd .carry/debs && for p in "${pkgs[@]}"; do apt-get download -qq "$p" 2>/dev/null || echo "note: $p not downloadable, skipped"; done)
shared="$root/../shared/data/stories260k"
if [ -d "$shared" ]; then cp "$shared"/features.npy "$shared"/labels.npy "$shared"/classifier.npy .carry/data/; fi
# collapse_llama2c (tests/gpu/llama2c_check.sh): the model, and the arrays of a forward pass (~5 MB).
models="$root/../shared/models/stories260k"
if [ -d "$models" ] && [ -d "$shared" ]; then
  mkdir -p .carry/stories260k/model .carry/stories260k/data
  cp "$models"/stories260K.bin "$models"/tok512.bin .carry/stories260k/model/
  cp "$shared"/inputs.npy "$shared"/seq.npy "$shared"/pos.npy "$shared"/labels.npy "$shared"/nll.npy .carry/stories260k/data/
fi
du -sh .carry
# The device tool carries at most 64 MiB together with the working tree (about 3 MiB).
size=$(du -sm .carry | cut -f1)
if [ "$size" -gt 60 ]; then echo "warning: .carry is $size MiB: over the device tool's 64 MiB with the working tree" >&2; fi
