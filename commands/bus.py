"""Sending commands: the write side's front door, used by the REST API, the SDK and tools.

`send` returns only after the broker has the command (acks=all, idempotent producer), so a
command the caller was told is accepted for processing cannot be lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

from confluent_kafka import KafkaError, Message, Producer

from commands.envelope import CommandEnvelope
from events.kafka_log import producer_config
from infra.settings import Settings


class CommandNotDelivered(RuntimeError):
    pass


Destination = Literal["commands", "trainer-requests", "sampler-requests"]


class CommandBus:
    """Sends aggregate commands (`commands`) and work requests (`trainer-requests`,
    `sampler-requests`); all are CommandEnvelopes keyed by their aggregate id."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # No linger: a command is one message a caller is waiting on, not part of a stream.
        self.producer = Producer({**producer_config(settings), "linger.ms": 0})

    def send(
        self, command: CommandEnvelope, *, to: Destination = "commands", timeout_s: float = 30.0
    ) -> None:
        self.send_many([command], to=to, timeout_s=timeout_s)

    def send_many(
        self,
        commands: Iterable[CommandEnvelope],
        *,
        to: Destination = "commands",
        timeout_s: float = 30.0,
    ) -> int:
        failures: list[str] = []

        def on_delivery(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                failures.append(f"{message.key()!r}: {error}")

        count = 0
        topic = self.settings.topic(to)
        for command in commands:
            self._produce(topic, command, on_delivery)
            count += 1
        remaining = self.producer.flush(timeout_s)
        if remaining or failures:
            raise CommandNotDelivered(
                f"{remaining} command(s) not acknowledged in {timeout_s}s; errors: {failures[:5]}"
            )
        return count

    def _produce(
        self,
        topic: str,
        command: CommandEnvelope,
        on_delivery: Callable[[KafkaError | None, Message], None],
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    topic,
                    key=command.aggregate_id.encode(),
                    value=command.to_bytes(),
                    headers=[("command_type", command.type.encode())],
                    on_delivery=on_delivery,
                )
                return
            except BufferError:  # local queue full: let deliveries drain, then retry
                self.producer.poll(0.1)
