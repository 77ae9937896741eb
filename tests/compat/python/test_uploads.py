"""Compatibility tests: the official Python ``fal-client`` (1.0.3) upload flows against Darkroom.

Each test runs against two servers (fal-protocol.md sections 6.2, 7.1 recipe P2, 10.11, 10.14):

* ``local``: the session's ``darkroom`` (files in a folder of its data directory),
  reached through the module-level functions (``fal_client.upload`` …) exactly as a
  user would, with ``fal_client.client.REST_URL``/``CDN_URL`` set by the ``fal`` fixture;
* ``s3``: a second ``darkroom serve --storage s3://media?endpoint=…`` whose files live
  in a real SeaweedFS on loopback, reached through ``fal_client.SyncClient(key=…)`` with
  the module's URL constants (``REST_URL``, ``CDN_URL``, ``RUN_URL_FORMAT``,
  ``QUEUE_URL_FORMAT``) and ``SSL_CERT_FILE`` monkeypatched for the test.

The fal_v3 single-request and multipart flows are exercised with the ``fal`` fallback
switched off (``fallback_repository=[]``), so a broken fal_v3 flow cannot hide behind
the storage-initiate fallback; the default chain is also checked for not falling back.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import ssl
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

IMAGE_APP = "darkroom/image-utils"
BACKENDS = ("local", "s3")


@dataclasses.dataclass
class Backend:
    name: str
    server: Any  # conftest.Darkroom
    client: Any  # the fal_client module (local) or a fal_client.SyncClient (s3)
    http: httpx.Client  # plain httpx trusting this server's CA, for downloads

    def get(self, url: str, **kw) -> httpx.Response:
        return self.http.get(url, **kw)


@pytest.fixture(scope="session")
def _s3_client(fal, darkroom_s3):
    # One client per session: its token manager and httpx client are created lazily, on
    # first use, inside a test that has the s3 server's constants and CA patched in.
    return fal.SyncClient(key=darkroom_s3.fal_key)


@pytest.fixture(scope="session")
def _http_clients():
    clients: dict[str, httpx.Client] = {}
    yield clients
    for c in clients.values():
        c.close()


@pytest.fixture(params=BACKENDS)
def backend(request, fal, darkroom, monkeypatch, _http_clients) -> Backend:
    import fal_client.client as fal_mod

    if request.param == "local":
        server = darkroom
        client = fal
    else:
        server = request.getfixturevalue("darkroom_s3")
        client = request.getfixturevalue("_s3_client")
        monkeypatch.setattr(fal_mod, "RUN_URL_FORMAT", f"https://{server.env['FAL_RUN_HOST']}/")
        monkeypatch.setattr(fal_mod, "QUEUE_URL_FORMAT", f"https://{server.env['FAL_QUEUE_RUN_HOST']}/")
        # The server has a CA of its own; httpx reads SSL_CERT_FILE when a client is made.
        monkeypatch.setenv("SSL_CERT_FILE", server.env["SSL_CERT_FILE"])
    monkeypatch.setattr(fal_mod, "REST_URL", f"{server.url}/rest")
    monkeypatch.setattr(fal_mod, "CDN_URL", f"{server.url}/cdn")

    if request.param not in _http_clients:
        _http_clients[request.param] = httpx.Client(
            verify=ssl.create_default_context(cafile=server.ca_bundle), timeout=30.0
        )
    return Backend(request.param, server, client, _http_clients[request.param])


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _assert_file_url(backend: Backend, url: str, file_name: str | None = None) -> None:
    """A Darkroom file URL: {base}/cdn/files/{id}.{exp}.{sig}/{file_name}."""
    assert isinstance(url, str), url
    prefix = f"{backend.server.url}/cdn/files/"
    assert url.startswith(prefix), url
    cap, _, name = url[len(prefix) :].partition("/")
    assert cap.count(".") == 2, url
    assert name, url
    if file_name is not None:
        assert urllib.parse.unquote(name) == file_name, url


def _download(backend: Backend, url: str) -> httpx.Response:
    r = backend.get(url)
    assert r.status_code == 200, f"GET {url} -> {r.status_code} {r.text[:300]}"
    return r


def _content_type(r: httpx.Response) -> str:
    return r.headers.get("content-type", "")


def _png_bytes(size=(32, 24), colour=(200, 30, 60)) -> bytes:
    img = Image.new("RGB", size, colour)
    # A second colour so that resizing is not trivially uniform.
    for x in range(size[0] // 2):
        for y in range(size[1]):
            img.putpixel((x, y), (10, 220, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _no_fallback_warnings(caplog) -> None:
    fell_back = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert not fell_back, f"the client fell back to another upload repository: {fell_back}"


def _in_s3(seaweedfs, size: int) -> bool:
    """Whether SeaweedFS's filer holds an object of `size` bytes in the bucket."""
    with httpx.Client(timeout=10.0) as c:
        def walk(path: str):
            r = c.get(
                f"http://127.0.0.1:{seaweedfs.filer_port}{path}",
                headers={"Accept": "application/json"},
                params={"limit": 10000},
            )
            if r.status_code != 200:
                return
            for e in (r.json().get("Entries") or []):
                full = e["FullPath"]
                # Directories carry Mode with the os.ModeDir bit (1 << 31).
                if int(e.get("Mode", 0)) & (1 << 31):
                    yield from walk(full + "/")
                else:
                    yield full, int(e.get("FileSize", 0))

        return any(sz == size for _, sz in walk("/buckets/media/"))


