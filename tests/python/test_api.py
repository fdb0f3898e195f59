"""collapse package: equality with the C++ command, zero-copy, strides and dtypes, errors, config."""
import json
import os

import numpy as np
import pytest

import collapse
from collapse import _collapse as native
from conftest import assert_reports_equal, make_rows, run_cli

CFG = dict(exclude_token_ids=[0], compute_nc4=True, min_samples_per_token=3)


def session_report(x, y, w, cfg=CFG, V=None, batches=3, **ingest):
    s = collapse.Session(collapse.Config(**cfg), num_classes=V or w.shape[0])
    s.set_classifier(w)
    n = len(y)
    cuts = np.linspace(0, n, batches + 1).astype(int)
    for a, b in zip(cuts[:-1], cuts[1:]):
        s.ingest(x[a:b], y[a:b], **{k: v[a:b] for k, v in ingest.items()})
    return s.compute()


def save(tmp_path, **arrays):
    out = {}
    for k, v in arrays.items():
        out[k] = str(tmp_path / f"{k}.npy")
        np.save(out[k], v)
    return out


def test_session_equals_cli_and_analyze(tmp_path, cli):
    x, y, w = make_rows()
    files = save(tmp_path, features=x, labels=y, classifier=w)
    (tmp_path / "c.yaml").write_text("exclude_token_ids: [0]\ncompute_nc4: true\nmin_samples_per_token: 3\n")
    st, err = run_cli(cli, "analyze", "--features", files["features"], "--labels", files["labels"], "--classifier",
                      files["classifier"], "--config", str(tmp_path / "c.yaml"), "--batch-rows", "500", "-q",
                      "--output", str(tmp_path / "cli.json"))
    assert st == 0, err
    ref = json.loads((tmp_path / "cli.json").read_text())
    rep = session_report(x, y, w)
    assert assert_reports_equal(rep.to_dict(), ref) > 100
    an = collapse.analyze(**files, config=collapse.Config.from_yaml(tmp_path / "c.yaml"), batch_rows=500,
                          output=tmp_path / "an.json")
    assert_reports_equal(an.to_dict(), ref)
    assert json.loads((tmp_path / "an.json").read_text()) == an.to_dict()
    # analyze records what it read, as the command does.
    assert an.to_dict()["input"]["kind"] == "npy"
    assert [t["role"] for t in an.to_dict()["input"]["tensors"]] == [t["role"] for t in ref["input"]["tensors"]]


def test_report_accessors():
    x, y, w = make_rows()
    rep = session_report(x, y, w)
    d = rep.to_dict()
    assert rep["overall_gnc2"] == d["overall_analysis"]["overall_gnc2"]
    assert rep["counts.rows_kept"] == d["counts"]["rows_kept"]
    assert rep["token_analysis"] == d["token_analysis"]
    ids = rep.token_ids
    assert ids.dtype == np.int64 and list(ids) == sorted(int(k) for k in d["token_analysis"])
    ent = rep.token_array("svd_entropy")
    assert ent.dtype == np.float64
    for i, e in zip(ids, ent):
        assert e == d["token_analysis"][str(i)]["svd_entropy"]
    assert 0 not in ids  # excluded
    with pytest.raises(KeyError) as e:
        rep["no_such_metric"]
    assert isinstance(e.value, collapse.NotFoundError) and "no_such_metric" in str(e.value)


def test_zero_copy_pointers():
    x, y, w = make_rows(n=200)
    s = collapse.Session(num_classes=w.shape[0])
    s.set_classifier(w)
    assert native._last_pointers()[0] == w.ctypes.data
    view = x[10:150]  # a view into x: the engine is handed x's own memory at row 10
    s.ingest(view, y[10:150])
    p = native._last_pointers()
    assert p[0] == x.ctypes.data + 10 * x.strides[0]
    assert p[1] == y.ctypes.data + 10 * y.strides[0]
    torch = pytest.importorskip("torch")
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    s.ingest(tx[150:], ty[150:])
    p = native._last_pointers()
    assert p[0] == tx[150:].data_ptr() == x.ctypes.data + 150 * x.strides[0]


