"""A fal app deployed to Darkroom unchanged by the compatibility tests (test_serverless.py, serverless.test.mjs).

It uses what real fal apps use: setup(), endpoints with pydantic models (so its own validation answers 422),
printed logs, a toolkit image output (uploaded to Darkroom's storage by the fal SDK itself) a toolkit download
of an input URL (through the SDK's download guard) fal's persistent /data folder and a
realtime endpoint.
"""

import fal
from fal.toolkit import Image
from pydantic import BaseModel, Field


class Input(BaseModel):
    prompt: str = Field(..., min_length=1, description="What to draw")
    size: int = Field(default=16, ge=1, le=512, description="Width and height in pixels")


class Output(BaseModel):
    text: str
    image: Image


class SquareIn(BaseModel):
    n: int = Field(..., ge=0, le=1_000_000)


class SquareOut(BaseModel):
    n: int
    square: int


class MeasureIn(BaseModel):
    image_url: str


class MeasureOut(BaseModel):
    width: int
    height: int


class CountOut(BaseModel):
    count: int


class ShoutIn(BaseModel):
    text: str = Field(..., max_length=100)


class ShoutOut(BaseModel):
    text: str
    length: int


class HelloApp(fal.App, keep_alive=30):
    """Draws a square of colour and squares numbers."""

    app_name = "hello-app"
    requirements = ["pillow"]
    max_concurrency = 2
    request_timeout = 120

    def setup(self):
        print("setup: loading the palette", flush=True)
        self.colour = (200, 30, 60)

    @fal.endpoint("/")
    def generate(self, inp: Input) -> Output:
        from PIL import Image as PILImage

        print(f"drawing {inp.prompt!r} at {inp.size}px", flush=True)
        img = PILImage.new("RGB", (inp.size, inp.size), self.colour)
        return Output(text=f"drew {inp.prompt}", image=Image.from_pil(img, format="png"))

    @fal.endpoint("/measure")
    def measure(self, inp: MeasureIn) -> MeasureOut:
        """Fetches an input image through the toolkit (and its download guard) and reports its size."""
        import tempfile

        from fal.toolkit import download_file
        from PIL import Image as PILImage

        with tempfile.TemporaryDirectory() as d:
            path = download_file(inp.image_url, target_dir=d)
            with PILImage.open(path) as im:
                return MeasureOut(width=im.width, height=im.height)

    @fal.endpoint("/count")
    def count(self) -> CountOut:
        """Counts its calls in fal's persistent /data folder."""
        import pathlib

        f = pathlib.Path("/data/count.txt")
        n = int(f.read_text()) + 1 if f.exists() else 1
        f.write_text(str(n))
        return CountOut(count=n)

    @fal.realtime("/realtime")
    def shout(self, inp: ShoutIn) -> ShoutOut:
        """fal's realtime protocol: msgpack frames, one answer per input."""
        return ShoutOut(text=inp.text.upper(), length=len(inp.text))

    @fal.endpoint("/square")
    def square(self, inp: SquareIn) -> SquareOut:
        print(f"squaring {inp.n}", flush=True)
        return SquareOut(n=inp.n, square=inp.n * inp.n)
