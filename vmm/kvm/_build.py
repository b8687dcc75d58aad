"""cffi API-mode builder: the KVM declarations and the C run loop, one module.

Struct layouts and ioctl numbers are never copied by hand: every struct below
ends in ``...;`` and every constant is ``#define NAME ...``, so the C compiler
fills them in from the real ``<linux/kvm.h>`` when the module is built
(cffi docs, "Letting the C compiler fill the gaps"). Only the fields vmm uses
are named.

Built by setuptools on ``pip install`` (see setup.py) into ``vmm.kvm._kvm``.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
KVM_CREATE_VCPU KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IRQFD KVM_IOEVENTFD
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_MSRS KVM_SET_MSRS KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_GET_TSC_KHZ KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2
KVM_GET_CLOCK KVM_SET_CLOCK KVM_SET_GUEST_DEBUG
""".split()

CONSTANTS = """
KVM_API_VERSION
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY
KVM_EXIT_INTR KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID
KVM_CAP_PIT2 KVM_CAP_IRQFD KVM_CAP_IOEVENTFD KVM_CAP_IMMEDIATE_EXIT KVM_CAP_MP_STATE
KVM_CAP_VCPU_EVENTS KVM_CAP_XSAVE KVM_CAP_READONLY_MEM KVM_CAP_COALESCED_MMIO
KVM_CAP_COALESCED_PIO KVM_CAP_NR_VCPUS KVM_CAP_MAX_VCPUS KVM_CAP_SET_IDENTITY_MAP_ADDR
KVM_CAP_SIGNAL_MSI KVM_CAP_IRQ_ROUTING KVM_CAP_SET_GUEST_DEBUG KVM_CAP_TSC_CONTROL
KVM_CAP_INTERNAL_ERROR_DATA KVM_CAP_X86_USER_SPACE_MSR
KVM_MEM_READONLY KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED
KVM_CAP_XCRS KVM_CAP_DEBUGREGS KVM_CAP_ADJUST_CLOCK KVM_CAP_GET_TSC_KHZ KVM_CAP_PIT_STATE2
KVM_CAP_TSC_DEADLINE_TIMER KVM_PIT_SPEAKER_DUMMY
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR
KVM_GUESTDBG_ENABLE KVM_GUESTDBG_SINGLESTEP KVM_GUESTDBG_USE_SW_BP KVM_GUESTDBG_USE_HW_BP
KVM_GUESTDBG_INJECT_BP KVM_GUESTDBG_INJECT_DB KVM_GUESTDBG_BLOCKIRQ KVM_CAP_SET_GUEST_DEBUG2
""".split()

CDEF = (
    """
/* The anonymous union of exits can't be "partial" in cffi: its members are
   spelled out exactly as in <linux/kvm.h>; cffi still checks every named
   field's offset against the compiler's. */
struct kvm_debug_exit_arch { uint32_t exception; uint32_t pad; uint64_t pc; uint64_t dr6;
                             uint64_t dr7; };
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                 uint64_t data_offset; } io;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint64_t nr; uint64_t args[6]; uint64_t ret; uint32_t longmode; } hypercall;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { struct kvm_debug_exit_arch arch; } debug;
        char padding[256];
    };
    ...;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
    ...;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable;
    ...;
};
struct kvm_dtable { uint64_t base; uint16_t limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    ...;
};
struct kvm_fpu { uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx;
                 uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp;
                 uint8_t xmm[16][16]; uint32_t mxcsr; ...; };
struct kvm_msr_entry { uint32_t index; uint64_t data; ...; };
struct kvm_msrs { uint32_t nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; ...; };
struct kvm_cpuid_entry2 { uint32_t function; uint32_t index; uint32_t flags;
                          uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; ...; };
struct kvm_cpuid2 { uint32_t nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_userspace_memory_region { uint32_t slot; uint32_t flags;
    uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_irq_level { uint32_t irq; uint32_t level; ...; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
struct kvm_ioeventfd { uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd;
                       uint32_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; ...; };
struct kvm_lapic_state { char regs[1024]; ...; };
/* Snapshot state: saved and restored as whole structs (the KVM ABI), so only
   the fields vmm reads itself are named. */
struct kvm_xsave { uint32_t region[1024]; ...; };
struct kvm_xcr { uint32_t xcr; uint64_t value; ...; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[16]; ...; };
struct kvm_debugregs { uint64_t dr6; uint64_t dr7; ...; };
struct kvm_guest_debug_arch { uint64_t debugreg[8]; };
struct kvm_guest_debug { uint32_t control; uint32_t pad; struct kvm_guest_debug_arch arch; };
struct kvm_irqchip { uint32_t chip_id; ...; };
struct kvm_pit_state2 { uint32_t flags; ...; };
struct kvm_clock_data { uint64_t clock; uint32_t flags; uint64_t realtime; uint64_t host_tsc; ...; };
struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending;
             uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    ...;
};
int ioctl(int fd, unsigned long request, ...);
"""
    + "".join(f"#define {name} ...\n" for name in IOCTLS + CONSTANTS)
    + (HERE / "runloop.h").read_text().split("#include <linux/kvm.h>", 1)[1]
    .replace("#endif", "")
)

SOURCE = """
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include "runloop.h"
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vmm.kvm._kvm",
    SOURCE,
    # setuptools wants paths relative to setup.py
    sources=["vmm/kvm/runloop.c"],
    include_dirs=["vmm/kvm"],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
)
