"""collapse.torch.Collector on a real model: a torch implementation of the stories260K llama2.c
checkpoint, a few stories of ../shared/data/stories260k; its report equals the C++ analysis of the
same rows dumped to .npy (collapse.analyze, and the collapse command when it is built)."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import collapse  # noqa: E402
from collapse.torch import Collector  # noqa: E402
from conftest import STORIES_DATA, STORIES_MODEL, assert_reports_equal, run_cli  # noqa: E402

pytestmark = pytest.mark.skipif(not (os.path.isdir(STORIES_DATA) and os.path.isfile(STORIES_MODEL)),
                                reason="../shared/data/stories260k or ../shared/models/stories260k absent")

CFG = dict(window_size=8, compute_nc4=True, exclude_token_ids=[0])


@pytest.fixture(scope="module")
def model():
    from llama2c_torch import Llama2c
    return Llama2c(STORIES_MODEL).eval()


def batches(n_seq=6, T=48, per_batch=3):
    """Stories 0..n_seq-1 cut to T tokens, right-padded (id 0) with an attention mask, in batches."""
    inputs = np.load(os.path.join(STORIES_DATA, "inputs.npy"), mmap_mode="r")
    seq = np.load(os.path.join(STORIES_DATA, "seq.npy"), mmap_mode="r")
    rows = []
    for s in range(n_seq):
        idx = np.flatnonzero(np.asarray(seq[:40000]) == s)
        rows.append(np.asarray(inputs[idx[:T - 5 * (s % 2)]]))  # odd stories 5 tokens shorter: padding
    out = []
    for b in range(0, n_seq, per_batch):
        ids = np.zeros((per_batch, T), dtype=np.int64)
        mask = np.zeros((per_batch, T), dtype=np.int64)
        for i, r in enumerate(rows[b:b + per_batch]):
            ids[i, :len(r)] = r
            mask[i, :len(r)] = 1
        out.append((torch.from_numpy(ids), torch.from_numpy(mask)))
    return out


def test_model_matches_the_dumped_features(model):
    """The torch model reproduces the stored hidden states (float16 storage, 0.0078 at most)."""
    feats = np.load(os.path.join(STORIES_DATA, "features.npy"), mmap_mode="r")
    seq = np.load(os.path.join(STORIES_DATA, "seq.npy"), mmap_mode="r")
    inputs = np.load(os.path.join(STORIES_DATA, "inputs.npy"), mmap_mode="r")
    idx = np.flatnonzero(np.asarray(seq[:5000]) == 0)[:64]
    got = {}
    h = model.norm.register_forward_hook(lambda m, i, o: got.setdefault("h", o))
    with torch.no_grad():
        model(torch.from_numpy(np.asarray(inputs[idx], dtype=np.int64))[None])
    h.remove()
    assert np.abs(got["h"][0].numpy() - np.asarray(feats[idx], dtype=np.float32)).max() < 0.008


def test_collector_equals_cli_on_the_same_rows(model, tmp_path):
    data = batches()
    with Collector(model, config=collapse.Config(**CFG)) as col:  # module "norm", classifier "output" found
        assert col.module_name == "norm"
        for ids, mask in data:
            col(ids, attention_mask=mask, )
        rep = col.compute().to_dict()
    assert col.batches == len(data)

    # The same rows, dumped: X = hidden[:, :-1], Y = ids[:, 1:], valid = mask[:, 1:], sequence b, position t.
    xs, ys, vs, ss, ps = [], [], [], [], []
    seq0 = 0
    for ids, mask in data:
        got = {}
        h = model.norm.register_forward_hook(lambda m, i, o: got.setdefault("h", o))
        with torch.no_grad():
            model(ids)
        h.remove()
        B, T = ids.shape
        xs.append(got["h"][:, :-1].reshape(-1, got["h"].shape[-1]).numpy())
        ys.append(ids[:, 1:].reshape(-1).numpy())
        vs.append(mask[:, 1:].reshape(-1).numpy())
        ss.append(np.repeat(np.arange(seq0, seq0 + B), T - 1))
        ps.append(np.tile(np.arange(T - 1), B))
        seq0 += B
    files = {}
    for k, v in dict(features=xs, labels=ys, valid=vs, sequence_ids=ss, positions=ps).items():
        files[k] = str(tmp_path / f"{k}.npy")
        np.save(files[k], np.concatenate(v))
    files["classifier"] = str(tmp_path / "classifier.npy")
    np.save(files["classifier"], model.output.weight.detach().numpy())
    ref = collapse.analyze(**files, config=collapse.Config(**CFG)).to_dict()
    n = assert_reports_equal(rep, ref)
    assert n > 300 and rep["window_summary"] is not None and rep["counts"]["rows_kept"] > 200

    from conftest import find_cli
    cli = find_cli()
    if cli:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(collapse.Config(**CFG).yaml)
        args = ["analyze", "-q", "--config", str(cfg), "--output", str(tmp_path / "cli.json")]
        for k, flag in (("features", "--features"), ("labels", "--labels"), ("valid", "--mask"),
                        ("sequence_ids", "--sequence-ids"), ("positions", "--positions"), ("classifier", "--classifier")):
            args += [flag, files[k]]
        st, err = run_cli(cli, *args)
        assert st == 0, err
        assert_reports_equal(rep, json.loads((tmp_path / "cli.json").read_text()))


def test_collector_outside_forward_and_errors(model):
    col = Collector(model, module="norm", num_classes=512, classifier=False)
    with torch.no_grad():
        model(torch.ones((1, 4), dtype=torch.int64))  # not through the collector: not collected
    ids, mask = batches(n_seq=2, T=16, per_batch=2)[0]
    col(ids, mask)
    snap = col.snapshot()
    assert snap["counts.rows_seen"] == 2 * 15
    rep = col.compute()
    assert rep["counts.rows_seen"] == 30 and rep["overall_unc3"] is None
    small = Collector(model, module="norm", num_classes=300, classifier=False)
    with pytest.raises(collapse.BadInputError):  # a label outside [0, V): the engine's error, nothing fed
        small(torch.full((1, 4), 400, dtype=torch.int64))
    small.close()
    with pytest.raises(ValueError, match="no module"):
        Collector(model, module="nope", num_classes=512)
