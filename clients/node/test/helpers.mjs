// Shared test plumbing: a fake supervisor (a listening socket passed as fd 3
// and a unix stream socket acting as NOTIFY_SOCKET), line waiters over child
// output, and small HTTP helpers. Nothing here sleeps to synchronise: every
// wait is for an event, and every deadline is only a safety net.

import { spawn } from 'node:child_process';
import { once, EventEmitter } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const PKG_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const FIXTURES = path.join(PKG_DIR, 'test', 'fixtures');
export const EXAMPLES = path.join(PKG_DIR, 'examples');

// Safety-net deadline for one awaited event; never a synchronisation device.
export const DEADLINE_MS = Number(process.env.CONTAINERFLIP_TEST_DEADLINE_MS ?? 30000);

export function tmpDir(t) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cf-node-test-'));
  t?.after?.(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Reject `promise` if it has not settled within `ms` (a safety net). */
export function withDeadline(promise, what, ms = DEADLINE_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms}ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Collects the lines of a readable stream; waitFor(re) resolves with the
 * match of the first line (already seen or still to come) matching `re`
 * after position `from`.
 */
export class Lines extends EventEmitter {
  constructor(stream, { echo = null } = {}) {
    super();
    this.lines = [];
    this.ended = false;
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        this.lines.push(line);
        if (echo) echo.write(`${line}\n`);
        this.emit('line', line, this.lines.length - 1);
      }
    });
    stream.on('end', () => {
      if (buf) {
        this.lines.push(buf);
        this.emit('line', buf, this.lines.length - 1);
      }
      this.ended = true;
      this.emit('end');
    });
  }

  find(re, from = 0) {
    for (let i = from; i < this.lines.length; i++) {
      const m = re.exec(this.lines[i]);
      if (m) return { match: m, index: i };
    }
    return null;
  }

  waitFor(re, { from = 0, ms = DEADLINE_MS } = {}) {
    const found = this.find(re, from);
    if (found) return Promise.resolve(found);
    return withDeadline(new Promise((resolve, reject) => {
      const onLine = (line, index) => {
        if (index < from) return;
        const m = re.exec(line);
        if (m) {
          cleanup();
          resolve({ match: m, index });
        }
      };
      const onEnd = () => {
        cleanup();
        reject(new Error(`stream ended without a line matching ${re}; got:\n${this.lines.join('\n')}`));
      };
      const cleanup = () => {
        this.off('line', onLine);
        this.off('end', onEnd);
      };
      this.on('line', onLine);
      this.on('end', onEnd);
    }), `a line matching ${re}; so far:\n${this.lines.join('\n')}`, ms);
  }

  text() {
    return this.lines.join('\n');
  }
}

/**
 * A unix stream socket standing in for the supervisor's notify socket.
 * `messages` receives the full text of each connection; `next()` waits for
 * the next one; `soFar()` returns every message sent before it was called.
 */
export async function notifyServer(t, { abstract = false } = {}) {
  const name = `cf-node-notify-${process.pid}-${Math.random().toString(36).slice(2)}`;
  let listenPath;
  let env;
  if (abstract) {
    listenPath = `\0${name}`;
    env = `@${name}`;
  } else {
    listenPath = path.join(tmpDir(t), 'notify.sock');
    env = listenPath;
  }
  const events = new EventEmitter();
  const messages = [];
  // Every accepted connection, in accept order, with a promise for its end.
  // A unix socket's accept queue is FIFO, so a connection whose connect(2)
  // came before another's is accepted before it.
  const conns = [];
  const server = net.createServer((sock) => {
    const seq = conns.length;
    let data = '';
    const closed = new Promise((resolve) => sock.once('close', resolve));
    conns.push(closed);
    sock.setEncoding('utf8');
    sock.on('data', (d) => { data += d; });
    sock.on('end', () => {
      if (data.startsWith('PROBE=')) {
        events.emit('probe', data, seq);
      } else {
        messages.push(data);
        events.emit('message', data);
      }
      sock.end();
    });
    sock.on('error', () => {});
  });
  server.listen(listenPath);
  await once(server, 'listening');
  t?.after?.(() => server.close());
  return {
    env,
    server,
    messages,
    events,
    next(what = 'a notify message') {
      const seen = messages.length;
      return withDeadline(new Promise((resolve) => {
        const check = () => {
          if (messages.length > seen) {
            events.off('message', check);
            resolve(messages[seen]);
          }
        };
        events.on('message', check);
      }), what);
    },
    /** Waits for the first message ever (whether it has arrived yet or not). */
    first(what = 'READY=1') {
      if (messages.length > 0) return Promise.resolve(messages[0]);
      return this.next(what);
    },
    /**
     * Every message from a connection opened before this call: connects a
     * probe, and once the probe is in, waits for every connection accepted
     * before it to close. (Probe messages are never in `messages`.)
     */
    async soFar() {
      const token = `PROBE=${Math.random().toString(36).slice(2)}\n`;
      const probeSeq = withDeadline(new Promise((resolve) => {
        const onProbe = (data, seq) => {
          if (data !== token) return;
          events.off('probe', onProbe);
          resolve(seq);
        };
        events.on('probe', onProbe);
      }), 'our notify probe');
      const probe = net.createConnection(server.address());
      probe.on('error', () => {});
      probe.end(token);
      const seq = await probeSeq;
      await withDeadline(Promise.all(conns.slice(0, seq)), 'earlier notify connections to close');
      return [...messages];
    },
  };
}

