"""Concurrency stress in the guest: many fork/exec/pipe loops at once, one boot.

On our PVM CI host, before guest-kernel/patches/0003-mm-pvm-populate-brk.patch,
about 1 in 8 exec'd static-glibc processes (busybox) died at start-up when other
processes ran at the same time: the first 16 bytes of the new process's TLS
block, copied by glibc's SSE memcpy into fresh brk memory, read back as zero
(segfault at address 0 in __ctype_init). See docs/pvm-concurrency.md. With
that many runs a regression shows up as failures > 0 with near certainty
(0.9**48 < 0.01).
"""

from __future__ import annotations

import re

import pytest

from tests.guest import vmm_run

pytestmark = [pytest.mark.boot, pytest.mark.kvm]

LOOPS = 4
ITERATIONS = 6
RUNS = LOOPS * ITERATIONS * 2  # each iteration: one exec, one pipeline

# Each loop is a subshell; each iteration execs static busybox (`true`) and
# runs `echo x | cat` (fork, pipe, exec), counting any non-zero status or wrong
# output. Each failure is also reported on its own line (the guest console).
STRESS = r"""
L=%(loops)d; N=%(iterations)d
cat /sys/module/kernel/parameters/pvm_brk_populate 2>/dev/null | sed 's/^/pvm_brk_populate=/'
i=0
while [ $i -lt $L ]; do
  (
    f=0; r=0; j=0
    while [ $j -lt $N ]; do
      /bin/busybox true; s=$?; r=$((r+1))
      [ $s -ne 0 ] && { f=$((f+1)); echo "stress: loop $i exec status $s" >&2; }
      o=$(echo x | cat); s=$?; r=$((r+1))
      [ "$o" != x ] && { f=$((f+1)); echo "stress: loop $i pipe status $s output '$o'" >&2; }
      j=$((j+1))
    done
    echo "$r $f" > /tmp/stress.$i
  ) &
  i=$((i+1))
done
wait
R=0; F=0
for x in /tmp/stress.*; do read r f < $x; R=$((R+r)); F=$((F+f)); done
echo "stress: runs=$R failures=$F"
[ $F -eq 0 ]
""" % {"loops": LOOPS, "iterations": ITERATIONS}


def test_concurrent_fork_exec_pipe_loops() -> None:
    """4 concurrent loops of exec + pipeline on 1 vCPU: every process starts and exits cleanly."""
    result = vmm_run("--cpus", "1", "--timeout", "540", "--", "sh", "-c", STRESS)
    out = result.stdout.decode().replace("\r", "")  # the serial console may send CRLF
    err = result.stderr.decode()
    summary = re.search(r"^stress: runs=(\d+) failures=(\d+)$", out, re.M)
    assert summary, f"no summary line (status {result.returncode}):\n{out}\n{err}"
    runs, failures = int(summary[1]), int(summary[2])
    assert runs == RUNS, out
    assert failures == 0, f"{failures} of {runs} runs failed:\n{out}\n{err}"
    assert result.returncode == 0, err
    # The guest kernel carries the workaround (patch 0003), and it is on.
    assert "pvm_brk_populate=Y" in out, out
