// Workers as child processes under a fake supervisor: a listening socket
// passed as fd 3 (LISTEN_FDS=1) and a unix stream socket as NOTIFY_SOCKET.
// This covers the whole worker contract without the containerflip binary.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';

import { spawnWorker, request, withDeadline, FIXTURES, EXAMPLES } from './helpers.mjs';

const WORKER = path.join(FIXTURES, 'worker.mjs');

// Wait until the fake notify socket has seen everything sent before now: our
// own probe connection is accepted after any earlier one.
async function notifyMessagesSoFar(n) {
  const probe = net.createConnection(n.server.address());
  probe.on('error', () => {});
  probe.end('PROBE=1\n');
  await n.next('our probe message');
  return n.messages.filter((m) => m !== 'PROBE=1\n');
}

async function freePort() {
  const s = net.createServer().listen(0, '127.0.0.1');
  await once(s, 'listening');
  const { port } = s.address();
  s.close();
  await once(s, 'close');
  return port;
}

describe('serve() under a fake supervisor', () => {
  test('serves on fd 3, sends READY=1 once, exits 0 on SIGTERM', async (t) => {
    const w = await spawnWorker(t, WORKER);
    assert.equal(await w.notify.first(), 'READY=1\n');
    const r = await request(w.port);
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-containerflip-generation'], '1');
    const info = JSON.parse((await request(w.port, { path: '/info' })).body);
    assert.deepEqual(info, { isDraining: false, fdMode: true, sigterm: 1, sigint: 0, request: 2 });
    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.deepEqual(await notifyMessagesSoFar(w.notify), ['READY=1\n']);
    assert.match(w.stderr.text(), /listening on fd 3 \(127\.0\.0\.1:\d+\)/);
  });

  test('listening on fd 3 sets the backlog to containerflip\'s default (4096), not Node\'s 511', async (t) => {
    try {
      execFileSync('ss', ['-V'], { stdio: 'pipe' });
    } catch {
      t.skip('ss (iproute2) is not installed: cannot read a listening socket\'s backlog');
      return;
    }
    const w = await spawnWorker(t, WORKER);
    await w.notify.first();
    const out = execFileSync('ss', ['-Hltn', `sport = :${w.port}`], { encoding: 'utf8' });
    const somaxconn = Number(fs.readFileSync('/proc/sys/net/core/somaxconn', 'utf8'));
    const [, , sendQ] = out.trim().split(/\s+/);
    assert.equal(Number(sendQ), Math.min(4096, somaxconn), out);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
  });

  test('NOTIFY_SOCKET with an abstract @address', async (t) => {
    const w = await spawnWorker(t, WORKER, { abstract: true });
    assert.match(w.notify.env, /^@/);
    assert.equal(await w.notify.first(), 'READY=1\n');
    assert.equal((await request(w.port)).status, 200);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
  });

  test('the primitives in the documented order work the same', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_MODE: 'primitives' } });
    assert.equal(await w.notify.first(), 'READY=1\n');
    assert.equal((await request(w.port)).status, 200);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
  });

  test('an unreachable NOTIFY_SOCKET makes the worker exit non-zero with a clear message', async (t) => {
    const w = await spawnWorker(t, WORKER, { notify: false, env: { NOTIFY_SOCKET: '/nonexistent/containerflip/notify' } });
    const { code } = await w.waitExit();
    assert.notEqual(code, 0);
    assert.match(w.stderr.text(), /cannot send READY=1 to NOTIFY_SOCKET=\/nonexistent\/containerflip\/notify/);
  });

  test('a failing listen (closed fd) exits non-zero before READY=1', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_OPTIONS: JSON.stringify({ fd: 42 }) } });
    const { code } = await w.waitExit();
    assert.notEqual(code, 0);
    assert.match(w.stderr.text(), /cannot listen on fd 42/);
    assert.deepEqual(await notifyMessagesSoFar(w.notify), []);
  });
});