# ---------------------------------------------------------------------------
# 1. fal_v3 single upload
# ---------------------------------------------------------------------------


def test_upload_bytes_text_plain(backend, caplog):
    caplog.set_level(logging.WARNING)
    data = f"hello from fal-client via {backend.name} ✓\n".encode()
    url = backend.client.upload(data, "text/plain")
    _no_fallback_warnings(caplog)
    _assert_file_url(backend, url)
    r = _download(backend, url)
    assert r.content == data
    assert _content_type(r) == "text/plain"


def test_upload_fal_v3_only_with_file_name(backend):
    data = os.urandom(4096)
    url = backend.client.upload(
        data, "application/octet-stream", file_name="blob.bin", repository="fal_v3", fallback_repository=[]
    )
    _assert_file_url(backend, url, "blob.bin")
    r = _download(backend, url)
    assert r.content == data
    assert _content_type(r) == "application/octet-stream"


def test_upload_str_is_utf8(backend):
    text = "naïve — 文字 ✓"
    url = backend.client.upload(text, "text/markdown", repository="fal_v3", fallback_repository=[])
    r = _download(backend, url)
    assert r.content == text.encode("utf-8")
    assert _content_type(r) == "text/markdown"


def test_upload_with_lifecycle_expires_in_1h(backend, fal):
    data = b"short-lived"
    now = int(time.time())
    for repository in ("fal_v3", "fal"):
        url = backend.client.upload(
            data,
            "text/plain",
            repository=repository,
            fallback_repository=[],
            lifecycle=fal.StorageSettings(expires_in="1h"),
        )
        _assert_file_url(backend, url)
        exp = int(url[len(f"{backend.server.url}/cdn/files/") :].split("/")[0].split(".")[1])
        # The signed URL never outlives the file (fal-protocol.md 6.2 lifecycle).
        assert abs(exp - (now + 3600)) <= 60, f"{repository}: URL expiry {exp}, expected about {now + 3600}"
        assert _download(backend, url).content == data


# ---------------------------------------------------------------------------
# 2. upload_file and upload_image
# ---------------------------------------------------------------------------


def test_upload_file(backend, tmp_path: Path):
    payload = {"backend": backend.name, "values": list(range(50)), "text": "héllo"}
    path = tmp_path / "sample.json"
    path.write_bytes(json.dumps(payload).encode())
    url = backend.client.upload_file(path, repository="fal_v3", fallback_repository=[])
    _assert_file_url(backend, url, "sample.json")
    r = _download(backend, url)
    assert r.content == path.read_bytes()
    assert _content_type(r) == "application/json"
    assert r.json() == payload


def test_upload_image_jpeg_default(backend):
    img = Image.new("RGB", (40, 30), (250, 120, 10))
    url = backend.client.upload_image(img, repository="fal_v3", fallback_repository=[])
    _assert_file_url(backend, url)
    r = _download(backend, url)
    assert _content_type(r) == "image/jpeg"
    assert r.content[:3] == b"\xff\xd8\xff"
    got = Image.open(io.BytesIO(r.content))
    assert got.format == "JPEG"
    assert got.size == (40, 30)
    px = got.convert("RGB").getpixel((20, 15))
    assert all(abs(a - b) <= 8 for a, b in zip(px, (250, 120, 10))), px


