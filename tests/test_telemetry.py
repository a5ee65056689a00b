"""OpenTelemetry ([telemetry]): a real `twistd -n lightmail` exports its spans over
OTLP/HTTP to a receiver in the test (an HTTP server decoding the protobuf with
opentelemetry-proto): a session span, a message span with the queue id, size and
recipients, and its delivery attempt as a child.  Off, nothing is imported or sent."""

from __future__ import annotations

import http.server
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness import ServerProcess, run_cli
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

REPO = Path(__file__).resolve().parent.parent


class Receiver:
    """An OTLP/HTTP traces endpoint: POST /v1/traces, protobuf, kept as spans."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.path == "/v1/traces", self.path
                assert self.headers["Content-Type"] == "application/x-protobuf"
                request = ExportTraceServiceRequest.FromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.append({
                            "name": span.name, "resource": resource,
                            "scope": scope_spans.scope.name,
                            "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "links": [(link.trace_id.hex(), link.span_id.hex())
                                      for link in span.links],
                            "events": [event.name for event in span.events],
                            "attributes": {a.key: _value(a.value) for a in span.attributes},
                            "status": span.status.code})

    def wait_for(self, name: str, timeout: float = 60.0, **attributes: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                for span in self.spans:
                    if span["name"] == name and all(
                            span["attributes"].get(k) == v for k, v in attributes.items()):
                        return span
                names = [(s["name"], s["attributes"]) for s in self.spans]
            assert time.monotonic() < deadline, f"no {name} {attributes}: {names}"
            time.sleep(0.2)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def _config(extra: str, workers: int = 0) -> str:
    return ("[server]\nstate_dir = state\nhostname = mx.example.test\nshutdown_timeout = 5s\n"
            f"workers = {workers}\n"
            "[smtp]\ndirect_delivery = no\n"
            "[listener:mx]\nprotocol = smtp\nendpoint = tcp:0:interface=127.0.0.1\n" + extra)


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("someone@remote.example", ["ann@example.test", "bob@example.test"],
                        "Subject: traced\r\n\r\nHello.\r\n")


def test_sessions_messages_and_deliveries_become_spans(write_config) -> None:
    receiver = Receiver()
    # With a worker: the session and its message are traced there, the deliveries in
    # the main process, and still the one is the other's parent.
    config = write_config(_config(f"[telemetry]\notlp_endpoint = {receiver.url}\n"
                                  "service_name = mx-test\n", workers=1))
    run_cli(config, "domain", "add", "example.test")
    for user in ("ann", "bob"):
        run_cli(config, "user", "add", f"{user}@example.test", "--no-password")
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1, timeout=120)["mx"]
        _send(port)
        queue_id = server.wait_for(r"msg=(\w+)\] accepted from=")[0].group(1)
        server.wait_for(r"status=delivered", count=2)
        session = receiver.wait_for("smtp session", **{"lightmail.messages": 1})
        assert session["resource"]["service.name"] == "mx-test"
        assert session["scope"] == "lightmail" and session["parent"] == ""
        attrs = session["attributes"]
        assert attrs["lightmail.protocol"] == "smtp" and attrs["lightmail.listener"] == "mx"
        assert attrs["client.address"] == "127.0.0.1"
        assert attrs["lightmail.outcome"] == "closed"
        server.wait_for(rf"worker=0 conn={attrs['lightmail.conn_id']}\] connect from 127")
        assert "message" in session["events"]
        message = receiver.wait_for("message accepted", **{"lightmail.queue_id": queue_id})
        assert message["attributes"]["lightmail.message.recipients"] == 2
        assert message["attributes"]["lightmail.message.size"] > 0
        assert message["attributes"]["lightmail.outcome"] == "accepted"
        assert message["links"] == [(session["trace_id"], session["span_id"])]
        # Each recipient's delivery attempt: a child of the message's span.
        deliveries = [receiver.wait_for("delivery local", **{"lightmail.queue_id": queue_id,
                                                             "lightmail.outcome": "delivered"})]
        for span in deliveries:
            assert span["trace_id"] == message["trace_id"]
            assert span["parent"] == message["span_id"]
            assert span["attributes"]["lightmail.recipient.domain"] == "example.test"
            assert span["attributes"]["lightmail.attempt"] == 1
        assert server.terminate() in (0, -15)
    finally:
        server.kill()
        receiver.close()


def test_telemetry_off_imports_nothing_and_sends_nothing(write_config) -> None:
    receiver = Receiver()
    config = write_config(_config(""))
    run_cli(config, "domain", "add", "example.test")
    for user in ("ann", "bob"):
        run_cli(config, "user", "add", f"{user}@example.test", "--no-password")
    # The service tree of a config without [telemetry], as twistd builds it.
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom lightmail.config import load_config\n"
         "from lightmail.service import makeService, validate\n"
         f"makeService(load_config({str(config)!r}, validators=validate))\n"
         "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"],
        capture_output=True, text=True, timeout=120, cwd=config.parent)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", probe.stdout
    server = ServerProcess(config)
    try:
        port = server.ports(expected=1, timeout=120)["mx"]
        _send(port)
        server.wait_for(r"status=delivered", count=2)
        assert server.terminate() in (0, -15)
        assert receiver.requests == 0 and receiver.spans == []
    finally:
        server.kill()
        receiver.close()


def test_a_telemetry_endpoint_that_is_not_http_is_a_config_error(write_config) -> None:
    config = write_config(_config("[telemetry]\notlp_endpoint = 127.0.0.1:4318\n"))
    result = subprocess.run([sys.executable, "-m", "lightmail.admin.cli", "check-config",
                             str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "[telemetry] otlp_endpoint: expected an http:// or https:// URL" in (
        result.stdout + result.stderr)
