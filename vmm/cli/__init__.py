"""The `vmm` command: a click group with one module per subcommand.

Every VmmError becomes one line on stderr (``vmm: <message>``) and a non-zero
status; a traceback means a bug in vmm.
"""

from __future__ import annotations

import time

START_NS = time.monotonic_ns()  # phase cli_start of `vmm run --metrics` (vmm/bench/phases.py)

import sys  # noqa: E402

import click  # noqa: E402

from vmm import __version__  # noqa: E402
from vmm.errors import VmmError  # noqa: E402

EXIT_VMM_ERROR = 125  # as vmm.outcome.EXIT_VMM_ERROR (not imported: keep start-up light)

CONTEXT = {"help_option_names": ["-h", "--help"]}


class VmmGroup(click.Group):
    def invoke(self, ctx: click.Context):  # one clear line for every VmmError
        try:
            return super().invoke(ctx)
        except VmmError as e:
            click.echo(f"vmm: {e}", err=True)
            sys.exit(EXIT_VMM_ERROR)


@click.group(cls=VmmGroup, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="vmm")
def main() -> None:
    """A small VMM on Linux KVM: boot guests, see every exit, measure boots."""


def _register() -> None:
    from vmm.cli import check, run

    main.add_command(check.check)
    main.add_command(run.run)
    for optional in ("kernel", "image", "bench", "snapshot", "cache"):
        try:
            module = __import__(f"vmm.cli.{optional}", fromlist=[optional])
        except ImportError:
            continue
        main.add_command(getattr(module, optional))


_register()
