# firmware/exitbench.S - measure the cost of a VM exit (an `out` that traps).
#
# What it does
#   1. N = 32-bit `in` from BENCH_PORT (the VMM answers a constant it was
#      configured with); if N is 0, N = 100000.
#   2. N times: 8-bit `out` to BENCH_PORT.  Each one leaves the guest, goes
#      through KVM to the VMM's run loop, which discards it (in its C loop,
#      never reaching Python) and re-enters the guest.  The loop itself is
#      three instructions, so the time per iteration is essentially the cost of
#      one exit round trip.
#   3. Prints "exitbench: done\n" and exits with status 0.
#
# Expected serial output (COM1, port 0x3F8), exactly:
#     exitbench: done\n
# Exit status: 0.
# VM exits, exactly:   1 (the `in` of N)
#                   +  N (the `out`s to BENCH_PORT)
#                   + 16 (one per character of "exitbench: done\n")
#                   +  1 (the `out` to EXIT_PORT)
#                   = N + 18   (100018 with the default N = 100000).
# Time per exit ~= (run time of the VM) / N, for large N.
#
# Starts like every payload at the reset vector F000:FFF0 in 16-bit real mode
# (see hello.S for the details), and stays in real mode: the 32-bit registers
# (EAX, ECX) are usable there, the assembler adds an operand-size prefix.

.include "layout.inc"           # ports, mirrored from layout.py
.include "uart.inc"             # UART_PUTS: the string printer

.equ DEFAULT_N, 100000          # used when the VMM answers 0

    .code16
    .section .text

start:
    cli
    cld
    mov     %cs, %ax            # DS = CS = 0xF000, so labels are DS offsets
    mov     %ax, %ds
    xor     %ax, %ax            # stack at 0000:7000 (print uses call/ret)
    mov     %ax, %ss
    mov     $FIRMWARE_STACK, %sp

    # 1. How many exits?  `in %dx, %eax`: a 32-bit read of the port (exit #1).
    mov     $BENCH_PORT, %dx
    in      %dx, %eax
    test    %eax, %eax
    jnz     1f
    mov     $DEFAULT_N, %eax
1:  mov     %eax, %ecx          # ECX = N, a full 32-bit counter (`loop` would
                                # only count with CX in 16-bit code)

    # 2. The measured loop: N exits.  DX still holds BENCH_PORT.  The byte we
    # send does not matter (the VMM drops it); send 0.
    xor     %al, %al
2:  out     %al, %dx            # one VM exit
    dec     %ecx
    jnz     2b

    # 3. Report and stop.
    mov     $message, %si
    call    print16
    mov     $EXIT_PORT, %dx
    xor     %al, %al            # exit status 0
    out     %al, %dx
3:  hlt                         # not reached under vmm
    jmp     3b

# print16: write the NUL-terminated string at DS:SI to the UART (uart.inc).
print16:
    UART_PUTS

message:
    .asciz  "exitbench: done\n"

# Reset vector F000:FFF0: jump to the code above.
    .section .reset, "ax"
    .globl  reset_vector
reset_vector:
    ljmp    $RESET_CS_SELECTOR, $start
