"""Serverless: a real `fal.App` (the `fal` SDK from PyPI), deployed with `darkroom apps deploy`, called through the
official Python client.

The app (fal_app/app.py) has setup(), two endpoints with pydantic models, printed logs and a toolkit image output
that the fal SDK uploads to Darkroom's storage itself (over TLS, with the upload-only key its runner gets). The
server runs fal apps on this interpreter (`--python sys.executable`), which has `fal` installed from
requirements.txt; the app's `requirements` (pillow) are already there, so its environment builds offline.
"""

from __future__ import annotations

import io
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import Darkroom

APP_FILE = Path(__file__).resolve().parent / "fal_app" / "app.py"
APP_ID = "local/hello-app"


def deploy(dr: Darkroom, target: str, *extra: str) -> subprocess.CompletedProcess:
    """`darkroom apps deploy TARGET` against the test server."""
    return subprocess.run(
        [str(dr.bin), "apps", "deploy", target, "--data-dir", str(dr.data_dir), *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def deployed(darkroom: Darkroom) -> Darkroom:
    out = deploy(darkroom, f"{APP_FILE}::HelloApp", "--json")
    assert out.returncode == 0, f"deploy failed:\n{out.stdout}\n{out.stderr}\n{darkroom.log_tail()}"
    return darkroom


def _client(dr: Darkroom) -> httpx.Client:
    verify = ssl.create_default_context(cafile=dr.ca_bundle) if dr.ca_bundle else True
    return httpx.Client(base_url=dr.url, verify=verify, headers={"Authorization": f"Key {dr.admin_key}"}, timeout=60)


@pytest.mark.deadline(120)
def test_fal_app_runs_unchanged_through_the_python_client(deployed: Darkroom, fal) -> None:
    # Scale from zero: the first call waits for the runner (environment, launcher, setup) and succeeds.
    result = fal.subscribe(APP_ID, arguments={"prompt": "a red square", "size": 12}, with_logs=True)
    assert result["text"] == "drew a red square"
    image = result["image"]
    assert image["content_type"] == "image/png" and image["width"] == 12 and image["height"] == 12
    # The toolkit uploaded the image to Darkroom's storage: the signed URL serves it.
    with _client(deployed) as c:
        got = c.get(image["url"])
        assert got.status_code == 200, got.text
        from PIL import Image

        with Image.open(io.BytesIO(got.content)) as im:
            assert im.size == (12, 12)
            assert im.getpixel((0, 0)) == (200, 30, 60)
        # Filed under the requester, with the request it belongs to.
        files = c.get("/v1/files").json()["files"]
        mine = [f for f in files if image["url"].split("/")[-2].startswith(f["id"])]
        assert mine and mine[0]["owner_id"] == "local" and mine[0]["request_id"], files

    # The second endpoint, through the queue.
    handle = fal.submit(f"{APP_ID}/square", arguments={"n": 12})
    assert handle.get() == {"n": 12, "square": 144}

    # The app's logs landed on its request.
    handle = fal.submit(APP_ID, arguments={"prompt": "logs", "size": 4})
    handle.get()
    with _client(deployed) as c:
        logs = c.get(f"/v1/requests/{handle.request_id}").json()["logs"]
    assert any("drawing 'logs' at 4px" in line["message"] for line in logs), logs


@pytest.mark.deadline(90)
def test_input_files_stored_in_darkroom_reach_the_app(deployed: Darkroom, fal) -> None:
    from PIL import Image

    url = fal.upload_image(Image.new("RGB", (21, 13), (0, 128, 255)), format="png")
    assert url.startswith(deployed.url), url
    # The toolkit's download guard refuses loopback addresses; Darkroom's own origin is let through.
    assert fal.run(f"{APP_ID}/measure", arguments={"image_url": url}) == {"width": 21, "height": 13}
    # Other private addresses stay refused by the app's guard.
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.run(f"{APP_ID}/measure", arguments={"image_url": "http://127.0.0.1:9/x.png"})
    assert e.value.status_code >= 400


@pytest.mark.deadline(90)
def test_data_is_a_persistent_folder_per_app(deployed: Darkroom, fal) -> None:
    first = fal.run(f"{APP_ID}/count", arguments={})["count"]
    assert fal.run(f"{APP_ID}/count", arguments={}) == {"count": first + 1}
    # /data is the app's folder in the server's data directory (mounted with bubblewrap), not the machine's /data.
    kept = deployed.data_dir / "apps" / "data" / "local" / "hello-app" / "count.txt"
    assert kept.read_text() == str(first + 1)
    assert not Path("/data/count.txt").exists()


@pytest.mark.deadline(90)
def test_the_apps_realtime_endpoint_through_the_client(deployed: Darkroom, fal) -> None:
    # fal_client.realtime: a JWT from /tokens/, then msgpack frames to the app's own @fal.realtime route, piped
    # through the gateway and the runner unchanged.
    with fal.realtime(APP_ID) as conn:
        for word in ("hello", "darkroom", "fal"):
            conn.send({"text": word})
            assert conn.recv() == {"text": word.upper(), "length": len(word)}
        # The app's own validation error arrives as its x-fal-error frame.
        from fal_client.client import RealtimeError

        conn.send({"text": "x" * 200})
        with pytest.raises(RealtimeError) as e:
            conn.recv()
        assert "validation error for ShoutIn" in str(e.value), e.value
    # fal's session ends after an error (the app closes it); a new one works.
    with fal.realtime(APP_ID) as conn:
        conn.send({"text": "again"})
        assert conn.recv() == {"text": "AGAIN", "length": 5}


@pytest.mark.deadline(90)
def test_the_apps_own_validation_answers(deployed: Darkroom, fal) -> None:
    # The app's pydantic 422 reaches the client unchanged.
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.run(f"{APP_ID}/square", arguments={"n": -3})
    assert e.value.status_code == 422
    detail = e.value.response.json()["detail"]
    assert detail[0]["loc"] == ["body", "n"] and detail[0]["type"] == "greater_than_equal", detail
    with pytest.raises(fal.FalClientHTTPError) as e:
        fal.run(APP_ID, arguments={"size": 4})
    assert e.value.status_code == 422
    assert e.value.response.json()["detail"][0]["loc"] == ["body", "prompt"]


@pytest.mark.deadline(60)
def test_settings_and_openapi_come_from_the_class(deployed: Darkroom) -> None:
    with _client(deployed) as c:
        app = c.get(f"/v1/apps/{APP_ID}").json()
        assert app["kind"] == "http" and app["version"] >= 1
        assert sorted(app["endpoints"]) == ["", "count", "measure", "square"]
        assert app["scaling"]["keep_alive"] == 30 and app["scaling"]["max_concurrency"] == 2
        assert app["scaling"]["request_timeout"] == 120
        assert app["fal"]["entry"] == "app.py::HelloApp"
        doc = c.get(f"/{APP_ID}/openapi.json").json()
        assert {"/", "/square", "/measure"} <= set(doc["paths"])
        schemas = doc["components"]["schemas"]
        assert schemas["SquareIn"]["properties"]["n"]["minimum"] == 0
        assert schemas["Input"]["required"] == ["prompt"]
        # The catalog lists it (search and detail), from the class's attributes.
        models = c.get("/v1/models", params={"q": "squares numbers"}).json()["models"]
        ids = [m["endpoint_id"] for m in models]
        assert ids == [APP_ID, f"{APP_ID}/count", f"{APP_ID}/measure", f"{APP_ID}/square"], models
        assert models[0]["metadata"]["description"] == "Draws a square of colour and squares numbers."
        detail = c.get(f"/v1/models/{APP_ID}").json()
        assert detail["app_id"] == APP_ID and "fal-app" in detail["tags"] and detail["kind"] == "http", detail
        square = next(e for e in detail["endpoints"] if e["path"] == "square")
        # The endpoint's own input schema, from the app's pydantic model.
        assert square["input_schema"]["$ref"] == "#/$defs/SquareIn", square
        assert square["input_schema"]["$defs"]["SquareIn"]["properties"]["n"]["maximum"] == 1_000_000


@pytest.mark.deadline(60)
def test_a_broken_fal_app_is_refused_at_deploy(darkroom: Darkroom, tmp_path: Path) -> None:
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "app.py").write_text("import fal\nraise RuntimeError('this app cannot even import')\n")
    out = deploy(darkroom, f"{bad / 'app.py'}::Nope")
    assert out.returncode != 0
    assert "this app cannot even import" in out.stderr, out.stderr
    # A class that is not a fal.App.
    (bad / "app.py").write_text("class Nope:\n    pass\n")
    out = deploy(darkroom, f"{bad / 'app.py'}::Nope")
    assert out.returncode != 0 and "not a fal.App" in out.stderr, out.stderr
