// Compatibility tests: a real fal.App (tests/compat/python/fal_app/app.py, the `fal` SDK from PyPI), deployed
// with `darkroom apps deploy` and called through the official JS client (recipe J1).
//
// The server runs fal apps on DARKROOM_PYTHON (scripts/test points it at the test venv, which has `fal`). This
// server speaks plain HTTP, so the app's toolkit image upload (https only) is exercised by the Python suite
// (test_serverless.py, on a TLS server); here the JS client calls the app's `/square` endpoint and meets the
// app's own validation errors.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { execFileSync } from "node:child_process";

import { ValidationError, createFalClient } from "@fal-ai/client";
import WS from "ws";

import { DARKROOM_BIN, REPO_ROOT, falRewriter, startDarkroom } from "./server.mjs";

const APP = "local/hello-app";
const APP_FILE = path.join(REPO_ROOT, "tests", "compat", "python", "fal_app", "app.py");
const T = { timeout: 90_000 };

let server = null;
let fal = null;

// The client opens its realtime WebSocket on the global WebSocket with `wss://fal.run/…`, which no middleware sees
// (recipe J1): point it at this server (Node 20 has no global WebSocket: the `ws` package stands in).
const BaseWebSocket = globalThis.WebSocket ?? WS;
const opened = [];
globalThis.WebSocket = class DarkroomWebSocket extends BaseWebSocket {
  constructor(url, protocols) {
    super(String(url).replace(/^wss:\/\/fal\.run\//, server.base.replace(/^http/, "ws") + "/run/"), protocols);
    opened.push(this);
  }
};

before(async () => {
  server = await startDarkroom({ name: "serverless" });
  const rewrite = falRewriter(server.base);
  fal = createFalClient({
    credentials: server.key,
    requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }),
  });
  const out = execFileSync(DARKROOM_BIN, ["apps", "deploy", `${APP_FILE}::HelloApp`, "--data-dir", server.dataDir, "--json"], {
    encoding: "utf8",
    timeout: 120_000,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const deployed = JSON.parse(out);
  assert.equal(deployed.app_id, APP);
  assert.deepEqual([...deployed.endpoints].sort(), ["", "count", "measure", "square"]);
});

after(async () => {
  for (const s of opened) {
    try {
      if (typeof s.terminate === "function") s.terminate();
      else s.close();
    } catch {
      /* already closed */
    }
  }
  await server?.stop();
});

describe("a deployed fal.App through @fal-ai/client", () => {
  test("subscribe: scale from zero, the result and the app's logs", T, async () => {
    const logs = [];
    const result = await fal.subscribe(`${APP}/square`, {
      input: { n: 7 },
      logs: true,
      onQueueUpdate: (u) => {
        for (const l of u.logs ?? []) logs.push(l.message);
      },
    });
    assert.deepEqual(result.data, { n: 7, square: 49 });
    assert.ok(result.requestId);
    const status = await fal.queue.status(`${APP}/square`, { requestId: result.requestId, logs: true });
    const all = [...logs, ...(status.logs ?? []).map((l) => l.message)];
    assert.ok(all.some((m) => m.includes("squaring 7")), `logs: ${JSON.stringify(all)}`);
  });

  test("run and queue submit", T, async () => {
    const r = await fal.run(`${APP}/square`, { input: { n: 12 } });
    assert.deepEqual(r.data, { n: 12, square: 144 });
    const { request_id } = await fal.queue.submit(`${APP}/square`, { input: { n: 3 } });
    let s;
    for (let i = 0; i < 200; i++) {
      s = await fal.queue.status(`${APP}/square`, { requestId: request_id });
      if (s.status === "COMPLETED") break;
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.equal(s.status, "COMPLETED");
    const res = await fal.queue.result(`${APP}/square`, { requestId: request_id });
    assert.deepEqual(res.data, { n: 3, square: 9 });
  });

  test("the app's own 422 reaches the client as a ValidationError", T, async () => {
    await assert.rejects(
      () => fal.run(`${APP}/square`, { input: { n: -1 } }),
      (e) => {
        assert.ok(e instanceof ValidationError, `not a ValidationError: ${e}`);
        assert.equal(e.status, 422);
        const f = e.fieldErrors[0];
        assert.deepEqual(f.loc, ["body", "n"]);
        assert.equal(f.type, "greater_than_equal");
        return true;
      },
    );
  });

  test("fal.realtime.connect reaches the app's own @fal.realtime route", T, async () => {
    const results = [];
    const errors = [];
    const conn = fal.realtime.connect(APP, {
      onResult: (r) => results.push(r),
      onError: (e) => errors.push(e),
      throttleInterval: 0,
    });
    try {
      const deadline = Date.now() + 30_000;
      conn.send({ text: "first" });
      while (results.length < 1 && errors.length === 0 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      for (const text of ["second", "third"]) conn.send({ text });
      while (results.length < 3 && errors.length === 0 && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.deepEqual(errors, []);
      assert.deepEqual(results, [
        { text: "FIRST", length: 5 },
        { text: "SECOND", length: 6 },
        { text: "THIRD", length: 5 },
      ]);
    } finally {
      conn.close();
    }
  });
});