describe('drain on SIGTERM', () => {
  test('in-flight requests complete with Connection: close, idle keep-alive sockets are closed, exit 0 long before the grace period', async (t) => {
    // A grace period far beyond the test's deadlines: the exit must come from
    // the connections going idle, not from the deadline.
    const w = await spawnWorker(t, WORKER, { env: { DRAIN_GRACE_MS: '600000' } });
    await w.notify.first();

    // Client A: a keep-alive connection that is idle when SIGTERM arrives.
    const agentA = new http.Agent({ keepAlive: true });
    t.after(() => agentA.destroy());
    await request(w.port, { agent: agentA });
    const [idleSocket] = Object.values(agentA.freeSockets).flat();
    assert.ok(idleSocket);
    const idleClosed = once(idleSocket, 'close');

    // Client B: keep-alive, its next response is still being prepared at SIGTERM.
    const agentB = new http.Agent({ keepAlive: true });
    t.after(() => agentB.destroy());
    const b1 = await request(w.port, { agent: agentB });
    assert.equal(b1.headers.connection, 'keep-alive');
    const b2 = request(w.port, { agent: agentB, path: '/hold' });
    // Client C: a fresh connection with a request in flight.
    const c = request(w.port, { path: '/hold' });
    await w.stdout.waitFor(/^HELD 2$/);

    w.child.kill('SIGTERM');
    await w.stderr.waitFor(/draining: no longer accepting, grace 600000ms/);
    w.child.kill('SIGUSR2'); // let the held responses go
    await w.stdout.waitFor(/^RELEASED 2$/);

    const [rb, rc] = await Promise.all([b2, c]);
    assert.equal(rb.status, 200);
    assert.equal(rb.reused, true);
    assert.equal(rb.headers.connection, 'close', 'keep-alive client B is told to close');
    assert.match(rb.body, /held response/);
    assert.equal(rc.status, 200);
    assert.equal(rc.headers.connection, 'close');

    await withDeadline(idleClosed, 'the idle keep-alive socket to be closed by the worker');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.match(w.stderr.text(), /drained in \d+ms \(idle\)/);
    assert.match(w.stderr.text(), /exiting with status 0/);
  });

  test('at the grace deadline the rest is cut and the worker still exits 0', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { DRAIN_GRACE_MS: '200' } });
    await w.notify.first();
    const stuck = request(w.port, { path: '/hold' }).then(() => null, (err) => err);
    await w.stdout.waitFor(/^HELD 1$/);
    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.ok((await stuck) instanceof Error, 'the stuck request was cut');
    assert.match(w.stderr.text(), /grace period of 200ms over: closing 1 remaining connection/);
  });

  test('signal handlers are additive: the app\'s own SIGTERM listener runs too', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_USER_SIGTERM: '1' } });
    await w.notify.first();
    await w.stdout.waitFor(/^SERVING .* sigterm=2 request=2$/);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
    assert.ok(w.stdout.find(/^USER SIGTERM HANDLER RAN$/));
  });

  test('gracefulDrain is idempotent: one signal handler and one marker however often it is called', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_TWICE: '1' } });
    await w.notify.first();
    await w.stdout.waitFor(/^SERVING .* sigterm=1 request=2$/);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
    assert.equal(w.stderr.lines.filter((l) => /SIGTERM received/.test(l)).length, 1);
  });

  test('signals: [] installs no handler: SIGTERM keeps its default action', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_OPTIONS: JSON.stringify({ signals: [] }) } });
    await w.notify.first();
    await w.stdout.waitFor(/^SERVING .* sigterm=0 request=2$/);
    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: null, signal: 'SIGTERM' });
  });

  test('signals: [\'SIGINT\'] drains on SIGINT instead', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_OPTIONS: JSON.stringify({ signals: ['SIGINT'] }) } });
    await w.notify.first();
    await w.stdout.waitFor(/^SERVING .* sigterm=0 request=2$/);
    w.child.kill('SIGINT');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.match(w.stderr.text(), /SIGINT received/);
  });

  test('drain() by hand: idempotent, sets isDraining, resolves, and does not exit', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_MODE: 'drain-only' } });
    await w.notify.first();
    await w.stdout.waitFor(/^SERVING .* sigterm=0 request=2$/);
    w.child.kill('SIGUSR1');
    await w.stdout.waitFor(/^DRAINING same=true isDraining=true$/);
    await w.stdout.waitFor(/^DRAINED$/);
    await w.stdout.waitFor(/^STILL ALIVE$/);
    assert.equal((await w.waitExit()).code, 7);
  });
});

