"""collapse.plot: the four-panel figure of one report and of two overlaid, as a function and as
`python3 -m collapse.plot`, written in png, pdf and svg and not empty."""
import json
import subprocess
import sys

import numpy as np
import pytest

import collapse
from collapse import plot
from conftest import make_rows


def report(tmp_path, name, seed, windows=True):
    x, y, w = make_rows(seed=seed, n=1200)
    s = collapse.Session(collapse.Config(window_size=10), num_classes=w.shape[0])
    s.set_classifier(w)
    seq = np.repeat(np.arange(12), 100) if windows else None
    s.ingest(x, y, sequence_ids=seq)
    path = tmp_path / f"{name}.json"
    s.compute().write_json(path)
    return path


def test_one_and_two_reports(tmp_path):
    a = report(tmp_path, "target", 1)
    b = report(tmp_path, "draft", 2)
    doc = json.loads(a.read_text())
    pts = plot.window_trajectory(doc)
    assert [p[0] for p in pts] == list(range(10))  # 100 rows per sequence / 10 per window
    x, h = plot.token_points(doc)
    assert len(x) == len(doc["token_analysis"]) and np.all(np.isfinite(h))
    fig = plot.plot_reports(a, b, output=tmp_path / "two.pdf")
    texts = [t.get_text() for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title)]
    assert "per-token SVD entropy (nats)" in texts and any("log$_{10}$" in t for t in texts)
    assert (tmp_path / "two.pdf").read_bytes()[:4] == b"%PDF"
    out = tmp_path / "cli.png"
    r = subprocess.run([sys.executable, "-m", "collapse.plot", str(a), str(b), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10000
    assert plot.main([str(a), str(b), "-o", str(tmp_path / "f.svg"), "--labels", "big", "small"]) == 0
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:1000]
    # One report, without window_summary: the panel says so.
    c = report(tmp_path, "rows", 3, windows=False)
    assert plot.main([str(c), "-o", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").stat().st_size > 10000
    fig = plot.plot_reports(c)
    assert any("no window_summary" in t.get_text() for ax in fig.axes for t in ax.texts)


def test_bad_arguments(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing.json"), "-o", str(tmp_path / "f.png")]) == 1
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        plot.main(["x.json", "-o", str(tmp_path / "f.jpg")])
    assert e.value.code == 2 and ".png, .pdf or .svg" in capsys.readouterr().err
