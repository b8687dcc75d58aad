# vmm's own tiny guest programs (assembly sources, linker script, README).
# This file only exists so that setuptools can ship the folder as the package
# data `vmm.firmware_src`; vmm/firmware.py finds and builds the sources.