/**
 * Runs `fn(port)` with a port that was free a moment ago, and again with
 * another one if `fn` fails with EADDRINUSE (another test file took the
 * port in between). For APIs whose point is to listen on a given port.
 */
export async function withFreePort(fn, attempts = 5) {
  for (let i = 1; ; i++) {
    const s = net.createServer().listen(0);
    await once(s, 'listening');
    const { port } = s.address();
    s.close();
    await once(s, 'close');
    try {
      return await fn(port);
    } catch (err) {
      if (err?.code !== 'EADDRINUSE' || i >= attempts) throw err;
    }
  }
}

/** A listening TCP socket on 127.0.0.1 to hand to a worker as fd 3. */
export async function listeningSocket() {
  const server = net.createServer();
  server.listen({ host: '127.0.0.1', port: 0 });
  await once(server, 'listening');
  return { server, port: server.address().port };
}

/**
 * Start `node script` the way the supervisor would: a listening socket as
 * fd 3 with LISTEN_FDS=1 (unless fd3 is false; `fds: N` passes N sockets as
 * fds 3 … 3+N-1, named by `names`, LISTEN_FDNAMES), NOTIFY_SOCKET pointing at
 * a fake notify socket (unless notify is false). The parent closes its copies
 * of the listening sockets once the child holds them, so only the child
 * accepts.
 */
export async function spawnWorker(t, script, { env = {}, fd3 = true, fds = 1, names = null, notify = true, abstract = false, args = [] } = {}) {
  const n = notify ? await notifyServer(t, { abstract }) : null;
  const listeners = [];
  if (fd3) for (let i = 0; i < fds; i++) listeners.push(await listeningSocket());
  const listener = listeners[0] ?? null;
  const childEnv = { ...process.env };
  for (const k of ['LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'NOTIFY_SOCKET', 'DRAIN_GRACE_MS', 'PORT', 'CONTAINERFLIP_GENERATION']) {
    delete childEnv[k];
  }
  childEnv.CONTAINERFLIP_GENERATION = '1';
  if (fd3) {
    childEnv.LISTEN_FDS = String(fds);
    childEnv.LISTEN_FDNAMES = names ?? Array(fds).fill('unknown').join(':');
  }
  if (n) childEnv.NOTIFY_SOCKET = n.env;
  Object.assign(childEnv, env);
  for (const [k, v] of Object.entries(childEnv)) if (v === undefined) delete childEnv[k];
  const stdio = ['ignore', 'pipe', 'pipe'];
  // The listening sockets' descriptors become the child's fds 3, 4, … (a
  // net.Server cannot be passed as a stdio stream, its descriptor can).
  for (const l of listeners) stdio.push(l.server._handle.fd);
  const child = spawn(process.execPath, [script, ...args], { stdio, env: childEnv, cwd: PKG_DIR });
  for (const l of listeners) l.server.close();
  const stdout = new Lines(child.stdout);
  const stderr = new Lines(child.stderr);
  // 'close' comes after 'exit' and after stdout/stderr have ended, so every
  // line the worker wrote is in `stdout`/`stderr` once this resolves.
  const exited = new Promise((resolve) => {
    child.once('close', (code, signal) => resolve({ code, signal }));
  });
  t?.after?.(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  return {
    child,
    port: listener?.port,
    ports: listeners.map((l) => l.port),
    notify: n,
    stdout,
    stderr,
    exited,
    waitExit(what = 'the worker to exit') {
      return withDeadline(exited, `${what}; stderr:\n${stderr.text()}`);
    },
  };
}

/**
 * One HTTP request. Resolves with { status, headers, body, socket } once the
 * body is complete.
 */
export function request(port, { path: p = '/', agent = false, method = 'GET', headers = {}, host = '127.0.0.1' } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host, port, path: p, method, agent, headers }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body, reused: req.reusedSocket }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end();
  });
}

/** The containerflip binary: $CONTAINERFLIP_BIN or ../../target/debug/containerflip. */
export function containerflipBinary() {
  const bin = process.env.CONTAINERFLIP_BIN ?? path.resolve(PKG_DIR, '..', '..', 'target', 'debug', 'containerflip');
  return bin;
}

