"""Decode's entry in the catalog: one process per encoded source that wants its pictures decoded.

Its keys (decode, pixel_format, hw_decode, decode_threads) are the source's own, in
[sources.NAME] (services/capture/sources/base.py, EncodedSourceConfig).
"""
from __future__ import annotations

from typing import Any

from services.capture import book
from services.catalog import ServiceSpec, register


def _instances(config: Any, with_overlay: bool) -> list[str]:
    table = book.effective(config) if with_overlay else config.sources
    return [name for name, source in table.items() if source.wants_decode()]


register(ServiceSpec(
    "decode", "services.decode.service:Decode", "decodes one encoded source's stream into pictures on NAME-raw",
    order=2, instances=_instances, instances_file=book.FILE, network="none", devices=("gpu",), nice=-2,
    cpu_weight=150, docs="decode.md"))
