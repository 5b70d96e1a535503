// Workers as child processes under a fake supervisor: a listening socket
// passed as fd 3 (LISTEN_FDS=1) and a unix stream socket as NOTIFY_SOCKET.
// This covers the whole worker contract without the containerflip binary.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';

import { spawnWorker, request, withDeadline, withFreePort, listeningSockets, FIXTURES, EXAMPLES } from './helpers.mjs';

// Let the fixture's held response go (SIGUSR2): it completes, marked
// `Connection: close` by the drain, and the worker then exits 0.
async function releaseHeldThenExit(w, held) {
  w.child.kill('SIGUSR2');
  const r = await held;
  assert.equal(r.status, 200);
  assert.equal(r.headers.connection, 'close');
  assert.match(r.body, /held response/);
  assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
}

const WORKER = path.join(FIXTURES, 'worker.mjs');
const CLUSTER_HELD = path.join(FIXTURES, 'cluster-held.mjs');

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
    assert.deepEqual(await w.notify.soFar(), ['READY=1\n']);
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
    assert.deepEqual(await w.notify.soFar(), []);
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

  // The environment's grace, and the graceMs option over an environment
  // that says 600000 ms (far beyond every deadline here): the worker can
  // only end in time by honouring the option.
  for (const [what, env] of [
    ['$DRAIN_GRACE_MS', { DRAIN_GRACE_MS: '200' }],
    ['the graceMs option, over $DRAIN_GRACE_MS', { DRAIN_GRACE_MS: '600000', CF_OPTIONS: JSON.stringify({ graceMs: 200 }) }],
  ]) {
    test(`at the grace deadline (${what}) the rest is cut and the worker still exits 0`, async (t) => {
      const w = await spawnWorker(t, WORKER, { env });
      await w.notify.first();
      const stuck = request(w.port, { path: '/hold' }).then(() => null, (err) => err);
      await w.stdout.waitFor(/^HELD 1$/);
      w.child.kill('SIGTERM');
      assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
      assert.ok((await stuck) instanceof Error, 'the stuck request was cut');
      assert.match(w.stderr.text(), /draining: no longer accepting, grace 200ms/);
      assert.match(w.stderr.text(), /grace period of 200ms over: closing 1 remaining connection/);
    });
  }

  test('a second SIGTERM during the drain changes nothing: the held response completes, exit 0', async (t) => {
    // The handler must stay subscribed: with no listener left, the second
    // SIGTERM would take its default action and kill the worker mid-drain.
    const w = await spawnWorker(t, WORKER, { env: { DRAIN_GRACE_MS: '600000' } });
    await w.notify.first();
    const held = request(w.port, { path: '/hold' });
    await w.stdout.waitFor(/^HELD 1$/);
    w.child.kill('SIGTERM');
    await w.stderr.waitFor(/draining: no longer accepting/);
    w.child.kill('SIGTERM');
    await w.stderr.waitFor(/SIGTERM received again: already draining/);
    await releaseHeldThenExit(w, held);
    assert.equal(w.stderr.lines.filter((l) => /draining: no longer accepting/.test(l)).length, 1, 'one drain, not two');
  });

  // Two listeners (LISTEN_FDS=2, fd 4 found through LISTEN_FDNAMES), each
  // with its own gracefulDrain(): the exit waits for both drains, whichever
  // of the two is the slow one.
  for (const [which, slow] of [['the second server (fd 4)', 1], ['the first server (fd 3)', 0]]) {
    test(`two servers: no exit before ${which}, which holds a request, has drained`, async (t) => {
      const w = await spawnWorker(t, WORKER, {
        fds: 2, names: 'web:admin', env: { CF_MODE: 'two-servers', DRAIN_GRACE_MS: '600000' },
      });
      assert.equal(await w.notify.first(), 'READY=1\n');
      const admin = await w.stdout.waitFor(/^ADMIN (\{.*\})$/);
      assert.equal(JSON.parse(admin.match[1]).port, w.ports[1], 'the admin server listens on fd 4');
      for (const port of w.ports) assert.equal((await request(port)).status, 200);
      const info = JSON.parse((await request(w.port, { path: '/info' })).body);
      assert.equal(info.sigterm, 2, 'one SIGTERM handler per server');

      const held = request(w.ports[slow], { path: '/hold' });
      await w.stdout.waitFor(/^HELD 1$/);
      w.child.kill('SIGTERM');
      // The other server has nothing in flight, so its drain ends first.
      await w.stderr.waitFor(/drained in \d+ms \(idle\)/);
      await releaseHeldThenExit(w, held);
      assert.equal(w.stderr.lines.filter((l) => /drained in \d+ms \(idle\)/.test(l)).length, 2, w.stderr.text());
      assert.equal(w.stderr.lines.filter((l) => /exiting with status 0/.test(l)).length, 1, w.stderr.text());
    });
  }

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
    assert.deepEqual(await w.notify.soFar(), []);
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

  test('with LISTEN_FDS a $PORT in the environment is ignored: it serves on fd 3 only', async (t) => {
    const w = await spawnWorker(t, WORKER, { env: { PORT: '0' } });
    assert.equal(await w.notify.first(), 'READY=1\n');
    const serving = await w.stdout.waitFor(/^SERVING (\{.*\}) /);
    assert.equal(JSON.parse(serving.match[1]).port, w.port, 'listening on the inherited socket');
    assert.deepEqual(listeningSockets(w.child.pid).map((s) => s.fd), [3], 'no socket of its own');
    assert.equal((await request(w.port)).status, 200);
    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
  });

  test('standalone: without LISTEN_FDS it serves on $PORT, READY=1 is a no-op, SIGTERM exits 0', async (t) => {
    // The port was free a moment ago; if another test file took it since,
    // the worker exits with EADDRINUSE and we try another one.
    const { w, port } = await withFreePort(async (port) => {
      const w = await spawnWorker(t, WORKER, { fd3: false, notify: false, env: { PORT: String(port) } });
      const serving = w.stdout.waitFor(/^SERVING (\{.*\}) /).then((r) => r, () => null);
      const exited = w.exited.then(() => null);
      const r = await withDeadline(Promise.race([serving, exited]), 'the worker to serve or exit');
      if (r === null && (await w.exited).code !== 0 && /EADDRINUSE/.test(w.stderr.text())) {
        throw Object.assign(new Error(`port ${port} in use`), { code: 'EADDRINUSE' });
      }
      assert.ok(r, `the worker did not serve:\n${w.stderr.text()}`);
      assert.equal(JSON.parse(r.match[1]).port, port);
      return { w, port };
    });
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
      assert.deepEqual(await w.notify.soFar(), ['READY=1\n'], 'exactly one READY=1');
      if (name === 'cluster') {
        // Two children listened on the primary's fd 3 and drained.
        assert.equal(w.stderr.lines.filter((l) => /listening on fd 3/.test(l)).length, 2, w.stderr.text());
        assert.equal(w.stderr.lines.filter((l) => /exiting with status 0/.test(l)).length, 2, w.stderr.text());
      }
    });
  }
});

