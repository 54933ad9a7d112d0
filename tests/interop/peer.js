// A small xrpc client written from docs/wire.md alone, with its own MessagePack codec (no packages).
//
//   node peer.js SOCKET_PATH
//
// It talks to a server exporting the `Interop` interface of tests/test_interop.py, checks every
// answer, prints one line `ok <step>` per step and exits 0; on a failed check it prints
// `FAIL <step>: <why>` and exits 1.  tests/test_interop.py runs it.
"use strict";

const net = require("net");

// ------------------------------------------------------------------ MessagePack
class Ext {
  constructor(type, data) { this.type = type; this.data = data; }
}

function encode(value) {
  const parts = [];
  enc(value, parts);
  return Buffer.concat(parts);
}

function u8(n) { return Buffer.from([n]); }

function head(n, small, smallMax, c8, c16, c32) {
  if (n <= smallMax) return u8(small | n);
  if (c8 !== null && n < 0x100) return Buffer.from([c8, n]);
  if (n < 0x10000) { const b = Buffer.alloc(3); b[0] = c16; b.writeUInt16BE(n, 1); return b; }
  const b = Buffer.alloc(5); b[0] = c32; b.writeUInt32BE(n, 1); return b;
}

function enc(v, out) {
  if (v === null || v === undefined) { out.push(u8(0xc0)); return; }
  if (v === false) { out.push(u8(0xc2)); return; }
  if (v === true) { out.push(u8(0xc3)); return; }
  if (typeof v === "number" && Number.isInteger(v)) {
    if (v >= 0) {
      if (v < 0x80) out.push(u8(v));
      else if (v < 0x100) out.push(Buffer.from([0xcc, v]));
      else if (v < 0x10000) { const b = Buffer.alloc(3); b[0] = 0xcd; b.writeUInt16BE(v, 1); out.push(b); }
      else if (v < 0x100000000) { const b = Buffer.alloc(5); b[0] = 0xce; b.writeUInt32BE(v, 1); out.push(b); }
      else { const b = Buffer.alloc(9); b[0] = 0xcf; b.writeBigUInt64BE(BigInt(v), 1); out.push(b); }
    } else {
      if (v >= -32) out.push(u8(v & 0xff));
      else if (v >= -0x80) { const b = Buffer.alloc(2); b[0] = 0xd0; b.writeInt8(v, 1); out.push(b); }
      else if (v >= -0x8000) { const b = Buffer.alloc(3); b[0] = 0xd1; b.writeInt16BE(v, 1); out.push(b); }
      else if (v >= -0x80000000) { const b = Buffer.alloc(5); b[0] = 0xd2; b.writeInt32BE(v, 1); out.push(b); }
      else { const b = Buffer.alloc(9); b[0] = 0xd3; b.writeBigInt64BE(BigInt(v), 1); out.push(b); }
    }
    return;
  }
  if (typeof v === "number") { const b = Buffer.alloc(9); b[0] = 0xcb; b.writeDoubleBE(v, 1); out.push(b); return; }
  if (typeof v === "string") {
    const s = Buffer.from(v, "utf8");
    out.push(head(s.length, 0xa0, 31, 0xd9, 0xda, 0xdb), s);
    return;
  }
  if (Buffer.isBuffer(v)) { out.push(head(v.length, 0, -1, 0xc4, 0xc5, 0xc6), v); return; }
  if (Array.isArray(v)) {
    out.push(head(v.length, 0x90, 15, null, 0xdc, 0xdd));
    for (const x of v) enc(x, out);
    return;
  }
  if (typeof v === "object") {
    const keys = Object.keys(v);
    out.push(head(keys.length, 0x80, 15, null, 0xde, 0xdf));
    for (const k of keys) { enc(k, out); enc(v[k], out); }
    return;
  }
  throw new Error(`cannot encode ${typeof v}`);
}

function decode(buf) {
  const r = { buf, pos: 0 };
  const v = dec(r);
  if (r.pos !== buf.length) throw new Error("trailing bytes after the msgpack value");
  return v;
}

