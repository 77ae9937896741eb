"""Realtime with the official Python ``fal-client``: ``realtime()`` with a JWT from ``POST /tokens/`` and with the
key on the handshake (``use_jwt=False``), sync and async, against the built-in diagnostics echo."""

from __future__ import annotations

import asyncio

import pytest

APP = "darkroom/diagnostics"


def test_realtime_with_jwt_frames_in_order(fal):
    with fal.realtime(APP, max_buffering=8) as conn:
        for i in range(5):
            conn.send({"i": i, "text": "héllo", "nested": {"xs": [1, 2.5, None]}})
        got = [conn.recv() for _ in range(5)]
    assert got == [{"i": i, "text": "héllo", "nested": {"xs": [1, 2.5, None]}} for i in range(5)]


def test_realtime_with_the_key_on_the_handshake(fal):
    with fal.realtime(APP, use_jwt=False) as conn:
        conn.send({"k": "v"})
        assert conn.recv() == {"k": "v"}


def test_realtime_app_errors_raise_and_the_session_goes_on(fal):
    from fal_client.client import RealtimeError

    with fal.realtime(APP) as conn:
        conn.send({"fail": "boom"})
        with pytest.raises(RealtimeError) as e:
            conn.recv()
        assert "INTERNAL_ERROR" in str(e.value) and "boom" in str(e.value)
        conn.send({"after": 1})
        assert conn.recv() == {"after": 1}


def test_realtime_async(fal):
    async def main():
        async with fal.realtime_async(APP) as conn:
            await conn.send({"a": 1})
            await conn.send({"a": 2})
            return [await conn.recv(), await conn.recv()]

    assert asyncio.run(main()) == [{"a": 1}, {"a": 2}]
