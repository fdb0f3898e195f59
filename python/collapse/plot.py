"""collapse.plot: paper-size figures of one report, or of two overlaid (target vs draft).

    python3 -m collapse.plot REPORT.json [B.json] -o FIG.png|pdf|svg [--labels target draft] [--title T]

    from collapse.plot import plot_reports
    fig = plot_reports("target.json", "draft.json", labels=("target", "draft"), output="fig.pdf")

Four panels: (a) per-token SVD entropy against log10 of the token's row count, (b) the histogram of
per-token entropies, (c) the window-entropy trajectory (mean entropy by window index over sequences,
from window_summary, when the report has it), (d) a table of the headline metrics. Entropies are in
nats (natural log, docs/METRICS.md). Uses matplotlib's Agg backend (no display needed).
"""
import argparse
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# (section, key, label) of the headline table.
HEADLINE = (
    ("counts", "rows_kept", "rows kept"),
    ("counts", "classes_kept", "classes kept"),
    ("overall_analysis", "overall_svd_entropy", "overall SVD entropy (nats)"),
    ("overall_analysis", "overall_effective_rank", "overall effective rank"),
    ("summary", "avg_svd_entropy", "mean per-token SVD entropy (nats)"),
    ("overall_analysis", "overall_gnc2", "GNC2"),
    ("overall_analysis", "nc2_equiangular_mean", "NC2 equiangular mean"),
    ("overall_analysis", "nc1_cdnv", "NC1 CDNV"),
    ("overall_analysis", "overall_unc3", "UNC3"),
    ("overall_analysis", "nc3_self_duality", "NC3 self-duality"),
    ("overall_analysis", "nc4_agreement", "NC4 agreement"),
    ("window_summary", "overall_avg_svd_entropy", "mean window entropy (nats)"),
)
COLORS = ("#1f77b4", "#d62728")


def _load(r):
    if isinstance(r, dict):
        return r
    if hasattr(r, "to_dict"):
        return r.to_dict()
    with open(os.fspath(r), encoding="utf-8") as f:
        return json.load(f)


def token_points(doc):
    """(log10 row count, SVD entropy) of every token with an entropy."""
    xs, ys = [], []
    for t in (doc.get("token_analysis") or {}).values():
        h, n = t.get("svd_entropy"), t.get("num_samples")
        if h is not None and n:
            xs.append(math.log10(n))
            ys.append(h)
    return np.array(xs), np.array(ys)


def window_trajectory(doc):
    """(window index, mean entropy, sequence count) from window_summary; empty when absent."""
    ws = doc.get("window_summary") or {}
    pts = []
    for k, v in ws.items():
        m = re.fullmatch(r"avg_chunk_idx_(\d+)_svd_entropy", k)
        if m and v is not None:
            pts.append((int(m.group(1)), v, ws.get(f"chunk_idx_{m.group(1)}_count")))
    pts.sort()
    return pts


def _fmt(v):
    if v is None:
        return "null"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.4g}"


