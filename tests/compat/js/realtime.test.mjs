// Compatibility tests: the realtime API of the official @fal-ai/client (1.10.1),
// `fal.realtime.connect`, against Darkroom's realtime WebSocket
// (fal-protocol.md sections 4 and 7.2, recipe J1).
//
// Each server is a plain-HTTP `darkroom serve` on 127.0.0.1:0 (server.mjs). The
// client is pointed at it the way recipe J1 says:
//   - a requestMiddleware rewrites the fal origins, which covers the default token
//     flow (`POST https://rest.fal.ai/tokens/` → `{base}/rest/tokens/`);
//   - the WebSocket itself is opened by the client with `new WebSocket("wss://fal.run/…")`
//     on the *global* WebSocket, which no middleware sees, so this file installs a
//     global WebSocket subclass that rewrites `wss://fal.run/` to `ws://127.0.0.1:port/run/`.
//     Node 20 has no global WebSocket (only behind --experimental-websocket), so the
//     base class is the `ws` package there, and Node's own WebSocket where it exists.
//     The subclass also records every socket (URL, text frames, close code) so that
//     the tests can check what happened on the wire.
//
// Things about the client (realtime.ts) the tests have to live with:
//   - `send()` is throttled (128 ms by default, last write wins in each window; the
//     leading call is immediate only for the very first send of a connection key);
//     most tests pass `throttleInterval: 0`, which the client supports (plain send).
//   - while the socket is connecting, one message slot is kept: only the latest send
//     is delivered when it opens. The tests wait for a first result before sending more.
//   - the client's own `close()` closes without a code, so the server's answering close
//     frame carries none (1005), and the client reports every close but 1000 to onError.
//     Its token refresh timer (90% of the expiration) only stops when an open connection
//     closes, so every test closes its connections.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";

import { ApiError, createFalClient } from "@fal-ai/client";
import WS from "ws";

import { falRewriter, startDarkroom } from "./server.mjs";

const APP = "darkroom/diagnostics";
const APP_ALIAS = "diagnostics";
const T = { timeout: 30_000 }; // per-test bound
const WAIT_MS = 10_000; // bound on any single wait for frames

// ---------------------------------------------------------------------------
// The global WebSocket (recipe J1)
// ---------------------------------------------------------------------------

const BaseWebSocket = globalThis.WebSocket ?? WS;
const WEBSOCKET_IMPL = globalThis.WebSocket ? "Node's global WebSocket" : "the ws package";

// Where `wss://fal.run/` goes: the base URL of the server the current test uses.
let wsTarget = null;

/** One socket the client opened: what it connected to and what it saw. */
const sockets = [];

globalThis.WebSocket = class DarkroomWebSocket extends BaseWebSocket {
  constructor(url, protocols) {
    const original = String(url);
    assert.ok(wsTarget, `a WebSocket was opened with no server selected: ${original}`);
    const target = original.replace(/^wss:\/\/fal\.run\//, wsTarget.replace(/^http/, "ws") + "/run/");
    super(target, protocols);
    const rec = { original, url: target, socket: this, texts: [], binaries: 0 };
    Object.assign(rec, { opened: false, errored: false, close: null });
    rec.closed = new Promise((resolve) => {
      this.addEventListener("close", (ev) => {
        rec.close = { code: ev.code, reason: ev.reason };
        resolve(rec.close);
      });
    });
    this.addEventListener("open", () => {
      rec.opened = true;
    });
    this.addEventListener("error", () => {
      rec.errored = true;
    });
    this.addEventListener("message", (ev) => {
      if (typeof ev.data === "string") rec.texts.push(ev.data);
      else rec.binaries++;
    });
    sockets.push(rec);
  }
};

/** Close whatever a failed test left open, so that node can exit. */
function dropSockets() {
  for (const rec of sockets) {
    if (rec.close) continue;
    try {
      if (typeof rec.socket.terminate === "function") rec.socket.terminate();
      else rec.socket.close();
    } catch {
      /* already gone */
    }
  }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/** Polls `pred` until it is truthy or `ms` pass; fails with `what()` in the message. */
async function until(pred, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) assert.fail(`timed out after ${ms} ms waiting for ${what()}`);
    await sleep(10);
  }
}

