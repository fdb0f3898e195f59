#!/usr/bin/env bash
# `collapse analyze` on one process against `mpirun -np 2` on this machine (README "MPI",
# bench/README.md "MPI scaling"): wall time, speedup next to the 2-core ceiling of 2.0, and what the
# combine moved and cost (COLLAPSE_MPI_STATS) next to the model of bench/README.md.
#   bash bench/mpi_scale.sh [build-dir] [rows] [dim] [classes]     (MODES="off exact sampled" by default)
# Each rank is one thread (OPENBLAS_NUM_THREADS=1, OMP_NUM_THREADS=1), so -np 1 uses one core and
# -np 2 two. Results: bench/results/mpi_scale_cpu.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$here/build}
rows=${2:-400000}
dim=${3:-64}
classes=${4:-512}
cli=$build/collapse
out=$here/bench/results/mpi_scale_cpu.txt
[ -x "$cli" ] || { echo "no $cli (build collapse_cli with MPI found)" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "mpirun not found (scripts/install_deps.sh installs openmpi-bin)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 COLLAPSE_MPI_STATS=1
"$cli" synth --output-dir "$work/d" --rows "$rows" --dim "$dim" --classes "$classes" --seed 3 --quiet
in="--features $work/d/features.npy --labels $work/d/labels.npy --classifier $work/d/classifier.npy"

# best of 3 wall seconds of a command; its last stderr in $work/err
best() {
  local b=""
  for _ in 1 2 3; do
    local t0 t1
    t0=$(date +%s.%N)
    "$@" 2>"$work/err" >/dev/null
    t1=$(date +%s.%N)
    b=$(echo "$t0 $t1 ${b:-1e9}" | awk '{d = $2 - $1; print (d < $3 ? d : $3)}')
  done
  echo "$b"
}
mpi() { mpirun --oversubscribe -np "$1" -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS -x COLLAPSE_MPI_STATS "$cli" "${@:2}"; }

{
echo "# collapse MPI scaling on one machine ($(date -u +%Y-%m-%dT%H:%MZ))"
echo "# cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc --all) logical cores, load average $(cut -d" " -f1-3 /proc/loadavg) (other jobs share this machine); $(mpirun --version | head -1)"
echo "# input: collapse synth --rows $rows --dim $dim --classes $classes (float32, $(du -h "$work/d/features.npy" | cut -f1)); one thread per rank; best of 3"
for mode in ${MODES:-off exact sampled}; do
  # sampled: reservoirs of 256 rows, below the classes' ~780 rows (the merged samples decided on rank 0)
  printf "svd_mode: %s\ncompute_nc4: true\nsvd_max_rows_per_token: 256\n" "$mode" > "$work/c.yaml"
  t1=$(best "$cli" analyze $in --config "$work/c.yaml" -q -o "$work/r1.json")
  t2=$(best mpi 2 analyze $in --config "$work/c.yaml" -q -o "$work/r2.json")
  stats=$(grep "collapse: mpi" "$work/err" | sed 's/^collapse: mpi /  /')
  echo "svd_mode $mode: -np 1 ${t1} s, -np 2 ${t2} s, speedup $(echo "$t1 $t2" | awk '{printf "%.2f", $1 / $2}') (ceiling 2.0 on 2 cores)"
  echo "$stats"
  for r in 1 2; do
    python3 -c 'import json, sys; t = json.load(open(sys.argv[1]))["engine"]["timings_seconds"]
print("  rank 0 of -np " + sys.argv[2] + ": " + ", ".join("%s %.2f s" % (k, v) for k, v in sorted(t.items()) if v >= 0.01))' "$work/r$r.json" "$r"
  done
done
} | tee "$out"
