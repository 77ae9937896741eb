"""Webhooks as a fal receiver sees them, verified by an independent implementation.

The receiver below verifies Darkroom's deliveries the way receivers written for fal do (fal-protocol.md §5): it
fetches the JWKS from the server, rebuilds ``"{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(body)}"`` and
checks the Ed25519 signature with the ``cryptography`` package (no Darkroom code involved), within ±300 s.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import ssl
import threading
import time

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

APP = "darkroom/diagnostics"


class Receiver:
    """An HTTP receiver on 127.0.0.1 that records deliveries and fails the first ``fail_first`` of them."""

    def __init__(self, fail_first: int = 0, redirect_to: str | None = None):
        self.fail_first = fail_first
        self.redirect_to = redirect_to
        self.calls: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with outer.lock:
                    outer.calls.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    n = len(outer.calls)
                code = 500 if n <= outer.fail_first else 200
                if outer.redirect_to:
                    code = 302
                self.send_response(code)
                if outer.redirect_to:
                    self.send_header("location", outer.redirect_to)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?src=test"

    def wait(self, n: int, timeout: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.calls) >= n:
                    return list(self.calls)
            time.sleep(0.02)
        raise AssertionError(f"expected {n} deliveries, got {len(self.calls)}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def b64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def fetch_jwks(darkroom) -> list[Ed25519PublicKey]:
    r = httpx.get(f"{darkroom.url}/.well-known/jwks.json", verify=ssl.create_default_context(cafile=darkroom.ca_bundle), timeout=10)
    r.raise_for_status()
    keys = r.json()["keys"]
    assert keys and all(k["kty"] == "OKP" and k["crv"] == "Ed25519" and k["kid"] for k in keys), keys
    return [Ed25519PublicKey.from_public_bytes(b64url(k["x"])) for k in keys]


def verify(headers: dict, body: bytes, keys: list[Ed25519PublicKey], now: float | None = None) -> bool:
    """A fal webhook receiver's check: freshness, then any key of the JWKS."""
    ts = int(headers["x-fal-webhook-timestamp"])
    if abs((now if now is not None else time.time()) - ts) > 300:
        return False
    msg = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            str(ts),
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    sig = bytes.fromhex(headers["x-fal-webhook-signature"])
    for k in keys:
        try:
            k.verify(sig, msg)
            return True
        except InvalidSignature:
            continue
    return False


def admin(darkroom) -> dict:
    return {"authorization": f"Key {darkroom.admin_key}"}


def test_signed_delivery_verifies_and_tampering_fails(fal, darkroom):
    rx = Receiver()
    try:
        handle = fal.submit(APP, {"echo": {"n": 1}}, webhook_url=rx.url, headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        call = rx.wait(1)[0]
        body = json.loads(call["body"])
        assert body == {
            "request_id": handle.request_id,
            "gateway_request_id": handle.request_id,
            "status": "OK",
            "payload": {"echo": {"n": 1}, "attempt": 1},
        }
        h = call["headers"]
        assert h["x-fal-webhook-request-id"] == handle.request_id
        assert h["x-fal-webhook-user-id"] == "local", "the owner id"
        assert h["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        keys = fetch_jwks(darkroom)
        assert verify(h, call["body"], keys)
        # A tampered body, a wrong key and a stale timestamp all fail.
        assert not verify(h, call["body"].replace(b'"n":1', b'"n":2'), keys)
        other = Ed25519PrivateKey.generate().public_key()
        assert not verify(h, call["body"], [other])
        assert not verify(h, call["body"], keys, now=int(h["x-fal-webhook-timestamp"]) + 301)
        assert not verify({**h, "x-fal-webhook-user-id": "someone-else"}, call["body"], keys)
    finally:
        rx.close()


def test_failed_request_webhook_carries_the_error(fal, darkroom):
    rx = Receiver()
    try:
        handle = fal.submit(APP, {"fail": {"status": 422, "message": "bad prompt"}}, webhook_url=rx.url)
        call = rx.wait(1)[0]
        body = json.loads(call["body"])
        assert body["status"] == "ERROR"
        assert body["request_id"] == handle.request_id
        assert body["error"] == "Invalid status code: 422"
        assert body["payload"]["detail"] == "bad prompt"
        assert verify(call["headers"], call["body"], fetch_jwks(darkroom))
    finally:
        rx.close()


def test_receiver_down_then_delivered_with_the_same_payload(fal, darkroom):
    rx = Receiver(fail_first=2)
    try:
        handle = fal.submit(APP, {"echo": "retry me"}, webhook_url=rx.url)
        calls = rx.wait(3)
        assert calls[0]["body"] == calls[1]["body"] == calls[2]["body"], "every attempt sends the same payload"
        keys = fetch_jwks(darkroom)
        assert all(verify(c["headers"], c["body"], keys) for c in calls)
        # The delivery log shows each attempt.
        deadline = time.monotonic() + 10
        while True:
            r = httpx.get(f"{darkroom.url}/v1/webhooks", params={"request_id": handle.request_id}, headers=admin(darkroom), verify=ssl.create_default_context(cafile=darkroom.ca_bundle))
            d = r.json()["webhooks"][0]
            if d["state"] == "delivered" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert d["state"] == "delivered" and d["attempts"] == 3, d
        detail = httpx.get(f"{darkroom.url}/v1/webhooks/{d['id']}", headers=admin(darkroom), verify=ssl.create_default_context(cafile=darkroom.ca_bundle)).json()
        assert [a["status"] for a in detail["attempt_log"]] == [500, 500, 200], detail
        assert detail["body"]["payload"]["echo"] == "retry me"
    finally:
        rx.close()


def test_private_webhook_targets_are_refused_at_submit(fal):
    # The session server allows 127.0.0.1 only; other private ranges are refused with a 422 on the field.
    for url in ["http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x", "ftp://example.com/x", "not a url"]:
        with pytest.raises(fal.client.FalClientHTTPError) as e:
            fal.submit(APP, {}, webhook_url=url)
        assert e.value.status_code == 422, url
        assert "fal_webhook" in str(e.value), str(e.value)


def test_redirects_are_not_followed(fal, darkroom):
    target = Receiver()
    bouncer = Receiver(redirect_to=target.url)
    try:
        handle = fal.submit(APP, {"echo": "no redirects"}, webhook_url=bouncer.url)
        calls = bouncer.wait(5)  # every attempt of the session server's 5-attempt schedule answers 302
        assert len(calls) == 5
        deadline = time.monotonic() + 10
        while True:
            r = httpx.get(f"{darkroom.url}/v1/webhooks", params={"request_id": handle.request_id}, headers=admin(darkroom),
                          verify=ssl.create_default_context(cafile=darkroom.ca_bundle))
            d = r.json()["webhooks"][0]
            if d["state"] == "dead" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert d["state"] == "dead" and d["last_status"] == 302, d
        assert target.calls == [], "the redirect target was never contacted"
        assert fal.result(APP, handle.request_id) == {"echo": "no redirects", "attempt": 1}, "the result stays fetchable"
    finally:
        target.close()
        bouncer.close()