def test_strided_views_equal_contiguous_copies():
    x, y, w = make_rows(n=900, d=10)
    # Rows inside a wider buffer (row stride 16 > d = 10) and every other row of a taller one; labels a
    # column of a 2-D array (stride 3 elements); valid a strided bool view.
    big = np.full((2 * len(y), 16), np.nan, dtype=np.float32)
    big[::2, :10] = x
    xs = big[::2, :10]
    lab = np.zeros((len(y), 3), dtype=np.int64)
    lab[:, 1] = y
    ys = lab[:, 1]
    valid = np.zeros((len(y), 2), dtype=bool)
    valid[:, 0] = np.arange(len(y)) % 7 != 0
    assert not xs.flags.c_contiguous and not ys.flags.c_contiguous
    a = session_report(xs, ys, w, valid=valid[:, 0]).to_dict()
    b = session_report(np.ascontiguousarray(xs), np.ascontiguousarray(ys), w,
                       valid=np.ascontiguousarray(valid[:, 0])).to_dict()
    a.pop("engine"), b.pop("engine")
    assert a == b
    assert a["counts"]["rows_masked"] > 0 if "rows_masked" in a["counts"] else True


def test_non_contiguous_rows_refused():
    x, y, w = make_rows(n=100)
    s = collapse.Session(num_classes=w.shape[0])
    f = np.asfortranarray(x)
    with pytest.raises(ValueError) as e:
        s.ingest(f, y)
    assert "features" in str(e.value) and "contiguous" in str(e.value)
    with pytest.raises(ValueError, match="row stride"):
        s.ingest(x[::-1], y)
    with pytest.raises(ValueError, match="row stride"):
        s.ingest(np.broadcast_to(x[0], (5, x.shape[1])), y[:5])
    # Nothing went in: the session still computes an empty report.
    assert s.compute()["counts.rows_seen"] == 0


def test_dtypes_agree():
    x, y, w = make_rows(n=800, dtype=np.float16)  # float16 values are exact in every wider type
    ref = session_report(x.astype(np.float32), y, w).to_dict()
    for xd in (x, x.astype(np.float64)):
        for yd in (y.astype(np.int32), y):
            d = session_report(xd, yd, w).to_dict()
            assert_reports_equal(d, ref, rel=0)
    mask = np.arange(len(y)) % 5 != 0
    m_ref = session_report(x, y, w, valid=mask).to_dict()
    for m in (mask.astype(np.uint8), mask.astype(np.int32), mask.astype(np.int64)):
        assert_reports_equal(session_report(x, y, w, valid=m).to_dict(), m_ref, rel=0)


def test_torch_cpu_tensors_and_bfloat16():
    torch = pytest.importorskip("torch")
    x, y, w = make_rows(n=600)
    xb = torch.from_numpy(x).to(torch.bfloat16)
    ref = session_report(xb.float().numpy(), y, w).to_dict()
    got = session_report(xb, torch.from_numpy(y), torch.from_numpy(w)).to_dict()
    assert_reports_equal(got, ref, rel=0)
    with pytest.raises(ValueError, match="contiguous"):
        collapse.Session(num_classes=24).ingest(torch.from_numpy(x).t().contiguous().t(), torch.from_numpy(y))


def test_sequences_layout_and_strided_hidden():
    rng = np.random.default_rng(3)
    B, T, d, V = 4, 9, 6, 10
    hid_big = rng.standard_normal((B, T + 3, d)).astype(np.float32)
    hidden = hid_big[:, :T]  # [B, T, d] that is no strided [B*T, d]: copied once
    ids = rng.integers(0, V, (B, T))
    mask = np.ones((B, T), dtype=np.int64)
    mask[1, 6:] = 0
    cfg = dict(window_size=3)
    s = collapse.Session(collapse.Config(**cfg), num_classes=V)
    s.ingest_sequences(hidden, ids, mask)
    a = s.compute().to_dict()
    s = collapse.Session(collapse.Config(**cfg), num_classes=V)
    s.ingest_sequences(np.ascontiguousarray(hidden), ids, mask)
    b = s.compute().to_dict()
    # The same rows as tagged rows: x = hidden[:, :-1], y = ids[:, 1:], valid = mask[:, 1:].
    s = collapse.Session(collapse.Config(**cfg), num_classes=V)
    s.ingest(hidden[:, :-1].reshape(-1, d), ids[:, 1:].reshape(-1), valid=mask[:, 1:].reshape(-1),
             sequence_ids=np.repeat(np.arange(B), T - 1), positions=np.tile(np.arange(T - 1), B))
    c = s.compute().to_dict()
    for r in (a, b, c):
        r.pop("engine")
    # Every form is one call with the same rows: equal to the bit (with one BLAS thread, conftest.py).
    assert_reports_equal(a, b, rel=0)
    assert_reports_equal(b, c, rel=0)
    assert a["window_summary"] is not None


