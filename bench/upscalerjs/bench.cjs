// Usage: node bench.cjs PACKAGE SCALE IMAGE.png RUNS  (e.g. esrgan-slim 4 fixture.png 5); prints one JSON line.
// The model files are served to TF.js from this machine on 127.0.0.1 (UpscalerJS loads models over HTTP).
// UpscalerJS (TF.js, WASM backend) on the same RDN model and image as `darkroom bench upscale`.
const fs = require('fs');
const http = require('http');
const path = require('path');
const { PNG } = require('pngjs');
const tf = require('@tensorflow/tfjs');
const wasm = require('@tensorflow/tfjs-backend-wasm');
const Upscaler = require(path.join(__dirname, 'node_modules/upscaler/dist/browser/umd/upscaler.js'));

async function main() {
  const [pkg, scale, image, runs] = [process.argv[2] || 'esrgan-slim', Number(process.argv[3] || 4), process.argv[4], Number(process.argv[5] || 5)];
  const pkgDir = path.join(__dirname, 'node_modules/@upscalerjs', pkg);
  const server = http.createServer((req, res) => {
    const f = path.join(pkgDir, decodeURIComponent(req.url.split('?')[0]));
    if (!f.startsWith(pkgDir) || !fs.existsSync(f)) { res.writeHead(404); return res.end(); }
    res.writeHead(200); fs.createReadStream(f).pipe(res);
  });
  await new Promise(r => server.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${server.address().port}`;
  wasm.setWasmPaths(path.join(__dirname, 'node_modules/@tensorflow/tfjs-backend-wasm/dist') + '/');
  await tf.setBackend('wasm');
  await tf.ready();
  const mod = require(`@upscalerjs/${pkg}/${scale}x`);
  const def = mod.default || mod;
  const model = { ...def, path: `${base}/models/x${scale}/model.json` };
  const upscaler = new Upscaler({ model });
  const png = PNG.sync.read(fs.readFileSync(image));
  const rgb = new Int32Array(png.width * png.height * 3);
  for (let i = 0; i < png.width * png.height; i++) for (let c = 0; c < 3; c++) rgb[i * 3 + c] = png.data[i * 4 + c];
  const input = tf.tensor3d(rgb, [png.height, png.width, 3], 'int32');
  const t0 = Date.now();
  await upscaler.ready;
  const load_s = (Date.now() - t0) / 1000;
  const times = [];
  let out;
  for (let i = 0; i <= runs; i++) {
    const t = process.hrtime.bigint();
    out = await upscaler.execute(input, { output: "tensor" });
    const s = Number(process.hrtime.bigint() - t) / 1e9;
    if (i > 0) times.push(s);
    if (i < runs) out.dispose();
  }
  times.sort((a, b) => a - b);
  console.log(JSON.stringify({ peer: 'UpscalerJS 1.0.0 on TF.js 4.11.0 WASM', backend: tf.getBackend(),
    threads: wasm.getThreadsCount ? wasm.getThreadsCount() : null, model: `${pkg} x${scale}`,
    input: [png.width, png.height], output: out.shape.slice(0, 2).reverse(), load_s,
    median_s: times[Math.floor(times.length / 2)], min_s: times[0], max_s: times[times.length - 1] }));
  server.close();
}
main().catch(e => { console.error(e); process.exit(1); });
