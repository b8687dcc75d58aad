"""A validating kernel command-line builder.

Arguments are added in order; the result must fit the kernel's limit (the
bzImage header's ``cmdline_size``, 2047 for x86 by default) with its NUL.
"""

from __future__ import annotations

from vmm.errors import LoaderError

DEFAULT_LIMIT = 2047  # COMMAND_LINE_SIZE - 1 on x86


class Cmdline:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._args: list[str] = []

    def add(self, *args: str) -> "Cmdline":
        for arg in args:
            for part in arg.split():
                if "\0" in part:
                    raise LoaderError("kernel command line: NUL byte in an argument")
                self._args.append(part)
        return self

    def has(self, key: str) -> bool:
        return any(a == key or a.startswith(key + "=") for a in self._args)

    def __str__(self) -> str:
        return " ".join(self._args)

    def encode(self) -> bytes:
        text = str(self).encode()
        if len(text) > self.limit:
            raise LoaderError(
                f"kernel command line is {len(text)} bytes, longer than the kernel accepts "
                f"({self.limit}); shorten --cmdline or the command"
            )
        return text + b"\0"
