#!/usr/bin/env python3
"""Acceptance test of the orchestrator worker through a plain AMQP client (pika).

Nothing of the project's own code is used here: requests are JSON bodies published with pika,
replies are read from a private exclusive queue (and, for requests without ``reply_to``, from the
worker's default reply queue), and every reply is validated against the checked-in JSON Schema
``schemas/json/reply.json`` (Draft 2020-12).

Requests go where any backend sends them: to the worker's exchange (``--exchange``, durable,
direct), with the container's name as routing key (empty for ``getallcont``), and a container's
requests only after its ``start`` was answered. The worker must already be running (see
``run.sh``) with the fake apptainer, on ``--exchange``, replying to ``--reply-queue`` by default,
with ``--data-dir`` as its data directory and the fake's invocation log at ``--fake-log``.

Prints one line per case (``PASS name`` or ``FAIL name: why``) and a last line
``N passed, M failed``; exits non-zero when any case failed.
"""

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import uuid

import jsonschema
import pika

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SCHEMA = os.path.normpath(os.path.join(HERE, "..", "..", "schemas", "json", "reply.json"))
MOVER = os.path.normpath(os.path.join(HERE, "..", "..", "deploy", "move-old-requests"))
REPLY_TIMEOUT = 30.0
DRAIN_SECONDS = 1.0
HOME_MOUNT = "/home/nextpyter"


class CaseFailed(Exception):
    pass


