# firmware/longmode.S - walk the x86 CPU from reset to 64-bit long mode.
#
# Expected serial output (COM1, port 0x3F8), exactly:
#     real mode\n
#     protected mode\n
#     long mode\n
# Exit status: 0.  (1 if a self-check fails: see "checks" below; the message
# then says which.)
# VM exits: 10 + 15 + 10 = 35 characters, one exit each, + 1 exit (EXIT_PORT)
#         = 36 exits.  Nothing else here traps to the VMM: control registers,
#         MSRs, lgdt and far jumps are all handled inside KVM.
#
# The three stages
# ----------------
#  1. 16-bit REAL MODE (how every x86 starts): address = segment*16 + offset.
#     We start at F000:FFF0 (physical 0xFFFF0, the `.reset` stub at the end of
#     this image), set up DS and a stack, print "real mode".
#  2. 32-bit PROTECTED MODE: load a GDT (Global Descriptor Table: describes the
#     segments), set CR0.PE, far-jump into a 32-bit code segment.  Segments now
#     have base 0 and 4 GiB limit ("flat"): an address is a linear address.
#     Print "protected mode".
#  3. 64-bit LONG MODE: needs paging.  Build identity-mapped page tables (linear
#     address = physical address) with 2 MiB pages, enable PAE (CR4), point CR3
#     at them, set EFER.LME (an MSR), turn on paging (CR0.PG).  The CPU is now
#     in long mode, but still running 32-bit "compatibility mode" code until we
#     far-jump into a code segment whose L (long) bit is set.  Print "long mode".
#
# Addresses: the one trap in this file
# ------------------------------------
# firmware.ld links everything as OFFSETS in segment 0xF000 (base 0xF0000):
# in real mode a label is its own address (with CS = DS = 0xF000).  Once the
# segments are flat (base 0), the same byte lives at linear address
# 0xF0000 + label.  So every absolute address used in 32-bit or 64-bit code is
# written `label + RESET_CS_BASE`.  (64-bit code can avoid this with
# RIP-relative addressing, which is position-independent: we use that there.)
#
# Checks: protected-mode code verifies CR0.PE is set; long-mode code reads the
# EFER MSR back and verifies EFER.LMA ("long mode active", set by the CPU, not
# by us).  Each failure prints a message and exits with status 1.
#
# Exceptions: while in 32-bit protected mode an IDT sends every CPU exception
# to a handler that prints what happened and exits with status 2, instead of
# the silent triple fault (KVM_EXIT_SHUTDOWN) you would otherwise get.  The one
# to expect: KVM refuses EFER.LME with #GP unless the VMM has told it, with
# KVM_SET_CPUID2, that the guest CPU has long mode (CPUID 0x80000001 EDX bit
# 29, "LM").  Then the output ends with
#     longmode: #GP on wrmsr EFER.LME: the VMM must give the vCPU CPUID 0x80000001 EDX.LM (KVM_SET_CPUID2)
# and the exit status is 2.  (The guest's own `cpuid` instruction may well
# report LM anyway: KVM checks its own copy of the CPUID table, not the CPU's.)

.include "layout.inc"           # ports and addresses, mirrored from layout.py
.include "uart.inc"             # UART_PUTS: the string printer, for every mode

# Bits and numbers from the Intel/AMD manuals (not guest layout, so not in layout.py)
.equ CR0_PE,     1 << 0         # protection enable
.equ CR0_PG,     1 << 31        # paging
.equ CR4_PAE,    1 << 5         # physical address extension (required for long mode)
.equ CR4_OSFXSR, 1 << 9         # the OS saves SSE state: SSE instructions allowed
.equ MXCSR_FZ,   0x9F80         # MXCSR's default (0x1F80) with flush-to-zero set
.equ MSR_EFER,   0xC0000080     # extended feature enable register
.equ EFER_LME,   1 << 8         # long mode enable (we set it)
.equ EFER_LMA,   1 << 10        # long mode active (the CPU sets it)
.equ PTE_P,      1 << 0         # page-table entry: present
.equ PTE_RW,     1 << 1         # writable
.equ PTE_PS,     1 << 7         # in a page-directory entry: a 2 MiB page
.equ MAPPED_2M_PAGES, 4         # identity map 4 x 2 MiB = the first 8 MiB