describe('options and defaults in a real process', () => {
  test('notify: false sends no READY=1', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_OPTIONS: JSON.stringify({ notify: false }) } });
    await w.stdout.waitFor(/^SERVING /);
    assert.equal((await request(w.port)).status, 200);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
    assert.deepEqual(await notifyMessagesSoFar(w.notify), []);
  });

  test('log: false writes nothing to stderr through a whole life', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_OPTIONS: JSON.stringify({ log: false }) } });
    await w.notify.first();
    await request(w.port);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
    assert.deepEqual(w.stderr.lines, []);
  });

  test('log: a function receives every lifecycle message (default goes to stderr)', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { CF_OPTIONS: JSON.stringify({ log: 'stdout' }) } });
    await w.notify.first();
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
    const logged = w.stdout.lines.filter((l) => l.startsWith('LOG ')).map((l) => l.slice(4));
    for (const re of [/^listening on fd 3/, /^READY=1 sent$/, /^SIGTERM received$/, /^draining/, /^drained in/, /^exiting with status 0$/]) {
      assert.ok(logged.some((l) => re.test(l)), `${re} in:\n${logged.join('\n')}`);
    }
    assert.deepEqual(w.stderr.lines, [], 'nothing on stderr when a logger is given');
  });

  test('standalone: without LISTEN_FDS it serves on $PORT, READY=1 is a no-op, SIGTERM exits 0', async (t) => {
    const port = await freePort();
    const w = await spawnWorker(t, WORKER, { fd3: false, notify: false, env: { PORT: String(port) } });
    const { match } = await w.stdout.waitFor(/^SERVING (\{.*\}) /);
    assert.equal(JSON.parse(match[1]).port, port);
    const info = JSON.parse((await request(port, { path: '/info' })).body);
    assert.equal(info.fdMode, false);
    w.child.kill('SIGTERM');
    assert.equal((await w.waitExit()).code, 0);
    assert.match(w.stderr.text(), /standalone, no LISTEN_FDS/);
  });
});

describe('examples under a fake supervisor', () => {
  for (const name of ['http', 'express', 'koa', 'fastify', 'cluster']) {
    test(`examples/${name}.mjs: READY=1, answers with its generation, exits 0 on SIGTERM`, async (t) => {
      const w = await spawnWorker(t, path.join(EXAMPLES, `${name}.mjs`), {
        env: { CONTAINERFLIP_GENERATION: '7', CLUSTER_WORKERS: '2' },
      });
      assert.equal(await w.notify.first(), 'READY=1\n');
      const r = await request(w.port);
      assert.equal(r.status, 200);
      assert.equal(r.headers['x-containerflip-generation'], '7');
      assert.match(r.body, /generation 7/);
      w.child.kill('SIGTERM');
      assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
      assert.deepEqual(await notifyMessagesSoFar(w.notify), ['READY=1\n'], 'exactly one READY=1');
      if (name === 'cluster') {
        // Two children listened on the primary's fd 3 and drained.
        assert.equal(w.stderr.lines.filter((l) => /listening on fd 3/.test(l)).length, 2, w.stderr.text());
        assert.equal(w.stderr.lines.filter((l) => /exiting with status 0/.test(l)).length, 2, w.stderr.text());
      }
    });
  }
});
