// Compatibility tests: the official @fal-ai/client (1.10.1) against Darkroom.
//
// Runs with Node's built-in runner (Node 20+):
//   DARKROOM_BIN=/path/to/darkroom node --test tests/compat/js/
//
// One `darkroom serve` (plain HTTP, no --tls) is started on a temporary data
// directory bound to 127.0.0.1:0. The client is used unmodified and pointed at
// it with recipe J1 of fal-protocol.md section 7.2 (a requestMiddleware that
// rewrites the fal origins) and, separately, with recipe J2 (the proxy
// protocol: proxyUrl + x-fal-target-url).

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";

import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";

import { falRewriter, startDarkroom } from "./server.mjs";

export { parseEnvOutput } from "./server.mjs";

const APP = "darkroom/diagnostics";
const MISSING_APP = "darkroom/no-such-app-compat";
const T = { timeout: 30_000 }; // per-test bound
const COMPLETE_WITHIN_MS = 20_000;

// ---------------------------------------------------------------------------
// Server lifecycle
// ---------------------------------------------------------------------------

let server = null; // { child, dataDir, logPath, info, env, base, key, logTail, stop } (server.mjs)
let fal = null; // J1 client (requestMiddleware)
let proxied = null; // J2 client (proxyUrl)

before(async () => {
  server = await startDarkroom();
  const BASE = server.base;
  const rewrite = falRewriter(BASE);

  // Recipe J1.
  fal = createFalClient({
    credentials: server.key,
    requestMiddleware: async (req) => ({ ...req, url: rewrite(req.url) }),
  });
  // Recipe J2.
  proxied = createFalClient({
    credentials: server.key,
    proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" },
  });
});

after(async () => {
  await server?.stop();
});

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

const messages = (logs) => (logs ?? []).map((l) => l.message);

async function waitCompleted(client, requestId, { logs = false, within = COMPLETE_WITHIN_MS } = {}) {
  const seen = [];
  const deadline = Date.now() + within;
  for (;;) {
    const st = await client.queue.status(APP, { requestId, logs });
    seen.push(st);
    assert.ok(["IN_QUEUE", "IN_PROGRESS", "COMPLETED"].includes(st.status), JSON.stringify(st));
    if (st.status === "COMPLETED") return { final: st, seen };
    assert.ok(Date.now() < deadline, `not COMPLETED after ${within} ms: ${JSON.stringify(seen)}`);
    await sleep(50);
  }
}

function assertQueueStatusShape(st, requestId) {
  assert.equal(st.request_id, requestId);
  for (const k of ["response_url", "status_url", "cancel_url"]) {
    assert.equal(typeof st[k], "string", `${k} missing in ${JSON.stringify(st)}`);
  }
  if (st.status === "IN_QUEUE") assert.equal(typeof st.queue_position, "number");
  else assert.ok("logs" in st, `logs key missing in ${JSON.stringify(st)}`);
}

// ---------------------------------------------------------------------------
// Recipe J1: requestMiddleware
// ---------------------------------------------------------------------------