# Segment selectors = byte offsets of the descriptors in the GDT below.
.equ SEL_CODE32, 0x08
.equ SEL_DATA,   0x10
.equ SEL_CODE64, 0x18

.equ IDT_VECTORS, 32            # the CPU exceptions are vectors 0..31
.equ GATE_INTR32, 0x8E00        # present, ring 0, 32-bit interrupt gate (in bits 15:8)

# ==============================================================================
# Stage 1: 16-bit real mode
# ==============================================================================
    .code16
    .section .text

start16:
    cli                         # no interrupts: we have no IDT at any stage
    cld
    mov     %cs, %ax            # DS = CS = 0xF000: labels are DS offsets
    mov     %ax, %ds
    xor     %ax, %ax            # stack at 0000:7000 in low RAM
    mov     %ax, %ss
    mov     $FIRMWARE_STACK, %sp

    mov     $msg_real, %si
    call    print16

    # Load the GDT register.  `lgdtl` (the `l` = 32-bit operand size) reads a
    # 6-byte pseudo-descriptor from DS:gdt_pointer: a 16-bit limit and a full
    # 32-bit LINEAR base address.  (Without the `l`, a 16-bit lgdt only takes
    # 24 bits of the base; ours would fit, but 32 bits is the safe habit.)
    lgdtl   gdt_pointer

    # Set CR0.PE.  We are now in protected mode, but CS still holds the old
    # real-mode segment (base 0xF0000) until we reload it with a far jump.
    mov     %cr0, %eax
    or      $CR0_PE, %eax
    mov     %eax, %cr0

    # Far jump to the 32-bit code segment.  `ljmpl` = jump with a 32-bit
    # offset; the target is a LINEAR address because SEL_CODE32 has base 0.
    ljmpl   $SEL_CODE32, $(start32 + RESET_CS_BASE)

# print16: write the NUL-terminated string at DS:SI to the UART (uart.inc).
print16:
    UART_PUTS

# ==============================================================================
# Stage 2: 32-bit protected mode (flat segments, paging off)
# ==============================================================================
    .code32
start32:
    # Every data segment register must get a valid protected-mode selector.
    mov     $SEL_DATA, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %fs
    mov     %ax, %gs
    mov     %ax, %ss
    mov     $FIRMWARE_STACK, %esp   # same stack memory, now as a linear address

    # Check: CR0.PE must read back as set.
    mov     %cr0, %eax
    test    $CR0_PE, %eax
    jz      fail32_pe

    # An IDT so that a CPU exception prints a message instead of silently
    # resetting the VM (see "Exceptions" at the top).  A 32-bit interrupt
    # gate is 8 bytes:
    #   low dword:  selector (31:16) | handler offset 15:0 (15:0)
    #   high dword: handler offset 31:16 (31:16) | type 0x8E (15:8) | 0
    # The offset is split in two, which the linker cannot compute for us, so
    # the table is built here at run time, in RAM at FIRMWARE_IDT.
    mov     $(exception32 + RESET_CS_BASE), %eax
    mov     %eax, %edx
    and     $0xFFFF, %eax
    or      $(SEL_CODE32 << 16), %eax   # EAX = low dword of the gate
    and     $0xFFFF0000, %edx
    or      $GATE_INTR32, %edx          # EDX = high dword of the gate
    mov     $FIRMWARE_IDT, %edi
    mov     $IDT_VECTORS, %ecx
