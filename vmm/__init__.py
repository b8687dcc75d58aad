"""vmm: a lightweight virtual machine monitor in Python on Linux KVM.

Importing vmm is cheap on purpose: the CLI is timed from process start to the
guest's first instruction, so heavy modules load only when used.
"""

__version__ = "0.1.0"
