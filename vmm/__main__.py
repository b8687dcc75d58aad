"""`python -m vmm` runs the CLI."""

from vmm.cli import main

main()