describe("J1 requestMiddleware", () => {
  test("server.json and env", T, () => {
    assert.match(server.base, /^http:\/\/127\.0\.0\.1:\d+$/);
    assert.equal(server.base, `http://${server.info.listen}`);
    assert.equal(server.info.ca_cert ?? null, null);
    assert.ok(server.key.includes(":"));
    assert.equal(server.env.SSL_CERT_FILE, undefined);
  });

  test("run echoes input and returns requestId", T, async () => {
    const echo = { hello: "world", n: 3, nested: { list: [1, 2.5, null, true] }, text: "héllo ✓" };
    const r = await fal.run(APP, { input: { echo } });
    assert.deepEqual(r.data, { echo, attempt: 1 });
    assert.ok(r.requestId, "x-fal-request-id header missing on run response");
  });

  test("queue.submit, status with and without logs, result", T, async () => {
    const sub = await fal.queue.submit(APP, {
      input: { echo: "queued", sleep_ms: 300, logs: ["first log line", "second log line"] },
    });
    const rid = sub.request_id;
    assert.ok(rid);
    assert.equal(sub.status, "IN_QUEUE");
    assert.equal(typeof sub.queue_position, "number");
    assert.equal(sub.response_url, `${server.base}/queue/${APP}/requests/${rid}`);
    assert.equal(sub.status_url, `${sub.response_url}/status`);
    assert.equal(sub.cancel_url, `${sub.response_url}/cancel`);

    // Without logs while running.
    const { final: plain, seen } = await waitCompleted(fal, rid, { logs: false });
    for (const st of seen) {
      assertQueueStatusShape(st, rid);
      if (st.status !== "IN_QUEUE") assert.ok(!st.logs || st.logs.length === 0, JSON.stringify(st.logs));
    }
    assert.equal(plain.status, "COMPLETED");

    // With logs.
    const withLogs = await fal.queue.status(APP, { requestId: rid, logs: true });
    assert.equal(withLogs.status, "COMPLETED");
    assertQueueStatusShape(withLogs, rid);
    const msgs = messages(withLogs.logs);
    assert.ok(msgs.includes("first log line") && msgs.includes("second log line"), JSON.stringify(withLogs.logs));
    assert.ok(msgs.indexOf("first log line") < msgs.indexOf("second log line"));
    for (const l of withLogs.logs) {
      assert.ok("message" in l && "level" in l && "timestamp" in l, JSON.stringify(l));
    }
    assert.equal(typeof withLogs.metrics?.inference_time, "number", JSON.stringify(withLogs.metrics));

    const res = await fal.queue.result(APP, { requestId: rid });
    assert.deepEqual(res.data, { echo: "queued", attempt: 1 });
    assert.equal(res.requestId, rid);
  });

  test("queue.subscribeToStatus mode polling", T, async () => {
    const { request_id: rid } = await fal.queue.submit(APP, {
      input: { echo: "poll", sleep_ms: 400, logs: ["poll log"] },
    });
    const updates = [];
    const done = await fal.queue.subscribeToStatus(APP, {
      requestId: rid,
      logs: true,
      mode: "polling",
      pollInterval: 50,
      onQueueUpdate: (s) => updates.push(s),
    });
    assert.equal(done.status, "COMPLETED");
    assert.ok(messages(done.logs).includes("poll log"), JSON.stringify(done.logs));
    assert.ok(updates.some((u) => u.status === "IN_PROGRESS"), JSON.stringify(updates.map((u) => u.status)));
    assert.equal(updates.at(-1).status, "COMPLETED");
    const res = await fal.queue.result(APP, { requestId: rid });
    assert.deepEqual(res.data, { echo: "poll", attempt: 1 });
  });

  test("queue.subscribeToStatus mode streaming (status SSE)", T, async () => {
    const { request_id: rid } = await fal.queue.submit(APP, {
      input: { echo: "sse", sleep_ms: 400, logs: ["sse log one", "sse log two"] },
    });
    const updates = [];
    const done = await fal.queue.subscribeToStatus(APP, {
      requestId: rid,
      logs: true,
      mode: "streaming",
      onQueueUpdate: (s) => updates.push(s),
    });
    // done() resolves with the last event, which must be the COMPLETED one.
    assert.equal(done.status, "COMPLETED", JSON.stringify(done));
    assertQueueStatusShape(done, rid);
    assert.ok(updates.length >= 1);
    assert.equal(updates.at(-1).status, "COMPLETED");
    for (const u of updates) assertQueueStatusShape(u, rid);
    const msgs = messages(updates.at(-1).logs); // client accumulates logs across events
    assert.ok(msgs.includes("sse log one") && msgs.includes("sse log two"), JSON.stringify(msgs));
    const res = await fal.queue.result(APP, { requestId: rid });
    assert.deepEqual(res.data, { echo: "sse", attempt: 1 });
  });

  test("queue.streamStatus iterates events until COMPLETED", T, async () => {
    const { request_id: rid } = await fal.queue.submit(APP, { input: { echo: "ss", sleep_ms: 300 } });
    const stream = await fal.queue.streamStatus(APP, { requestId: rid, logs: false });
    const events = [];
    for await (const ev of stream) events.push(ev);
    const last = await stream.done();
    assert.ok(events.length >= 1);
    assert.equal(events.at(-1).status, "COMPLETED");
    assert.equal(last.status, "COMPLETED");
    for (const e of events) assertQueueStatusShape(e, rid);
  });

  test("subscribe mode polling with onEnqueue/onQueueUpdate/logs", T, async () => {
    const enq = [];
    const updates = [];
    const r = await fal.subscribe(APP, {
      input: { echo: "sub-poll", sleep_ms: 300, logs: ["sub poll log"] },
      logs: true,
      mode: "polling",
      pollInterval: 50,
      onEnqueue: (id) => enq.push(id),
      onQueueUpdate: (s) => updates.push(s),
    });
    assert.deepEqual(r.data, { echo: "sub-poll", attempt: 1 });
    assert.equal(enq.length, 1);
    assert.equal(r.requestId, enq[0]);
    assert.equal(updates.at(-1).status, "COMPLETED");
    assert.ok(messages(updates.at(-1).logs).includes("sub poll log"));
  });

  test("subscribe mode streaming", T, async () => {
    const updates = [];
    const r = await fal.subscribe(APP, {
      input: { echo: "sub-sse", sleep_ms: 300, logs: ["sub sse log"] },
      logs: true,
      mode: "streaming",
      onQueueUpdate: (s) => updates.push(s),
    });
    assert.deepEqual(r.data, { echo: "sub-sse", attempt: 1 });
    assert.equal(updates.at(-1).status, "COMPLETED");
    assert.ok(messages(updates.at(-1).logs).includes("sub sse log"));
  });

  test("subscribe with default options", T, async () => {
    const r = await fal.subscribe(APP, { input: { echo: [1, 2, 3] } });
    assert.deepEqual(r.data, { echo: [1, 2, 3], attempt: 1 });
  });

  test("queue.cancel of a long request; result then rejects", T, async () => {
    const { request_id: rid } = await fal.queue.submit(APP, { input: { echo: "cancel-me", sleep_ms: 30_000 } });
    const first = await fal.queue.status(APP, { requestId: rid });
    assert.ok(["IN_QUEUE", "IN_PROGRESS"].includes(first.status), first.status);
    await sleep(200);
    const started = Date.now();
    await fal.queue.cancel(APP, { requestId: rid });
    const { final } = await waitCompleted(fal, rid, { within: 10_000 });
    assert.ok(Date.now() - started < 10_000);
    assert.equal(final.error_type, "request_cancelled", JSON.stringify(final));
    await assert.rejects(fal.queue.result(APP, { requestId: rid }), (e) => {
      assert.ok(e instanceof ApiError, String(e));
      assert.ok(e.status >= 400 && e.status < 500, `status ${e.status}`);
      return true;
    });
  });

  test("stream yields partial events then final; done() returns final", T, async () => {
    const stream = await fal.stream(APP, { input: { echo: "streamed", parts: 3, sleep_ms: 300 } });
    const events = [];
    for await (const ev of stream) events.push(ev);
    const final = await stream.done();
    assert.deepEqual(events.slice(0, 3), [{ part: 0 }, { part: 1 }, { part: 2 }], JSON.stringify(events));
    assert.equal(events.length, 4, JSON.stringify(events));
    assert.equal(events.at(-1).echo, "streamed");
    assert.deepEqual(final, events.at(-1));
    assert.ok(stream.requestId, "x-fal-request-id missing on stream response");
  });

  test("ValidationError with fieldErrors on 422 (run and submit)", T, async () => {
    const check = (e) => {
      assert.ok(e instanceof ValidationError, `expected ValidationError, got ${e?.name}: ${e?.message}`);
      assert.equal(e.status, 422);
      assert.ok(Array.isArray(e.body.detail), JSON.stringify(e.body));
      assert.deepEqual(e.fieldErrors[0].loc, ["body", "sleep_ms"]);
      assert.ok(e.fieldErrors[0].msg && e.fieldErrors[0].type);
      assert.equal(e.getFieldErrors("sleep_ms").length, 1);
      assert.equal(e.body.error_type, "validation_error");
      assert.ok(e.requestId, "x-fal-request-id missing on 422");
      return true;
    };
    await assert.rejects(fal.run(APP, { input: { sleep_ms: "x" } }), check);
    await assert.rejects(fal.queue.submit(APP, { input: { sleep_ms: "x" } }), check);
  });

  test("failing app surfaces as ApiError on result and subscribe", T, async () => {
    const { request_id: rid } = await fal.queue.submit(APP, {
      input: { fail: { status: 418, message: "teapot failure" } },
    });
    const { final } = await waitCompleted(fal, rid);
    assert.equal(final.status, "COMPLETED");
    await assert.rejects(fal.queue.result(APP, { requestId: rid }), (e) => {
      assert.ok(e instanceof ApiError, String(e));
      assert.equal(e.status, 418);
      assert.equal(e.body?.detail, "teapot failure");
      return true;
    });
    await assert.rejects(
      fal.subscribe(APP, { input: { fail: { status: 418, message: "via subscribe" } }, pollInterval: 50 }),
      (e) => e instanceof ApiError && e.status === 418 && e.body?.detail === "via subscribe",
    );
  });

  test("unknown app is a 404 ApiError", T, async () => {
    await assert.rejects(fal.run(MISSING_APP, { input: {} }), (e) => e instanceof ApiError && e.status === 404);
    await assert.rejects(fal.queue.submit(MISSING_APP, { input: {} }), (e) => e instanceof ApiError && e.status === 404);
  });
});