1:  mov     %eax, (%edi)                # the same handler for every vector
    mov     %edx, 4(%edi)
    add     $8, %edi
    loop    1b
    lidt    idt_pointer + RESET_CS_BASE

    mov     $(msg_protected + RESET_CS_BASE), %esi
    call    print32

    # --- Identity page tables, 2 MiB pages -----------------------------------
    # Three 4 KiB tables in low RAM, chained:
    #   PML4[0]  -> PDPT          (each PML4 entry covers 512 GiB)
    #   PDPT[0]  -> PD            (each PDPT entry covers 1 GiB)
    #   PD[i]    =  i * 2 MiB | present | writable | PS (a 2 MiB page)
    # RAM may hold garbage: zero all three pages first (3 * 4096 bytes).
    mov     $PML4, %edi
    xor     %eax, %eax
    mov     $(3 * 4096 / 4), %ecx
    rep stosl                   # ES:EDI, 4 bytes at a time (needs PML4, PDPTE,
                                # PDE to be the three consecutive pages they are)

    movl    $(PDPTE + PTE_P + PTE_RW), PML4     # PML4[0] -> PDPT
    movl    $(PDE + PTE_P + PTE_RW), PDPTE      # PDPT[0] -> PD
    # PD[0..MAPPED_2M_PAGES-1]: 8 bytes each; the high 4 bytes stay 0.
    mov     $PDE, %edi
    mov     $(PTE_P + PTE_RW + PTE_PS), %eax    # page 0 at physical 0
    mov     $MAPPED_2M_PAGES, %ecx
1:  mov     %eax, (%edi)
    add     $(2 << 20), %eax    # next 2 MiB
    add     $8, %edi            # next entry
    loop    1b

    # --- Enter long mode (the order is prescribed by the manuals) ------------
    mov     %cr4, %eax          # 1. PAE on: 64-bit page-table entries
    or      $CR4_PAE, %eax
    mov     %eax, %cr4

    mov     $PML4, %eax         # 2. CR3 = physical address of the PML4
    mov     %eax, %cr3

    mov     $MSR_EFER, %ecx     # 3. EFER.LME = 1: rdmsr/wrmsr move EDX:EAX
    rdmsr
    or      $EFER_LME, %eax
wrmsr_efer:                     # (the exception handler looks for this address)
    wrmsr

    # Our IDT holds 8-byte 32-bit gates; once long mode is active the CPU reads
    # 16-byte gates instead.  Rather than leave it a misread table, load an
    # empty IDT: from here on an exception shuts the VM down (triple fault).
    lidt    no_idt_pointer + RESET_CS_BASE

    mov     %cr0, %eax          # 4. paging on: with LME set this activates
    or      $CR0_PG, %eax       #    long mode (EFER.LMA becomes 1), still in
    mov     %eax, %cr0          #    32-bit compatibility mode

    # 5. Far jump into the 64-bit code segment (L = 1).  Our code at linear
    # 0xF0000 + start64 is identity mapped, so the jump lands on the same bytes.
    ljmp    $SEL_CODE64, $(start64 + RESET_CS_BASE)

# print32: write the NUL-terminated string at linear address ESI to the UART.
print32:
    UART_PUTS

fail32_pe:
    mov     $(msg_fail_pe + RESET_CS_BASE), %esi
    mov     $1, %bl             # exit status 1
    jmp     fail32

# exception32: every CPU exception in 32-bit mode comes here (interrupt gate:
# the CPU pushed EFLAGS, CS, EIP and, for some vectors such as #GP, an error
# code on top).  For the #GP we expect from wrmsr, the stack is
#   (%esp) = error code, 4(%esp) = EIP of the faulting instruction.
exception32:
    mov     $(msg_exception32 + RESET_CS_BASE), %esi
    cmpl    $(wrmsr_efer + RESET_CS_BASE), 4(%esp)
    jne     1f
    mov     $(msg_efer_gp + RESET_CS_BASE), %esi
1:  mov     $2, %bl             # exit status 2
fail32:                         # print the message at ESI, exit with status BL
    call    print32
    mov     %bl, %al
    mov     $EXIT_PORT, %dx
    out     %al, %dx
    hlt

# ==============================================================================
# Stage 3: 64-bit long mode
# ==============================================================================
    .code64
