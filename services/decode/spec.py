"""Decode's entry in the catalog: one process per encoded source that wants its pictures decoded.

Its keys (decode, pixel_format, hw_decode, decode_threads) are the source's own, in
[sources.NAME] (services/capture/sources/base.py, EncodedSourceConfig), or those of another
table whose entries put access units on the bus as NAME (an RTP call's [rtp.NAME]: the
owning spec calls `add_input_table`).
"""
from __future__ import annotations

from typing import Any

from services.capture import book
from services.catalog import ServiceSpec, register

__all__ = ["add_input_table", "inputs", "lookup"]

_TABLES: list[str] = []   # config tables besides [sources] whose entries decode@NAME serves


def add_input_table(name: str) -> None:
    """Entries of the config table [name.NAME] put access units on NAME too: decode@NAME runs for those whose
    `wants_decode()` is true, with their decode keys (called by the spec that declares the table)."""
    if name not in _TABLES:
        _TABLES.append(name)


def inputs(config: Any, with_overlay: bool = True) -> dict[str, Any]:
    """Every entry decode@NAME may serve, by name: the sources, then the other tables' entries."""
    found: dict[str, Any] = dict(book.effective(config) if with_overlay else config.sources)
    for table in _TABLES:
        for name, entry in getattr(config, table, {}).items():
            found.setdefault(name, entry)
    return found


def lookup(config: Any, name: str) -> Any:
    """The entry decode@NAME serves, or ValueError saying which exist."""
    found = inputs(config)
    if name not in found:
        raise ValueError(f"no source {name!r} in the config or added by command, nor a "
                         f"{' or '.join(f'[{t}.{name}]' for t in _TABLES) or 'table'} entry "
                         f"(sources: {', '.join(book.effective(config)) or 'none'})")
    return found[name]


def _instances(config: Any, with_overlay: bool) -> list[str]:
    return [name for name, entry in inputs(config, with_overlay).items() if entry.wants_decode()]


register(ServiceSpec(
    "decode", "services.decode.service:Decode", "decodes one encoded source's stream into pictures on NAME-raw",
    order=2, instances=_instances, instances_file=book.FILE, network="none", devices=("gpu",), nice=-2,
    cpu_weight=150, docs="decode.md"))