def test_upload_image_png_is_lossless(backend):
    img = Image.new("RGBA", (7, 5), (0, 0, 0, 0))
    for x in range(7):
        for y in range(5):
            img.putpixel((x, y), (x * 30, y * 50, 100, 255 - x * 10))
    url = backend.client.upload_image(img, format="png", repository="fal_v3", fallback_repository=[])
    r = _download(backend, url)
    assert _content_type(r) == "image/png"
    got = Image.open(io.BytesIO(r.content))
    assert got.format == "PNG"
    assert got.size == (7, 5)
    assert got.convert("RGBA").tobytes() == img.tobytes()


# ---------------------------------------------------------------------------
# 3. fal_v3 multipart (thresholds lowered; the client reads them at call time)
# ---------------------------------------------------------------------------


def _spy_parts(monkeypatch) -> list[int]:
    import fal_client.client as fal_mod

    parts: list[int] = []
    original = fal_mod.MultipartUpload.upload_part

    def upload_part(self, part_number, data):
        parts.append(part_number)
        return original(self, part_number, data)

    monkeypatch.setattr(fal_mod.MultipartUpload, "upload_part", upload_part)
    return parts


def test_multipart_upload_bytes(backend, monkeypatch):
    import fal_client.client as fal_mod

    monkeypatch.setattr(fal_mod, "MULTIPART_THRESHOLD", 1024 * 1024)
    monkeypatch.setattr(fal_mod, "MULTIPART_CHUNK_SIZE", 512 * 1024)
    parts = _spy_parts(monkeypatch)

    data = os.urandom(3 * 1024 * 1024 + 12345)  # 7 parts, the last one short
    url = backend.client.upload(data, "application/octet-stream", file_name="big.bin")
    assert sorted(parts) == list(range(1, 8)), parts
    _assert_file_url(backend, url, "big.bin")
    r = _download(backend, url)
    assert len(r.content) == len(data)
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert _content_type(r) == "application/octet-stream"


def test_multipart_upload_file(backend, monkeypatch, tmp_path: Path):
    import fal_client.client as fal_mod

    monkeypatch.setattr(fal_mod, "MULTIPART_THRESHOLD", 1024 * 1024)
    monkeypatch.setattr(fal_mod, "MULTIPART_CHUNK_SIZE", 512 * 1024)
    parts = _spy_parts(monkeypatch)

    data = os.urandom(2 * 1024 * 1024)  # exactly 4 parts
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    url = backend.client.upload_file(path)
    assert sorted(parts) == [1, 2, 3, 4], parts
    _assert_file_url(backend, url, "video.mp4")
    r = _download(backend, url)
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(data).digest()
    assert _content_type(r) == "video/mp4"


def test_s3_backend_stores_objects_in_seaweedfs(fal, seaweedfs, darkroom_s3, _s3_client, monkeypatch):
    """The s3 server's uploads land in the SeaweedFS bucket (sanity check of the fixture)."""
    import fal_client.client as fal_mod

    server, client = darkroom_s3, _s3_client

    monkeypatch.setattr(fal_mod, "REST_URL", f"{server.url}/rest")
    monkeypatch.setattr(fal_mod, "CDN_URL", f"{server.url}/cdn")
    monkeypatch.setenv("SSL_CERT_FILE", server.env["SSL_CERT_FILE"])
    size = 777_777  # an unusual size to find in the bucket
    url = client.upload(os.urandom(size), "application/octet-stream", repository="fal_v3", fallback_repository=[])
    assert url.startswith(f"{server.url}/cdn/files/"), url
    assert _in_s3(seaweedfs, size), "no object of the uploaded size in SeaweedFS bucket `media`"


# ---------------------------------------------------------------------------
# 4. The `fal` repository: POST /storage/upload/initiate?storage_type=gcs, then PUT
# ---------------------------------------------------------------------------


def test_upload_via_fal_repository(backend):
    data = os.urandom(10_000)
    url = backend.client.upload(
        data, "application/pdf", file_name="doc.pdf", repository="fal", fallback_repository=[]
    )
    _assert_file_url(backend, url, "doc.pdf")
    r = _download(backend, url)
    assert r.content == data
    assert _content_type(r) == "application/pdf"


