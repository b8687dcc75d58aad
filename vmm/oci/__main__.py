"""`python3 -m vmm.oci ...` is `vmm-runtime ...` (where the console script is not on PATH)."""

from vmm.oci.cli import main

main(prog_name="vmm-runtime")
