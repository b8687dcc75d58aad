"""State values to JSON and back, checked field by field against their dataclass.

A snapshot's state file is hostile input like anything else vmm reads: a
crafted file with a valid checksum must still give one clear error, never a
traceback or a device holding a string where an int belongs. :func:`decode`
builds a dataclass only from values of exactly the declared types (an ``int``
field refuses ``true``, a ``bytes`` field wants a hex string), and names the
field that is wrong.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache

from vmm.errors import SnapshotError


def encode(value):
    """A dataclass (or tuple, bytes, int...) as JSON-ready values; bytes as hex."""
    if dataclasses.is_dataclass(value):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, (tuple, list)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def decode(hint, data, where: str):
    """``data`` (parsed JSON) as a value of type ``hint``; SnapshotError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if data is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return decode(option, data, where)
            except SnapshotError as e:
                errors.append(str(e))
        raise SnapshotError(errors[0] if errors else f"{where}: unexpected null")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(data, dict):
            raise SnapshotError(f"{where}: expected an object")
        fields = {f.name: f for f in dataclasses.fields(hint)}
        unknown = set(data) - set(fields)
        if unknown:
            raise SnapshotError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        values = {}
        for name, field in fields.items():
            if name not in data:
                raise SnapshotError(f"{where}: missing field {name!r}")
            values[name] = decode(_hints(hint)[name], data[name], f"{where}.{name}")
        try:
            return hint(**values)
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"{where}: {e}") from None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(data, list):
            raise SnapshotError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise SnapshotError(f"{where}: expected {len(args)} values, got {len(data)}")
        return tuple(decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data)))
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(data, dict) or key_type is not str:
            raise SnapshotError(f"{where}: expected an object")
        return {k: decode(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if hint is bytes:
        if not isinstance(data, str):
            raise SnapshotError(f"{where}: expected hex bytes")
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise SnapshotError(f"{where}: not hex bytes") from None
    if hint is bool:
        if not isinstance(data, bool):
            raise SnapshotError(f"{where}: expected true or false")
        return data
    if hint is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise SnapshotError(f"{where}: expected an integer")
        return data
    if hint is str:
        if not isinstance(data, str):
            raise SnapshotError(f"{where}: expected a string")
        return data
    raise TypeError(f"codec: no rule for {hint!r} ({where})")
