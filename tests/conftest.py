"""Shared test set-up: the `kvm` and `boot` markers, and the count of KVM tests that ran.

Tests marked ``kvm`` (need /dev/kvm) or ``boot`` (boot a Linux guest, so need
/dev/kvm too) **fail** with the reason when /dev/kvm is missing or unusable:
they never skip. A test suite that silently skips every VM test on a machine
without KVM would be green and prove nothing.

A test that asks for the ``kvm`` fixture (an open :class:`vmm.kvm.system.Kvm`)
is marked ``kvm`` automatically.

The session starts by installing the system packages the tests run programs
from (tests/packages.py), as root on Debian, when any is missing, and runs on
a snapshot cache of its own (``private_snapshot_cache``): the guests it boots
restore or boot cold by what this session did, not by what an earlier run or
the user left in ~/.cache/vmm, and it leaves no snapshots there.

Every test phase (set-up, call, tear-down) has a time limit, a backstop for a
test that would wait forever on a guest or a peer: 120 s, or BOOT_TIMEOUT +
300 s for a kvm/boot test (its own subprocess timeouts fire first), or what its
``time_limit(seconds)`` marker says. Past it the test fails with where it was.

When ``VMM_KVM_TESTS_REPORT`` names a file, the number of ``kvm``/``boot`` tests
that *passed* is written there at the end of the session (one integer and a
newline). ``.ci/run`` reads it to prove the VM tests really ran.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

KVM_MARKERS = ("kvm", "boot")
REPORT_ENV = "VMM_KVM_TESTS_REPORT"
# For tests of this file only: probe another device instead of /dev/kvm.
DEVICE_ENV = "VMM_TEST_KVM_DEVICE"

_kvm_nodeids: set[str] = set()
_kvm_passed: set[str] = set()
_kvm_problem: list[str | None] = []  # cached result of the /dev/kvm probe


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so the markers exist even when
    # pytest runs with another rootdir/inifile.
    config.addinivalue_line("markers", "kvm: needs /dev/kvm (fails, never skips, when it is missing)")
    config.addinivalue_line("markers", "boot: boots a Linux guest (needs /dev/kvm; slow on PVM hosts)")
    config.addinivalue_line("markers", "time_limit(seconds): this test's own time limit per phase")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Install the tests' system packages (tests/packages.py): as root on Debian, once."""
    from tests.packages import PACKAGES
    from vmm.errors import VmmError
    from vmm.images.host import ensure_packages

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def progress(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"tests: {line} (tests/packages.py)")

    try:
        ensure_packages(list(PACKAGES), progress)
    except VmmError as e:  # not root, or apt failed: the tests that need one say which
        progress(str(e))


# Cache entries that are builds (minutes to make, the same for every session): shared.
# The rest (snapshots, container bases) is the session's own.
SHARED_BUILDS = ("kernel", "busybox", "initramfs", "firmware", "debian")


@pytest.fixture(scope="session", autouse=True)
def private_snapshot_cache(tmp_path_factory):
    """VMM_CACHE_DIR for the session: its own snapshots, the user's builds (symlinks)."""
    from vmm.cache import cache_dir

    shared = cache_dir()
    private = tmp_path_factory.mktemp("vmm-cache")
    for name in SHARED_BUILDS:
        (shared / name).mkdir(parents=True, exist_ok=True)
        (private / name).symlink_to(shared / name)
    saved = os.environ.get("VMM_CACHE_DIR")
    os.environ["VMM_CACHE_DIR"] = str(private)
    yield private
    if saved is None:
        os.environ.pop("VMM_CACHE_DIR", None)
    else:
        os.environ["VMM_CACHE_DIR"] = saved


def _needs_kvm(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) for name in KVM_MARKERS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kvm" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("kvm"):
            item.add_marker(pytest.mark.kvm)
        if _needs_kvm(item):
            _kvm_nodeids.add(item.nodeid)


def kvm_problem() -> str | None:
    """None when /dev/kvm opens, speaks API 12 and creates a VM; else why not."""
    if not _kvm_problem:
        from vmm.errors import VmmError
        from vmm.kvm.system import Kvm

        try:
            with Kvm(os.environ.get(DEVICE_ENV) or "/dev/kvm") as kvm:
                kvm.create_vm().close()
            _kvm_problem.append(None)
        except VmmError as e:
            _kvm_problem.append(str(e))
    return _kvm_problem[0]


@pytest.fixture(autouse=True)
def _require_kvm(request: pytest.FixtureRequest) -> None:
    """Fail (never skip) a kvm/boot test when /dev/kvm cannot run a VM."""
    if _needs_kvm(request.node):
        problem = kvm_problem()
        if problem is not None:
            pytest.fail(f"this test needs a usable /dev/kvm: {problem}", pytrace=False)


@pytest.fixture
def kvm():
    """An open /dev/kvm (the test is marked ``kvm``)."""
    from vmm.kvm.system import Kvm

    with Kvm() as handle:
        yield handle


PLAIN_TIME_LIMIT = 120


def time_limit(item: pytest.Item) -> float:
    from tests.guest import BOOT_TIMEOUT

    marker = item.get_closest_marker("time_limit")
    if marker is not None:
        return float(marker.args[0])
    return BOOT_TIMEOUT + 300 if _needs_kvm(item) else PLAIN_TIME_LIMIT


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _time_limited(item, "set-up"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _time_limited(item, "call"):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    with _time_limited(item, "tear-down"):
        yield


class _time_limited:
    """SIGALRM after the limit: the test fails where it waits (the main thread's blocking
    calls are interrupted by the handler's exception), with the traceback."""

    def __init__(self, item: pytest.Item, phase: str) -> None:
        self.limit, self.what = time_limit(item), f"{item.nodeid} ({phase})"

    def _expired(self, signum, frame) -> None:
        pytest.fail(f"{self.what}: over its time limit of {self.limit:.0f} s", pytrace=True)

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGALRM, self._expired)
        signal.setitimer(signal.ITIMER_REAL, self.limit)

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _kvm_nodeids:
        return
    if report.when == "call" and report.passed:
        _kvm_passed.add(report.nodeid)
    elif report.failed:  # a failing teardown un-counts the test
        _kvm_passed.discard(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(REPORT_ENV)
    if target:
        Path(target).write_text(f"{len(_kvm_passed)}\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _kvm_nodeids:
        terminalreporter.write_line(
            f"kvm/boot tests: {len(_kvm_passed)} of {len(_kvm_nodeids)} collected passed"
        )
