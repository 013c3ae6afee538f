"""An asynchronous web backend's client of apptainer-orchestrator (aio-pika).

Starts a container, shows its progress events as they arrive, awaits its final reply, stops it
and deletes it (and its data). Run it against a worker:

    python client.py --amqp-url amqp://guest:guest@127.0.0.1:5672/%2f --exchange apptainer

The `Orchestrator` class is what a backend would keep: one connection, one private reply queue,
and a future per request, matched by correlation id. Every request goes to the worker's exchange
with the container's name as routing key, which takes it to the host that owns the container (or,
for a new name, to the fleet's placement). A container's requests are sent only once its `start`
was answered, as below: until then no host owns the name, and a request sent earlier could
arrive before the container exists.
"""

import argparse
import asyncio
import json
import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable

import aio_pika
from aio_pika.exceptions import DeliveryError


class OrchestratorUnavailable(Exception):
    """The exchange does not exist (no worker has ever run on it), or no reply came in time."""


@dataclass
class _Pending:
    future: asyncio.Future
    on_progress: Callable[[dict], None] = field(default=lambda envelope: None)


class Orchestrator:
    def __init__(self, amqp_url: str, exchange: str = "apptainer"):
        self.amqp_url = amqp_url
        self.exchange_name = exchange
        self.pending: dict[str, _Pending] = {}

    async def connect(self) -> None:
        self.connection = await aio_pika.connect_robust(self.amqp_url)
        # Publisher confirms: publish() returns once the broker has the request, and raises
        # when a `mandatory` request could not be routed (no queue behind the exchange).
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            # Passive: only asks whether a worker declared it, on a channel of its own because
            # the broker closes the channel of a failed declaration.
            probe = await self.connection.channel()
            await probe.declare_exchange(self.exchange_name, passive=True)
            await probe.close()
        except aio_pika.exceptions.ChannelClosed as e:
            raise OrchestratorUnavailable(
                f"the exchange {self.exchange_name} does not exist: start a worker with "
                f"--exchange {self.exchange_name} first"
            ) from e
        self.exchange = await self.channel.get_exchange(self.exchange_name, ensure=False)
        self.replies = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        connection = getattr(self, "connection", None)
        if connection is not None:
            await connection.close()

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pending = self.pending.get(message.correlation_id or "")
        if pending is None:
            return  # a duplicate, or the answer to a request we gave up on: ignore it
        envelope = json.loads(message.body)
        if envelope.get("final", True):
            del self.pending[message.correlation_id]
            pending.future.set_result(envelope)
        else:
            pending.on_progress(envelope)

    async def call(self, request: dict, timeout: float, on_progress=None, message_id=None) -> dict:
        """Publishes `request` and returns its final reply envelope. With `on_progress`, asks
        for progress events (header x-progress) and hands each to it, in order, before the
        final reply. Reuse `message_id` when retrying the same intent: it never runs twice.
        The routing key is the container's name (empty for getallcont, which names none)."""
        correlation_id = str(uuid.uuid4())
        future = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = _Pending(future, on_progress or (lambda envelope: None))
        message = aio_pika.Message(
            json.dumps(request).encode(),
            content_type="application/json",
            correlation_id=correlation_id,
            message_id=message_id or correlation_id,
            reply_to=self.replies.name,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"x-progress": True} if on_progress else {},
        )
        try:
            await self.exchange.publish(
                message, routing_key=request.get("container_name", ""), mandatory=True
            )
            return await asyncio.wait_for(future, timeout)
        except DeliveryError as e:
            raise OrchestratorUnavailable(
                f"nothing behind the exchange {self.exchange_name} took the request; "
                f"is a worker running with --exchange {self.exchange_name}?"
            ) from e
        except asyncio.TimeoutError as e:
            raise OrchestratorUnavailable(
                f"no reply to {request['op']} within {timeout}s; the request may still run"
            ) from e
        finally:
            self.pending.pop(correlation_id, None)


def expect(reply: dict, status: int) -> dict:
    if reply["status"] != status:
        error = reply.get("error") or {}
        raise SystemExit(f"{reply['op']} answered {reply['status']}: {error.get('message')}")
    return reply


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--exchange", default="apptainer")
    parser.add_argument("--name", default=f"py-{uuid.uuid4().hex[:8]}")
    args = parser.parse_args()

    orchestrator = Orchestrator(args.amqp_url, args.exchange)
    try:
        await orchestrator.connect()
        stages = []

        def show(event: dict) -> None:
            stages.append(event["stage"])
            where = f" (position {event['position']})" if "position" in event else ""
            print(f"{event['container_name']}: {event['stage']}{where}", flush=True)

        start = {
            "op": "start",
            "container_name": args.name,
            "container_image": "jupyter/base-notebook",
            "image_distributor": "docker",
            "image_os": "jupyter/base-notebook",
            "image_version": "latest",
            "container_command": ["jupyter lab --no-browser"],
        }
        # An image build can take many minutes: wait long for start. Nothing else is sent for
        # this name before its start is answered.
        started = expect(await orchestrator.call(start, timeout=3600, on_progress=show), 201)
        record = started["result"]
        print(f"{record['container_name']}: running at {record['container_ip'] or 'no IP'}")

        named = {"container_name": args.name}
        expect(await orchestrator.call({"op": "stop", **named}, timeout=60), 200)
        print(f"{args.name}: stopped")
        expect(await orchestrator.call({"op": "deletecont", **named}, timeout=60), 204)
        expect(await orchestrator.call({"op": "deletecontdata", **named}, timeout=60), 204)
        print(f"{args.name}: deleted with its data")

        # Progress is best effort and a stage may be reported more than once (placement, then
        # the host's lane): a repeated stage counts as one.
        seen = [stage for i, stage in enumerate(stages) if i == 0 or stages[i - 1] != stage]
        wanted = ["queued", "building_image", "starting_instance"]
        if seen != wanted:
            print(f"expected the stages {wanted}, saw {stages}", file=sys.stderr)
            return 1
        return 0
    except OrchestratorUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        await orchestrator.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