/** `promise`, or null once `ms` pass (the timer is cleared either way, so node can exit). */
async function within(promise, ms = WAIT_MS) {
  let timer;
  try {
    return await Promise.race([promise, new Promise((resolve) => (timer = setTimeout(resolve, ms, null)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** onResult/onError that record what the client delivers. */
function collector() {
  const c = {
    results: [],
    errors: [],
    onResult: (r) => c.results.push(r),
    onError: (e) => c.errors.push(e),
    describe: () =>
      `results=${JSON.stringify(c.results)} errors=${JSON.stringify(
        c.errors.map((e) => ({ name: e?.name, status: e?.status, message: e?.message })),
      )}`,
    waitResults: (n, ms) => until(() => c.results.length >= n, () => `${n} result(s): ${c.describe()}`, ms),
    waitErrors: (n, ms) => until(() => c.errors.length >= n, () => `${n} error(s): ${c.describe()}`, ms),
  };
  return c;
}

/** A J1 client for `server` whose fetch records every call (method, URL, body). */
function makeClient(server) {
  const calls = [];
  const recordingFetch = (input, init = {}) => {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    calls.push({
      method: (init.method ?? "GET").toUpperCase(),
      url,
      headers: init.headers ?? {},
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
  return { fal, calls, tokenCalls: () => calls.filter((c) => c.url === `${server.base}/rest/tokens/`) };
}

/**
 * What a browser app's backend does for `tokenProvider`: call the token endpoint
 * with its own key. The client passes "{appId}{path}" ("darkroom/diagnostics/realtime");
 * the token is scoped to the app's alias, as fal's default provider does.
 */
async function mintToken(server, app, ttl) {
  const [, alias] = app.split("/");
  const resp = await fetch(`${server.base}/rest/tokens/`, {
    method: "POST",
    headers: { Authorization: `Key ${server.key}`, "Content-Type": "application/json" },
    body: JSON.stringify({ allowed_apps: [alias], token_expiration: ttl }),
  });
  const body = await resp.json();
  assert.equal(resp.status, 201, `POST /rest/tokens/: ${resp.status} ${JSON.stringify(body)}`);
  assert.equal(typeof body, "string");
  return body;
}

/** The sockets opened since `mark` (an index into `sockets`). */
const socketsSince = (mark) => sockets.slice(mark);

/**
 * Close a connection the way an app does and wait for the socket to close. The
 * client's close() sends a close frame without a code; a server that answers the
 * closing handshake echoes it, so the client sees 1005 and, as it does for any code
 * but 1000, reports ApiError(status 1005) to onError. A server that drops the TCP
 * connection instead gives 1006; that is accepted here and checked (and refused) in
 * its own test, "connection.close() gets the server's close frame". Anything else
 * reaching onError fails.
 */
async function closeConn(conn, rec, col) {
  const before = col.errors.length;
  conn.close();
  const close = await within(rec.closed);
  assert.ok(close, "the socket did not close after connection.close()");
  assert.ok([1000, 1005, 1006].includes(close.code), `close after connection.close(): ${JSON.stringify(close)}`);
  await until(() => close.code === 1000 || col.errors.length > before, () => "onError after close", 2_000);
  for (const e of col.errors.slice(before)) {
    assert.ok(e instanceof ApiError, String(e));
    assert.equal(e.status, close.code, `onError after close: ${e.status} ${e.message}`);
  }
  return close;
}

// ---------------------------------------------------------------------------
// Default server
// ---------------------------------------------------------------------------

let server = null;

before(async () => {
  server = await startDarkroom({ name: "realtime" });
  wsTarget = server.base;
});

after(async () => {
  dropSockets();
  await server?.stop();
});

describe(`fal.realtime.connect (J1, WebSocket from ${WEBSOCKET_IMPL})`, () => {
  test("default token flow through requestMiddleware; echoes arrive in order", T, async (t) => {
    const { fal, calls, tokenCalls } = makeClient(server);
    const col = collector();
    const warnings = [];
    t.mock.method(console, "warn", (...a) => warnings.push(a.join(" ")));
    const mark = sockets.length;

    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      throttleInterval: 0,
    });
    try {
      // The first send starts token fetch + connect; it is delivered when the socket opens.
      conn.send({ seq: 0, text: "héllo ✓", nested: { list: [1, 2.5, null, true] } });
      await col.waitResults(1);
      // Connected: with throttleInterval 0 every send goes straight out.
      const burst = [1, 2, 3, 4, 5].map((seq) => ({ seq, pad: "x".repeat(seq * 100) }));
      for (const input of burst) conn.send(input);
      await col.waitResults(6);
      await sleep(200); // nothing more may come (no duplicate of the queued first message)

      assert.deepEqual(col.results, [
        { seq: 0, text: "héllo ✓", nested: { list: [1, 2.5, null, true] } },
        ...burst,
      ]);
      assert.deepEqual(col.errors, [], col.describe());

      // The token came from POST {base}/rest/tokens/ (rewritten by the middleware), with the Key.
      const tok = tokenCalls();
      assert.equal(tok.length, 1, JSON.stringify(calls));
      assert.equal(tok[0].method, "POST");
      assert.deepEqual(JSON.parse(tok[0].body), { allowed_apps: [APP_ALIAS], token_expiration: 120 });
      assert.equal(tok[0].headers.Authorization, `Key ${server.key}`);
      assert.ok(warnings.some((w) => w.includes("default token provider is deprecated")), JSON.stringify(warnings));

      // One socket, to the rewritten realtime URL, carrying the JWT.
      const opened = socketsSince(mark);
      assert.equal(opened.length, 1);
      const rec = opened[0];
      assert.match(rec.original, /^wss:\/\/fal\.run\/darkroom\/diagnostics\/realtime\?fal_jwt_token=[^&]+$/);
      const u = new URL(rec.url);
      assert.equal(`${u.protocol}//${u.host}`, server.base.replace(/^http/, "ws"));
      assert.equal(u.pathname, "/run/darkroom/diagnostics/realtime");
      assert.equal(u.searchParams.get("fal_jwt_token").split(".").length, 3, "not a JWT");
      assert.equal(rec.binaries, 6, "every echo is a binary (msgpack) frame");
      assert.deepEqual(rec.texts, []);

      const close = await closeConn(conn, rec, col);
      assert.equal(col.results.length, 6);
      t.diagnostic(`close after connection.close(): ${JSON.stringify(close)}`);
    } finally {
      conn.close();
    }
  });

  test("sends while connecting: only the latest is kept and delivered on open", T, async () => {
    const { fal } = makeClient(server);
    const col = collector();
    const mark = sockets.length;
    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      throttleInterval: 0,
      tokenProvider: (app) => mintToken(server, app, 60),
    });
    try {
      conn.send({ seq: "a" });
      conn.send({ seq: "b" });
      conn.send({ seq: "c" });
      await col.waitResults(1);
      await sleep(300);
      assert.deepEqual(col.results, [{ seq: "c" }], col.describe());
      conn.send({ seq: "d" });
      await col.waitResults(2);
      assert.deepEqual(col.results, [{ seq: "c" }, { seq: "d" }]);
      assert.deepEqual(col.errors, []);
      assert.equal(socketsSince(mark).length, 1);
      await closeConn(conn, socketsSince(mark)[0], col);
    } finally {
      conn.close();
    }
  });

  test("default throttle (128 ms): a burst is last-write-wins, spaced sends all arrive", T, async () => {
    const { fal } = makeClient(server);
    const col = collector();
    const mark = sockets.length;
    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      tokenProvider: (app) => mintToken(server, app, 60),
    });
    try {
      conn.send({ seq: "first" }); // the leading call of the throttle: immediate
      await col.waitResults(1);
      // Well past the window, so that the throttle's trailing timer cannot race its own check.
      await sleep(300);
      for (const seq of [1, 2, 3, 4, 5]) conn.send({ seq }); // one window: only the last goes out
      await col.waitResults(2);
      await sleep(500);
      assert.deepEqual(col.results, [{ seq: "first" }, { seq: 5 }], col.describe());
      for (const seq of [6, 7, 8]) {
        conn.send({ seq });
        await sleep(300);
      }
      await col.waitResults(5);
      assert.deepEqual(col.results.slice(2), [{ seq: 6 }, { seq: 7 }, { seq: 8 }]);
      assert.deepEqual(col.errors, []);
      await closeConn(conn, socketsSince(mark)[0], col);
    } finally {
      conn.close();
    }
  });

  test("an app error frame reaches onError as ApiError 400 and the session goes on", T, async () => {
    const { fal } = makeClient(server);
    const col = collector();
    const mark = sockets.length;
    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      throttleInterval: 0,
      tokenProvider: (app) => mintToken(server, app, 60),
    });
    try {
      conn.send({ seq: 1 });
      await col.waitResults(1);
      conn.send({ fail: "boom" });
      await col.waitErrors(1);
      conn.send({ seq: 2 });
      await col.waitResults(2);

      assert.deepEqual(col.results, [{ seq: 1 }, { seq: 2 }]);
      assert.equal(col.errors.length, 1, col.describe());
      const e = col.errors[0];
      assert.ok(e instanceof ApiError, String(e));
      assert.equal(e.status, 400);
      assert.equal(e.message, "INTERNAL_ERROR: boom");
      assert.deepEqual(e.body, { type: "x-fal-error", error: "INTERNAL_ERROR", reason: "boom" });

      const opened = socketsSince(mark);
      assert.equal(opened.length, 1, "the error must not cost the connection");
      assert.equal(opened[0].close, null);
      assert.equal(opened[0].texts.length, 1, "the error came as one text frame");
      assert.deepEqual(JSON.parse(opened[0].texts[0]), e.body);
      await closeConn(conn, opened[0], col);
    } finally {
      conn.close();
    }
  });

  test("tokenProvider with tokenExpirationSeconds: the backend mints tokens, refreshed at 90%", T, async () => {
    const { fal, tokenCalls } = makeClient(server);
    const col = collector();
    const provided = []; // [app, token]
    const mark = sockets.length;
    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      throttleInterval: 0,
      tokenExpirationSeconds: 2, // refresh after 1.8 s
      tokenProvider: async (app) => {
        const token = await mintToken(server, app, 2);
        provided.push([app, token]);
        return token;
      },
    });
    try {
      conn.send({ seq: 1 });
      await col.waitResults(1);
      assert.equal(provided.length, 1);
      assert.equal(provided[0][0], `${APP}/realtime`, "the provider gets {appId}{path}");
      const rec = socketsSince(mark)[0];
      assert.equal(new URL(rec.url).searchParams.get("fal_jwt_token"), provided[0][1]);

      // The refresh is due at 90% of 2 s; the client keeps the new token for the next connection.
      await until(() => provided.length >= 2, () => `a token refresh (provider calls: ${provided.length})`, 5_000);
      assert.notEqual(provided[1][1], provided[0][1]);

      // The open socket is untouched (its token may have expired by now, which only the handshake checks).
      await sleep(500);
      conn.send({ seq: 2 });
      await col.waitResults(2);
      assert.deepEqual(col.results, [{ seq: 1 }, { seq: 2 }]);
      assert.deepEqual(col.errors, []);
      assert.equal(socketsSince(mark).length, 1);
      assert.equal(tokenCalls().length, 0, "with a tokenProvider the client must not call /tokens/ itself");
      await closeConn(conn, rec, col);

      // close() leaves the state machine idle and drops the token: the next send mints a new one and reconnects.
      const before = provided.length;
      conn.send({ seq: 3 });
      await col.waitResults(3);
      assert.deepEqual(col.results[2], { seq: 3 });
      assert.equal(provided.length, before + 1);
      const again = socketsSince(mark);
      assert.equal(again.length, 2);
      assert.equal(new URL(again[1].url).searchParams.get("fal_jwt_token"), provided[before][1]);
      await closeConn(conn, again[1], col);
    } finally {
      conn.close();
    }
  });

  test("maxBuffering reaches the server: with 1, the newest waiting input replaces the others", T, async () => {
    const { fal } = makeClient(server);
    const col = collector();
    const mark = sockets.length;
    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      throttleInterval: 0,
      maxBuffering: 1,
      tokenProvider: (app) => mintToken(server, app, 60),
    });
    try {
      conn.send({ seq: "warm" });
      await col.waitResults(1);
      const rec = socketsSince(mark)[0];
      assert.equal(new URL(rec.url).searchParams.get("max_buffering"), "1");
      // seq 0 runs for 600 ms; 1, 2, 3 arrive meanwhile and only the newest is kept.
      conn.send({ seq: 0, sleep_ms: 600 });
      conn.send({ seq: 1 });
      conn.send({ seq: 2 });
      conn.send({ seq: 3 });
      await col.waitResults(3);
      await sleep(300);
      assert.deepEqual(col.results, [{ seq: "warm" }, { seq: 0, sleep_ms: 600 }, { seq: 3 }], col.describe());
      assert.deepEqual(col.errors, []);
      await closeConn(conn, rec, col);
    } finally {
      conn.close();
    }
  });

  test("connection.close() gets the server's close frame (1005, not an abnormal 1006)", T, async () => {
    const { fal } = makeClient(server);
    const col = collector();
    const mark = sockets.length;
    const conn = fal.realtime.connect(APP, {
      onResult: col.onResult,
      onError: col.onError,
      throttleInterval: 0,
      tokenProvider: (app) => mintToken(server, app, 60),
    });
    try {
      conn.send({ seq: 1 });
      await col.waitResults(1);
      const rec = socketsSince(mark)[0];
      conn.close();
      const close = await within(rec.closed);
      assert.ok(close, "the socket did not close after connection.close()");
      // RFC 6455 section 5.5.1: the server answers a close frame with one of its own. The
      // client's close() sends no code, so the answer carries none and the client reports 1005
      // (what fal-protocol.md section 4 records against fal). 1006 means the server dropped
      // the TCP connection without answering.
      assert.equal(close.code, 1005, `close after connection.close(): ${JSON.stringify(close)}`);
      await col.waitErrors(1, 2_000);
      assert.equal(col.errors.length, 1, col.describe());
      assert.ok(col.errors[0] instanceof ApiError);
      assert.equal(col.errors[0].status, 1005);
      assert.deepEqual(col.results, [{ seq: 1 }]);
    } finally {
      conn.close();
    }
  });

  test("a refused handshake (token for another app, expired token) reaches onError, no results", T, async (t) => {
    for (const [label, provider] of [
      ["wrong app", () => mintToken(server, "darkroom/image-utils", 60)],
      [
        "expired",
        async () => {
          const tok = await mintToken(server, APP, 1);
          await sleep(2_100);
          return tok;
        },
      ],
    ]) {
      const { fal } = makeClient(server);
      const col = collector();
      let calls = 0;
      const mark = sockets.length;
      const conn = fal.realtime.connect(APP, {
        onResult: col.onResult,
        onError: col.onError,
        throttleInterval: 0,
        tokenProvider: async () => {
          calls++;
          return provider();
        },
      });
      try {
        conn.send({ seq: 1 });
        const refused = () => socketsSince(mark)[0]?.errored || socketsSince(mark)[0]?.close;
        await until(refused, () => `${label}: the refusal`);
        await col.waitErrors(1);
        const rec = socketsSince(mark)[0];
        // ws, and the WHATWG spec, follow the error event with a close event (1006). Node 20's
        // experimental global WebSocket (undici) fires only the error event and stays CONNECTING,
        // so the client's state machine never leaves "connecting"; the rest is checked when closed.
        await until(() => rec.close, () => `${label}: a close event after the refusal`, 3_000).catch(() => {});
        await sleep(200);
        assert.equal(rec.opened, false, `${label}: the handshake must be refused`);
        assert.deepEqual(col.results, []);
        // The HTTP status (401/403) is not visible to a WebSocket client; what surfaces is
        // the socket's error event (ApiError "Unknown error", 500) and the abnormal close (1006).
        for (const e of col.errors) assert.ok(e instanceof ApiError, String(e));
        assert.ok(
          col.errors.some((e) => e.status === 500 && e.message === "Unknown error"),
          `${label}: ${col.describe()}`,
        );
        assert.equal(calls, 1);
        if (!rec.close) {
          t.diagnostic(`${label}: ${WEBSOCKET_IMPL} gave no close event after the refused handshake`);
          continue;
        }
        assert.equal(rec.close.code, 1006, `${label}: ${JSON.stringify(rec.close)}`);
        assert.ok(col.errors.some((e) => e.status === 1006), `${label}: ${col.describe()}`);

        // Client behaviour worth knowing: a socket that never opened leaves the token in
        // the state machine (only a close of an *open* socket drops it), so the next send
        // reconnects with the same refused token instead of asking the provider again.
        conn.send({ seq: 2 });
        await until(() => socketsSince(mark)[1]?.close, () => `${label}: the second refused socket to close`);
        const second = socketsSince(mark)[1];
        assert.equal(second.opened, false);
        assert.equal(calls, 1, `${label}: the provider was asked again`);
        assert.equal(
          new URL(second.url).searchParams.get("fal_jwt_token"),
          new URL(rec.url).searchParams.get("fal_jwt_token"),
        );
        assert.deepEqual(col.results, []);
      } finally {
        conn.close();
      }
    }
  });
});

