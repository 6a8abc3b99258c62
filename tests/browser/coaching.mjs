// End-to-end test of the coaching page (issue #5 point 6) in headless
// Chromium (Debian's /usr/bin/chromium, driven by playwright-core): a real
// `recvault serve`, content put through the real CLI, then a coach logs in,
// draws a sample, plays the recording past a seek point and reads the
// transcript with the card number redacted as [card]. A screenshot of the
// page is saved as tests/browser/artifacts/coaching.png.
//
//   RECVAULT_BIN=target/debug/recvault node tests/browser/coaching.mjs
import { spawn, execFileSync } from "node:child_process";
import { createInterface } from "node:readline";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { deflateSync } from "node:zlib";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const bin = process.env.RECVAULT_BIN || join(root, "target", "debug", "recvault");
const browserPath = process.env.CHROMIUM || "/usr/bin/chromium";
const artifacts = join(here, "artifacts");
mkdirSync(artifacts, { recursive: true });

function fail(message) {
  console.error(`coaching page test FAILED: ${message}`);
  process.exitCode = 1;
  throw new Error(message);
}

/** 30 s of 16-bit mono 8 kHz PCM: a 440 Hz tone. */
function wav(seconds) {
  const rate = 8000;
  const n = rate * seconds;
  const b = Buffer.alloc(44 + n * 2);
  b.write("RIFF", 0);
  b.writeUInt32LE(36 + n * 2, 4);
  b.write("WAVEfmt ", 8);
  b.writeUInt32LE(16, 16);
  b.writeUInt16LE(1, 20);
  b.writeUInt16LE(1, 22);
  b.writeUInt32LE(rate, 24);
  b.writeUInt32LE(rate * 2, 28);
  b.writeUInt16LE(2, 32);
  b.writeUInt16LE(16, 34);
  b.write("data", 36);
  b.writeUInt32LE(n * 2, 40);
  for (let i = 0; i < n; i++) b.writeInt16LE(Math.round(8000 * Math.sin((2 * Math.PI * 440 * i) / rate)), 44 + i * 2);
  return b;
}