def test_failed_strided_sequences_change_nothing():
    """A [B, T, d] view that is no strided [B*T, d] block went in one call per sequence, so a bad label
    in sequence 2 left sequences 0 and 1 ingested (and a retry counted them twice)."""
    rng = np.random.default_rng(4)
    B, T, d, V = 4, 9, 6, 10
    hidden = rng.standard_normal((B, T + 3, d)).astype(np.float32)[:, :T]
    ids = rng.integers(0, V, (B, T))
    bad = ids.copy()
    bad[2, 4] = 99
    s = collapse.Session(num_classes=V)
    with pytest.raises(collapse.BadInputError, match="99"):
        s.ingest_sequences(hidden, bad)
    s.ingest_sequences(hidden, ids)
    assert s.compute().to_dict()["counts"]["rows_seen"] == B * (T - 1)


def test_close_during_another_threads_call_is_refused():
    """close() while another thread's ingest ran without the GIL freed the session under that call
    (a use after free seen by ASan), or leaked it when the engine refused. Now it is refused. The
    worker is known to be inside the engine when sync() is refused as an overlapping call; it can
    still return (taking the GIL while sync() reacquires it) before close() runs, and then close()
    rightly succeeds: that attempt proves nothing and the next one is made."""
    import threading
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200000, 64)).astype(np.float32)
    y = rng.integers(0, 50, len(x))
    refused = 0
    for _ in range(20):
        s = collapse.Session(num_classes=50)
        t = threading.Thread(target=s.ingest, args=(x, y))
        t.start()
        in_flight = False
        while t.is_alive() and not in_flight:
            try:
                s.sync()
            except collapse.StateError:
                in_flight = True
        if in_flight:
            try:
                s.close()
            except collapse.StateError as e:
                assert "another thread's call" in str(e)
                refused += 1
        t.join()
        s.close()
        with pytest.raises(collapse.StateError, match="closed"):
            s.ingest(x[:10], y[:10])
        if refused:
            break
    assert refused > 0


def test_config_keys_are_names():
    with pytest.raises(collapse.ConfigError, match="not a config key"):
        collapse.Config(**{"compute_nc4: true\nmin_samples_per_token": 5})


def test_snapshot_then_compute():
    x, y, w = make_rows(n=600)
    s = collapse.Session(collapse.Config(**CFG), num_classes=w.shape[0])
    s.set_classifier(w)
    s.ingest(x[:300], y[:300])
    snap = s.snapshot()
    assert snap["counts.rows_seen"] == 300
    s.ingest(x[300:], y[300:])
    assert s.compute()["counts.rows_seen"] == 600


def test_error_mapping_and_messages():
    x, y, w = make_rows(n=200)
    V = w.shape[0]
    s = collapse.Session(num_classes=V)
    bad = y.copy()
    bad[17] = V + 5
    with pytest.raises(collapse.BadInputError) as e:
        s.ingest(x, bad)
    assert isinstance(e.value, ValueError) and e.value.status == 4 and "17" in str(e.value)
    s.ingest(x, y)  # the refused batch changed nothing; the session goes on
    with pytest.raises(collapse.ShapeError):
        s.ingest(x[:, :5], y)
    with pytest.raises(collapse.ShapeError):
        s.set_classifier(w[:, :5])
    r1 = s.compute()
    assert r1["counts.rows_seen"] == 200
    with pytest.raises(collapse.StateError) as e:
        s.compute()
    assert isinstance(e.value, RuntimeError) and str(e.value)
    with pytest.raises(collapse.InvalidArgumentError):
        collapse.Session()  # num_classes is required
    with pytest.raises(OSError) as e:
        collapse.analyze(features="/nonexistent/f.npy", labels="/nonexistent/l.npy")
    assert isinstance(e.value, collapse.CollapseIOError) and "/nonexistent/" in str(e.value)
    with pytest.raises(TypeError):
        collapse.analyze(features=x, labels=y)
    with pytest.raises(ValueError, match="positions needs sequence_ids"):
        collapse.Session(num_classes=V).ingest(x, y, positions=np.arange(len(y)))


