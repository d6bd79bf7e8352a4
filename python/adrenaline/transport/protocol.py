"""Typed control messages over a ``Transport``: each protocol declares its message types and
version once (``Protocol``), managers send and match ``msgspec.Struct``\\s, never kind strings.

On the wire a message is still the transport's (kind, metadata, tensors): the kind is the
Struct's name, the metadata its fields. The message that opens an exchange with a peer carries a
``version`` field; ``parse`` turns another version into a ``Mismatch`` whose error names both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import msgspec
import torch

from adrenaline.transport.base import Message, Transport

logger = logging.getLogger(__name__)


class Mismatch(msgspec.Struct):
    """A message in another version of the protocol: its fields may not parse, so its raw
    metadata comes along for the reply (room, step, ask...)."""

    kind: str
    error: str
    meta: dict


class Protocol:
    def __init__(self, name: str, version: int, types: Iterable[type[msgspec.Struct]]) -> None:
        self.name = name
        self.version = version
        self.types = {t.__name__: t for t in types}

    def send(
        self, transport: Transport, peer: str, msg: msgspec.Struct, tensors: Sequence[torch.Tensor] = ()
    ) -> int:
        """Queue ``msg`` (and its tensors) to ``peer``; returns the tensor bytes sent."""
        return transport.send(peer, type(msg).__name__, msgspec.to_builtins(msg), tensors)

    def parse(self, message: Message) -> msgspec.Struct | None:
        """The typed form of a received message: ``Mismatch`` when it carries another version,
        None for another protocol's or a malformed one."""
        cls = self.types.get(message.kind)
        if cls is None:
            return None
        version = message.meta.get("version")
        if version is not None and version != self.version:
            return Mismatch(message.kind, self.check_version(version, message.peer), message.meta)
        try:
            return msgspec.convert(message.meta, cls)
        except msgspec.ValidationError as e:
            logger.warning(
                "malformed %s message %s from %s dropped: %s", self.name, message.kind, message.peer, e
            )
            return None

    def check_version(self, version: int, peer: str) -> str | None:
        """The error text for a peer speaking another version of this protocol (None: same)."""
        if version == self.version:
            return None
        return (
            f"{self.name} protocol version mismatch: this instance speaks version {self.version}, "
            f"peer {peer} speaks version {version}"
        )
