# firmware/hello.S - the smallest useful guest: print one line, then exit.
#
# Expected serial output (COM1, port 0x3F8), exactly:
#     Hello from the guest!\n
# Exit status: 0.
# VM exits: 22 (one per character, each `out` to the UART traps to the VMM)
#         +  1 (the `out` to EXIT_PORT) = 23 exits in total.
#
# How we get here
# ---------------
# The VMM copies this image so that its last byte is at physical 0xFFFFF (just
# below 1 MiB) and starts the vCPU exactly like a PC after power-on:
#   * 16-bit real mode: an address is segment * 16 + offset;
#   * CS = 0xF000 (segment base 0xF0000), IP = 0xFFF0, so the first
#     instruction is at physical 0xFFFF0: the last 16 bytes of this image,
#     our `.reset` section (see firmware.ld);
#   * interrupts off, and NO stack: SS:SP point nowhere useful until we set them.
# All labels below are offsets inside segment 0xF000 (firmware.ld links the
# image that way), so as long as CS and DS are 0xF000 a label IS its address.
#
# Build: as --64 -I firmware  ->  ld -T firmware/firmware.ld  ->  objcopy -O binary
# (vmm/firmware.py does this for you; see firmware/README.md).

.include "layout.inc"           # port numbers, mirrored from layout.py

    .code16                     # the CPU starts in 16-bit mode: assemble for it
    .section .text

start:
    cli                         # interrupts are already off; say so anyway
    cld                         # string instructions (lodsb) count upwards

    # Data segment = code segment, so `message` (an offset in segment 0xF000)
    # can be read through DS.  Segment registers cannot be loaded with an
    # immediate, so go through AX.
    mov     %cs, %ax
    mov     %ax, %ds

    # A stack in low RAM: SS = 0, SP = 0x7000, growing down.  Not needed by
    # this program (no call/push), but every payload sets one up first thing,
    # so that adding a `call` later does not scribble over random memory.
    xor     %ax, %ax
    mov     %ax, %ss            # loading SS blocks interrupts for one instruction,
    mov     $FIRMWARE_STACK, %sp   # so SS and SP always change together

    # Print the message: one `out` per byte.  We do NOT use `rep outsb`: that
    # would hand the VMM several bytes per exit, which is faster but makes the
    # exit count depend on how KVM splits the string.  One byte per exit keeps
    # it simple and deterministic.  The VMM's UART is always ready, so we do
    # not poll the line status register either (that would be one more exit
    # per character).
    mov     $message, %si       # DS:SI -> first character
    mov     $message_len, %cx   # CX = number of characters
    mov     $COM1_PORT, %dx     # DX = the port (>255, so it must go in DX)
1:  lodsb                       # AL = [DS:SI], SI += 1
    out     %al, %dx            # -> UART: one VM exit, the VMM prints AL
    loop    1b                  # CX -= 1, repeat until CX == 0

    # Exit with status 0: an 8-bit `out` to EXIT_PORT stops the VM.
    mov     $EXIT_PORT, %dx
    xor     %al, %al            # the exit status
    out     %al, %dx

    # Not reached under vmm.  If a VMM resumed us anyway, stop here for good.
halt:
    hlt
    jmp     halt

message:
    .ascii  "Hello from the guest!\n"
    .equ    message_len, . - message

# The reset vector: the CPU's first instruction, at F000:FFF0.  Only 16 bytes
# fit here, so all it does is jump to the real code.  A far jump also makes
# CS:IP canonical (CS = 0xF000 explicitly), as a PC BIOS does.
    .section .reset, "ax"
    .globl  reset_vector
reset_vector:
    ljmp    $RESET_CS_SELECTOR, $start
