"""One check of a command's arguments, for the hub's own commands and the ones services answer.

A command declares its arguments as `{name: type or tuple of types}` and which are
required; `check_args` refuses unknown names, missing required ones and wrong types with
`ProtocolError("bad_args", ...)` naming the argument. A bool is never taken for an int.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from services.control.protocol import ProtocolError

__all__ = ["ArgTypes", "check_args"]

ArgTypes = Mapping[str, "type | tuple[type, ...]"]


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def check_args(args: Any, allowed: ArgTypes, required: Iterable[str] = ()) -> dict[str, Any]:
    """`args` checked against `allowed` and `required`; raises ProtocolError(bad_args)."""
    if not isinstance(args, dict):
        raise ProtocolError("bad_args", f"args must be an object, got {type(args).__name__}")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ProtocolError("bad_args", f"unknown argument(s): {', '.join(unknown)} "
                                        f"(allowed: {', '.join(allowed) or 'none'})")
    for name in required:
        if name not in args:
            raise ProtocolError("bad_args", f"missing argument {name!r}")
    for name, value in args.items():
        kinds = _types(allowed[name])
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ProtocolError("bad_args", f"argument {name!r} has the wrong type ({type(value).__name__})")
    return args
