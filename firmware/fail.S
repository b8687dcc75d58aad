# firmware/fail.S - exit with a non-zero status, to test that vmm passes the
# guest's exit status through to its own.
#
# Expected serial output (COM1, port 0x3F8), exactly:
#     failing with 42\n
# Exit status: 42.
# VM exits: 16 (one per character) + 1 (EXIT_PORT) = 17.
#
# Same shape as hello.S (read that one first): start at the reset vector in
# 16-bit real mode, print with one `out` per byte, write the status to
# EXIT_PORT.

.include "layout.inc"           # ports, mirrored from layout.py

.equ STATUS, 42

    .code16
    .section .text

start:
    cli
    cld
    mov     %cs, %ax            # DS = CS = 0xF000
    mov     %ax, %ds
    xor     %ax, %ax            # stack at 0000:7000 (unused, set for safety)
    mov     %ax, %ss
    mov     $FIRMWARE_STACK, %sp

    mov     $message, %si
    mov     $message_len, %cx
    mov     $COM1_PORT, %dx
1:  lodsb                       # AL = next character
    out     %al, %dx            # one exit per character
    loop    1b

    mov     $EXIT_PORT, %dx
    mov     $STATUS, %al        # vmm will exit with this status
    out     %al, %dx
2:  hlt                         # not reached under vmm
    jmp     2b

message:
    .ascii  "failing with 42\n"
    .equ    message_len, . - message

# Reset vector F000:FFF0: jump to the code above.
    .section .reset, "ax"
    .globl  reset_vector
reset_vector:
    ljmp    $RESET_CS_SELECTOR, $start