// The pid of cluster child `id`, from its answers (each child accepts for
// itself: a few requests reach them all).
async function childPid(port, id) {
  let pid;
  await withDeadline((async () => {
    while (pid === undefined) {
      const m = (await request(port)).body.match(new RegExp(`pid (\\d+), cluster child ${id}\\n$`));
      if (m) pid = Number(m[1]);
    }
  })(), `an answer from cluster child ${id}`);
  return pid;
}

// test/fixtures/cluster-held.mjs with `size` children, child 2 held.
async function heldCluster(t, size, generation = '4') {
  const w = await spawnWorker(t, CLUSTER_HELD, { env: { CONTAINERFLIP_GENERATION: generation, CLUSTER_WORKERS: String(size) } });
  const held = await w.stdout.waitFor(/^FIXTURE child 2 pid (\d+) held$/);
  const child2 = Number(held.match[1]);
  t.after(() => {
    try {
      process.kill(child2, 'SIGKILL');
    } catch {}
  });
  return { w, child2 };
}

describe('cluster readiness is aggregated over every child', () => {
  // test/fixtures/cluster-held.mjs runs examples/cluster.mjs unchanged, but
  // cluster child 2 first waits for SIGUSR2 from the test: until then it
  // does not listen, and the primary must not send READY=1.
  test('examples/cluster.mjs: no READY=1 while child 2 does not listen; READY=1 once it does', async (t) => {
    const { w, child2 } = await heldCluster(t, 2, '3');
    // The fixture's 'listening' listener ran for child 1 after the
    // example's, which would have sent READY=1 if it counted wrong.
    await w.stdout.waitFor(/^FIXTURE primary saw child 1 listening \(1 of 2\)$/);
    const r = await request(w.port);
    assert.equal(r.status, 200);
    assert.match(r.body, /generation 3, pid \d+, cluster child 1\n$/, 'child 1 serves already');
    assert.deepEqual(await w.notify.soFar(), [], 'no READY=1 while child 2 is held');

    process.kill(child2, 'SIGUSR2');
    await w.stdout.waitFor(/^FIXTURE child 2 released$/);
    assert.equal(await w.notify.first(), 'READY=1\n');
    await w.stdout.waitFor(/^FIXTURE primary saw child 2 listening \(2 of 2\)$/);

    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.deepEqual(await w.notify.soFar(), ['READY=1\n'], 'exactly one READY=1');
    assert.equal(w.stderr.lines.filter((l) => /listening on fd 3/.test(l)).length, 2, w.stderr.text());
    assert.equal(w.stderr.lines.filter((l) => /exiting with status 0/.test(l)).length, 2, w.stderr.text());
  });
});

