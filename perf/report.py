"""bench's output: per-configuration summary rows, the issue's targets, Markdown, JSON, PNG plots."""

from __future__ import annotations

import json
import operator
import statistics
from collections.abc import Callable
from pathlib import Path

NOISY_CORES = 0.2  # a run during which other processes used more than this is marked "*"
SERVER_ORDER = ("reference", "aserver w1", "aserver w2")


def size_text(body: int) -> str:
    return f"{body // 1024} KiB" if body >= 1024 and body % 1024 == 0 else f"{body} B"


def config_key(connections: int, depth: int, body: int, cmd: int = 1) -> str:
    return f"{connections}x{depth} {size_text(body)}" + (f" cmd {cmd}" if cmd != 1 else "")


def server_label(server: str, workers: int) -> str:
    return server if server == "reference" else f"{server} w{workers}"


# Summary -----------------------------------------------------------------------------------


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: statistics.mean(d.get(k, 0.0) for d in dicts) for k in sorted(keys)}


def _summary_row(key: str, label: str, runs: list[dict]) -> dict:
    clean = [r for r in runs if r["other_cpu_cores"] <= NOISY_CORES]
    used = clean or runs  # runs disturbed by other processes count only if all were
    first = used[0]
    return {
        "config": key,
        "server": label,
        **{k: first["spec"][k] for k in ("connections", "depth", "body", "cmd", "workers")},
        "runs": len(runs),
        "clean_runs": len(clean),
        "req_per_s": statistics.mean(r["req_per_s"] for r in used),
        "bytes_per_s": statistics.mean(r["bytes_per_s"] for r in used),
        "p50_ms": statistics.median(r["latency_ms"]["p50"] for r in used),
        "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in used),
        "p999_ms": statistics.median(r["latency_ms"]["p99.9"] for r in used),
        "client_cpu_cores": statistics.mean(r["client_cpu_cores"] for r in used),
        "server_cpu_cores": _mean_dicts([r["server_cpu_cores"] for r in used]),
        "per_request": {proc: _mean_dicts([r["server_per_request"].get(proc, {}) for r in used])
                        for proc in first["server_per_request"]},
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (configuration, server), in run order; mean req/s, median percentiles."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["spec"]["key"], r["spec"]["label"]), []).append(r)
    rows = [_summary_row(key, label, mine) for (key, label), mine in groups.items()]
    refs = {row["config"]: row for row in rows if row["server"] == "reference"}
    for row in rows:
        ref = refs.get(row["config"])
        if ref is not None and row is not ref and ref["req_per_s"] > 0:
            row["ratio"] = row["req_per_s"] / ref["req_per_s"]
    return rows


# Targets -----------------------------------------------------------------------------------

# (name, configuration, metric, numerator server, denominator server, comparison, goal)
RATIO_TARGETS = [
    ("50 x 16, req/s vs reference", config_key(50, 16, 64), "req_per_s", "aserver w1", "reference", ">=", 0.7),
    ("50 x 1, req/s vs reference", config_key(50, 1, 64), "req_per_s", "aserver w1", "reference", ">=", 0.8),
    ("1000 x 1, req/s vs reference", config_key(1000, 1, 64), "req_per_s", "aserver w1", "reference", ">=", 0.8),
    ("16 KiB bodies 50 x 4, bytes/s vs reference", config_key(50, 4, 16384), "bytes_per_s",
     "aserver w1", "reference", ">=", 0.8),
    ("cmd 2 (CPU-bound) 50 x 4, 2 workers vs 1", config_key(50, 4, 64, 2), "req_per_s",
     "aserver w2", "aserver w1", ">=", 1.6),
    ("p99 latency 50 x 1 vs reference", config_key(50, 1, 64), "p99_ms", "aserver w1", "reference", "<=", 1.5),
]
COMPARE: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}
IDLE_GOAL_KIB = 4.0


def _find(rows: list[dict], key: str, label: str) -> dict | None:
    return next((r for r in rows if r["config"] == key and r["server"] == label), None)


def _ratio_target(rows: list[dict], spec: tuple) -> dict:
    name, key, metric, num_label, den_label, op, goal = spec
    num, den = _find(rows, key, num_label), _find(rows, key, den_label)
    target = {"target": name, "goal": f"{op} {goal:.2f}", "measured": None, "passed": None, "detail": "not run"}
    if num is not None and den is not None and den[metric] > 0:
        ratio = num[metric] / den[metric]
        target.update(measured=ratio, passed=COMPARE[op](ratio, goal),
                      detail=f"{num_label} {num[metric]:,.4g} / {den_label} {den[metric]:,.4g} {metric}")
    return target


def _idle_target(idle: dict) -> dict:
    mine = idle.get("aserver w1")
    name = f"{mine['connections'] if mine else 'N'} idle connections: conn process KiB/conn, all answered"
    target = {"target": name, "goal": f"<= {IDLE_GOAL_KIB:.2f}", "measured": None, "passed": None,
              "detail": "not run"}
    if mine:
        per_conn = mine["kib_per_conn_open"]
        ref = idle.get("reference")
        target.update(
            measured=per_conn,
            passed=per_conn <= IDLE_GOAL_KIB and mine["answered"] == mine["connections"],
            detail=f"answered {mine['answered']:,}/{mine['connections']:,}; "
                   f"{mine['kib_per_conn_answered']:.2f} KiB/conn after answering"
                   + (f"; reference {ref['kib_per_conn_open']:.2f}" if ref else ""),
        )
    return target


