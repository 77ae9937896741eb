"""The built-in upscaler through the platform with the official client: a small PNG uploaded with ``fal.upload``
comes back 4× larger, as a stored file (fetched over the server's TLS) or inline with ``sync_mode``; a scale the
model lacks is a 422 naming ``scale``.

The runner fetches the RDN weights through the model store (the npm package ``@upscalerjs/esrgan-slim``) in its PULL
state, so this runs where ``DARKROOM_TEST_REGISTRIES=1`` (scripts/test sets it).
"""

from __future__ import annotations

import base64
import io
import os
import ssl

import httpx
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(
    os.environ.get("DARKROOM_TEST_REGISTRIES") != "1",
    reason="needs DARKROOM_TEST_REGISTRIES=1 (model packages from npm)",
)

APP = "darkroom/upscale"


def _png(size=(24, 16)) -> bytes:
    """A small RGB image with edges and gradients."""
    img = Image.new("RGB", size)
    for x in range(size[0]):
        for y in range(size[1]):
            img.putpixel((x, y), (x * 10 % 256, y * 15 % 256, 200 if (x // 4 + y // 4) % 2 else 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.deadline(400)
def test_upscales_an_uploaded_png_4x(fal, darkroom):
    url = fal.upload(_png(), "image/png", file_name="small.png")
    out = fal.subscribe(APP, arguments={"image_url": url, "scale": 4}, with_logs=True)
    image = out["image"]
    assert (image["width"], image["height"]) == (96, 64), out
    assert image["content_type"] == "image/png"
    assert out["model"] == "rdn-slim" and out["scale"] == 4, out
    assert out["timings"]["inference"] >= 0
    assert image["url"].startswith(darkroom.url), image["url"]

    with httpx.Client(verify=ssl.create_default_context(cafile=darkroom.ca_bundle), timeout=30.0) as http:
        r = http.get(image["url"])
    assert r.status_code == 200, r.text[:300]
    assert r.headers.get("content-type", "").startswith("image/png")
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    got = Image.open(io.BytesIO(r.content))
    assert got.format == "PNG" and got.size == (96, 64)
    # Downscaled back, the output is close to the input.
    small = Image.open(io.BytesIO(_png())).convert("RGB")
    back = got.convert("RGB").resize(small.size, Image.Resampling.BILINEAR)
    diffs = [abs(a - b) for a, b in zip(back.tobytes(), small.tobytes())]
    assert sum(diffs) / len(diffs) < 25, sum(diffs) / len(diffs)


@pytest.mark.deadline(400)
def test_sync_mode_returns_a_data_uri(fal):
    data_uri = "data:image/png;base64," + base64.b64encode(_png((10, 6))).decode()
    out = fal.subscribe(
        APP, arguments={"image_url": data_uri, "scale": 2, "output_format": "jpeg", "sync_mode": True}
    )
    image = out["image"]
    assert image["url"].startswith("data:image/jpeg;base64,"), image["url"][:40]
    raw = base64.b64decode(image["url"].split(",", 1)[1])
    assert raw[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(raw)).size == (20, 12)
    assert (image["width"], image["height"]) == (20, 12)


@pytest.mark.deadline(400)
def test_a_scale_the_model_lacks_is_a_422(fal):
    data_uri = "data:image/png;base64," + base64.b64encode(_png((8, 8))).decode()
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.subscribe(APP, arguments={"image_url": data_uri, "model": "realesrgan-x4plus", "scale": 2})
    assert e.value.status_code == 422
    detail = e.value.message
    assert detail[0]["loc"] == ["body", "scale"], detail