describe('cluster readiness counts children listening at the same time', () => {
  test('a child that listened and died no longer counts, and its replacement counts once', async (t) => {
    const { w, child2 } = await heldCluster(t, 3);
    await w.stdout.waitFor(/^FIXTURE primary saw child 1 listening/);
    await w.stdout.waitFor(/^FIXTURE primary saw child 3 listening/);
    // Child 1 dies and child 4 replaces it: three listening events, two
    // children listening.
    process.kill(await childPid(w.port, 1), 'SIGKILL');
    await w.stdout.waitFor(/^FIXTURE primary saw child 4 listening/);
    assert.deepEqual(await w.notify.soFar(), [], 'READY=1 with child 2 still not listening');

    process.kill(child2, 'SIGUSR2');
    assert.equal(await w.notify.first(), 'READY=1\n');
    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.deepEqual(await w.notify.soFar(), ['READY=1\n'], 'exactly one READY=1');
  });

  test('when the last listening child dies the primary exits 1 (Node closed its handle on the socket)', async (t) => {
    const { w } = await heldCluster(t, 2);
    await w.stdout.waitFor(/^FIXTURE primary saw child 1 listening/);
    process.kill(await childPid(w.port, 1), 'SIGKILL');
    assert.deepEqual(await w.waitExit(), { code: 1, signal: null });
    assert.match(w.stderr.text(), /died \(SIGKILL\) and no child listens any more; exiting/);
    assert.deepEqual(await w.notify.soFar(), [], 'no READY=1');
  });
});

describe('no monkey-patching', () => {
  test('a whole life (serve, a keep-alive request, SIGTERM drain, exit) leaves every built-in prototype, process method and the server\'s own methods as they were', async (t) => {
    // The fixture snapshots them before it even imports the helper and
    // compares at exit, after the helper's drain and process.exit(0).
    const w = await spawnWorker(t, path.join(FIXTURES, 'untouched.mjs'), { env: { DRAIN_GRACE_MS: '600000' } });
    assert.equal(await w.notify.first(), 'READY=1\n');
    await w.stdout.waitFor(/^SERVING$/);
    const agent = new http.Agent({ keepAlive: true });
    t.after(() => agent.destroy());
    assert.equal((await request(w.port, { agent })).body, 'ok\n');
    w.child.kill('SIGTERM');
    assert.deepEqual(await w.waitExit(), { code: 0, signal: null });
    assert.ok(w.stdout.find(/^UNTOUCHED$/), `the helper patched something:\n${w.stdout.text()}`);
  });
});