def test_config_messages_equal_engine(tmp_path, cli):
    cases = [dict(min_samples_per_token=0), dict(svd_mode="fast"), dict(min_samples_per_tokn=3),
             dict(compute_nc4="yes please"), dict(exclude_token_ids=[1, -2])]
    for kw in cases:
        (key, value), = kw.items()
        with pytest.raises(collapse.ConfigError) as from_kwargs:
            collapse.Config(**kw)
        line = f"{key}: {collapse._yaml_value(value)}\n"
        path = tmp_path / "c.yaml"
        path.write_text(line)
        with pytest.raises(collapse.ConfigError) as from_file:
            collapse.Config.from_yaml(path)
        assert str(from_file.value).startswith(str(path) + ":1: ")
        assert str(from_kwargs.value) == str(from_file.value).replace(str(path), "collapse.Config", 1)
        # The command line reads the same file and says the same.
        st, err = run_cli(cli, "analyze", "--synthetic", "--config", str(path), "-o", str(tmp_path / "r.json"))
        assert st == 1 and str(from_file.value) in err
    cfg = collapse.Config(host_memory_limit="64MiB", svd_mode="sampled", ignore_index=None, cdnv_power=2.0)
    assert "host_memory_limit: 64MiB" in cfg.yaml
    s = collapse.Session(cfg, num_classes=5)
    s.ingest(np.ones((3, 2), np.float32), np.array([0, 1, 2]))
    with pytest.raises(collapse.BadInputError):  # ignore_index None: -100 is refused
        s.ingest(np.ones((1, 2), np.float32), np.array([-100]))
    c = s.compute().to_dict()["config"]
    assert c["svd_mode"] == "sampled" and c["cdnv_power"] == 2.0 and c["host_memory_limit"] in (64 << 20, "64MiB", "64.0 MiB")


def test_cuda_tensors_match_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not collapse.backend_available("cuda"):
        pytest.skip("no CUDA device or no CUDA backend in this build (COLLAPSE_CUDA=AUTO pip install)")
    x, y, w = make_rows(n=3000, d=32, V=40)
    cfg = dict(CFG, svd_mode="exact")
    cpu = session_report(x, y, w, cfg=cfg).to_dict()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the engine works on the tensor's current stream
        tx, ty = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
        s = collapse.Session(collapse.Config(backend="cuda", **cfg), num_classes=w.shape[0])
        s.set_classifier(torch.from_numpy(w).cuda())
        s.ingest(tx[:1000], ty[:1000])
        assert native._last_pointers()[0] == tx.data_ptr()
        s.ingest(tx[1000:], ty[1000:])
        got = s.compute().to_dict()
    assert_reports_equal(got, cpu, rel=1e-6, sections=("counts",))
    for k in ("overall_svd_entropy", "overall_gnc2", "overall_unc3", "nc4_agreement"):
        assert got["overall_analysis"][k] == pytest.approx(cpu["overall_analysis"][k], rel=1e-5, abs=1e-9)


def test_gil_released_during_ingest():
    """While one thread is inside ingest, another runs Python and reaches the engine, which refuses the
    overlapping call on the same session (collapse.h, Threads): impossible if the GIL were held."""
    import threading
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100000, 64)).astype(np.float32)
    y = rng.integers(0, 50, len(x))
    s = collapse.Session(num_classes=50)
    refused = 0

    def work():  # its own call may meet main's sync: retry until it went in
        while True:
            try:
                return s.ingest(x, y)
            except collapse.StateError:
                pass

    for _ in range(5):
        t = threading.Thread(target=work)
        t.start()
        while t.is_alive():
            try:
                s.sync()
            except collapse.StateError as e:
                assert "in use by another thread" in str(e)
                refused += 1
        t.join()
        if refused:
            break
    assert refused > 0


def test_analyze_sequence_layout_equals_session(tmp_path):
    rng = np.random.default_rng(8)
    B, T, d, V = 5, 11, 6, 12
    hidden = rng.standard_normal((B, T, d)).astype(np.float32)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.1).astype(np.uint8)
    files = save(tmp_path, hidden=hidden, input_ids=ids, attention_mask=mask)
    cfg = collapse.Config(window_size=4)
    a = collapse.analyze(**files, config=cfg, num_classes=V, batch_rows=2 * T).to_dict()
    s = collapse.Session(cfg, num_classes=V)
    s.ingest_sequences(hidden[:2], ids[:2], mask[:2])
    s.ingest_sequences(hidden[2:], ids[2:], mask[2:])
    assert_reports_equal(s.compute().to_dict(), a, rel=1e-12)  # other batch cuts: summation order differs
    with pytest.raises(ValueError, match="bias needs a classifier"):
        collapse.analyze(**files, bias=files["hidden"])
    with pytest.raises(ValueError, match="choose one"):
        collapse.analyze(**files, features=files["hidden"], labels=files["input_ids"])