// ---------------------------------------------------------------------------
// Idle timeout: a server with --realtime-idle-secs 1
// ---------------------------------------------------------------------------

describe("fal.realtime.connect and the idle TIMEOUT", () => {
  let idle = null;

  before(async () => {
    idle = await startDarkroom({ name: "realtime-idle", args: ["--realtime-idle-secs", "1"] });
  });

  after(async () => {
    dropSockets();
    await idle?.stop();
  });

  test("TIMEOUT is silent to onError, the 1000 close too, and the next send reconnects", T, async () => {
    wsTarget = idle.base;
    try {
      const { fal, tokenCalls } = makeClient(idle);
      const col = collector();
      const mark = sockets.length;
      const conn = fal.realtime.connect(APP, {
        onResult: col.onResult,
        onError: col.onError,
        throttleInterval: 0,
        tokenProvider: (app) => mintToken(idle, app, 60),
      });
      try {
        conn.send({ seq: 1 });
        await col.waitResults(1);
        const first = socketsSince(mark)[0];
        const close = await within(first.closed);
        assert.ok(close, "the server did not close the idle session");
        assert.equal(close.code, 1000, JSON.stringify(close));
        assert.equal(first.texts.length, 1, JSON.stringify(first.texts));
        const frame = JSON.parse(first.texts[0]);
        assert.equal(frame.type, "x-fal-error");
        assert.equal(frame.error, "TIMEOUT");
        await sleep(200);
        assert.deepEqual(col.errors, [], "TIMEOUT and a 1000 close must not reach onError");

        // The state machine went idle on the close: the next send fetches a token and reconnects.
        conn.send({ seq: 2 });
        await col.waitResults(2);
        assert.deepEqual(col.results, [{ seq: 1 }, { seq: 2 }]);
        assert.equal(socketsSince(mark).length, 2);
        assert.equal(tokenCalls().length, 0);
        await closeConn(conn, socketsSince(mark)[1], col);
      } finally {
        conn.close();
      }
    } finally {
      wsTarget = server.base;
    }
  });
});
