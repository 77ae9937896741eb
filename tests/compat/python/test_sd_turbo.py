"""darkroom/sd-turbo through the official client: text-to-image, image-to-image, /stream previews, determinism by
seed and validation. The server runs the real pipeline on a tiny random-weight checkpoint of SD-Turbo's
architecture (conftest registers it; the real weights come only from the Hugging Face Hub), so images are noise
but every stage (text encoder, UNet steps, VAE, storage, URLs) is the real one.
"""

from __future__ import annotations

import base64
import io
import ssl

import httpx
import pytest
from PIL import Image

APP = "darkroom/sd-turbo"


def _get(darkroom, url: str) -> bytes:
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    r = httpx.get(url, verify=ssl.create_default_context(cafile=darkroom.ca_bundle), timeout=30)
    assert r.status_code == 200, (r.status_code, r.text)
    return r.content


def _png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.deadline(240)
def test_text_to_image_fetches_images_and_repeats_by_seed(fal, darkroom):
    args = {
        "prompt": "the cat",
        "image_size": {"width": 64, "height": 80},
        "num_inference_steps": 2,
        "num_images": 2,
        "seed": 1234,
        "output_format": "png",
    }
    logs = []
    out = fal.subscribe(APP, arguments=args, with_logs=True, on_queue_update=logs.append)
    assert out["seed"] == 1234
    assert out["prompt"] == "the cat"
    assert out["timings"]["inference"] > 0
    assert "has_nsfw_concepts" not in out
    images = out["images"]
    assert len(images) == 2
    blobs = []
    for im in images:
        assert im["content_type"] == "image/png"
        assert (im["width"], im["height"]) == (64, 80)
        assert im["url"].startswith("https://"), im["url"]
        data = _get(darkroom, im["url"])
        decoded = Image.open(io.BytesIO(data))
        assert decoded.size == (64, 80)
        blobs.append(data)
    assert blobs[0] != blobs[1], "image 2 uses seed + 1"

    again = fal.subscribe(APP, arguments=args)
    assert [_get(darkroom, im["url"]) for im in again["images"]] == blobs, "same seed and input, same images"


@pytest.mark.deadline(240)
def test_image_to_image_takes_an_uploaded_image(fal, darkroom):
    src = Image.new("RGB", (72, 70), (200, 40, 40))
    url = fal.upload_image(src, format="png")
    out = fal.subscribe(
        f"{APP}/image-to-image",
        arguments={"prompt": "the cat", "image_url": url, "strength": 0.5, "seed": 3, "sync_mode": True},
    )
    (im,) = out["images"]
    assert im["url"].startswith("data:image/jpeg;base64,"), im["url"][:40]
    assert (im["width"], im["height"]) == (72, 64)
    assert Image.open(io.BytesIO(_get(darkroom, im["url"]))).size == (72, 64)


@pytest.mark.deadline(240)
def test_stream_sends_a_preview_per_step_then_the_images(fal, darkroom):
    events = list(
        fal.stream(
            APP,
            {"prompt": "the cat", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 3, "seed": 9},
            timeout=120,
        )
    )
    previews = [e for e in events if e.get("preview")]
    assert [p["step"] for p in previews] == [1, 2, 3], events
    for p in previews:
        assert Image.open(io.BytesIO(_get(darkroom, p["images"][0]["url"]))).size == (64, 64)
    final = events[-1]
    assert not final.get("preview")
    assert len(final["images"]) == 1 and final["seed"] == 9


def test_invalid_image_size_is_a_422_before_any_model_runs(fal):
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.subscribe(APP, arguments={"prompt": "a fox", "image_size": {"width": 100, "height": 512}})
    assert e.value.status_code == 422
    assert e.value.message[0]["loc"] == ["body", "image_size", "width"], e.value.message
    assert "multiple of 8" in e.value.message[0]["msg"], e.value.message
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.subscribe(f"{APP}/image-to-image", arguments={"prompt": "a fox"})
    assert e.value.status_code == 422
    assert e.value.message[0]["loc"] == ["body", "image_url"], e.value.message
