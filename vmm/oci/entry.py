"""`vmm-runtime`'s entry point: the shim's per-container calls fast, the rest through click.

containerd's shim runs the runtime binary as a new process for each step of
every container: create, start, then delete twice for `ctr run --rm`. On our
CI host a Python process with vmm's command line costs ~50 ms before it does
anything, ~12 ms of it importing click. `create --bundle B --pid-file F
[--console-socket S] ID`, `start ID`, `kill ID [SIGNAL]` and `delete [--force]
ID`, with the global options the shim passes, are read here by hand and run
with vmm/oci/lifecycle.py alone; anything else (another command, an option
spelled otherwise, --help) goes to the full command line of vmm/oci/cli.py,
which runs the same functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

VALUE_OPTIONS = ("--root", "--log", "--log-format")
FLAG_OPTIONS = ("--systemd-cgroup", "--debug")


# create's options as the shim passes them: value options, and flags runc has that vmm ignores
CREATE_VALUES = {"--bundle": "bundle", "-b": "bundle", "--pid-file": "pid_file",
                 "--console-socket": "console_socket"}
CREATE_FLAGS = ("--no-pivot", "--no-new-keyring")


def parse_fast(argv: list[str]) -> tuple[dict[str, str | None], str, list[str]] | None:
    """(global options, command, its operands) for the calls read here; None for the rest.

    create's options come back in the options, under their CREATE_VALUES names.
    """
    from vmm.oci.store import DEFAULT_ROOT

    options: dict[str, str | None] = {"--root": DEFAULT_ROOT, "--log": None, "--log-format": "text"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in VALUE_OPTIONS and i + 1 < len(argv):
            options[argv[i]] = argv[i + 1]
            i += 2
        elif argv[i] in FLAG_OPTIONS:
            i += 1
        else:
            return None
    command, operands = (argv[i], argv[i + 1:]) if i < len(argv) else ("", [])
    if options["--log-format"] not in ("text", "json"):
        return None
    if command == "create":
        options.update(bundle=".", pid_file=None, console_socket=None)
        rest = []
        while operands:
            word = operands.pop(0)
            if word in CREATE_VALUES and operands:
                options[CREATE_VALUES[word]] = operands.pop(0)
            elif word in CREATE_FLAGS:
                pass
            else:
                rest.append(word)
        operands = rest
        if len(operands) != 1:
            return None
    elif command == "delete" and len(operands) == 2 and operands[0] in ("--force", "-f"):
        operands = ["--force", operands[1]]
    elif not ((command == "start" and len(operands) == 1) or
              (command == "kill" and len(operands) in (1, 2)) or
              (command == "delete" and len(operands) == 1)):
        return None
    if any(o.startswith("-") for o in operands if o != "--force"):
        return None  # an ID or signal that looks like an option: click says what it is
    return options, command, operands


def run_fast(options: dict[str, str | None], command: str, operands: list[str]) -> int:
    from vmm.errors import VmmError
    from vmm.oci.lifecycle import (Runtime, create_container, delete_container, kill_container,
                                   start_container)

    root, log_format = options["--root"], options["--log-format"]
    assert root is not None and log_format is not None  # parse_fast gives both, always
    runtime = Runtime(root, options["--log"], log_format)
    try:
        if command == "create":
            create_container(runtime, Path(options["bundle"] or "."), options["pid_file"],
                             options["console_socket"], operands[0])
        elif command == "start":
            start_container(runtime.store, operands[0])
        elif command == "kill":
            kill_container(runtime.store, operands[0], operands[1] if len(operands) > 1 else "SIGTERM")
        else:
            delete_container(runtime.store, operands[-1], force=operands[0] == "--force")
    except VmmError as e:
        runtime.error(str(e))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fast = parse_fast(argv)
    if fast is not None:
        return run_fast(*fast)
    from vmm.oci.cli import main as command_line

    return command_line(args=argv, prog_name="vmm-runtime")
