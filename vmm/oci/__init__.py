"""vmm as an OCI runtime: an OCI bundle (config.json + rootfs) run as a VM.

spec.py reads and checks config.json.
"""