start64:
    # In 64-bit mode DS/ES/SS bases are ignored (treated as 0); the values we
    # loaded in protected mode are fine.  The stack pointer is now RSP.
    mov     $FIRMWARE_STACK, %esp   # writing ESP zero-extends into RSP

    # Check: EFER.LMA (set by the CPU) proves long mode is really active.
    mov     $MSR_EFER, %ecx
    rdmsr
    test    $EFER_LMA, %eax
    jz      fail64_lma

    # SSE's control register, there and back: x86-64 code needs SSE, and in kernel
    # mode PVM's emulator cannot run ldmxcsr/stmxcsr (vmm finishes them for the guest,
    # vmm/arch/x86_64/pvm.py, decoding each of these addressing forms).
    mov     %cr4, %rax
    or      $CR4_OSFXSR, %rax
    mov     %rax, %cr4
    ldmxcsr mxcsr_fz(%rip)      # RIP-relative (from this ROM)
    mov     %rsp, %r9
    stmxcsr -8(%r9)             # a REX.B base register, disp8
    mov     -8(%rsp), %eax      # (an SIB byte: RSP as the base)
    cmp     $MXCSR_FZ, %eax
    jne     fail64_mxcsr

    lea     msg_long(%rip), %rsi    # RIP-relative: no RESET_CS_BASE needed
    call    print64

    xor     %eax, %eax          # exit status 0
exit64:
    mov     $EXIT_PORT, %dx
    out     %al, %dx
1:  hlt                         # not reached under vmm
    jmp     1b

fail64_lma:
    lea     msg_fail_lma(%rip), %rsi
    call    print64
    mov     $1, %eax
    jmp     exit64

fail64_mxcsr:
    lea     msg_fail_mxcsr(%rip), %rsi
    call    print64
    mov     $1, %eax
    jmp     exit64

# print64: write the NUL-terminated string at RSI to the UART.
print64:
    UART_PUTS

# ==============================================================================
# Data (read-only: this image is our "ROM")
# ==============================================================================
msg_real:       .asciz "real mode\n"
msg_protected:  .asciz "protected mode\n"
msg_long:       .asciz "long mode\n"
msg_fail_pe:    .asciz "longmode: CR0.PE not set after entering protected mode\n"
msg_fail_lma:   .asciz "longmode: EFER.LMA not set after enabling paging\n"
msg_fail_mxcsr: .asciz "longmode: MXCSR did not read back what ldmxcsr wrote\n"
    .balign 4
mxcsr_fz:       .long MXCSR_FZ
msg_exception32: .asciz "longmode: unexpected CPU exception in 32-bit protected mode\n"
msg_efer_gp:    .asciz "longmode: #GP on wrmsr EFER.LME: the VMM must give the vCPU CPUID 0x80000001 EDX.LM (KVM_SET_CPUID2)\n"

# The GDT.  Each descriptor is 8 bytes; the packed layout is historical:
#   limit 15:0 | base 23:0 | access byte | flags:4 + limit 19:16 | base 31:24
# Access 0x9A = present, ring 0, code, readable; 0x92 = present, ring 0, data,
# writable.  Flags 0xC = 4 KiB granularity + 32-bit (D) -> 4 GiB flat 32-bit;
# flags 0xA = 4 KiB granularity + long (L): a 64-bit code segment (D must be 0).
    .balign 8
gdt:
    .quad   0                       # 0x00: the mandatory null descriptor
    .quad   0x00CF9A000000FFFF      # 0x08: SEL_CODE32, base 0, limit 4 GiB
    .quad   0x00CF92000000FFFF      # 0x10: SEL_DATA,   base 0, limit 4 GiB
    .quad   0x00AF9A000000FFFF      # 0x18: SEL_CODE64 (base/limit ignored)
gdt_end:

# The operand of `lgdtl`: limit (size - 1), then the LINEAR address of gdt.
gdt_pointer:
    .word   gdt_end - gdt - 1
    .long   gdt + RESET_CS_BASE

# The operands of the two `lidt`s: our exception table, then an empty one.
idt_pointer:
    .word   IDT_VECTORS * 8 - 1
    .long   FIRMWARE_IDT
no_idt_pointer:
    .word   0
    .long   0

# ==============================================================================
# Reset vector: F000:FFF0, the first instruction the CPU executes.
# ==============================================================================
    .section .reset, "ax"
    .code16
    .globl  reset_vector
reset_vector:
    ljmp    $RESET_CS_SELECTOR, $start16
