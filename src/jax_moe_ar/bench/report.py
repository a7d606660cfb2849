"""What the bench writes: the table and its header lines (stdout), ``bench.json``, and the
``bench.png`` plot (latency vs M; needs matplotlib, the ``[bench]`` extra)."""

from __future__ import annotations

import json
import os

import numpy as np

from ..cli import PATH_DESCRIPTIONS
from .programs import NOOP

# The row's baselines beside the fused columns, by their JSON key.
XLA, XLA_ONE_SHOT = "xla", "xla_one_shot"
BASELINES = (XLA, XLA_ONE_SHOT, NOOP)
SHORT = {XLA: "xla", XLA_ONE_SHOT: "1shot"}


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def write_json(path, meta, rows):
    """Writes {"meta", "rows"} whole or not at all (through a temporary file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=json_default)
    os.replace(tmp, path)


def _baseline_cell(res):
    return "skipped" if "skipped" in res else fmt(res.get("wall_us"))


def table_lines(rows, algorithms):
    head = (f"{'ranks':>5} {'quant':<13} {'M':>5} {'algo':<7} {'fused µs':>9} {'fused µs':>9} "
            f"{'xla µs':>9} {'xla µs':>9} {'xla 1shot':>9} {'ffi no-op':>9} {'speedup':>7} "
            f"{'vs':<5} {'floor µs':>8} {'% of':>6}  ok")
    head2 = (f"{'':>5} {'':<13} {'':>5} {'':<7} {'wall':>9} {'kernel':>9} "
             f"{'wall':>9} {'kernel':>9} {'µs wall':>9} {'µs wall':>9} {'best/fu':>7} "
             f"{'':<5} {'':>8} {'floor':>6}")
    out = [head, head2, "-" * len(head)]
    for r in rows:
        baseline_failed = any(k in r["errors"] for k in BASELINES)
        for algo in algorithms:
            f = r["fused"].get(algo, {})
            x = r[XLA]
            chk = (r.get("check") or {}).get(algo)
            ok = "-" if chk is None else ("yes" if chk.get("ok") else "NO")
            if algo in r["errors"] or baseline_failed:
                ok = "ERR"
            out.append(
                f"{r['ranks']:>5} {r['quant']:<13} {r['M']:>5} {algo:<7} "
                f"{fmt(f.get('wall_us')):>9} {fmt(f.get('kernel_us')):>9} "
                f"{fmt(x.get('wall_us')):>9} {fmt(x.get('kernel_us')):>9} "
                f"{_baseline_cell(r[XLA_ONE_SHOT]):>9} {_baseline_cell(r[NOOP]):>9} "
                f"{fmt(r['speedup'].get(algo), '.2f'):>7} "
                f"{SHORT.get(r['speedup_vs'], '-'):<5} {fmt(r['floor_us']):>8} "
                f"{fmt(r['pct_of_floor'].get(algo), '.0f'):>6}  {ok}")
    return out


def summary_lines(meta, rows, algorithms, floor_formula, bwtxt):
    """The lines printed above the table: the machine, what each column is, the paths."""
    platform = meta["platform"]
    paths = sorted({res.get("path", "?") for r in rows for res in r["fused"].values()
                    if "path" in res})
    out = [f"\njax_moe_ar bench — {meta['device_count']} x {meta['device_kind']} ({platform}), "
           f"jax {meta['jax_version']}, H={meta['H']}, K={meta['K']}, {meta['dtype']}, "
           f"chain={meta['chain']} calls per program",
           f"op: {meta.get('op', 'moe_finalize_allreduce')}",
           "fused path: " + ("; ".join(f"{p} = {PATH_DESCRIPTIONS.get(p, p)}" for p in paths)
                             or "n/a")]
    if "xla" in paths and platform == "gpu":
        out.append("warning: some fused rows compiled to the plain-XLA fallback (see the "
                   "warning on stderr and 'path' in the JSON); those rows do not time the "
                   "fused kernel")
    out.append(f"per call: wall = median program time / chain; kernel = GPU busy time from a "
               f"profile / chain ({'n/a on CPU' if platform != 'gpu' else 'mean over the GPUs'})")
    one_shot = meta["xla_one_shot"]
    out.append(f"xla 1shot = 'xla' with {one_shot['flag']} in its own process"
               + (f" — skipped: {one_shot['skipped']}" if one_shot.get("skipped") else ""))
    out.append("ffi no-op = the same chain with a custom call that enqueues nothing in place "
               "of the op (a 4-byte memset only inside a command-buffer capture): XLA's own "
               "cost per call")
    out.append("speedup = wall of the faster xla column (vs) / fused wall")
    out.append(f"{floor_formula}, BW = {bwtxt}; % of floor = floor / fused wall")
    return out + table_lines(rows, algorithms)


def _plot_module():
    """matplotlib.pyplot with the file-only backend, or (None, why not)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return None, (f"matplotlib is not available ({type(e).__name__}: {e}); "
                      'pip install "jax_moe_ar[bench]" for the plot')
    return plt, None


def write_plot(path, rows, meta, algorithms):
    """latency vs M, log-log, one panel per quant; returns None or why not written."""
    plt, why = _plot_module()
    if plt is None:
        return why
    quants = list(dict.fromkeys(r["quant"] for r in rows))
    ranks = sorted({r["ranks"] for r in rows})
    ncols = min(3, len(quants))
    nrows = -(-len(quants) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows + 0.6),
                             squeeze=False)
    for ax in axes.flat[len(quants):]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, q in zip(axes.flat, quants):
        for i, n in enumerate(ranks):
            sel = sorted((r for r in rows if r["quant"] == q and r["ranks"] == n),
                         key=lambda r: r["M"])
            c = colors[i % len(colors)]
            ms = [r["M"] for r in sel]

            def series(get):
                pts = [(m, get(r)) for m, r in zip(ms, sel)]
                return [p[0] for p in pts if p[1]], [p[1] for p in pts if p[1]]

            def plot(get, style, label, **kw):
                xs, ys = series(get)
                if xs:
                    ax.plot(xs, ys, style, color=c, label=label, **kw)

            for j, algo in enumerate(algorithms):
                plot(lambda r, a=algo: r["fused"].get(a, {}).get("wall_us"),
                     "o^vD"[j % 4] + ("-", "-.")[j % 2],
                     f"fused {algo} N={n}" if len(algorithms) > 1 else f"fused N={n}")
            plot(lambda r: r[XLA].get("wall_us"), "s--", f"xla N={n}")
            plot(lambda r: r[XLA_ONE_SHOT].get("wall_us"), "x--", f"xla 1shot N={n}")
            plot(lambda r: r[NOOP].get("wall_us"), "-", f"ffi no-op N={n}", alpha=0.4)
            plot(lambda r: r["floor_us"], ":", f"NVLink floor N={n}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(q)
        ax.set_xlabel("tokens M")
        ax.set_ylabel(f"µs per call (wall, chain of {meta['chain']})")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    title = (f"jax_moe_ar bench — {meta['device_kind']} x{meta['device_count']}, "
             f"H={meta['H']}, K={meta['K']}, {meta['dtype']}, jax {meta['jax_version']}")
    if meta["platform"] != "gpu":
        title += "\nCPU numbers: not meaningful for the GPU targets"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