/** A valid 2x2 RGB PNG, built here (CRC-32 and zlib) so no binary is committed. */
function png() {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const byte of buf) c = crcTable[(c ^ byte) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, body) => {
    const head = Buffer.alloc(8);
    head.writeUInt32BE(body.length, 0);
    head.write(type, 4);
    const tail = Buffer.alloc(4);
    tail.writeUInt32BE(crc(Buffer.concat([head.subarray(4), body])), 0);
    return Buffer.concat([head, body, tail]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(2, 0);
  ihdr.writeUInt32BE(2, 4);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit RGB
  const rows = Buffer.from([0, 255, 0, 0, 0, 255, 0, 0, 0, 0, 255, 255, 255, 255]);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", deflateSync(rows)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

const data = mkdtempSync(join(tmpdir(), "recvault-browser-"));
const server = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--data-dir", data], {
  stdio: ["ignore", "pipe", "inherit"],
  env: { ...process.env, RECVAULT_LOG: process.env.RECVAULT_LOG || "warn" },
});
let browser;
try {
  const line = await new Promise((ok, ko) => {
    const rl = createInterface({ input: server.stdout });
    rl.once("line", ok);
    server.once("exit", (code) => ko(new Error(`server exited (${code}) before serving`)));
  });
  // "recvault serving on ADDR (data in DIR); coaching page URL"
  const grpc = `http://${line.split(/\s+/)[3]}`;
  const pageUrl = line.match(/coaching page (\S+)/)?.[1] ?? fail(`no page URL in ${JSON.stringify(line)}`);
  const admin = readFileSync(join(data, "admin.token"), "utf8").trim();
  const cli = (token, ...args) =>
    execFileSync(bin, [...args, "--server", grpc], { env: { ...process.env, RECVAULT_TOKEN: token }, encoding: "utf8" })
      .trim();
  const coach = cli(admin, "token", "create", "--name", "coach-e2e", "--role", "coach", "--ttl", "1h");
  const pbx = cli(admin, "token", "create", "--name", "pbx-e2e", "--role", "ingest", "--ttl", "1h");

  const files = mkdtempSync(join(tmpdir(), "recvault-browser-files-"));
  const put = (name, bytes, ...args) => {
    writeFileSync(join(files, name), bytes);
    return cli(pbx, "put", join(files, name), "--customer", "crm-e2e", "--interaction", "call-e2e", "--agent", "a-1",
      "--queue", "billing", ...args);
  };
  put("call.wav", wav(30), "--kind", "call-recording", "--sensitive", "2000-4000");
  put("chat.txt", "agent: how can I help?\ncustomer: my card is 4111 1111 1111 1111, exp 12/29\n", "--kind",
    "chat-transcript");
  put("screenshot.png", png(), "--kind", "image");
  rmSync(files, { recursive: true, force: true });

  browser = await chromium.launch({
    executablePath: browserPath,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required", "--mute-audio",
    ],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
  await page.goto(pageUrl);
  await page.fill("#token", coach);
  await page.click("#login-form button[type=submit]");
  await page.waitForSelector("#app:not([hidden])");
  const who = await page.textContent("#who");
  if (!who.includes("coach-e2e")) fail(`logged in as ${who}`);

  // Draw a sample: one interaction per agent in queue billing, seed 7.
  await page.fill("input[name=queue]", "billing");
  await page.selectOption("select[name=strata]", "agent");
  await page.fill("input[name=n]", "1");
  await page.fill("input[name=seed]", "7");
  await page.click("#draw");
  await page.waitForSelector("#results li");
  const drawn = await page.textContent("#status");
  if (!drawn.includes("Drew 1 of 1")) fail(`sample status: ${drawn}`);
  await page.click("#results li");

  // The redacted transcript, side by side with the recording and the image.
  await page.waitForSelector("pre.transcript");
  const transcript = await page.textContent("pre.transcript");
  if (!transcript.includes("[card]")) fail(`no [card] in the transcript: ${transcript}`);
  if (transcript.includes("4111")) fail(`the card number reached the page: ${transcript}`);
  await page.waitForFunction(() => document.querySelector("img.image")?.naturalWidth === 2, null, { timeout: 15000 });

  // Play the recording past a seek point in its second half.
  await page.waitForSelector("audio.recording");
  const played = await page.evaluate(async () => {
    const a = document.querySelector("audio.recording");
    if (a.readyState < 1) await new Promise((ok, ko) => {
      a.addEventListener("loadedmetadata", ok, { once: true });
      a.addEventListener("error", () => ko(new Error(`media error ${a.error?.code}`)), { once: true });
    });
    const duration = a.duration;
    a.currentTime = 20;
    await new Promise((ok) => a.addEventListener("seeked", ok, { once: true }));
    await a.play();
    const deadline = Date.now() + 20000;
    while (a.currentTime < 21 && Date.now() < deadline) await new Promise((ok) => setTimeout(ok, 100));
    a.pause();
    return { duration, currentTime: a.currentTime, error: a.error?.code ?? null };
  });
  if (played.error !== null) fail(`media error ${played.error}`);
  if (Math.round(played.duration) !== 30) fail(`duration ${played.duration}`);
  if (!(played.currentTime >= 21)) fail(`playback did not get past the seek point: ${JSON.stringify(played)}`);

  await page.screenshot({ path: join(artifacts, "coaching.png"), fullPage: true });
  console.log(
    `coaching page ok: sample drawn, recording played ${played.currentTime.toFixed(1)} s of ${played.duration} s ` +
      `after a seek to 20 s, transcript redacted ([card]); screenshot ${join(artifacts, "coaching.png")}`,
  );
} catch (e) {
  if (!process.exitCode) console.error(`coaching page test FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  if (browser) await browser.close().catch(() => {});
  server.kill("SIGTERM");
  rmSync(data, { recursive: true, force: true });
}
