"""Results straight from Kafka, so a future resolves the moment its result is committed.

The futures table (a projection) is the durable answer, but it is one hop later: the projection
has to consume, batch and write it. This feed reads the command-results topic itself
(read_committed, every partition, from the moment the API starts) and keeps the most recent
results in memory, so the long-poll of a request this API sent usually finds its result here
first. Anything older, or produced before this process started, is found in the table.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from confluent_kafka import OFFSET_END, Consumer

from commands.envelope import CommandResult
from events.kafka_log import assign_all, consumer_config
from infra.settings import Settings

log = logging.getLogger("loopstream.api.results")


class ResultFeed:
    def __init__(self, settings: Settings, *, capacity: int = 100_000) -> None:
        self.settings = settings
        self.capacity = capacity
        self._results: OrderedDict[str, CommandResult] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        topic = self.settings.topic("command-results")
        consumer = Consumer(
            consumer_config(
                self.settings,
                group_id=f"{self.settings.topic_prefix}-api-results",
                **{"fetch.wait.max.ms": 10},  # a result is news: don't let the broker sit on it
            )
        )
        assign_all(consumer, self.settings, topic, OFFSET_END)
        self._thread = threading.Thread(target=self._run, args=(consumer,), daemon=True)
        self._thread.start()

    def get(self, request_id: str) -> CommandResult | None:
        with self._lock:
            return self._results.get(request_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self, consumer: Consumer) -> None:
        try:
            while not self._stop.is_set():
                # consume(n, timeout) would wait for n messages; wait for one, then drain.
                first = consumer.poll(0.2)
                if first is None:
                    continue
                for message in (first, *consumer.consume(num_messages=500, timeout=0)):
                    if message.error() is not None:
                        continue
                    try:
                        result = CommandResult.model_validate_json(message.value() or b"")
                    except ValueError:
                        continue  # the projection dead-letters it; nothing to serve
                    with self._lock:
                        self._results[result.command_id] = result
                        while len(self._results) > self.capacity:
                            self._results.popitem(last=False)
        except Exception:
            log.exception("result feed stopped; futures fall back to the table")
        finally:
            consumer.close()