function dec(r) {
  const b = r.buf;
  const c = b[r.pos++];
  const take = (n) => { const s = b.subarray(r.pos, r.pos + n); if (s.length !== n) throw new Error("truncated"); r.pos += n; return s; };
  const arr = (n) => { const a = []; for (let i = 0; i < n; i++) a.push(dec(r)); return a; };
  const map = (n) => { const m = {}; for (let i = 0; i < n; i++) { const k = dec(r); m[k] = dec(r); } return m; };
  const num = (n, f) => { const s = take(n); return f(s); };
  if (c < 0x80) return c;
  if (c >= 0xe0) return c - 0x100;
  if ((c & 0xf0) === 0x80) return map(c & 0x0f);
  if ((c & 0xf0) === 0x90) return arr(c & 0x0f);
  if ((c & 0xe0) === 0xa0) return take(c & 0x1f).toString("utf8");
  switch (c) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: return Buffer.from(take(num(1, (s) => s[0])));
    case 0xc5: return Buffer.from(take(num(2, (s) => s.readUInt16BE(0))));
    case 0xc6: return Buffer.from(take(num(4, (s) => s.readUInt32BE(0))));
    case 0xc7: { const n = num(1, (s) => s[0]); const t = num(1, (s) => s.readInt8(0)); return new Ext(t, take(n)); }
    case 0xc8: { const n = num(2, (s) => s.readUInt16BE(0)); const t = num(1, (s) => s.readInt8(0)); return new Ext(t, take(n)); }
    case 0xc9: { const n = num(4, (s) => s.readUInt32BE(0)); const t = num(1, (s) => s.readInt8(0)); return new Ext(t, take(n)); }
    case 0xca: return num(4, (s) => s.readFloatBE(0));
    case 0xcb: return num(8, (s) => s.readDoubleBE(0));
    case 0xcc: return num(1, (s) => s[0]);
    case 0xcd: return num(2, (s) => s.readUInt16BE(0));
    case 0xce: return num(4, (s) => s.readUInt32BE(0));
    case 0xcf: return Number(num(8, (s) => s.readBigUInt64BE(0)));
    case 0xd0: return num(1, (s) => s.readInt8(0));
    case 0xd1: return num(2, (s) => s.readInt16BE(0));
    case 0xd2: return num(4, (s) => s.readInt32BE(0));
    case 0xd3: return Number(num(8, (s) => s.readBigInt64BE(0)));
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: {
      const n = 1 << (c - 0xd4); const t = num(1, (s) => s.readInt8(0)); return new Ext(t, take(n));
    }
    case 0xd9: return take(num(1, (s) => s[0])).toString("utf8");
    case 0xda: return take(num(2, (s) => s.readUInt16BE(0))).toString("utf8");
    case 0xdb: return take(num(4, (s) => s.readUInt32BE(0))).toString("utf8");
    case 0xdc: return arr(num(2, (s) => s.readUInt16BE(0)));
    case 0xdd: return arr(num(4, (s) => s.readUInt32BE(0)));
    case 0xde: return map(num(2, (s) => s.readUInt16BE(0)));
    case 0xdf: return map(num(4, (s) => s.readUInt32BE(0)));
  }
  throw new Error(`bad msgpack byte 0x${c.toString(16)}`);
}

// ------------------------------------------------------------------ framing and a connection
const T = { HELLO: 0, WELCOME: 1, CALL: 2, REPLY: 3, ERROR: 4, ITEM: 5, END: 6, CREDIT: 7, CANCEL: 8, RELEASE: 9, GOODBYE: 10, PING: 11, PONG: 12 };
const NAMES = Object.fromEntries(Object.entries(T).map(([k, v]) => [v, k]));
const FLAGS = { ONEWAY: 1, STREAM_IN: 2, STREAM_OUT: 4 };

function frame(msg) {
  const body = encode(msg);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length, 0);
  return Buffer.concat([len, body]);
}

