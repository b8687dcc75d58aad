"""The CPU model a guest sees (vmm/arch/x86_64/cpuid.py), checked leaf by leaf without KVM.

Inputs are KVM_GET_SUPPORTED_CPUID tables from an Intel and an AMD host
(tests/data/cpuid/: the AMD one recorded on our CI host, the Intel one written
from the SDM, each file says which), normalized for every vCPU of 1-, 2- and
4-vCPU VMs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.arch.x86_64 import cpuid
from vmm.arch.x86_64.cpuid import GuestCpu, normalize

DATA = Path(__file__).parent / "data" / "cpuid"
TSC_KHZ = 2_596_098


def load(name: str) -> list[cpuid.Entry]:
    rows = []
    for line in (DATA / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(tuple(int(field, 0) for field in line.split()))
    return rows


INTEL = load("intel-xeon-spr-kvm.txt")
AMD = load("amd-epyc-kvm-pvm.txt")
HOSTS = {"intel": INTEL, "amd": AMD}


def leaf(entries, function: int, index: int = 0) -> dict[str, int]:
    for f, i, flags, eax, ebx, ecx, edx in entries:
        if (f, i) == (function, index):
            return {"flags": flags, "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
    raise KeyError(f"leaf {function:#x}.{index} missing")


def has(entries, function: int, index: int = 0) -> bool:
    return any((f, i) == (function, index) for f, i, *_ in entries)


def tables(host: str, cpus: int, **options):
    return [normalize(HOSTS[host], GuestCpu(n, cpus, **options)) for n in range(cpus)]


def test_fixtures_name_their_vendor():
    assert cpuid.vendor(INTEL) == cpuid.INTEL
    assert cpuid.vendor(AMD) == cpuid.AMD


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_leaf1_identity(host, cpus):
    for n, table in enumerate(tables(host, cpus, tsc_khz=TSC_KHZ)):
        supported, got = leaf(HOSTS[host], 1), leaf(table.entries, 1)
        assert got["ebx"] >> 24 == n  # initial APIC id = vCPU index
        assert (got["ebx"] >> 16) & 0xFF == (1 if cpus == 1 else {2: 2, 4: 4}[cpus])
        assert got["ebx"] & 0xFFFF == supported["ebx"] & 0xFFFF  # CLFLUSH size, brand: kept
        assert bool(got["edx"] & cpuid.FEATURES_EDX_HTT) == (cpus > 1)
        assert got["eax"] == supported["eax"]  # family, model, stepping: the host's


@pytest.mark.parametrize("host", HOSTS)
def test_tsc_deadline_follows_the_capability(host):
    on = leaf(normalize(HOSTS[host], GuestCpu(0, 1, tsc_deadline=True)).entries, 1)["ecx"]
    off = leaf(normalize(HOSTS[host], GuestCpu(0, 1, tsc_deadline=False)).entries, 1)["ecx"]
    assert on & cpuid.FEATURES_ECX_TSC_DEADLINE
    assert not off & cpuid.FEATURES_ECX_TSC_DEADLINE
    assert on & ~cpuid.FEATURES_ECX_TSC_DEADLINE == off & ~cpuid.FEATURES_ECX_TSC_DEADLINE


def test_intel_tsc_deadline_was_not_reported_and_is_added():
    """The Intel fixture is KVM < 6.14: the bit comes from KVM_CAP_TSC_DEADLINE_TIMER."""
    assert not leaf(INTEL, 1)["ecx"] & cpuid.FEATURES_ECX_TSC_DEADLINE
    table = normalize(INTEL, GuestCpu(0, 1, tsc_deadline=True))
    assert any(c.function == 1 and c.register == "ecx" and "TSC-deadline" in c.why
               for c in table.changes)


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_intel_leaf4_caches_describe_cores_of_one_socket(cpus):
    cores = {1: 1, 2: 2, 4: 4}[cpus]
    for table in tables("intel", cpus):
        for index in range(4):
            supported, got = leaf(INTEL, 4, index), leaf(table.entries, 4, index)
            assert got["eax"] >> 26 == cores - 1
            level = (got["eax"] >> 5) & 7
            sharing = (got["eax"] >> 14) & 0xFFF
            assert sharing == (cores - 1 if level == 3 else 0), (index, level)
            assert got["eax"] & 0x3FFF == supported["eax"] & 0x3FFF  # type, level: kept
            assert (got["ebx"], got["ecx"], got["edx"]) == (
                supported["ebx"], supported["ecx"], supported["edx"])
        assert leaf(table.entries, 4, 4)["eax"] == 0  # the end of the list stays the end


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_x2apic_topology_leaves(host, cpus):
    shift = {1: 0, 2: 1, 4: 2}[cpus]
    for n, table in enumerate(tables(host, cpus)):
        for function in (0xB, 0x1F):
            if not has(HOSTS[host], function):
                continue
            smt, core, end = (leaf(table.entries, function, i) for i in range(3))
            assert (smt["eax"] & 0x1F, smt["ebx"], smt["ecx"] >> 8) == (0, 1, 1)  # 1 thread
            assert (core["eax"] & 0x1F, core["ebx"], core["ecx"] >> 8) == (shift, cpus, 2)
            assert (end["ebx"], end["ecx"] >> 8, end["ecx"] & 0xFF) == (0, 0, 2)
            assert smt["edx"] == core["edx"] == end["edx"] == n  # x2APIC id
            assert all(x["flags"] & cpuid.FLAG_SIGNIFICANT_INDEX for x in (smt, core, end))
            assert not has(table.entries, function, 3)


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_amd_topology_leaves(cpus):
    shift = {1: 0, 2: 1, 4: 2}[cpus]
    for n, table in enumerate(tables("amd", cpus)):
        sizes = leaf(table.entries, 0x80000008)
        assert sizes["ecx"] & 0xFF == cpus - 1  # NC
        assert (sizes["ecx"] >> 12) & 0xF == shift  # ApicIdCoreIdSize
        assert sizes["eax"] == leaf(AMD, 0x80000008)["eax"]  # address sizes: kept
        ext = leaf(table.entries, 0x8000001E)
        assert ext["eax"] == n  # extended APIC id
        assert ext["ebx"] & 0xFF == n and (ext["ebx"] >> 8) & 0xFF == 0  # core n, 1 thread
        assert ext["ecx"] & 0x7FF == 0  # node 0 of 1
        for index in range(4):
            eax = leaf(table.entries, 0x8000001D, index)["eax"]
            level = (eax >> 5) & 7
            assert (eax >> 14) & 0xFFF == ((1 << shift) - 1 if level == 3 else 0)


def test_amd_leaves_untouched_on_intel_and_intel_leaves_on_amd():
    intel = normalize(INTEL, GuestCpu(1, 2, tsc_khz=TSC_KHZ)).entries
    amd = normalize(AMD, GuestCpu(1, 2, tsc_khz=TSC_KHZ)).entries
    assert leaf(intel, 0x80000008) == leaf(INTEL, 0x80000008)
    assert leaf(amd, 0x15) == leaf(AMD, 0x15) and leaf(amd, 0x16) == leaf(AMD, 0x16)


def test_intel_tsc_frequency_leaves_give_the_exact_tsc_and_kvm_apic_clock():
    got = leaf(normalize(INTEL, GuestCpu(0, 1, tsc_khz=TSC_KHZ)).entries, 0x15)
    assert got["ecx"] * got["ebx"] // got["eax"] == TSC_KHZ * 1000  # the SDM's formula
    crystal_khz = got["ecx"] // 1000
    assert crystal_khz * got["ebx"] // got["eax"] == TSC_KHZ  # Linux's native_calibrate_tsc()
    assert got["ecx"] == cpuid.KVM_APIC_BUS_HZ  # Linux sets its LAPIC timer period from it
    freq = leaf(normalize(INTEL, GuestCpu(0, 1, tsc_khz=TSC_KHZ)).entries, 0x16)
    assert freq["eax"] == TSC_KHZ // 1000


def test_without_tsc_khz_frequency_leaves_stay_as_kvm_gave_them():
    entries = normalize(INTEL, GuestCpu(0, 1, tsc_khz=None)).entries
    assert leaf(entries, 0x15) == leaf(INTEL, 0x15)
    assert not has(entries, cpuid.LEAF_KVM_TIMING)


@pytest.mark.parametrize("host", HOSTS)
def test_kvm_leaves_on_hardware_kvm(host):
    entries = normalize(HOSTS[host], GuestCpu(0, 1, paravirt=True, tsc_khz=TSC_KHZ)).entries
    assert leaf(entries, 1)["ecx"] & cpuid.FEATURES_ECX_HYPERVISOR
    signature = leaf(entries, cpuid.LEAF_KVM_SIGNATURE)
    assert signature["eax"] == cpuid.LEAF_KVM_TIMING
    assert b"".join(signature[r].to_bytes(4, "little") for r in ("ebx", "ecx", "edx")) == \
        cpuid.KVM_SIGNATURE
    features = leaf(entries, cpuid.LEAF_KVM_FEATURES)["eax"]
    supported = leaf(HOSTS[host], cpuid.LEAF_KVM_FEATURES)["eax"]
    assert features & (1 << 3)  # kvmclock
    assert features & ~supported == 0  # nothing KVM does not offer
    assert not features & ((1 << 15) | (1 << 16) | (1 << 17))  # need vmm's help: withheld
    timing = leaf(entries, cpuid.LEAF_KVM_TIMING)
    assert (timing["eax"], timing["ebx"]) == (TSC_KHZ, 1_000_000)


def test_intel_fixture_offers_pv_features_vmm_withholds():
    supported = leaf(INTEL, cpuid.LEAF_KVM_FEATURES)["eax"]
    assert supported & (1 << 15) and supported & (1 << 16)


@pytest.mark.parametrize("host", HOSTS)
def test_pvm_guest_is_not_told_about_kvm(host):
    entries = normalize(HOSTS[host], GuestCpu(0, 2, paravirt=False, tsc_khz=TSC_KHZ)).entries
    assert not leaf(entries, 1)["ecx"] & cpuid.FEATURES_ECX_HYPERVISOR
    assert not any(f >> 28 == 0x4 for f, *_ in entries)


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_every_change_is_explained_and_nothing_else_moves(host, cpus):
    supported = {(f, i): rest for f, i, *rest in HOSTS[host]}
    for table in tables(host, cpus, tsc_deadline=True, tsc_khz=TSC_KHZ):
        changed = {(c.function, c.index) for c in table.changes}
        for change in table.changes:
            assert change.why
            assert change.old != change.new or change.register == ""
        for f, i, *rest in table.entries:
            if (f, i) not in changed:
                assert supported[f, i] == rest, f"leaf {f:#x}.{i} changed silently"
        # Leaf 7 (the feature flags a guest kernel picks code paths by) is the host's.
        assert leaf(table.entries, 7) == leaf(HOSTS[host], 7)


@pytest.mark.parametrize("host", HOSTS)
def test_apic_ids_unique_across_the_vm(host):
    ids = [leaf(t.entries, 1)["ebx"] >> 24 for t in tables(host, 4)]
    assert ids == [0, 1, 2, 3]


def test_snapshot_identity_ignores_per_cpu_fields_only():
    """Two KVM_GET_SUPPORTED_CPUID calls differ in the APIC id: the same CPU model."""
    other = [(f, i, fl, a, (b & 0x00FFFFFF) | (7 << 24) if f == 1 else b, c, d)
             for f, i, fl, a, b, c, d in AMD]
    assert cpuid.cpuid_features(other) == cpuid.cpuid_features(AMD)
    flipped = [(f, i, fl, a, b, c ^ (1 << 20) if f == 1 else c, d) for f, i, fl, a, b, c, d in AMD]
    assert cpuid.cpuid_features(flipped) != cpuid.cpuid_features(AMD)  # a feature: different
