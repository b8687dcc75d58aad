"""Show a `vmm bench boot` report: a terminal table (plain text) and a PNG chart (matplotlib)."""

from __future__ import annotations

from typing import Any

from vmm.bench.phases import DESCRIPTIONS

#: The segments of a vmm bar in the chart: (label, from phase, to phase).
SEGMENTS = (
    ("Python start", "process_start", "cli_start"),
    ("imports", "cli_start", "imports_done"),
    ("load kernel+initrd", "imports_done", "loaded"),
    ("KVM set-up", "loaded", "kvm_ready"),
    ("to first KVM_RUN", "kvm_ready", "first_kvm_run"),
    ("guest kernel boot", "first_kvm_run", "init_reached"),
    ("command", "init_reached", "command_done"),
    ("guest exit + teardown", "command_done", "vmm_exited"),
)
#: A vmm bar restored from a snapshot: no kernel to load, no boot.
RESTORE_SEGMENTS = (
    ("Python start", "process_start", "cli_start"),
    ("imports", "cli_start", "imports_done"),
    ("load snapshot state", "imports_done", "state_loaded"),
    ("restore (KVM, RAM mapped, state set)", "state_loaded", "kvm_ready"),
    ("to first KVM_RUN", "kvm_ready", "first_kvm_run"),
    ("command", "first_kvm_run", "command_done"),
    ("guest exit + teardown", "command_done", "vmm_exited"),
)


