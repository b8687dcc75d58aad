"""A GDB remote stub: `vmm run --gdb [HOST:]PORT` (docs/gdb.md).

packets.py    the remote serial protocol's framing: $data#checksum, acks, escapes, run-length
registers.py  the x86-64 target description GDB reads, and the registers to and from a vCPU
stub.py       the stub: a GDB session in the runner's pause, KVM_SET_GUEST_DEBUG on resume
"""
