"""Darkroom's launcher for fal.App apps (embedded in the darkroom binary).

    python darkroom_fal_launcher.py inspect FILE CLASS   prints the app's settings and OpenAPI as one JSON line
    python darkroom_fal_launcher.py serve FILE CLASS     serves the app on $HOST:$PORT (127.0.0.1 and a port the
                                                         runner picked), as `fal run --local` would on 0.0.0.0:8080

Both import FILE from the current folder (the app's unpacked bundle) the way `fal run` does.
"""

import importlib.util
import json
import os
import sys

MARK = "__DARKROOM_INSPECT__ "


def load(file, class_name):
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    folder = os.path.dirname(os.path.abspath(file))
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise SystemExit(f"{file} defines no {class_name}")
    import fal

    if not (isinstance(cls, type) and issubclass(cls, fal.App)):
        raise SystemExit(f"{file}::{class_name} is not a fal.App subclass")
    return cls


def plain(value):
    """JSON-safe copy of a settings value (anything else becomes its repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return repr(value)


def inspect_app(file, class_name):
    import inspect as pyinspect

    cls = load(file, class_name)
    hk = dict(getattr(cls, "host_kwargs", {}) or {})
    endpoints = []
    for _, fn in pyinspect.getmembers(cls, pyinspect.isfunction):
        sig = getattr(fn, "route_signature", None)
        if sig is None:
            continue
        endpoints.append({"path": sig.path, "websocket": bool(getattr(sig, "is_websocket", False))})
    endpoints.sort(key=lambda e: e["path"])
    requirements = list(getattr(cls, "requirements", []) or [])
    flat = []
    for r in requirements:
        if isinstance(r, (list, tuple)):
            flat.extend(str(x) for x in r)
        else:
            flat.append(str(r))
    try:
        openapi = cls.build_metadata().get("openapi")
    except Exception as e:  # noqa: BLE001
        openapi = None
        print(f"could not build the app's OpenAPI: {e!r}", file=sys.stderr)
    doc = (cls.__doc__ or "").strip()
    settings = {
        name: plain(hk.get(name))
        for name in (
            "keep_alive",
            "min_concurrency",
            "max_concurrency",
            "concurrency_buffer",
            "concurrency_buffer_perc",
            "scaling_delay",
            "max_multiplexing",
            "request_timeout",
            "startup_timeout",
            "secrets",
            "data_mounts",
        )
    }
    out = {
        "app_name": cls.app_name,
        "class": class_name,
        "doc": doc,
        "requirements": flat,
        "machine_type": plain(getattr(cls, "machine_type", None)),
        "num_gpus": plain(getattr(cls, "num_gpus", None)),
        "image": getattr(cls, "image", None) is not None,
        "settings": settings,
        "endpoints": endpoints,
        "openapi": openapi,
        "fal_version": getattr(__import__("fal"), "__version__", None),
    }
    sys.stdout.write(MARK + json.dumps(out) + "\n")
    sys.stdout.flush()


def trust_darkroom_files():
    """Lets the toolkit's download guard (fal.toolkit.utils.ssrf) fetch input files from Darkroom itself.

    Files uploaded to Darkroom are served from the gateway's own address, which is 127.0.0.1 here; the guard refuses
    every non-routable address. Exactly that origin (DARKROOM_FILES_ORIGIN, host:port) is let through; every other
    URL is checked as before.
    """
    origin = os.environ.get("DARKROOM_FILES_ORIGIN")
    if not origin:
        return
    host, _, port = origin.rpartition(":")
    try:
        from fal.toolkit.utils import ssrf
    except ImportError:
        return
    check = getattr(ssrf, "resolve_and_validate_host", None)
    if check is None:
        return

    def resolve_and_validate_host(hostname, port_number, _check=check):
        if hostname == host and port_number is not None and str(port_number) == port:
            return [host]
        return _check(hostname, port_number)

    ssrf.resolve_and_validate_host = resolve_and_validate_host


def serve_app(file, class_name):
    os.environ["IS_ISOLATE_AGENT"] = "1"
    trust_darkroom_files()
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ["PORT"])
    cls = load(file, class_name)
    import uvicorn

    app = cls()
    try:
        from fal.ref import set_current_app

        set_current_app(app)
    except ImportError:
        pass
    asgi = app._build_app()
    # setup() runs in the lifespan, before the port opens: the runner's health check sees a ready app.
    uvicorn.run(asgi, host=host, port=port, timeout_keep_alive=300, lifespan="on", access_log=False, log_level="warning")


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("inspect", "serve"):
        raise SystemExit(__doc__)
    mode, file, class_name = sys.argv[1:]
    if mode == "inspect":
        inspect_app(file, class_name)
    else:
        serve_app(file, class_name)


if __name__ == "__main__":
    main()
