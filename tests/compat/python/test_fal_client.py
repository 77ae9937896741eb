"""Compatibility tests: the official Python ``fal-client`` (1.0.3) against Darkroom.

The client is used unmodified and configured only through the environment
(fal-protocol.md section 7.1, recipe P1); see conftest.py.  All traffic stays on
127.0.0.1.  The app under test is Darkroom's built-in ``darkroom/diagnostics``:

    input  {"echo": any, "sleep_ms": n, "logs": [str], "fail": {"status", "message"}, "parts": n}
    output {"echo": <echo>, "attempt": n}
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import httpx
import pytest

APP = "darkroom/diagnostics"
MISSING_APP = "darkroom/no-such-app-compat"

# How long a test waits for a short diagnostics request to finish.
COMPLETE_WITHIN_S = 20.0


def _wait_completed(fal, handle, *, with_logs: bool = False, within: float = COMPLETE_WITHIN_S):
    """Poll handle.status() until Completed; return (final_status, all_statuses)."""
    seen = []
    deadline = time.monotonic() + within
    while True:
        st = handle.status(with_logs=with_logs)
        seen.append(st)
        assert isinstance(st, (fal.Queued, fal.InProgress, fal.Completed)), st
        if isinstance(st, fal.Completed):
            return st, seen
        assert time.monotonic() < deadline, f"not COMPLETED after {within}s; statuses: {seen}"
        time.sleep(0.05)


def _log_messages(statuses) -> list[str]:
    out: list[str] = []
    for st in statuses:
        for entry in getattr(st, "logs", None) or []:
            out.append(entry["message"])
    return out


# ---------------------------------------------------------------------------
# Setup sanity
# ---------------------------------------------------------------------------


def test_server_json_and_env(darkroom):
    sj = darkroom.server_json
    assert darkroom.url.startswith("https://127.0.0.1:"), sj
    port = darkroom.listen.rsplit(":", 1)[1]
    assert darkroom.url == f"https://127.0.0.1:{port}"
    assert isinstance(sj.get("pid"), int)
    assert sj.get("boot_id")
    assert darkroom.ca_bundle and darkroom.ca_cert
    env = darkroom.env
    assert env["FAL_RUN_HOST"] == f"127.0.0.1:{port}/run"
    assert env["FAL_QUEUE_RUN_HOST"] == f"127.0.0.1:{port}/queue"
    assert env["SSL_CERT_FILE"] == darkroom.ca_bundle
    assert ":" in env["FAL_KEY"]
    assert darkroom.admin_key and ":" in darkroom.admin_key


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


def test_run_echo(fal):
    payload = {"hello": "world", "n": 3, "nested": {"list": [1, 2.5, None, True]}, "text": "héllo ✓"}
    out = fal.run(APP, {"echo": payload}, timeout=30)
    assert out["echo"] == payload
    assert out["attempt"] == 1


def test_run_with_client_object_and_explicit_key(fal, darkroom):
    client = fal.SyncClient(key=darkroom.fal_key)
    out = client.run(APP, {"echo": "explicit-key", "sleep_ms": 50}, timeout=30, hint="compat-hint", start_timeout=30)
    assert out == {"echo": "explicit-key", "attempt": 1}


# ---------------------------------------------------------------------------
# queue: submit / status / result
# ---------------------------------------------------------------------------


def test_submit_status_with_logs_and_result(fal, darkroom):
    handle = fal.submit(
        APP,
        {"echo": "queued", "sleep_ms": 300, "logs": ["first log line", "second log line"]},
    )
    rid = handle.request_id
    assert rid
    # The client follows these URLs verbatim (fal-protocol.md 1.3 #2).
    for url in (handle.status_url, handle.response_url, handle.cancel_url):
        assert url.startswith(darkroom.url + "/queue/"), url
    assert handle.response_url.endswith(f"/darkroom/diagnostics/requests/{rid}")
    assert handle.status_url == handle.response_url + "/status"
    assert handle.cancel_url == handle.response_url + "/cancel"

    final, seen = _wait_completed(fal, handle, with_logs=True)
    messages = _log_messages([final])
    assert "first log line" in messages, final.logs
    assert "second log line" in messages, final.logs
    assert messages.index("first log line") < messages.index("second log line")
    for entry in final.logs:
        assert {"message", "level", "timestamp"} <= set(entry), entry
    assert final.error is None and final.error_type is None
    assert isinstance(final.metrics.get("inference_time"), (int, float)), final.metrics

    assert handle.get() == {"echo": "queued", "attempt": 1}

    # Module-level helpers rebuild the URLs from the endpoint id instead.
    st = fal.status(APP, rid, with_logs=True)
    assert isinstance(st, fal.Completed)
    assert "first log line" in _log_messages([st])
    assert fal.result(APP, rid) == {"echo": "queued", "attempt": 1}
    # Status and result URLs drop the endpoint path; an id with a path still works.
    assert fal.result(f"{APP}/some/path", rid) == {"echo": "queued", "attempt": 1}


def test_status_without_logs(fal):
    handle = fal.submit(APP, {"echo": "nologs", "sleep_ms": 300, "logs": ["should not be shown"]})
    final, seen = _wait_completed(fal, handle, with_logs=False)
    for st in seen:
        if isinstance(st, (fal.InProgress, fal.Completed)):
            assert not st.logs, f"logs returned without logs=true: {st.logs}"
    st = fal.status(APP, handle.request_id)  # with_logs defaults to False
    assert isinstance(st, fal.Completed)
    assert not st.logs
    # And with logs the same request does have them.
    st = fal.status(APP, handle.request_id, with_logs=True)
    assert "should not be shown" in _log_messages([st])
    assert handle.get()["echo"] == "nologs"


def test_status_reports_in_queue_or_in_progress_while_running(fal):
    handle = fal.submit(APP, {"echo": "slow", "sleep_ms": 800, "logs": ["working"]})
    first = handle.status(with_logs=True)
    assert isinstance(first, (fal.Queued, fal.InProgress)), first
    if isinstance(first, fal.Queued):
        assert isinstance(first.position, int) and first.position >= 0
    final, seen = _wait_completed(fal, handle, with_logs=True)
    assert any(isinstance(s, fal.InProgress) for s in seen), seen
    assert handle.get()["echo"] == "slow"


# ---------------------------------------------------------------------------
# subscribe
# ---------------------------------------------------------------------------


def test_subscribe_with_queue_updates_and_logs(fal):
    enqueued: list[str] = []
    updates: list[Any] = []
    out = fal.subscribe(
        APP,
        {"echo": "subscribed", "sleep_ms": 400, "logs": ["sub log one", "sub log two"]},
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=updates.append,
    )
    assert out == {"echo": "subscribed", "attempt": 1}
    assert len(enqueued) == 1 and enqueued[0]
    assert updates, "on_queue_update never called"
    assert isinstance(updates[-1], fal.Completed)
    assert all(isinstance(u, (fal.Queued, fal.InProgress, fal.Completed)) for u in updates)
    assert any(isinstance(u, fal.InProgress) for u in updates), updates
    messages = _log_messages(u for u in updates if isinstance(u, (fal.InProgress, fal.Completed)))
    assert "sub log one" in messages and "sub log two" in messages, messages
    assert "sub log one" in _log_messages([updates[-1]])


def test_subscribe_without_callbacks(fal):
    out = fal.subscribe(APP, {"echo": [1, 2, 3]}, client_timeout=30)
    assert out == {"echo": [1, 2, 3], "attempt": 1}


# ---------------------------------------------------------------------------
# cancel
# ---------------------------------------------------------------------------


def test_cancel_long_request(fal):
    handle = fal.submit(APP, {"echo": "cancel-me", "sleep_ms": 30000})
    first = handle.status()
    assert isinstance(first, (fal.Queued, fal.InProgress)), first
    time.sleep(0.2)  # let it get picked up (either state is fine to cancel)

    started = time.monotonic()
    fal.cancel(APP, handle.request_id)  # PUT .../requests/{id}/cancel, URL rebuilt from the id

    final, _ = _wait_completed(fal, handle, within=10.0)
    assert time.monotonic() - started < 10.0
    assert final.error_type == "request_cancelled", final

    with pytest.raises(fal.FalClientHTTPError) as ei:
        handle.get()
    assert 400 <= ei.value.status_code < 500, (ei.value.status_code, ei.value.message)


def test_cancel_via_handle_url(fal):
    handle = fal.submit(APP, {"echo": "cancel-me-too", "sleep_ms": 30000})
    handle.cancel()  # uses the cancel_url the server returned
    final, _ = _wait_completed(fal, handle, within=10.0)
    assert final.error_type == "request_cancelled", final
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.result(APP, handle.request_id)
    assert 400 <= ei.value.status_code < 500


# ---------------------------------------------------------------------------
# stream
# ---------------------------------------------------------------------------


def test_stream_partials_then_final(fal):
    events = list(fal.stream(APP, {"echo": "streamed", "parts": 3, "sleep_ms": 300}, timeout=30))
    assert events[:3] == [{"part": 0}, {"part": 1}, {"part": 2}], events
    assert len(events) == 4, events
    assert events[-1]["echo"] == "streamed", events


def test_stream_without_parts_yields_final_only(fal):
    events = list(fal.stream(APP, {"echo": {"k": "v"}}, timeout=30))
    assert len(events) == 1, events
    assert events[-1]["echo"] == {"k": "v"}


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


def _assert_validation_error(fal, exc_info):
    err = exc_info.value
    assert isinstance(err, fal.FalClientHTTPError)
    assert err.status_code == 422, (err.status_code, err.message)
    detail = err.message  # fal-client puts body["detail"] here
    assert isinstance(detail, list) and detail, detail
    assert detail[0]["loc"] == ["body", "sleep_ms"], detail
    assert detail[0].get("msg") and detail[0].get("type"), detail
    assert err.error_type == "validation_error"
    assert err.response.headers.get("x-fal-request-id")


def test_validation_error_on_submit(fal):
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.submit(APP, {"sleep_ms": "x"})
    _assert_validation_error(fal, ei)


def test_validation_error_on_run(fal):
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.run(APP, {"sleep_ms": "x"}, timeout=30)
    _assert_validation_error(fal, ei)


def test_validation_error_on_subscribe(fal):
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.subscribe(APP, {"sleep_ms": "x"})
    _assert_validation_error(fal, ei)


def test_app_failure_surfaces_on_result(fal):
    handle = fal.submit(APP, {"fail": {"status": 418, "message": "teapot failure"}})
    final, _ = _wait_completed(fal, handle)
    assert isinstance(final, fal.Completed)
    with pytest.raises(fal.FalClientHTTPError) as ei:
        handle.get()
    assert ei.value.status_code == 418
    assert ei.value.message == "teapot failure"
    assert ei.value.response.headers.get("x-fal-request-id")


def test_app_failure_surfaces_on_subscribe(fal):
    updates: list[Any] = []
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.subscribe(
            APP,
            {"fail": {"status": 418, "message": "teapot via subscribe"}},
            on_queue_update=updates.append,
        )
    assert ei.value.status_code == 418
    assert ei.value.message == "teapot via subscribe"
    assert updates and isinstance(updates[-1], fal.Completed)


def test_app_failure_on_run(fal):
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.run(APP, {"fail": {"status": 500, "message": "boom"}}, timeout=30)
    assert ei.value.status_code == 500
    assert ei.value.message == "boom"
    assert ei.value.response.headers.get("x-fal-request-id")


def test_unknown_app_is_404(fal):
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.run(MISSING_APP, {}, timeout=30)
    assert ei.value.status_code == 404
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.submit(MISSING_APP, {})
    assert ei.value.status_code == 404


def test_unknown_request_id_status_is_404(fal):
    with pytest.raises(fal.FalClientHTTPError) as ei:
        fal.status(APP, "00000000-0000-0000-0000-000000000000")
    assert ei.value.status_code == 404


# ---------------------------------------------------------------------------
# AsyncClient
# ---------------------------------------------------------------------------


def test_async_client_run_submit_stream(fal):
    async def main() -> None:
        client = fal.AsyncClient()  # key from FAL_KEY
        out = await client.run(APP, {"echo": "async-run"}, timeout=30)
        assert out == {"echo": "async-run", "attempt": 1}

        handle = await client.submit(APP, {"echo": "async-queue", "sleep_ms": 200, "logs": ["async log"]})
        deadline = time.monotonic() + COMPLETE_WITHIN_S
        while True:
            st = await handle.status(with_logs=True)
            assert isinstance(st, (fal.Queued, fal.InProgress, fal.Completed)), st
            if isinstance(st, fal.Completed):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert "async log" in _log_messages([st])
        assert await handle.get() == {"echo": "async-queue", "attempt": 1}
        assert await client.result(APP, handle.request_id) == {"echo": "async-queue", "attempt": 1}

        updates: list[Any] = []
        out = await client.subscribe(
            APP, {"echo": "async-sub", "sleep_ms": 200}, with_logs=True, on_queue_update=updates.append
        )
        assert out == {"echo": "async-sub", "attempt": 1}
        assert isinstance(updates[-1], fal.Completed)

        events = [e async for e in client.stream(APP, {"echo": "async-stream", "parts": 2, "sleep_ms": 100})]
        assert events[:2] == [{"part": 0}, {"part": 1}], events
        assert events[-1]["echo"] == "async-stream"

        long = await client.submit(APP, {"sleep_ms": 30000})
        await long.cancel()
        deadline = time.monotonic() + 10
        while True:
            st = await long.status()
            if isinstance(st, fal.Completed):
                break
            assert time.monotonic() < deadline, "cancelled request did not complete"
            await asyncio.sleep(0.05)
        assert st.error_type == "request_cancelled"
        with pytest.raises(fal.FalClientHTTPError):
            await long.get()

        with pytest.raises(fal.FalClientHTTPError) as ei:
            await client.submit(APP, {"sleep_ms": "x"})
        assert ei.value.status_code == 422

        await (await client._client).aclose()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# Raw HTTP checks of details the clients depend on (fal-protocol.md 1.5, 9)
# ---------------------------------------------------------------------------


@pytest.fixture()
def raw(darkroom):
    with httpx.Client(
        base_url=darkroom.url,
        verify=ssl.create_default_context(cafile=darkroom.ca_bundle),
        headers={"Authorization": f"Key {darkroom.fal_key}"},
        timeout=30,
        trust_env=False,
        follow_redirects=False,
    ) as c:
        yield c


def test_raw_run_has_request_id_header(raw):
    r = raw.post(f"/run/{APP}", json={"echo": "raw"})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-fal-request-id")
    assert r.headers.get("content-type", "").startswith("application/json")
    assert r.json() == {"echo": "raw", "attempt": 1}


def test_raw_queue_shapes(raw, darkroom):
    r = raw.post(f"/queue/{APP}", json={"echo": "raw-q", "sleep_ms": 100})
    assert 200 <= r.status_code < 300, r.text
    body = r.json()
    rid = body["request_id"]
    assert body["status"] == "IN_QUEUE"
    assert isinstance(body["queue_position"], int)
    base = f"{darkroom.url}/queue/{APP}/requests/{rid}"
    assert body["response_url"] == base
    assert body["status_url"] == base + "/status"
    assert body["cancel_url"] == base + "/cancel"

    deadline = time.monotonic() + COMPLETE_WITHIN_S
    while True:
        s = raw.get(f"/queue/{APP}/requests/{rid}/status", params={"logs": "1"})
        st = s.json()
        assert st["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED"), st
        assert st["request_id"] == rid
        if st["status"] == "COMPLETED":
            assert s.status_code == 200
            assert "logs" in st
            break
        assert s.status_code == 202, (s.status_code, st)
        if st["status"] == "IN_QUEUE":
            assert isinstance(st["queue_position"], int)
        else:
            assert "logs" in st
        assert time.monotonic() < deadline
        time.sleep(0.05)

    res = raw.get(f"/queue/{APP}/requests/{rid}")
    assert res.status_code == 200
    assert res.headers.get("x-fal-request-id") == rid
    assert res.json() == {"echo": "raw-q", "attempt": 1}
    # Trailing slashes are accepted (fal.apps sends them) and never redirected.
    assert raw.get(f"/queue/{APP}/requests/{rid}/").status_code == 200
    assert raw.get(f"/queue/{APP}/requests/{rid}/status/", params={"logs": "1"}).status_code == 200