/**
 * `containerflip run --notify-mode MODE --listen 127.0.0.1:0 RUNARGS -- CMD`,
 * with its control socket in a temporary directory. Resolves once the first
 * generation is ready (or rejects with the log if `run` exits first).
 */
export async function startSupervisor(t, command, { runArgs = [], env = {}, notifyMode = 'stream', waitReady = true } = {}) {
  const bin = containerflipBinary();
  if (!fs.existsSync(bin)) {
    throw new Error(`containerflip binary not found at ${bin}: build it with \`cargo build\` at the top of the repository, or set CONTAINERFLIP_BIN`);
  }
  const dir = tmpDir(t);
  const childEnv = { ...process.env };
  for (const k of ['LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'NOTIFY_SOCKET', 'DRAIN_GRACE_MS', 'PORT', 'CONTAINERFLIP_GENERATION', 'CONTAINERFLIP_CONTROL']) {
    delete childEnv[k];
  }
  Object.assign(childEnv, env);
  const args = [
    'run', '--notify-mode', notifyMode, '--listen', '127.0.0.1:0',
    '--control', path.join(dir, 'control.sock'),
    ...runArgs, '--', ...command,
  ];
  const child = spawn(bin, args, { cwd: PKG_DIR, env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
  const echo = process.env.CF_TEST_VERBOSE ? process.stderr : null;
  // Workers inherit the supervisor's stdout and stderr, so their lines show
  // up here too.
  const stdout = new Lines(child.stdout, { echo });
  const stderr = new Lines(child.stderr, { echo });
  const exited = new Promise((resolve) => child.once('close', (code, signal) => resolve({ code, signal })));
  t?.after?.(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
      await exited;
      clearTimeout(timer);
    }
  });
  const sup = {
    child,
    stdout,
    stderr,
    exited,
    port: null,
    active: null, // { gen, pid }
    waitExit(what = 'containerflip run to exit') {
      return withDeadline(exited, `${what}; log:\n${stderr.text()}`);
    },
    /**
     * SIGHUP, then wait for the new generation's `ready` line and the old
     * one's `exited`/`killed` line; or for `deploy failed`.
     */
    async deploy() {
      const from = stderr.lines.length;
      const old = this.active;
      child.kill('SIGHUP');
      const spawned = await stderr.waitFor(/^containerflip: gen (\d+) pid (\d+) spawned/, { from });
      const gen = Number(spawned.match[1]);
      const pid = Number(spawned.match[2]);
      const outcome = await stderr.waitFor(new RegExp(`^containerflip: gen ${gen} pid ${pid} (ready in \\d+ ?ms|deploy failed: (.*))$`), { from });
      if (outcome.match[2] !== undefined) {
        return { ok: false, gen, pid, reason: outcome.match[2] };
      }
      const end = await stderr.waitFor(new RegExp(`^containerflip: gen ${old.gen} pid ${old.pid} (exited with status \\d+|killed .*)$`), { from });
      this.active = { gen, pid };
      return { ok: true, gen, pid, old, oldEnd: end.match[1] };
    },
    async stop() {
      child.kill('SIGTERM');
      return this.waitExit();
    },
  };
  const ended = exited.then((r) => { throw new Error(`containerflip run exited early (${JSON.stringify(r)}):\n${stderr.text()}`); });
  ended.catch(() => {});
  const listening = await Promise.race([stderr.waitFor(/^containerflip: listening on 127\.0\.0\.1:(\d+) as fd 3/), ended]);
  sup.port = Number(listening.match[1]);
  if (waitReady) {
    const ready = await Promise.race([stderr.waitFor(/^containerflip: gen 1 pid (\d+) ready in/), ended]);
    sup.active = { gen: 1, pid: Number(ready.match[1]) };
  }
  return sup;
}

/**
 * The listening TCP sockets process `pid` holds: `{ fd, inode, address }`
 * for each, from /proc/PID/fd and /proc/PID/net/tcp{,6} (state 0A).
 */
export function listeningSockets(pid) {
  const listening = new Map(); // inode -> local address (hex, as the kernel prints it)
  for (const table of ['tcp', 'tcp6']) {
    let text = '';
    try { text = fs.readFileSync(`/proc/${pid}/net/${table}`, 'utf8'); } catch { continue; }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length > 9 && f[3] === '0A') listening.set(f[9], `${table} ${f[1]}`);
    }
  }
  const out = [];
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    let target;
    try { target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`); } catch { continue; }
    const m = /^socket:\[(\d+)\]$/.exec(target);
    if (m && listening.has(m[1])) out.push({ fd: Number(fd), inode: m[1], address: listening.get(m[1]) });
  }
  return out;
}