class Client:
    """A plain pika client: publishes requests, collects every reply by correlation id."""

    def __init__(self, url, exchange, default_reply_queue, validator):
        self.exchange = exchange
        self.default_reply_queue = default_reply_queue
        self.validator = validator
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        try:
            # Passive: only asks whether the worker declared it (a failure closes the channel).
            self.connection.channel().exchange_declare(exchange, passive=True)
        except pika.exceptions.ChannelClosedByBroker as e:
            raise SystemExit(
                f"the exchange {exchange} does not exist ({e}): start a worker with "
                f"--exchange {exchange} first"
            ) from e
        self.channel.confirm_delivery()
        declared = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.private_queue = declared.method.queue
        # correlation id -> list of (queue it arrived on, parsed body or None, raw body, properties)
        self.replies = {}
        # every correlation id this client published, in order
        self.sent = []
        self.channel.basic_consume(
            queue=self.private_queue,
            on_message_callback=self._on_reply(self.private_queue),
            auto_ack=True,
        )
        # The worker declares its default reply queue (durable) at start-up; it exists by now.
        self.channel.basic_consume(
            queue=self.default_reply_queue,
            on_message_callback=self._on_reply(self.default_reply_queue),
            auto_ack=True,
        )

    def _on_reply(self, queue):
        def callback(_channel, _method, properties, body):
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            self.replies.setdefault(properties.correlation_id, []).append(
                (queue, parsed, body, properties)
            )

        return callback

    def pump(self, seconds):
        self.connection.process_data_events(time_limit=seconds)

    def publish(self, body, *, reply_to=True, correlation_id=None, message_id=None):
        """Publishes a request; `body` is a dict (JSON-encoded) or bytes (sent as they are).
        Returns the correlation id."""
        correlation_id = correlation_id or f"acc-{uuid.uuid4()}"
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties = pika.BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self.private_queue if reply_to else None,
            message_id=message_id,
            delivery_mode=2,
        )
        # mandatory + confirms: a request nothing could route (no worker ever declared the
        # queues behind the exchange) raises here.
        self.channel.basic_publish(
            exchange=self.exchange,
            routing_key=routing_key(body),
            body=payload,
            properties=properties,
            mandatory=True,
        )
        self.sent.append(correlation_id)
        return correlation_id

    def wait(self, correlation_id, *, reply_to=True, timeout=REPLY_TIMEOUT):
        """Waits for the final reply of `correlation_id`, checks its envelope, returns its body."""
        parsed, problems = self.wait_lenient(correlation_id, reply_to=reply_to, timeout=timeout)
        if problems:
            raise CaseFailed("; ".join(problems) + f" (reply: {short(parsed)})")
        return parsed

    def wait_lenient(self, correlation_id, *, reply_to=True, timeout=REPLY_TIMEOUT):
        """Like `wait`, but returns the envelope's problems instead of raising on them."""
        deadline = time.monotonic() + timeout
        while not self.replies.get(correlation_id):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CaseFailed(f"no reply for correlation id {correlation_id} within {timeout:.0f} s")
            self.pump(min(0.1, remaining))
        queue, parsed, raw, properties = self.replies[correlation_id][0]
        expected_queue = self.private_queue if reply_to else self.default_reply_queue
        problems = []
        if queue != expected_queue:
            problems.append(f"reply arrived on {queue}, expected {expected_queue}")
        if parsed is None:
            raise CaseFailed(f"reply body is not JSON: {raw[:200]!r}")
        errors = sorted(self.validator.iter_errors(parsed), key=lambda e: list(e.path))
        if errors:
            problems.append(
                "reply does not validate against reply.json: "
                + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:3])
            )
        if parsed.get("correlation_id") != correlation_id:
            problems.append(
                f"reply body correlation_id is {parsed.get('correlation_id')!r}, expected {correlation_id!r}"
            )
        if parsed.get("final") is not True:
            problems.append("reply is not final")
        if isinstance(parsed.get("status"), int) and parsed.get("ok") != (parsed["status"] < 400):
            problems.append(f"ok={parsed.get('ok')} does not match status {parsed['status']}")
        if parsed.get("v") != 1:
            problems.append(f"v is {parsed.get('v')!r}, expected 1")
        if properties.content_type != "application/json":
            problems.append(f"content_type is {properties.content_type!r}")
        return parsed, problems

    def publish_to_queue(self, queue, body):
        """Publishes a request the way clients of the single-host protocol did: to a queue,
        through the default exchange. Returns the correlation id."""
        correlation_id = f"acc-{uuid.uuid4()}"
        properties = pika.BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=self.private_queue,
            message_id=correlation_id,
            delivery_mode=2,
        )
        self.channel.basic_publish("", queue, json.dumps(body).encode(), properties, mandatory=True)
        self.sent.append(correlation_id)
        return correlation_id

    def call(self, body, *, reply_to=True, message_id=None):
        correlation_id = self.publish(body, reply_to=reply_to, message_id=message_id)
        return self.wait(correlation_id, reply_to=reply_to)

    def close(self):
        try:
            self.connection.close()
        except Exception:  # noqa: BLE001 - best effort at the end
            pass


def routing_key(body):
    """The container's name, which routes a request to the host that owns the container; empty
    for a request that names none (getallcont), or a body that is not a JSON object with a
    string name (the worker answers those 400 wherever they land)."""
    if isinstance(body, bytes):
        try:
            body = json.loads(body)
        except ValueError:
            return ""
    name = body.get("container_name") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""


def short(reply):
    text = json.dumps(reply, sort_keys=True)
    return text if len(text) <= 600 else text[:600] + "..."


def expect(cond, message):
    if not cond:
        raise CaseFailed(message)


def expect_status(reply, status, code=None):
    expect(
        reply.get("status") == status,
        f"status {reply.get('status')}, expected {status}: {short(reply)}",
    )
    if status < 400:
        expect(reply.get("error") is None, f"a success reply carries an error: {short(reply)}")
    else:
        error = reply.get("error") or {}
        expect(error.get("message"), f"an error reply without a message: {short(reply)}")
        if code is not None:
            expect(
                error.get("code") == code,
                f"error code {error.get('code')!r}, expected {code!r}: {short(reply)}",
            )
        expect(reply.get("result") is None, f"an error reply carries a result: {short(reply)}")


def read_log(path):
    entries = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        entries.append(json.loads(line))
                    except ValueError:
                        pass
    except FileNotFoundError:
        pass
    return entries