def plot_reports(a, b=None, labels=("target", "draft"), output=None, title=None):
    """A figure of report a (a path, dict or collapse.Report), overlaid with b when given.
    Writes `output` (format from its extension: png, pdf, svg) when given; returns the Figure."""
    docs = [_load(a)] + ([_load(b)] if b is not None else [])
    names = list(labels[:len(docs)]) if len(docs) > 1 else [labels[0] if labels else "report"]
    with plt.rc_context({"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
                         "xtick.labelsize": 7, "ytick.labelsize": 7}):
        fig, axes = plt.subplots(2, 2, figsize=(7.0, 5.6), constrained_layout=True)
        ax_sc, ax_hist, ax_win, ax_tab = axes.ravel()

        all_h = []
        for doc, name, c in zip(docs, names, COLORS):
            x, y = token_points(doc)
            all_h.append(y)
            ax_sc.scatter(x, y, s=6, alpha=0.6, color=c, edgecolors="none", label=f"{name} ({len(y)} tokens)")
        ax_sc.set_xlabel("log$_{10}$ rows of the token (frequency)")
        ax_sc.set_ylabel("per-token SVD entropy (nats)")
        ax_sc.set_title("(a) entropy vs token frequency")
        ax_sc.legend(loc="best")
        ax_sc.grid(alpha=0.3)

        nonempty = [h for h in all_h if len(h)]
        if nonempty:
            lo, hi = min(h.min() for h in nonempty), max(h.max() for h in nonempty)
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-9, 31)
            for h, name, c in zip(all_h, names, COLORS):
                ax_hist.hist(h, bins=bins, alpha=0.55, color=c, label=name)
        ax_hist.set_xlabel("per-token SVD entropy (nats)")
        ax_hist.set_ylabel("tokens")
        ax_hist.set_title("(b) entropy histogram")
        if len(docs) > 1:
            ax_hist.legend(loc="best")
        ax_hist.grid(alpha=0.3)

        any_win = False
        for doc, name, c in zip(docs, names, COLORS):
            pts = window_trajectory(doc)
            if pts:
                any_win = True
                ax_win.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=c, label=name)
        ax_win.set_title("(c) window entropy during generation")
        if any_win:
            w = next((d.get("config", {}).get("window_size") for d in docs if d.get("config")), None)
            ax_win.set_xlabel("window index" + (f" ({w} rows per window)" if w else ""))
            ax_win.set_ylabel("mean window SVD entropy (nats)")
            ax_win.grid(alpha=0.3)
            if len(docs) > 1:
                ax_win.legend(loc="best")
        else:
            ax_win.text(0.5, 0.5, "no window_summary in the report\n(rows without sequence ids)", ha="center",
                        va="center", transform=ax_win.transAxes)
            ax_win.set_xticks([])
            ax_win.set_yticks([])

        ax_tab.axis("off")
        ax_tab.set_title("(d) headline metrics")
        rows, cells = [], []
        for sec, key, label in HEADLINE:
            vals = [(d.get(sec) or {}).get(key) for d in docs]
            if all(v is None for v in vals) and sec == "window_summary":
                continue
            row = [_fmt(v) for v in vals]
            if len(docs) > 1:
                row.append(_fmt(vals[1] - vals[0]) if None not in vals else "")
            rows.append(label)
            cells.append(row)
        cols = ["metric"] + names + (["B - A"] if len(docs) > 1 else [])
        label_w = 0.52
        value_w = (1.0 - label_w) / (len(cols) - 1)
        # Inside the panel (bbox): the metric names are a column of their own, so nothing spills out.
        table = ax_tab.table(cellText=[[r] + c for r, c in zip(rows, cells)], colLabels=cols, cellLoc="right",
                             colWidths=[label_w] + [value_w] * (len(cols) - 1), bbox=[0.0, 0.0, 1.0, 0.97])
        table.auto_set_font_size(False)
        table.set_fontsize(6.5)
        for (r, c), cell in table.get_celld().items():
            cell.set_linewidth(0.3)
            if c == 0:
                cell.set_text_props(ha="left")
                cell.PAD = 0.03
        if title:
            fig.suptitle(title)
        if output is not None:
            fig.savefig(os.fspath(output), dpi=200)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m collapse.plot",
                                description="Plot a collapse report (or two: target vs draft) at paper size.")
    p.add_argument("report", help="report JSON (target)")
    p.add_argument("other", nargs="?", help="second report JSON (draft), overlaid")
    p.add_argument("-o", "--output", required=True, help="figure file: .png, .pdf or .svg")
    p.add_argument("--labels", nargs=2, default=("target", "draft"), metavar=("A", "B"))
    p.add_argument("--title")
    a = p.parse_args(argv)
    ext = os.path.splitext(a.output)[1].lower()
    if ext not in (".png", ".pdf", ".svg"):
        p.error(f"--output {a.output}: the extension must be .png, .pdf or .svg")
    try:
        fig = plot_reports(a.report, a.other, labels=tuple(a.labels) if a.other else ("report",),
                           output=a.output, title=a.title)
    except (OSError, ValueError) as e:
        print(f"collapse.plot: error: {e}", file=sys.stderr)
        return 1
    plt.close(fig)
    print(f"figure written to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