def targets(rows: list[dict], idle: dict, machine_scaling: list[float] | None = None) -> list[dict]:
    """`machine_scaling`: the same CPU work in 2 processes vs 1 without a server, once per
    round (bench.machine_scaling): the cmd 2 target's ceiling on this machine."""
    items = [_ratio_target(rows, spec) for spec in RATIO_TARGETS] + [_idle_target(idle)]
    if machine_scaling:
        cmd2 = next(t for t in items if t["target"].startswith("cmd 2"))
        cmd2["detail"] += "; the bare work itself scales " + ", ".join(f"{x:.2f}" for x in machine_scaling)
    return items


# Text --------------------------------------------------------------------------------------


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _cores(row: dict) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in sorted(row["server_cpu_cores"].items()) if v >= 0.005)


def matrix_table(rows: list[dict]) -> str:
    header = ["config", "server", "req/s", "MB/s", "ratio", "p50 ms", "p99 ms", "p99.9 ms",
              "client cores", "server cores", "clean runs"]
    lines = [[r["config"], r["server"], f"{r['req_per_s']:,.0f}", f"{r['bytes_per_s'] / 1e6:,.1f}",
              f"{r['ratio']:.2f}" if "ratio" in r else "", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
              f"{r['p999_ms']:.2f}", f"{r['client_cpu_cores']:.2f}", _cores(r), f"{r['clean_runs']}/{r['runs']}"]
             for r in rows]
    return _table(header, lines)


def targets_table(items: list[dict]) -> str:
    verdict = {True: "pass", False: "FAIL", None: "not run"}
    lines = [[t["target"], t["goal"], "" if t["measured"] is None else f"{t['measured']:.2f}",
              verdict[t["passed"]], t["detail"]] for t in items]
    return _table(["target", "goal", "measured", "result", "detail"], lines)


def idle_table(idle: dict) -> str:
    lines = [[label, f"{r['connections']:,}", f"{r['rss_before_kib']:,}", f"{r['rss_open_kib']:,}",
              f"{r['rss_answered_kib']:,}", f"{r['kib_per_conn_open']:.2f}", f"{r['kib_per_conn_answered']:.2f}",
              f"{r['answered']:,}"] for label, r in idle.items()]
    header = ["server", "connections", "VmRSS before KiB", "open KiB", "answered KiB", "KiB/conn open",
              "KiB/conn answered", "answered"]
    return _table(header, lines)


def per_request_table(rows: list[dict]) -> str:
    lines = [[r["config"], r["server"], proc, f"{r['server_cpu_cores'].get(proc, 0.0):.2f}",
              f"{per['read_syscalls']:.3f}", f"{per['write_syscalls']:.3f}",
              f"{per['voluntary_switches']:.3f}", f"{per['preempted']:.3f}"]
             for r in rows for proc, per in r["per_request"].items()]
    return _table(["config", "server", "process", "cores", "reads/req", "writes/req", "sleeps/req",
                   "preempted/req"], lines)


def markdown(report: dict) -> str:
    opts = report["options"]
    return "\n\n".join([
        "# aserver benchmark",
        f"{report['started']}; {opts['duration']} s measured per run after {opts['warmup']} s warm-up, "
        f"{opts['rounds']} round(s), {opts['client_processes']} client process(es); "
        "req/s and MB/s are means, latencies medians over the rounds (runs with other busy "
        f"processes, > {NOISY_CORES} cores, are left out unless all were). ratio: vs the reference.",
        "## Targets", targets_table(report["targets"]),
        "## Matrix", matrix_table(report["summary"]),
        "## Idle connections (VmRSS of the connection-holding process)", idle_table(report["idle"]),
        "## Per request, per server process",
        "Syscalls from /proc/pid/io, sleeps = voluntary context switches (wakeups needed), "
        "preempted = involuntary ones (cores oversubscribed).",
        per_request_table(report["summary"]),
    ]) + "\n"


# Files -------------------------------------------------------------------------------------


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """throughput.png (per configuration, servers side by side) and latency.png."""
    import matplotlib  # deferred: only needed here (pip install -e '.[perf]')

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    keys = list(dict.fromkeys(r["config"] for r in rows))
    labels = [s for s in SERVER_ORDER if any(r["server"] == s for r in rows)]
    paths = []
    panels = [("throughput.png", [("req_per_s", 1e3, "k req/s"), ("bytes_per_s", 1e6, "MB/s")]),
              ("latency.png", [("p50_ms", 1, "p50 ms"), ("p99_ms", 1, "p99 ms"), ("p999_ms", 1, "p99.9 ms")])]
    for name, metrics in panels:
        fig, axes = plt.subplots(len(metrics), 1, figsize=(max(8, 1.1 * len(keys)), 3.2 * len(metrics)),
                                 squeeze=False)
        for ax, (metric, scale, unit) in zip(axes[:, 0], metrics, strict=True):
            _bars(ax, rows, keys, labels, metric, scale)
            ax.set_ylabel(unit)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        axes[0, 0].legend(fontsize=8)
        axes[-1, 0].tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def _bars(ax, rows: list[dict], keys: list[str], labels: list[str], metric: str, scale: float) -> None:
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        xs, ys = [], []
        for x, key in enumerate(keys):
            row = _find(rows, key, label)
            if row is not None and row[metric] > 0:
                xs.append(x + (i - (len(labels) - 1) / 2) * width)
                ys.append(row[metric] / scale)
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(keys)), keys, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def write(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "results.md").write_text(markdown(report))
    paths = [out_dir / "results.json", out_dir / "results.md"]
    if not report["summary"]:  # e.g. --only idle: nothing to plot
        return paths
    try:
        paths += plot(report["summary"], out_dir)
    except ImportError:
        print("no plots: matplotlib is missing (pip install -e '.[perf]')")
    return paths
