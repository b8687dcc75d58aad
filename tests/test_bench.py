"""vmm run --boot-timer/--metrics and vmm bench boot.

Fast tests: the phase maths, /proc/self/stat parsing, the bench report's JSON
schema with cheap contenders, a failing contender reported (not raised).
Boot tests (two Linux boots, ~35 s each on an idle PVM host): one
`vmm run --boot-timer --metrics` (phase order, boot timer at init), one
`vmm bench boot --runs 1` with a cheap subset plus one vmm boot.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmm.arch.x86_64.layout import DEFAULT_MEM
from vmm.bench import boot as bench_boot
from vmm.bench import phases
from vmm.bench.report import format_table

LINE = bench_boot.LINE


# --- phases, no VM --------------------------------------------------------------------

def test_proc_stat_parsing_survives_a_command_name_with_spaces_and_parentheses():
    fields = ["S"] + ["0"] * 18 + ["12345"] + ["0"] * 20  # state, ..., starttime is the 20th after comm
    text = "4242 (we ird) (name) " + " ".join(fields)
    start = phases.proc_start_ns(text)
    assert start is not None
    # starttime 12345 ticks; the result is on CLOCK_MONOTONIC, i.e. shifted by the suspended time only.
    import os
    import time

    hz = os.sysconf("SC_CLK_TCK")
    suspended = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
    assert abs(start - (12345 * 10**9 // hz - suspended)) < 50_000_000


def test_process_start_of_this_process_is_before_now_and_plausible():
    import time

    start, source = phases.process_start()
    now = time.monotonic_ns()
    assert start is not None and start <= now
    assert "proc" in source or "VMM_SPAWN_NS" in source


def test_spawn_time_from_the_parent_is_used_only_when_plausible(monkeypatch):
    import time

    proc = phases.proc_start_ns()
    monkeypatch.setenv(phases.SPAWN_ENV, str(proc + 1000))
    start, source = phases.process_start(cli_start=time.monotonic_ns())
    assert start == proc + 1000 and phases.SPAWN_ENV in source
    monkeypatch.setenv(phases.SPAWN_ENV, str(proc + 3 * 10**9))  # far from /proc's figure: ignored
    start, source = phases.process_start(cli_start=None)
    assert start != proc + 3 * 10**9
    monkeypatch.setenv(phases.SPAWN_ENV, "junk")
    assert phases.process_start()[0] is not None


def test_relative_ms_keeps_the_phase_order_and_boot_time_is_process_start_to_init():
    raw = {"vmm_exited": 9_000_000, "process_start": 1_000_000, "init_reached": 5_000_000,
           "first_kvm_run": 3_000_000, "first_output": 0}
    rel = phases.relative_ms(raw)
    assert list(rel) == ["process_start", "first_kvm_run", "init_reached", "vmm_exited"]  # 0 = missing
    assert rel == {"process_start": 0.0, "first_kvm_run": 2.0, "init_reached": 4.0, "vmm_exited": 8.0}
    assert phases.boot_time_us(raw) == 4000
    assert phases.boot_time_us({"process_start": 1}) is None


def test_guest_facts_read_our_kernel_cache_layout(tmp_path):
    (tmp_path / "vmlinux").write_bytes(b"\0" * 64 + b"Linux version 6.1.99 (x@y) #1\0")
    (tmp_path / "config").write_text("CONFIG_X=y\n")
    facts = phases.guest_facts(tmp_path / "vmlinux", "vmlinux (PVH)", 512 << 20, 1)
    assert facts["kernel_release"] == "6.1.99"  # no version file: read from the image
    assert len(facts["kernel_config_sha256"]) == 64
    (tmp_path / "version").write_text("6.1.100\n")
    assert phases.guest_facts(tmp_path / "vmlinux")["kernel_release"] == "6.1.100"


def test_host_facts_name_the_kvm_flavour():
    host = phases.host_facts()
    assert host["kvm_flavour"] in ("pvm", "intel", "amd", "unknown")
    assert host["cores"] >= 1 and host["cpu_model"]
    assert host["kvm_flavour"] in phases.machine_line(host)


# --- bench, cheap contenders ----------------------------------------------------------

class FailingContender(bench_boot.Contender):
    name = "broken"
    label = "a contender that fails"

    def argv(self, run_dir):
        return [sys.executable, "-c", "import sys; print('no line here'); sys.exit(3)"]


class MissingToolContender(bench_boot.Contender):
    name = "missing"
    label = "a contender whose binary is absent"

    def argv(self, run_dir):
        return ["/nonexistent/vmm-bench-tool"]


class SkippedContender(bench_boot.Contender):
    name = "skipped"
    label = "a contender that cannot be set up"

    def prepare(self, workdir):
        return "tool X not installed"


class RaisingContender(bench_boot.Contender):
    name = "raising"
    label = "a contender whose set-up raises"

    def prepare(self, workdir):
        raise RuntimeError("boom")


class SlowContender(bench_boot.Contender):
    name = "slow"
    label = "a contender that hangs"

    def argv(self, run_dir):
        return [sys.executable, "-c", "import time; time.sleep(30)"]


def check_report_schema(report: dict) -> None:
    assert report["schema"] == bench_boot.SCHEMA
    assert isinstance(report["runs"], int) and report["runs"] >= 1
    assert set(report["host"]) >= {"cpu_model", "cores", "host_kernel", "kvm_flavour", "kvm_description"}
    assert report["host"]["kvm_flavour"] in report["machine"]
    for c in report["contenders"]:
        assert set(c) >= {"name", "label", "kind", "status", "reason", "timeout_s", "summary", "runs"}
        assert c["status"] in ("ok", "partial", "failed", "skipped")
        assert c["kind"] in ("vm", "container", "process")
        s = c["summary"]
        assert set(s["wall_ms"]) == {"min", "median", "max"}
        assert s["runs_ok"] + s["runs_failed"] == len(c["runs"])
        if s["runs_ok"]:
            assert s["wall_ms"]["min"] <= s["wall_ms"]["median"] <= s["wall_ms"]["max"]
        else:
            assert s["wall_ms"]["median"] is None and c["reason"]
        for run in c["runs"]:
            assert set(run) >= {"ok", "wall_ms", "reason", "exit_status", "peak_rss_bytes"}
            assert run["ok"] or run["reason"]
    json.dumps(report)  # serialisable as is


def test_failing_contenders_are_reported_not_raised():
    contenders = [bench_boot.ProcessContender(), FailingContender(), MissingToolContender(),
                  SkippedContender(), RaisingContender(), SlowContender(timeout=1.0)]
    report = bench_boot.run_bench(contenders, runs=2)
    check_report_schema(report)
    by_name = {c["name"]: c for c in report["contenders"]}
    assert by_name["process"]["status"] == "ok" and by_name["process"]["summary"]["runs_ok"] == 2
    broken = by_name["broken"]
    assert broken["status"] == "failed" and "exit status 3" in broken["reason"]
    assert len(broken["runs"]) == 1 and "not retried" in broken["reason"]  # failed first run: given up
    assert by_name["missing"]["status"] == "failed" and "cannot run" in by_name["missing"]["reason"]
    assert by_name["skipped"] == {**by_name["skipped"], "status": "skipped", "reason": "tool X not installed",
                                  "runs": []}
    assert by_name["raising"]["status"] == "skipped" and "boom" in by_name["raising"]["reason"]
    assert by_name["slow"]["status"] == "failed" and "timed out after 1 s" in by_name["slow"]["reason"]
    table = format_table(report)
    assert "tool X not installed" in table and report["machine"] in table


def test_runs_are_interleaved_round_robin():
    order = []

    class Recording(bench_boot.ProcessContender):
        def argv(self, run_dir):
            order.append(self.name)
            return super().argv(run_dir)

    a, b, c = Recording(), Recording(), Recording()
    a.name, b.name, c.name = "a", "b", "c"
    bench_boot.run_bench([a, b, c], runs=3)
    # Each round starts one later; the last entries are the untimed RSS probes.
    assert order[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_unknown_contender_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vmm", "bench", "boot", "--contenders", "vmm,nope"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "nope" in result.stderr


def test_cli_cheap_contenders_json_and_table(tmp_path):
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, "-m", "vmm", "bench", "boot", "--runs", "2", "-q",
                             "--contenders", "process,unshare,qemu-kvm", "--timeout", "qemu-kvm=3",
                             "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    check_report_schema(report)
    assert [c["name"] for c in report["contenders"]] == ["process", "unshare", "qemu-kvm"]
    assert report["contenders"][0]["status"] == "ok"
    assert "process (fork/exec)" in result.stdout and report["machine"] in result.stdout
    # qemu-kvm: skipped (no QEMU) or failed (PVM) or ok (hardware KVM): always reported, never raised.
    assert report["contenders"][2]["status"] in ("ok", "failed", "skipped")


# --- boots ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("metrics") / "metrics.json"
    result = subprocess.run([sys.executable, "-m", "vmm", "run", "--cold", "--boot-timer", "--metrics",
                             str(path), "--timeout", "280", "--", "echo", LINE],
                            capture_output=True, text=True, timeout=300)
    return result, path


@pytest.mark.boot
@pytest.mark.kvm
def test_metrics_json_schema(metrics_run):
    result, path = metrics_run
    assert result.returncode == 0, result.stderr
    assert LINE in result.stdout
    metrics = json.loads(path.read_text())
    assert metrics["schema"] == phases.SCHEMA
    assert metrics["status"] == 0 and metrics["command"] == ["echo", LINE]
    assert metrics["start"] == "cold"
    assert set(metrics["host"]) >= {"cpu_model", "cores", "host_kernel", "kvm_flavour"}
    guest = metrics["guest"]
    assert guest["kernel_release"] and len(guest["kernel_config_sha256"]) == 64
    assert guest["ram_bytes"] == DEFAULT_MEM and guest["vcpus"] == 1
    assert guest["kernel_format"] == "vmlinux (PVH)"
    memory = metrics["memory"]
    assert 0 < memory["guest_touched_bytes"] <= memory["guest_ram_bytes"]
    assert memory["peak_rss_bytes"] > memory["guest_touched_bytes"]
    assert memory["vmm_overhead_bytes"] == memory["peak_rss_bytes"] - memory["guest_touched_bytes"]
    assert metrics["exits"]["exits_total"] > 0


@pytest.mark.boot
@pytest.mark.kvm
def test_phases_are_all_there_and_in_order(metrics_run):
    result, path = metrics_run
    metrics = json.loads(path.read_text())
    assert list(metrics["phases_ms"]) == list(phases.PHASES)
    ns = [metrics["phases_ns"][name] for name in phases.PHASES]
    assert ns == sorted(ns), metrics["phases_ms"]
    assert metrics["phases_ms"]["process_start"] == 0.0


@pytest.mark.boot
@pytest.mark.kvm
def test_boot_timer_marks_init_exactly_when_it_runs(metrics_run):
    result, path = metrics_run
    metrics = json.loads(path.read_text())
    p = metrics["phases_ms"]
    # /init writes 1 after the kernel ran (after the first KVM_RUN) and before the command
    # printed anything (quiet kernel: the command's line is the first serial output) ...
    assert p["first_kvm_run"] < p["init_reached"] <= p["first_output"] <= p["command_done"]
    # ... and 2 after the command, before the exit port ends the VM.
    assert p["command_done"] <= p["guest_finished"]
    assert metrics["guest_boot_time_us"] == round(p["init_reached"] * 1000) or \
        abs(metrics["guest_boot_time_us"] - p["init_reached"] * 1000) <= 1
    # --boot-timer: one summary line on stderr, then the phases
    lines = result.stderr.splitlines()
    summary = [line for line in lines if line.startswith("Guest-boot-time = ")]
    assert summary == [f"Guest-boot-time = {metrics['guest_boot_time_us']} us"]
    assert any("init_reached" in line for line in lines)


@pytest.mark.boot
@pytest.mark.kvm
def test_bench_boot_end_to_end(tmp_path):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    command = [sys.executable, "-m", "vmm", "bench", "boot", "--runs", "1",
               "--contenders", "vmm,unshare,process", "--json", str(out)]
    try:
        import matplotlib  # noqa: F401

        command += ["--plot", str(png)]
    except ImportError:
        png = None
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    check_report_schema(report)
    vmm = report["contenders"][0]
    assert vmm["name"] == "vmm" and vmm["status"] == "ok", vmm["reason"]
    run = vmm["runs"][0]
    assert run["guest_boot_time_us"] > 0 and run["exits_total"] > 0
    assert run["phases_ms"]["first_kvm_run"] < run["phases_ms"]["init_reached"] < run["wall_ms"]
    assert vmm["summary"]["vmm_overhead_bytes_median"] > 0
    assert "Guest-boot-time" in result.stdout
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_are_checked_before_the_benchmark_runs(tmp_path, monkeypatch):
    """An unwritable --json/--plot, or --plot without matplotlib: one line, before any run."""
    from click.testing import CliRunner

    from vmm.cli import main

    ran = []
    monkeypatch.setattr("vmm.bench.boot.run_bench", lambda *a, **k: ran.append(1))
    for option in ("--json", "--plot"):
        result = CliRunner().invoke(main, ["bench", "boot", "--contenders", "process", option,
                                           str(tmp_path / "missing" / "out")])
        assert result.exit_code == 125 and result.output.startswith(f"vmm: {option} ")
        assert "cannot write: No such file or directory" in result.output
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = CliRunner().invoke(main, ["bench", "boot", "--contenders", "process", "--plot",
                                       str(tmp_path / "out.png")])
    assert result.exit_code == 125 and "--plot needs matplotlib" in result.output
    assert ran == [] and not (tmp_path / "out.png").exists()


def test_bench_help_names_every_contender():
    from click.testing import CliRunner

    from vmm.bench.boot import ALL_CONTENDERS
    from vmm.cli import main

    result = CliRunner().invoke(main, ["bench", "boot", "--help"], terminal_width=400)
    listed = result.output.split("Which to run:")[1].split("or all")[0]
    assert [name.strip() for name in listed.split(",") if name.strip()] == list(ALL_CONTENDERS)
