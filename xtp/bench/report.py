"""``xtp bench`` output: rank results folded into rows, a markdown table with ratios vs xtp,
the profile summary, and an optional matplotlib chart."""

from __future__ import annotations

import statistics
from pathlib import Path

METRICS = (("ready_s", "ready s", "{:.1f}"), ("prefill_ms", "prefill ms", "{:.0f}"),
           ("decode_ms", "decode ms/token", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB/rank",
                                                        "{:.0f}"))


def fold(ranks: list[dict], bytes_per_step: int | None = None) -> dict:
    """One row from the ranks of one run: times of the slowest rank, memory of the largest,
    and the decode floor where the ranks measured their read bandwidth: ``bytes_per_step``
    (weight bytes one decode step reads, all ranks together) / the ranks' bandwidths summed
    (each measured while all read at once)."""
    ok = [r for r in ranks if r.get("ok")]
    r0 = min(ranks, key=lambda r: r.get("rank", 0)) if ranks else {}
    row = {k: r0.get(k) for k in ("impl", "tp", "dtype", "threads", "tokens", "profile",
                                  "collectives", "versions", "device")}
    row["cpus"] = [r.get("cpus") for r in sorted(ranks, key=lambda r: r.get("rank", 0))]
    if not ranks or len(ok) < len(ranks) or len(ranks) < (row.get("tp") or 1):
        errs = [r["error"] for r in ranks if r.get("error")]
        row.update(ok=False, error=errs[0] if errs else "no result from some rank")
        return row
    row["ok"] = True
    for key in ("ready_s", "load_s", "prefill_ms", "decode_ms", "peak_rss_mib", "base_rss_mib",
                "peak_device_mib", "compile_s"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        row[key] = max(vals) if vals else None
    row["decode_ms_median_of_ranks"] = statistics.median(r["decode_ms"] for r in ok)
    bw = [r.get("read_bytes_per_s") for r in ok]
    row["read_bytes_per_s"] = sum(bw) if all(bw) else None
    row["floor_ms"] = (bytes_per_step / row["read_bytes_per_s"] * 1e3
                       if bytes_per_step and row["read_bytes_per_s"] else None)
    return row


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from repeated runs of the same implementation: the median of each time over
    the successful rounds, the largest memory; every round's figures kept under ``rounds``."""
    ok = [r for r in rounds if r.get("ok")]
    if len(rounds) == 1 or not ok:
        return rounds[0]
    row = dict(ok[0])
    for key in ("ready_s", "load_s", "prefill_ms", "decode_ms", "floor_ms", "read_bytes_per_s"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        row[key] = statistics.median(vals) if len(vals) == len(ok) else None
    for key in ("peak_rss_mib", "base_rss_mib", "peak_device_mib"):
        vals = [r[key] for r in ok if r.get(key) is not None]
        row[key] = max(vals) if vals else None
    row["rounds"] = [{k: r.get(k) for k in ("ok", "ready_s", "prefill_ms", "decode_ms",
                                            "floor_ms", "load_before", "load_after", "error")}
                     for r in rounds]
    return row


def _per_round(rounds_a: list[dict] | None, rounds_b: list[dict] | None, key_a: str,
               key_b: str) -> float | None:
    """The median over rounds of ``a[key_a] / b[key_b]`` taken within each round (where both
    succeeded), or None without rounds on both sides. On a shared machine whose speed moves
    between rounds, this pairs runs minutes apart instead of medians taken over the whole run."""
    if not rounds_a or not rounds_b or len(rounds_a) != len(rounds_b):
        return None
    ratios = [a[key_a] / b[key_b] for a, b in zip(rounds_a, rounds_b)
              if a.get("ok") and b.get("ok") and a.get(key_a) and b.get(key_b)]
    return statistics.median(ratios) if ratios else None


def _ratio(row: dict, base: dict | None, key: str) -> str:
    if not base or not base.get("ok") or not row.get("ok") or not base.get(key):
        return "-"
    paired = _per_round(row.get("rounds"), base.get("rounds"), key, key)
    return f"{row[key] / base[key] if paired is None else paired:.2f}"


def _over_floor(row: dict) -> str:
    rounds = row.get("rounds")
    paired = _per_round(rounds, rounds, "decode_ms", "floor_ms")
    if paired is not None:
        return f"{paired:.2f}"
    return f"{row['decode_ms'] / row['floor_ms']:.2f}" if row.get("floor_ms") else "-"


def table(rows: list[dict]) -> str:
    """A markdown table: metrics, the decode floor, and each metric as a ratio to xtp at the
    same tp and dtype (above 1: xtp is better). With several rounds, the times are medians
    over rounds and the ratios (decode / floor included) medians of the ratios within each
    round."""
    device = any(r.get("peak_device_mib") for r in rows)
    head = ["impl", "dtype", "tp", "threads/rank"] + [m[1] for m in METRICS]
    head += ["peak device MiB"] if device else []
    head += ["floor ms", "decode / floor"] + [f"{m[1].split()[0]} vs xtp" for m in METRICS]
    head += ["tokens = unsharded"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["impl"], r["dtype"], str(r["tp"]), str(r.get("threads") or "-")]
        if not r.get("ok"):
            cells.append(f"failed: {str(r.get('error', '?'))[:160]}")
            cells += [""] * (len(head) - len(cells))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells += [fmt.format(r[key]) for key, _, fmt in METRICS]
        if device:
            cells.append(f"{r['peak_device_mib']:.0f}" if r.get("peak_device_mib") else "-")
        floor = r.get("floor_ms")
        cells += [f"{floor:.1f}" if floor else "-", _over_floor(r)]
        base = next((b for b in rows if b["impl"] == "xtp" and b["tp"] == r["tp"]
                     and b["dtype"] == r["dtype"]), None)
        cells += [_ratio(r, base, key) for key, _, _ in METRICS]
        ref = next((b for b in rows if b["impl"] == "unsharded" and b["dtype"] == r["dtype"]
                    and b.get("ok")), None)
        cells.append("-" if ref is None or r is ref else
                     ("yes" if r.get("tokens") == ref.get("tokens") else "no"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compile_text(rows: list[dict]) -> str:
    """One line: how long each compiled-decode run spent in its first (compiling) steps."""
    done = [f"{r['impl']} tp {r['tp']} {r['dtype']} {r['compile_s']:.0f} s" for r in rows
            if r.get("ok") and r.get("compile_s")]
    return ("compiled decode (torch.compile, static KV cache; prefill eager): the warm-up "
            "steps that compile took " + ", ".join(done))


def profile_text(rows: list[dict]) -> str:
    """Top operators by self CPU time per decode token, for each profiled run."""
    out = []
    for r in rows:
        if r.get("ok") and r.get("profile"):
            out.append(f"profile {r['impl']} tp {r['tp']} {r['dtype']} (rank 0, ms per token):")
            out += [f"  {p['ms_per_token']:8.2f}  {p['calls_per_token']:6.0f} calls  {p['op']}"
                    for p in r["profile"]]
            for op, c in (r.get("collectives") or {}).items():
                out.append(f"  xtp {op}: {c['ms_per_token']:.2f} ms per token in "
                           f"{c['calls_per_token']:.0f} calls (timed around the communicator)")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars, one panel per metric, one group per (dtype, tp), one bar per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("ok")]
    groups = sorted({(r["dtype"], r["tp"]) for r in ok})
    impls = list(dict.fromkeys(r["impl"] for r in ok))
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4))
    width = 0.8 / max(1, len(impls))
    for ax, (key, label, _) in zip(axes, METRICS):
        for i, impl in enumerate(impls):
            xs, ys = [], []
            for g, (dt, tp) in enumerate(groups):
                row = next((r for r in ok if (r["impl"], r["dtype"], r["tp"]) == (impl, dt, tp)),
                           None)
                if row is not None:
                    xs.append(g + i * width)
                    ys.append(row[key])
            ax.bar(xs, ys, width, label=impl)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{dt}\ntp {tp}" for dt, tp in groups], fontsize=8)
        ax.set_title(label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(impls), fontsize=8)
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