SEGMENT_LABELS = list(dict.fromkeys(label for label, _, _ in (*SEGMENTS, *RESTORE_SEGMENTS)))


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.1f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def format_table(report: dict[str, Any]) -> str:
    """The results as plain text: one row per contender, then each vmm contender's phases."""
    lines = [f"vmm bench boot: {report['job']}, {report['runs']} run(s) each, interleaved",
             f"machine: {report['machine']}"]
    host = report.get("host", {})
    if host.get("load_average_1min") is not None:
        lines.append(f"load average (1 min) before/after: {host['load_average_1min']:.2f}/"
                     f"{host.get('load_average_1min_after') or 0:.2f}")
    header = f"{'contender':<30} {'status':<8} {'ok':>4} {'min':>10} {'median':>10} {'max':>10} {'peak RSS':>11}"
    lines += ["", header, "-" * len(header)]
    for c in report["contenders"]:
        s = c["summary"]
        wall = s["wall_ms"]
        runs = f"{s['runs_ok']}/{s['runs_ok'] + s['runs_failed']}"
        lines.append(f"{c['label']:<30} {c['status']:<8} {runs:>4} {_ms(wall['min']):>10} "
                     f"{_ms(wall['median']):>10} {_ms(wall['max']):>10} {_mib(s['peak_rss_bytes_median']):>11}")
        if c["reason"]:
            lines.append(f"{'':<30} reason: {c['reason']}")
    for c in report["contenders"]:
        s = c["summary"]
        phases = s.get("phases_ms_median")
        if not phases:
            continue
        lines += ["", f"{c['label']}: phases (median, ms after process start)"]
        previous = 0.0
        for name, value in phases.items():
            lines.append(f"  {name:<15} {value:>12.1f}  (+{value - previous:>10.1f})  {DESCRIPTIONS.get(name, '')}")
            previous = value
        boot = s.get("guest_boot_time_ms", {})
        if boot.get("median") is not None:
            lines.append(f"  Guest-boot-time (process start -> init): median {_ms(boot['median'])} "
                         f"(min {_ms(boot['min'])}, max {_ms(boot['max'])})")
        if s.get("vmm_overhead_bytes_median") is not None:
            lines.append(f"  memory: peak RSS {_mib(s.get('peak_rss_bytes_median'))}, guest RAM touched "
                         f"{_mib(s.get('guest_touched_bytes_median'))}, VMM overhead "
                         f"{_mib(s.get('vmm_overhead_bytes_median'))}")
        if s.get("exits_total_median") is not None:
            lines.append(f"  exits to the VMM: {s['exits_total_median']:.0f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """One horizontal bar per contender (median wall time, log scale); vmm bars split into phases.

    Needs matplotlib (``pip install 'vmm[plot]'``); raises ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders = report["contenders"]
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.65 * len(contenders)))
    floor = 0.1  # ms: the left edge of the log axis
    colours = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap
    legend_done: set[str] = set()
    labels = []
    finite = [c["summary"]["wall_ms"]["median"] for c in contenders if c["summary"]["wall_ms"]["median"]]
    right = max(finite) * 4 if finite else 1000.0
    for row, c in enumerate(contenders):
        labels.append(c["label"])
        s = c["summary"]
        median = s["wall_ms"]["median"]
        y = len(contenders) - 1 - row
        phases = s.get("phases_ms_median")
        if median is None:
            text = f"{c['status']}: {c['reason']}"
            ax.text(floor * 1.2, y, text[:110], va="center", fontsize=8, color="firebrick")
            continue
        if phases:
            segments = RESTORE_SEGMENTS if "state_loaded" in phases else SEGMENTS
            for label, start, end in segments:
                index = SEGMENT_LABELS.index(label)  # one colour per label in both kinds of bar
                if start in phases and end in phases and phases[end] > phases[start]:
                    left = max(phases[start], floor)
                    width = max(phases[end], floor) - left
                    ax.barh(y, width, left=left, color=colours[index % len(colours)],
                            label=label if label not in legend_done else None, edgecolor="white", linewidth=0.5)
                    legend_done.add(label)
            tail = phases.get("vmm_exited", 0)
            if median > tail:
                ax.barh(y, median - max(tail, floor), left=max(tail, floor), color="lightgrey",
                        label="process exit" if "process exit" not in legend_done else None)
                legend_done.add("process exit")
        else:
            ax.barh(y, median - floor, left=floor, color="slategray")
        ax.text(median * 1.1, y, _ms(median), va="center", fontsize=9)
    ax.set_yticks(range(len(contenders)))
    ax.set_yticklabels(list(reversed(labels)))
    ax.set_xscale("log")
    ax.set_xlim(floor, right)
    ax.set_xlabel("wall time to print a line and exit, ms (log scale; median of "
                  f"{report['runs']} run(s))")
    host = report.get("host", {})
    ax.set_title(f"vmm bench boot — {report['machine']}\n{host.get('kvm_description', '')}", fontsize=9)
    if legend_done:
        ax.legend(loc="lower right", fontsize=7, ncol=2)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_markdown(report: dict[str, Any]) -> str:
    """The summary as a Markdown table (for the README and docs/boot-time.md)."""
    lines = [f"Machine: {report['machine']} ({report.get('host', {}).get('kvm_description', '')}); "
             f"{report['runs']} interleaved run(s) each; job: {report['job']}.", "",
             "| contender | status | min | median | max | peak RSS |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for c in report["contenders"]:
        s = c["summary"]
        wall = s["wall_ms"]
        status = c["status"] if not c["reason"] else f"{c['status']}: {c['reason']}"
        lines.append(f"| {c['label']} | {status} | {_ms(wall['min'])} | {_ms(wall['median'])} | "
                     f"{_ms(wall['max'])} | {_mib(s['peak_rss_bytes_median'])} |")
    for c in report["contenders"]:
        s = c["summary"]
        phases = s.get("phases_ms_median")
        if not phases:
            continue
        lines += ["", f"{c['label']}, phases (median of each, ms after process start):", "",
                  "| phase | at | step |", "| --- | ---: | ---: |"]
        previous = 0.0
        for name, value in phases.items():
            lines.append(f"| `{name}` | {value:.1f} | +{value - previous:.1f} |")
            previous = value
        if s.get("vmm_overhead_bytes_median") is not None:
            lines += ["", f"Memory: peak RSS {_mib(s.get('peak_rss_bytes_median'))}, guest RAM touched "
                      f"{_mib(s.get('guest_touched_bytes_median'))}, VMM overhead "
                      f"{_mib(s.get('vmm_overhead_bytes_median'))}."]
    return "\n".join(lines)