class Conn {
  constructor(path) {
    this.sock = net.createConnection(path);
    this.buf = Buffer.alloc(0);
    this.frames = []; // [message, body length]
    this.waiters = [];
    this.ended = false;
    this.nextId = 1; // the connecting side numbers its calls 1, 3, 5, ...
    this.sock.on("data", (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      while (this.buf.length >= 4) {
        const n = this.buf.readUInt32BE(0);
        if (this.buf.length < 4 + n) break;
        const body = this.buf.subarray(4, 4 + n);
        this.buf = this.buf.subarray(4 + n);
        this.frames.push([decode(body), n]);
      }
      this.wake();
    });
    this.sock.on("end", () => { this.ended = true; this.wake(); });
    this.sock.on("error", () => { this.ended = true; this.wake(); });
  }
  wake() { const w = this.waiters; this.waiters = []; for (const f of w) f(); }
  connected() { return new Promise((ok, bad) => { this.sock.once("connect", ok); this.sock.once("error", bad); }); }
  send(msg) { this.sock.write(frame(msg)); }
  // the next frame, [message, body length]; null once the socket has ended
  async next(timeoutMs = 10000) {
    const until = Date.now() + timeoutMs;
    while (this.frames.length === 0) {
      if (this.ended) return null;
      const left = until - Date.now();
      if (left <= 0) throw new Error("timed out waiting for a frame");
      await new Promise((ok) => { const t = setTimeout(ok, left); this.waiters.push(() => { clearTimeout(t); ok(); }); });
    }
    return this.frames.shift();
  }
  // the next frame about call `id`, answering PINGs in between
  async nextFor(id) {
    for (;;) {
      const got = await this.next();
      if (got === null) throw new Error(`the connection ended while waiting on call ${id}`);
      const [m] = got;
      if (m[0] === T.PING) { this.send([T.PONG, m[1]]); continue; }
      if (m[0] === T.GOODBYE) throw new Error(`GOODBYE ${JSON.stringify(m)}`);
      if (m[1] === id) return got;
      if (m[0] === T.CREDIT && m[1] === 0) continue; // connection credit (this peer announces no conn_window)
      throw new Error(`unexpected frame ${JSON.stringify(m)}`);
    }
  }
  call(obj, method, args, flags = 0, deadline = undefined) {
    const id = this.nextId;
    this.nextId += 2;
    const msg = [T.CALL, id, obj, method, args];
    if (flags || deadline !== undefined) msg.push(flags);
    if (deadline !== undefined) msg.push(deadline);
    this.send(msg);
    return id;
  }
  async unary(obj, method, args, deadline) {
    const id = this.call(obj, method, args, 0, deadline);
    const [m] = await this.nextFor(id);
    if (m[0] === T.REPLY) return { reply: m[2] };
    if (m[0] === T.ERROR) return { error: { code: m[2], type_name: m[3], message: m[4], args: m[5] === undefined ? null : m[5] } };
    throw new Error(`unexpected answer ${JSON.stringify(m)}`);
  }
}

// ------------------------------------------------------------------ the steps
function check(cond, why) { if (!cond) throw new Error(why); }
function same(a, b) { return JSON.stringify(a) === JSON.stringify(b); }

const WINDOW = 8; // the stream credit this client grants, in items

