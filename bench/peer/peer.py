"""The Celery peer of courier's benchmark: the same job done the usual way.

API (`python peer.py api`): POST /orders/<id>/cancel commits the cancel in
one transaction (lock the order, refuse unless placed, update it), then
publishes a `refund` task with publisher confirms (`confirm_publish`) and
answers once the broker confirmed it. No outbox: a crash between commit and
publish loses the event, which is the usual trade and not measured here.

Worker (`celery -A peer worker`): `acks_late`, so a task is acked after it
ran. It checks the inbox, calls the payment gateway simulator with the event
id as Idempotency-Key, then writes the refund row and its inbox row in one
transaction, like courier's refund handler.

Configuration comes from the environment the bench sets: PEER_BROKER_URL,
PEER_DATABASE_URL, PEER_GATEWAY (host:port), PEER_API_PORT.
"""

import http.client
import json
import os
import re
import signal
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Queue

import psycopg
from celery import Celery

BROKER_URL = os.environ["PEER_BROKER_URL"]
DATABASE_URL = os.environ["PEER_DATABASE_URL"]
GATEWAY = os.environ["PEER_GATEWAY"]
API_PROCESSES = int(os.environ.get("PEER_API_PROCESSES", str(os.cpu_count() or 2)))
API_DB_CONNECTIONS = int(os.environ.get("PEER_API_DB_CONNECTIONS", "16"))

app = Celery("peer", broker=BROKER_URL)
app.conf.update(
    broker_transport_options={"confirm_publish": True},
    broker_pool_limit=64,
    broker_connection_retry_on_startup=True,
    task_default_queue="peer.refunds",
    task_default_queue_type="quorum",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=int(os.environ.get("PEER_PREFETCH_MULTIPLIER", "8")),
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    worker_hijack_root_logger=False,
)

# One database connection and one gateway connection per worker process.
_local = threading.local()


def _db():
    conn = getattr(_local, "db", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(DATABASE_URL, autocommit=True)
        _local.db = conn
    return conn


def _gateway_refund(event_id, payment_id, amount_cents):
    body = json.dumps({"payment_id": payment_id, "amount_cents": amount_cents})
    headers = {"content-type": "application/json", "idempotency-key": event_id}
    for attempt in (1, 2):
        conn = getattr(_local, "gateway", None)
        if conn is None:
            host, port = GATEWAY.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            _local.gateway = conn
        try:
            conn.request("POST", "/refunds", body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            _local.gateway = None
            if attempt == 2:
                raise
            continue
        if response.status >= 300:
            raise RuntimeError(f"gateway answered {response.status}: {data[:200]!r}")
        return json.loads(data)["refund_id"]
    raise RuntimeError("unreachable")


@app.task(name="peer.refund", acks_late=True)
def refund(event_id, order_id, payment_id, amount_cents):
    db = _db()
    seen = db.execute(
        "SELECT EXISTS (SELECT 1 FROM processed_messages WHERE consumer = 'refunds' AND message_id = %s)",
        (event_id,),
    ).fetchone()[0]
    if seen:
        return
    refund_id = _gateway_refund(event_id, payment_id, amount_cents)
    with db.transaction():
        inserted = db.execute(
            "INSERT INTO processed_messages (consumer, message_id) VALUES ('refunds', %s) "
            "ON CONFLICT DO NOTHING",
            (event_id,),
        ).rowcount
        if inserted != 1:
            return
        db.execute(
            "INSERT INTO refunds (id, order_id, event_id, payment_id, amount_cents, "
            "gateway_refund_id, status) VALUES (%s, %s, %s, %s, %s, %s, 'completed') "
            "ON CONFLICT (order_id) DO NOTHING",
            (str(uuid.uuid4()), order_id, event_id, payment_id, amount_cents, refund_id),
        )


CANCEL_PATH = re.compile(r"^/orders/([0-9a-fA-F-]{36})/cancel$")


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    pool: Queue = None  # set per process

    def log_message(self, *args):
        pass

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            self._answer(200, {"ok": True})
        else:
            self._answer(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        match = CANCEL_PATH.match(self.path)
        if not match:
            self._answer(404, {"error": "not found"})
            return
        order_id = match.group(1)
        conn = Api.pool.get()
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT state, payment_id, amount_cents FROM orders WHERE id = %s FOR UPDATE",
                    (order_id,),
                ).fetchone()
                if row is None:
                    self._answer(404, {"error": "no such order"})
                    return
                state, payment_id, amount_cents = row
                if state != "placed":
                    self._answer(409, {"error": f"order is {state}"})
                    return
                conn.execute(
                    "UPDATE orders SET state = 'canceled', version = version + 1, "
                    "updated_at = now() WHERE id = %s",
                    (order_id,),
                )
        finally:
            Api.pool.put(conn)
        event_id = str(uuid.uuid4())
        # Blocks until the broker confirmed the publish (confirm_publish).
        refund.apply_async(
            kwargs={
                "event_id": event_id,
                "order_id": order_id,
                "payment_id": payment_id,
                "amount_cents": amount_cents,
            },
            task_id=event_id,
        )
        self._answer(200, {"order_id": order_id, "event_id": event_id})


def serve_api():
    port = int(os.environ["PEER_API_PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Api)
    server.daemon_threads = True
    # Pre-fork: every process accepts on the same socket, with its own
    # database connections and broker connections made after the fork. The
    # first process passes SIGTERM on to the others.
    forks = []
    for _ in range(API_PROCESSES - 1):
        child = os.fork()
        if child == 0:
            forks = []
            break
        forks.append(child)

    def stop(*_):
        for child in forks:
            try:
                os.kill(child, signal.SIGTERM)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    pool = Queue()
    for _ in range(max(1, API_DB_CONNECTIONS // API_PROCESSES)):
        pool.put(psycopg.connect(DATABASE_URL, autocommit=True))
    Api.pool = pool
    server.serve_forever()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "api":
    serve_api()
