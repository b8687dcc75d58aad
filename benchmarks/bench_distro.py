#!/usr/bin/env python3
"""Debian 12 as it ships, booted by vmm and by QEMU side by side: phase by phase to login.

    python3 benchmarks/bench_distro.py [--only vmm|qemu] [--out FILE] [--timeout S]

One root (vmm/images/debian.py: mmdebstrap bookworm minbase + systemd-sysv, udev,
linux-image-cloud-amd64, initramfs-tools, autologin on ttyS0), one fresh disk image
per contender, Debian's own kernel and initramfs, 512 MiB, one vCPU:

vmm         `vmm run --kernel vmlinuz --initrd initrd.img --disk root.img
            --cmdline 'root=/dev/vda ro'` (decompressed on the host, ACPI, on PVM
            the command-line diet of vmm/arch/x86_64/pvm.py); stopped by SIGTERM
            (the ACPI power button)
qemu-tcg    QEMU `-M microvm,acpi=on -accel tcg`, a virtio-blk-device: the same kernel
            and initramfs, every guest instruction translated by TCG; stopped by
            `poweroff` typed at its shell (QEMU has no power button on SIGTERM)

For each: when the console showed the kernel's first line, /init of the initramfs,
systemd's welcome, the login prompt and the shell; `systemd-analyze time` from
inside; and the stop. The machine and the KVM flavour head the report. A boot on
PVM takes minutes (its guest kernel code runs in KVM's emulator); QEMU is installed
with apt-get when missing (qemu-system-x86).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vmm.bench.console import Console  # noqa: E402
from vmm.bench.phases import host_facts, machine_line  # noqa: E402

PROMPT = b"root@debian:~# "
CMDLINE = "root=/dev/vda ro"


def vmm_argv(system, disk: Path) -> list[str]:
    return [sys.executable, "-m", "vmm", "run", "--kernel", str(system.kernel), "--initrd",
            str(system.initrd), "--disk", str(disk), "--mem", "512M", "--cmdline", CMDLINE]


def qemu_argv(system, disk: Path) -> list[str]:
    from vmm.images.host import ensure_packages

    ensure_packages(["qemu-system-x86"], lambda line: print(f"[bench_distro] {line}",
                                                           file=sys.stderr))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise RuntimeError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    return [qemu, "-M", "microvm,acpi=on", "-accel", "tcg", "-m", "512M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(system.kernel), "-initrd", str(system.initrd),
            "-append", f"console=ttyS0 {CMDLINE}",
            "-drive", f"id=root,file={disk},format=raw,if=none",
            "-device", "virtio-blk-device,drive=root"]


def boot(name: str, argv: list[str], stop, timeout: float) -> dict:
    """Boot to the shell, ask systemd how long it took, stop; the phases in seconds."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=stderr)
        console = Console(process, started)
        result: dict = {"contender": name, "argv": argv}
        try:
            console.wait_for(PROMPT, 0, timeout)
            result["shell_s"] = round(time.monotonic() - started, 2)
            result["systemd_analyze"] = console.run("analyze", "systemd-analyze time")
            asked = time.monotonic()
            stop(process, console)
            result["status"] = process.wait(timeout=300)
            result["stop_s"] = round(time.monotonic() - asked, 2)
        except (AssertionError, subprocess.TimeoutExpired) as e:
            result["error"] = str(e)[-1500:]
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            console.finish()
            stderr.seek(0)
            result["stderr"] = stderr.read().decode(errors="replace")[-1500:]
    result["milestones_s"] = {k: None if v is None else round(v, 2)
                              for k, v in console.milestones().items()}
    return result


def stop_vmm(process, console) -> None:
    process.send_signal(signal.SIGTERM)  # vmm presses the ACPI power button


def stop_qemu(process, console) -> None:
    console.type("poweroff")


def table(results: list[dict]) -> str:
    phases = ["kernel", "initramfs", "systemd", "login"]
    head = f"{'':22}" + "".join(f"{p:>11}" for p in phases) + f"{'shell':>9}{'stop':>8}"
    lines = [head, "  (seconds from the VMM's start until the console showed each)"]
    for r in results:
        marks = r.get("milestones_s", {})
        cells = "".join(f"{marks.get(p) if marks.get(p) is not None else '-':>11}"
                        for p in phases)
        lines.append(f"{r['contender']:22}{cells}{r.get('shell_s', '-'):>9}"
                     f"{r.get('stop_s', '-'):>8}")
        if "error" in r:
            lines.append(f"  error: {r['error'].splitlines()[0]}")
    return "\n".join(lines)


def main() -> int:
    from vmm.images.debian import AUTOLOGIN, debian_disk, debian_system

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["vmm", "qemu"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--timeout", type=float, default=1500, help="seconds to the shell")
    args = parser.parse_args()

    host = host_facts()
    print(f"[bench_distro] {machine_line(host)}", file=sys.stderr)
    system = debian_system(lambda line: print(f"[bench_distro] {line}", file=sys.stderr))
    contenders = [("vmm", vmm_argv, stop_vmm), ("qemu-tcg", qemu_argv, stop_qemu)]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-distro-") as tmp:
        for name, argv, stop in contenders:
            if args.only and not name.startswith(args.only):
                continue
            disk = debian_disk(system, Path(tmp) / f"{name}.img", 2 << 30, AUTOLOGIN)
            print(f"[bench_distro] {name} ...", file=sys.stderr, flush=True)
            try:
                results.append(boot(name, argv(system, disk), stop, args.timeout))
            except Exception as e:  # one broken contender must not lose the other's figures
                results.append({"contender": name, "error": f"{type(e).__name__}: {e}"})
            disk.unlink()
    report = {"host": host, "results": results}
    print(json.dumps(report, indent=2))
    print(f"\n{machine_line(host)}\n{table(results)}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