def invocations(path, prefix, last=None):
    """Invocations (begin events) of the fake whose argv starts with `prefix` and, when given,
    ends with `last`."""
    found = []
    for entry in read_log(path):
        argv = entry.get("argv") or []
        if entry.get("event") != "begin":
            continue
        if argv[: len(prefix)] != prefix:
            continue
        if last is not None and (not argv or argv[-1] != last):
            continue
        found.append(argv)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchange", default=os.environ.get("ACCEPTANCE_EXCHANGE"))
    parser.add_argument("--reply-queue", default=os.environ.get("ACCEPTANCE_REPLY_QUEUE"))
    parser.add_argument("--data-dir", default=os.environ.get("ACCEPTANCE_DATA_DIR"))
    parser.add_argument("--fake-log", default=os.environ.get("FAKE_APPTAINER_LOG"))
    parser.add_argument(
        "--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    )
    parser.add_argument("--schema", default=DEFAULT_SCHEMA)
    args = parser.parse_args()
    for name in ("exchange", "reply_queue", "data_dir", "fake_log"):
        if not getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} (or its environment variable) is required")

    with open(args.schema, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)

    client = Client(args.amqp_url, args.exchange, args.reply_queue, validator)
    results = []

    def case(name, fn):
        try:
            fn()
        except CaseFailed as e:
            results.append(False)
            print(f"FAIL {name}: {e}", flush=True)
            return
        except Exception as e:  # noqa: BLE001 - a broken case is a failed case, the run goes on
            results.append(False)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
            return
        results.append(True)
        print(f"PASS {name}", flush=True)

    run = uuid.uuid4().hex[:8]
    volumes = os.path.join(args.data_dir, "volumes")
    home = os.path.join(volumes, f"home-a-{run}")
    bind1 = os.path.join(volumes, f"bind1-{run}")
    bind2 = os.path.join(volumes, f"bind2-{run}")
    bind3 = os.path.join(volumes, f"bind3-{run}")
    missing = os.path.join(volumes, f"missing-{run}")
    for d in (home, bind1, bind2, bind3):
        os.makedirs(d)

    A, B, C = "nb-a", "nb-b", "nb-c"

    def start_body(name, volume=None):
        body = {
            "op": "start",
            "container_name": name,
            "container_image": "jupyter/base-notebook",
            "image_distributor": "docker",
            "image_os": "jupyter/base-notebook",
            "image_version": "latest",
            "container_command": ["jupyter lab"],
        }
        if volume:
            body["volume_name"] = volume
        return body

    def volume_body(op, host, target, name=A):
        return {"op": op, "container_name": name, "host_location": host, "container_location": target}

    # ---------------------------------------------------------------- start, getcont
    def start_a():
        reply = client.call(start_body(A, home))
        expect_status(reply, 201)
        result = reply.get("result") or {}
        expect(reply.get("op") == "start", f"op is {reply.get('op')!r}")
        expect(reply.get("container_name") == A, f"container_name is {reply.get('container_name')!r}")
        expect(result.get("container_name") == A, f"result.container_name: {short(reply)}")
        expect(result.get("container_active") is True, f"not active: {short(reply)}")
        ip = result.get("container_ip") or ""
        expect(ip.startswith("10.22.0."), f"container_ip {ip!r}, expected 10.22.0.x (bridge network)")
        expect(result.get("container_image") == "jupyter/base-notebook", f"container_image: {short(reply)}")
        expect(result.get("image_distributor") == "docker", f"image_distributor: {short(reply)}")
        expect(result.get("image_os") == "jupyter/base-notebook", f"image_os: {short(reply)}")
        expect(result.get("image_version") == "latest", f"image_version: {short(reply)}")
        started = invocations(args.fake_log, ["instance", "start"], A)
        expect(len(started) == 1, f"the fake saw {len(started)} instance starts of {A}, expected 1")
        expect(
            f"{os.path.realpath(home)}:{HOME_MOUNT}" in started[0],
            f"volume_name not bound to {HOME_MOUNT}: {started[0]}",
        )

    case("start nb-a -> 201, active, bridge IP", start_a)

    def start_again():
        reply = client.call(start_body(A, home))
        expect_status(reply, 409, "conflict")

    case("start nb-a again -> 409 conflict", start_again)

    def getcont_a():
        reply = client.call({"op": "getcont", "container_name": A})
        expect_status(reply, 200)
        result = reply.get("result") or {}
        expect(result.get("container_name") == A, f"record of another container: {short(reply)}")
        expect(result.get("container_active") is True, f"record not active: {short(reply)}")
        expect(result.get("container_ip", "").startswith("10.22.0."), f"record without IP: {short(reply)}")
        expect(result.get("volume_name") == home, f"volume_name: {short(reply)}")
        expect(result.get("binds") == {}, f"binds: {short(reply)}")

    case("getcont nb-a -> 200 with the record", getcont_a)

    def getcont_unknown():
        reply = client.call({"op": "getcont", "container_name": f"nobody-{run}"})
        expect_status(reply, 404, "not_found")

    case("getcont unknown -> 404 not_found", getcont_unknown)

    def default_reply_queue():
        # A read (answered straight from the lane) and a write (answered through the outbox),
        # both without reply_to: their replies come on the worker's default reply queue.
        read = client.call({"op": "getcont", "container_name": A}, reply_to=False)
        expect_status(read, 200)
        expect((read.get("result") or {}).get("container_name") == A, f"wrong record: {short(read)}")
        write = client.call({"op": "stop", "container_name": f"nobody-{run}"}, reply_to=False)
        expect_status(write, 404, "not_found")

    case("no reply_to -> reply on the default reply queue", default_reply_queue)

    # ---------------------------------------------------------------- volumes
    def createvolume_running():
        reply = client.call(volume_body("createvolume", bind1, "/mnt"))
        expect_status(reply, 200)
        expect(reply.get("op") == "createvolume", f"op is {reply.get('op')!r}")
        result = reply.get("result") or {}
        expect(result.get("container_name") == A, f"result.container_name: {short(reply)}")
        expect(result.get("binds", {}).get(bind1) == "/mnt", f"binds lack the new bind: {short(reply)}")
        warnings = reply.get("warnings") or []
        expect(
            any("restart" in w or "running" in w for w in warnings),
            f"no warning that the container is running: {short(reply)}",
        )

    case("createvolume on running nb-a -> 200 with a warning", createvolume_running)

    def createvolume_again():
        reply = client.call(volume_body("createvolume", bind1, "/mnt"))
        expect_status(reply, 409, "conflict")

    case("createvolume same host dir again -> 409 conflict", createvolume_again)

    def createvolume_missing_target():
        reply = client.call(volume_body("createvolume", bind2, "/does-not-exist"))
        expect_status(reply, 400, "bad_request")
        expect("/does-not-exist" in reply["error"]["message"], f"message: {short(reply)}")

    case("createvolume container_location not in image -> 400", createvolume_missing_target)

    def createvolume_missing_host():
        reply = client.call(volume_body("createvolume", missing, "/srv"))
        expect_status(reply, 400, "bad_request")
        expect(missing in reply["error"]["message"], f"message does not name the path: {short(reply)}")

    case("createvolume missing host directory -> 400", createvolume_missing_host)

    def createvolume_forbidden():
        reply = client.call(volume_body("createvolume", "/etc", "/srv"))
        expect_status(reply, 403, "forbidden")

    case("createvolume host /etc -> 403 forbidden", createvolume_forbidden)

    def deletevolume_running():
        reply = client.call(volume_body("deletevolume", bind1, "/mnt"))
        expect_status(reply, 422, "unprocessable")

    case("deletevolume on running nb-a -> 422", deletevolume_running)

    # ---------------------------------------------------------------- stop, restart
    def stop_a():
        reply = client.call({"op": "stop", "container_name": A})
        expect_status(reply, 200)
        result = reply.get("result") or {}
        expect(result.get("container_active") is False, f"still active: {short(reply)}")
        expect(result.get("container_ip") == "", f"a stopped container with an IP: {short(reply)}")

    case("stop nb-a -> 200, inactive", stop_a)

    def stop_again():
        reply = client.call({"op": "stop", "container_name": A})
        expect_status(reply, 409, "conflict")

    case("stop nb-a again -> 409 conflict", stop_again)

    def deletevolume_stopped():
        reply = client.call(volume_body("deletevolume", bind1, "/mnt"))
        expect_status(reply, 200)
        expect(reply.get("op") == "deletevolume", f"op is {reply.get('op')!r}")
        binds = (reply.get("result") or {}).get("binds")
        expect(binds == {}, f"binds after deletevolume: {short(reply)}")

    case("deletevolume on stopped nb-a -> 200", deletevolume_stopped)

    def removevolume_alias():
        created = client.call(volume_body("createvolume", bind2, "/opt"))
        expect_status(created, 200)
        expect(created.get("warnings") == [], f"a warning on a stopped container: {short(created)}")
        expect((created.get("result") or {}).get("binds") == {bind2: "/opt"}, f"binds: {short(created)}")
        reply = client.call(volume_body("removevolume", bind2, "/opt"))
        expect_status(reply, 200)
        expect(reply.get("op") == "deletevolume", f"op is {reply.get('op')!r}")
        expect((reply.get("result") or {}).get("binds") == {}, f"binds after removevolume: {short(reply)}")

    case("removevolume alias on another bind -> 200", removevolume_alias)

    def restart_a():
        before = len(invocations(args.fake_log, ["instance", "start"], A))
        reply = client.call({"op": "restart", "container_name": A})
        expect_status(reply, 200)
        result = reply.get("result") or {}
        expect(result.get("container_active") is True, f"not active: {short(reply)}")
        expect(result.get("container_ip", "").startswith("10.22.0."), f"no IP after restart: {short(reply)}")
        started = invocations(args.fake_log, ["instance", "start"], A)
        expect(len(started) == before + 1, f"{len(started) - before} instance starts for restart, expected 1")
        expect(
            f"{os.path.realpath(home)}:{HOME_MOUNT}" in started[-1],
            f"restart lost the home bind: {started[-1]}",
        )

    case("restart nb-a -> 200, active", restart_a)

    def restart_again():
        reply = client.call({"op": "restart", "container_name": A})
        expect_status(reply, 409, "conflict")

    case("restart nb-a again -> 409 conflict", restart_again)

    # ---------------------------------------------------------------- delete
    def deletecont_running():
        reply = client.call({"op": "deletecont", "container_name": A})
        expect_status(reply, 422, "unprocessable")

    case("deletecont on running nb-a -> 422", deletecont_running)

    def stop_then_deletecont():
        stopped = client.call({"op": "stop", "container_name": A})
        expect_status(stopped, 200)
        reply = client.call({"op": "deletecont", "container_name": A})
        expect_status(reply, 204)
        expect(reply.get("result") is None, f"a 204 with a result: {short(reply)}")

    case("stop, deletecont nb-a -> 204", stop_then_deletecont)

    def getcont_deleted():
        reply = client.call({"op": "getcont", "container_name": A})
        expect_status(reply, 404, "not_found")

    case("getcont deleted nb-a -> 404", getcont_deleted)

    def getallcont_leftover():
        reply = client.call({"op": "getallcont"})
        expect_status(reply, 200)
        result = reply.get("result") or {}
        names = [c.get("container_name") for c in result.get("containers", [])]
        expect(A not in names, f"deleted container still listed: {short(reply)}")
        expect(
            any(
                d.get("container_name") == A and d.get("container_image") == "jupyter/base-notebook"
                for d in result.get("data", [])
            ),
            f"data does not list nb-a's image: {short(reply)}",
        )

    case("getallcont -> 200, data lists nb-a's image", getallcont_leftover)

    def deletecontdata_a():
        image = os.path.join(args.data_dir, "images", A)
        expect(os.path.exists(image), f"{image} is not on disk before deletecontdata")
        reply = client.call({"op": "deletecontdata", "container_name": A})
        expect_status(reply, 204)
        expect(not os.path.exists(image), f"{image} is still on disk after deletecontdata")

    case("deletecontdata nb-a -> 204, image gone", deletecontdata_a)

    def deletecontdata_again():
        reply = client.call({"op": "deletecontdata", "container_name": A})
        expect_status(reply, 404, "not_found")

    case("deletecontdata nb-a again -> 404", deletecontdata_again)

    def start_more():
        for name in (C, B):  # out of order on purpose: getallcont sorts by name
            reply = client.call(start_body(name))
            expect_status(reply, 201)
            expect((reply.get("result") or {}).get("container_active") is True, f"{name}: {short(reply)}")

    case("start nb-c, nb-b -> 201", start_more)

    def deletecontdata_registered():
        reply = client.call({"op": "deletecontdata", "container_name": B})
        expect_status(reply, 422, "unprocessable")

    case("deletecontdata of registered nb-b -> 422", deletecontdata_registered)

    def getallcont_pages():
        full = client.call({"op": "getallcont", "page": 1, "page_size": 10})
        expect_status(full, 200)
        result = full.get("result") or {}
        names = [c.get("container_name") for c in result.get("containers", [])]
        expect(names == [B, C], f"containers {names}, expected [{B}, {C}] sorted")
        expect(result.get("total") == 2, f"total {result.get('total')}, expected 2")
        expect(result.get("page") == 1 and result.get("page_size") == 10, f"page fields: {short(full)}")
        expect(result.get("data") == [], f"data after deletecontdata: {short(full)}")
        for page, expected in ((1, [B]), (2, [C]), (3, [])):
            reply = client.call({"op": "getallcont", "page": page, "page_size": 1})
            expect_status(reply, 200)
            got = [c.get("container_name") for c in (reply.get("result") or {}).get("containers", [])]
            expect(got == expected, f"page {page} of size 1 has {got}, expected {expected}")
            expect((reply.get("result") or {}).get("total") == 2, f"total on page {page}: {short(reply)}")

    case("getallcont with page/page_size -> sorted, total", getallcont_pages)

    # ---------------------------------------------------------------- invalid requests
    def bad(name, body, needles):
        def run_case():
            reply = client.call(body)
            expect_status(reply, 400, "bad_request")
            message = reply["error"]["message"]
            expect(
                any(n in message for n in needles),
                f"message {message!r} names none of {needles}",
            )

        case(name, run_case)

    bad("malformed JSON -> 400", b'{"op": "getcont", "container_name": ', ["JSON", "json"])
    bad("unknown op -> 400", {"op": "explode", "container_name": B}, ["explode"])
    missing_field = start_body(f"nb-x-{run}")
    del missing_field["container_image"]
    bad("missing required field -> 400", missing_field, ["container_image"])
    bad("mistyped field (container_name: 7) -> 400", {"op": "getcont", "container_name": 7},
        ["container_name", "invalid type"])
    bad("unknown extra field -> 400", {"op": "getcont", "container_name": B, "colour": "red"},
        ["colour"])

    def still_serving():
        reply = client.call({"op": "getallcont"})
        expect_status(reply, 200)
        expect((reply.get("result") or {}).get("total") == 2, f"total: {short(reply)}")

    case("getallcont after invalid requests -> 200", still_serving)

    # ---------------------------------------------------------------- idempotency
    def same_reply(first, second):
        for field in ("status", "ok", "result", "error", "warnings", "op", "container_name"):
            expect(
                first.get(field) == second.get(field),
                f"{field} differs: {first.get(field)!r} vs {second.get(field)!r}",
            )

    def duplicate_stop_queued():
        # Published back to back: the second is a duplicate of a request not yet answered.
        message_id = f"acc-stop-{run}"
        c1 = client.publish({"op": "stop", "container_name": C}, message_id=message_id)
        c2 = client.publish({"op": "stop", "container_name": C}, message_id=message_id)
        r1, r2 = client.wait(c1), client.wait(c2)
        expect_status(r1, 200)
        same_reply(r1, r2)
        stops = invocations(args.fake_log, ["instance", "stop"], C)
        expect(len(stops) == 1, f"the fake ran `instance stop {C}` {len(stops)} times, expected once")

    case("same stop twice (same message_id) -> same reply, one side effect", duplicate_stop_queued)

    def duplicate_createvolume_answered():
        # The second is published after the first was answered: the stored reply is sent again.
        message_id = f"acc-createvolume-{run}"
        body = volume_body("createvolume", bind3, "/mnt", name=B)
        c1 = client.publish(body, message_id=message_id)
        r1 = client.wait(c1)
        expect_status(r1, 200)
        c2 = client.publish(body, message_id=message_id)
        # Checked last, so that a wrong envelope does not hide the other findings.
        r2, envelope_problems = client.wait_lenient(c2)
        same_reply(r1, r2)
        # Run a second time, it would find its own bind and answer 409: a 200 again means the
        # stored reply was sent, not a new run.
        expect_status(r2, 200)
        expect(
            not envelope_problems,
            "same status/result and not run again, but the repeated reply is wrong: "
            + "; ".join(envelope_problems),
        )

    case(
        "same createvolume twice (same message_id, after the reply) -> same reply, not run again",
        duplicate_createvolume_answered,
    )

    # ---------------------------------------------------------------- upgrade
    def old_queue_moved():
        # README, "Upgrading from a single host": requests left in the old queue reach their
        # containers through deploy/move-old-requests, and are answered to their requesters.
        old = f"{args.exchange}.old-requests"
        client.channel.queue_declare(old, durable=True)
        try:
            read = client.publish_to_queue(old, {"op": "getcont", "container_name": B})
            listed = client.publish_to_queue(old, {"op": "getallcont"})
            unknown = client.publish_to_queue(old, {"op": "getcont", "container_name": f"nobody-{run}"})
            mover = subprocess.run(
                [sys.executable, MOVER, "--amqp-url", args.amqp_url, "--from", old,
                 "--exchange", args.exchange],
                capture_output=True, text=True, timeout=60,
            )
            expect(mover.returncode == 0, f"move-old-requests exited {mover.returncode}: {mover.stderr}")
            expect("moved 3 request(s)" in mover.stdout, f"move-old-requests said {mover.stdout!r}")
            reply = client.wait(read)
            expect_status(reply, 200)
            expect((reply.get("result") or {}).get("container_name") == B, f"record: {short(reply)}")
            expect_status(client.wait(listed), 200)
            expect_status(client.wait(unknown), 404, "not_found")
            left = client.channel.queue_declare(old, passive=True).method.message_count
            expect(left == 0, f"{left} messages left in {old}")
        finally:
            client.channel.queue_delete(old)

    case("requests left in an old request queue -> moved to the exchange, answered", old_queue_moved)

    # ---------------------------------------------------------------- exactly one reply each
    def one_reply_each():
        client.pump(DRAIN_SECONDS)
        problems = []
        for correlation_id in client.sent:
            count = len(client.replies.get(correlation_id, []))
            if count != 1:
                problems.append(f"{correlation_id}: {count} replies")
        strangers = [c for c in client.replies if c not in client.sent]
        if strangers:
            problems.append(f"replies for correlation ids never sent: {strangers}")
        expect(not problems, "; ".join(problems))

    case(f"exactly one final reply per request ({len(client.sent)} requests)", one_reply_each)

    client.close()
    passed = sum(results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
