"""Shared helpers of the Python package's tests (run: pytest tests/python, after
`pip install --no-build-isolation .`)."""
import math
import os
import shutil
import subprocess

# One OpenBLAS thread, as the C++ tests run (tests/CMakeLists.txt): several tests compare reports
# to the bit, and OpenBLAS's threaded routines can move a result by an ulp from run to run on a
# loaded machine (README "Reproducibility"). Set before numpy loads OpenBLAS; a value you set wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STORIES_DATA = os.path.join(ROOT, "..", "shared", "data", "stories260k")
STORIES_MODEL = os.path.join(ROOT, "..", "shared", "models", "stories260k", "stories260K.bin")


def find_cli():
    """The `collapse` command: $COLLAPSE_CLI, else build/collapse (the release stage's), else None."""
    env = os.environ.get("COLLAPSE_CLI")
    if env:
        return env
    for d in ("build", "build-python"):
        p = os.path.join(ROOT, d, "collapse")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return shutil.which("collapse")


@pytest.fixture
def cli():
    p = find_cli()
    if not p:
        pytest.skip("no collapse command (set COLLAPSE_CLI or build build/collapse)")
    return p


def run_cli(cli, *args):
    """Runs `collapse ARGS`; returns (status, stderr)."""
    r = subprocess.run([cli, *args], capture_output=True, text=True)
    return r.returncode, r.stderr


# Sections with metrics (input provenance, run, engine timings and config text differ by design).
METRIC_SECTIONS = ("overall_analysis", "summary", "counts", "token_analysis", "sequence_analysis", "window_summary")


def assert_reports_equal(a, b, rel=1e-9, sections=METRIC_SECTIONS, abs_tol=None):
    """Every number of the metric sections agrees within rel, or within abs_tol for a value at
    rounding level (nulls, keys and strings exactly). abs_tol: the CLI may run other BLAS kernels
    than this process (cpu/blas_setup.hpp switches them for the CLI alone), and a numerically zero
    value, such as the normalized entropy of a rank-one class (-9.1e-11 against -9.1e-11, 2e-16
    apart), has no relative agreement to speak of. Default 1e-12, and 0 with rel = 0 (bit-exact checks)."""
    if abs_tol is None:
        abs_tol = 1e-12 if rel > 0 else 0.0
    checked = [0]

    def walk(x, y, path):
        if isinstance(x, dict):
            assert isinstance(y, dict), path
            assert sorted(x) == sorted(y), f"{path}: keys differ: {sorted(set(x) ^ set(y))}"
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list):
            assert isinstance(y, list) and len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(x, bool) or x is None or isinstance(x, str):
            assert x == y, f"{path}: {x!r} != {y!r}"
        else:
            assert isinstance(y, (int, float)) and not isinstance(y, bool), f"{path}: {x!r} vs {y!r}"
            checked[0] += 1
            if math.isnan(x) or math.isnan(y):
                assert math.isnan(x) and math.isnan(y), f"{path}: {x} != {y}"
            else:
                assert abs(x - y) <= rel * max(abs(x), abs(y)) + abs_tol, f"{path}: {x!r} != {y!r}"

    for s in sections:
        assert (s in a) == (s in b), f"section {s} only in one report"
        if s in a:
            walk(a[s], b[s], s)
    return checked[0]


def make_rows(seed=0, n=1500, d=12, V=24, dtype=np.float32):
    """Features with class structure (class means plus noise), labels, classifier."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((V, d)) * 2.0
    y = rng.integers(0, V, n)
    x = (means[y] + rng.standard_normal((n, d))).astype(dtype)
    w = (means + 0.3 * rng.standard_normal((V, d))).astype(np.float32)
    return x, y.astype(np.int64), w