// ---------------------------------------------------------------------------
// Recipe J2: proxy protocol (/api/fal/proxy + x-fal-target-url)
// ---------------------------------------------------------------------------

describe("J2 proxyUrl", () => {
  test("run through the proxy", T, async () => {
    const r = await proxied.run(APP, { input: { echo: "via proxy" } });
    assert.deepEqual(r.data, { echo: "via proxy", attempt: 1 });
    assert.ok(r.requestId);
  });

  test("subscribe (polling) through the proxy", T, async () => {
    const updates = [];
    const r = await proxied.subscribe(APP, {
      input: { echo: "proxy-sub", sleep_ms: 200, logs: ["proxy log"] },
      logs: true,
      pollInterval: 50,
      onQueueUpdate: (s) => updates.push(s),
    });
    assert.deepEqual(r.data, { echo: "proxy-sub", attempt: 1 });
    assert.equal(updates.at(-1).status, "COMPLETED");
    assert.ok(messages(updates.at(-1).logs).includes("proxy log"));
  });

  test("subscribe (streaming) through the proxy", T, async () => {
    const r = await proxied.subscribe(APP, {
      input: { echo: "proxy-sse", sleep_ms: 200 },
      mode: "streaming",
    });
    assert.deepEqual(r.data, { echo: "proxy-sse", attempt: 1 });
  });

  test("stream through the proxy", T, async () => {
    const stream = await proxied.stream(APP, { input: { echo: "proxy-stream", parts: 2, sleep_ms: 100 } });
    const events = [];
    for await (const ev of stream) events.push(ev);
    const final = await stream.done();
    assert.deepEqual(events.slice(0, 2), [{ part: 0 }, { part: 1 }]);
    assert.equal(final.echo, "proxy-stream");
  });

  test("validation error through the proxy", T, async () => {
    await assert.rejects(
      proxied.run(APP, { input: { sleep_ms: "x" } }),
      (e) => e instanceof ValidationError && e.status === 422 && e.getFieldErrors("sleep_ms").length === 1,
    );
  });

  test("CORS preflight on /api/fal/proxy", T, async () => {
    const origin = "http://localhost:5173";
    const requested = ["x-fal-target-url", "content-type", "authorization"];
    const r = await fetch(`${server.base}/api/fal/proxy`, {
      method: "OPTIONS",
      headers: {
        Origin: origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": requested.join(","),
      },
    });
    assert.ok(r.status >= 200 && r.status < 300, `preflight status ${r.status}`);
    const allowOrigin = r.headers.get("access-control-allow-origin");
    assert.ok(allowOrigin === "*" || allowOrigin === origin, `access-control-allow-origin: ${allowOrigin}`);
    const allowMethods = (r.headers.get("access-control-allow-methods") ?? "").toLowerCase();
    assert.ok(allowMethods === "*" || allowMethods.includes("post"), `access-control-allow-methods: ${allowMethods}`);
    // Per the Fetch standard a "*" in Access-Control-Allow-Headers does not cover
    // Authorization, which must be listed explicitly.
    const allowHeaders = (r.headers.get("access-control-allow-headers") ?? "")
      .toLowerCase()
      .split(",")
      .map((s) => s.trim());
    for (const h of requested) {
      const ok = allowHeaders.includes(h) || (h !== "authorization" && allowHeaders.includes("*"));
      assert.ok(ok, `${h} not allowed by access-control-allow-headers: ${allowHeaders.join(",")}`);
    }
  });

  test("actual cross-origin proxy request carries access-control-allow-origin", T, async () => {
    const origin = "http://localhost:5173";
    const r = await fetch(`${server.base}/api/fal/proxy`, {
      method: "POST",
      headers: {
        Origin: origin,
        "content-type": "application/json",
        authorization: `Key ${server.key}`,
        "x-fal-target-url": `https://fal.run/${APP}`,
      },
      body: JSON.stringify({ echo: "cors" }),
    });
    assert.equal(r.status, 200, await r.clone().text());
    const allowOrigin = r.headers.get("access-control-allow-origin");
    assert.ok(allowOrigin === "*" || allowOrigin === origin, `access-control-allow-origin: ${allowOrigin}`);
    assert.ok(r.headers.get("x-fal-request-id"));
    assert.deepEqual(await r.json(), { echo: "cors", attempt: 1 });
  });
});