async function main() {
  const path = process.argv[2];
  let step = "connect";
  try {
    const c = new Conn(path);
    await c.connected();

    step = "handshake";
    // HELLO: version 1, max_frame 1 MiB, no exports, a window of 8 items and 1 MiB; no conn_window
    c.send([T.HELLO, 1, 1 << 20, [], WINDOW, 1 << 20]);
    const [welcome] = await c.next();
    check(welcome[0] === T.WELCOME, `expected WELCOME, got ${JSON.stringify(welcome)}`);
    check(welcome[1] === 1, `version ${welcome[1]}`);
    const exports = Object.fromEntries(welcome[3].map((e) => [e[0], e]));
    check("Interop" in exports, `no Interop export in ${Object.keys(exports)}`);
    check("xrpc.introspect" in exports, "no introspection export");
    const sigs = exports.Interop[3];
    check(exports.Interop[1] === "Interop" && /^[0-9a-f]{16}$/.test(exports.Interop[2]), "interface name / fingerprint");
    check(same(sigs.add, ["unary", ["a", "b"], [], null]), `add: ${JSON.stringify(sigs.add)}`);
    check(same(sigs.count, ["server_stream", ["n"], [], null]), `count: ${JSON.stringify(sigs.count)}`);
    check(same(sigs.total, ["client_stream", ["label", "values"], [], 1]), `total: ${JSON.stringify(sigs.total)}`);
    check(same(sigs.norm2, ["unary", ["p", "scale"], [1], null]), `norm2: ${JSON.stringify(sigs.norm2)}`);
    const peerWindow = welcome[4];
    console.log(`ok handshake window=${peerWindow}`);

    step = "unary";
    let r = await c.unary("Interop", "add", [2, 3], 30); // an integer deadline
    check(same(r, { reply: 5 }), JSON.stringify(r));
    console.log("ok unary");

    step = "struct";
    r = await c.unary("Interop", "norm2", [{ x: 3, y: 4 }]); // `scale` left at its default
    check(same(r, { reply: 25 }), JSON.stringify(r));
    r = await c.unary("Interop", "norm2", [{ x: 3, y: 4 }, 2]);
    check(same(r, { reply: 50 }), JSON.stringify(r));
    r = await c.unary("Interop", "norm2", [{ x: "three", y: 4 }]);
    check(r.error && r.error.code === 3 && r.error.type_name === "ValidationError" && same(r.error.args, ["p"]), JSON.stringify(r));
    console.log("ok struct");

    step = "server stream";
    const N = 5 * WINDOW + 3;
    let id = c.call("Interop", "count", [N], FLAGS.STREAM_OUT);
    const items = [];
    let credits = 0, heldItems = WINDOW, consumed = 0, consumedBytes = 0;
    for (;;) {
      const [m, size] = await c.nextFor(id);
      if (m[0] === T.END) break;
      check(m[0] === T.ITEM, `expected ITEM, got ${JSON.stringify(m)}`);
      const [, , count, payload] = m;
      check(Array.isArray(payload) && payload.length === count && count >= 1, `batch ${JSON.stringify(m)}`);
      check(count <= heldItems, `ITEM of ${count} beyond the ${heldItems} items of credit granted`);
      heldItems -= count;
      items.push(...payload);
      consumed += count;
      consumedBytes += size;
      if (consumed >= WINDOW / 2) { // give back what was consumed: CREDIT adds to what the sender holds
        c.send([T.CREDIT, id, consumed, consumedBytes]);
        heldItems += consumed;
        credits += 1;
        consumed = 0;
        consumedBytes = 0;
      }
    }
    check(same(items, Array.from({ length: N }, (_, i) => i)), `items ${JSON.stringify(items)}`);
    check(credits >= 4, `only ${credits} CREDITs were needed`);
    console.log(`ok server stream items=${items.length} credits=${credits}`);

    step = "client stream";
    id = c.call("Interop", "total", ["sum"], FLAGS.STREAM_IN);
    c.send([T.ITEM, id, 3, [1, 2, 3]]);
    c.send([T.ITEM, id, 1, [4]]);
    c.send([T.END, id]);
    let [m] = await c.nextFor(id);
    check(same(m, [T.REPLY, id, "sum=10"]), JSON.stringify(m));
    console.log("ok client stream");

    step = "declared error";
    r = await c.unary("Interop", "withdraw", [100]);
    check(r.error && r.error.code === 2 && r.error.type_name === "Overdrawn", JSON.stringify(r));
    check(same(r.error.args, [100, 10]), JSON.stringify(r.error.args));
    r = await c.unary("Interop", "nosuch", []);
    check(r.error && r.error.code === 4 && r.error.type_name === "MethodNotFound", JSON.stringify(r));
    r = await c.unary("Nobody", "add", [1, 2]);
    check(r.error && r.error.code === 5 && r.error.type_name === "ObjectNotFound", JSON.stringify(r));
    console.log("ok declared error");

    step = "introspection";
    r = await c.unary("xrpc.introspect", "exports", []);
    const described = r.reply.map((e) => e.name);
    check(same(described, ["Interop"]), JSON.stringify(described));
    console.log("ok introspection");

    step = "goodbye";
    c.send([T.GOODBYE, "done", 0]);
    const after = await c.next(); // the receiver of GOODBYE sends nothing and closes its socket
    check(after === null, `after GOODBYE: ${JSON.stringify(after)}`);
    c.sock.destroy();
    console.log("ok goodbye");

    step = "version mismatch";
    const v = new Conn(path);
    await v.connected();
    v.send([T.HELLO, 2, 1 << 20]);
    const got = [];
    for (let f = await v.next(); f !== null; f = await v.next()) got.push(f[0]);
    check(got.length === 1 && got[0][0] === T.GOODBYE && got[0][2] === 3, `frames ${JSON.stringify(got)}`);
    check(/version 2/.test(got[0][1]), got[0][1]);
    v.sock.destroy();
    console.log("ok version mismatch");
  } catch (e) {
    console.log(`FAIL ${step}: ${e && e.message}`);
    process.exit(1);
  }
  process.exit(0);
}

main();