def test_upload_via_fal_repository_without_file_name(backend):
    data = b"no name given"
    url = backend.client.upload(data, "text/plain", repository="fal", fallback_repository=[])
    # The client sends file_name "upload.bin" when none is given.
    _assert_file_url(backend, url, "upload.bin")
    r = _download(backend, url)
    assert r.content == data
    assert _content_type(r) == "text/plain"


# ---------------------------------------------------------------------------
# 5. Round trip through darkroom/image-utils
# ---------------------------------------------------------------------------


def test_round_trip_image_utils_resize(backend):
    png = _png_bytes((32, 24))
    url = backend.client.upload(png, "image/png", file_name="in.png", repository="fal_v3", fallback_repository=[])

    result = backend.client.subscribe(
        IMAGE_APP, arguments={"image_url": url, "operation": "resize", "width": 16}, client_timeout=45
    )
    image = result["image"]
    assert image["content_type"] == "image/png", image
    assert (image["width"], image["height"]) == (16, 12), image
    _assert_file_url(backend, image["url"])
    r = _download(backend, image["url"])
    assert _content_type(r) == "image/png"
    assert image["file_size"] == len(r.content), image
    got = Image.open(io.BytesIO(r.content))
    assert got.format == "PNG"
    assert got.size == (16, 12)
    # Left half green, right half red, as in the input.
    assert got.convert("RGB").getpixel((2, 6))[1] > 150
    assert got.convert("RGB").getpixel((13, 6))[0] > 150


def test_round_trip_image_utils_sync_mode_data_uri(backend):
    png = _png_bytes((32, 24))
    url = backend.client.upload(png, "image/png", repository="fal_v3", fallback_repository=[])
    result = backend.client.run(
        IMAGE_APP,
        arguments={"image_url": url, "operation": "resize", "width": 16, "sync_mode": True},
        timeout=45,
    )
    image = result["image"]
    prefix = "data:image/png;base64,"
    assert image["url"].startswith(prefix), image["url"][:80]
    raw = base64.b64decode(image["url"][len(prefix) :], validate=True)
    got = Image.open(io.BytesIO(raw))
    assert got.format == "PNG"
    assert got.size == (16, 12)
    assert (image["width"], image["height"]) == (16, 12), {k: v for k, v in image.items() if k != "url"}
    assert image["content_type"] == "image/png"


def test_round_trip_convert_uploaded_jpeg_to_webp(backend):
    img = Image.new("RGB", (20, 10), (30, 60, 90))
    url = backend.client.upload_image(img, format="jpeg", repository="fal_v3", fallback_repository=[])
    result = backend.client.subscribe(
        IMAGE_APP, arguments={"image_url": url, "operation": "convert", "output_format": "webp"}, client_timeout=45
    )
    image = result["image"]
    assert image["content_type"] == "image/webp", image
    r = _download(backend, image["url"])
    assert _content_type(r) == "image/webp"
    assert r.content[:4] == b"RIFF" and r.content[8:12] == b"WEBP"
    assert Image.open(io.BytesIO(r.content)).size == (20, 10)


# ---------------------------------------------------------------------------
# 6. Tampered file URLs
# ---------------------------------------------------------------------------


def _flip(ch: str) -> str:
    return "B" if ch == "A" else "A"


def test_tampered_signature_is_403(backend):
    data = b"secret bytes that must not leak " + os.urandom(16)
    url = backend.client.upload(data, "application/octet-stream", repository="fal_v3", fallback_repository=[])
    assert _download(backend, url).content == data

    prefix = f"{backend.server.url}/cdn/files/"
    cap, _, name = url[len(prefix) :].partition("/")
    file_id, exp, sig = cap.split(".")

    variants = {
        "signature, first character": f"{file_id}.{exp}.{_flip(sig[0])}{sig[1:]}",
        "signature, middle character": f"{file_id}.{exp}.{sig[:10]}{_flip(sig[10])}{sig[11:]}",
        "expiry": f"{file_id}.{int(exp) + 1}.{sig}",
        "file id": f"{file_id[:-1]}{'0' if file_id[-1] != '0' else '1'}.{exp}.{sig}",
    }
    for what, bad_cap in variants.items():
        bad = f"{prefix}{bad_cap}/{name}"
        r = backend.get(bad)
        assert r.status_code == 403, f"{what}: GET {bad} -> {r.status_code} {r.content[:200]!r}"
        assert data not in r.content, f"{what}: the file's bytes were served with the 403"
        assert not r.content.startswith(data[:16]), what
