// The helper and the recipes under the real supervisor:
//   containerflip run --notify-mode stream --listen 127.0.0.1:0 -- node examples/X.mjs
// The binary is $CONTAINERFLIP_BIN or ../../target/debug/containerflip; if it
// is missing these tests fail (they are never skipped).
//
// Every wait is for a log line or an answer; deadlines are safety nets only.
// A deploy is: SIGHUP to the supervisor, then the new generation's `ready`
// line and the old generation's `exited` line.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';

import { startSupervisor, request, withDeadline, listeningSockets, FIXTURES } from './helpers.mjs';
import { Load } from './load.mjs';

const WORKER = path.join(FIXTURES, 'worker.mjs');
const DEPLOYS = 5;

const checkAnswer = (r) => {
  if (r.status !== 200) return `status ${r.status}`;
  if (!/generation \d+/.test(r.body)) return `unexpected body ${JSON.stringify(r.body)}`;
  if (!/^\d+$/.test(r.headers['x-containerflip-generation'] ?? '')) return 'no X-Containerflip-Generation header';
  return null;
};

describe('recipes under containerflip: ready, serve, 5 deploys under load, zero failed requests', () => {
  for (const name of ['http', 'express', 'koa', 'fastify', 'cluster']) {
    test(`examples/${name}.mjs`, async (t) => {
      const CHILDREN = 2;
      const sup = await startSupervisor(t, ['node', `examples/${name}.mjs`], { env: { CLUSTER_WORKERS: String(CHILDREN) } });
      const first = await request(sup.port);
      assert.equal(first.status, 200);
      assert.equal(first.headers['x-containerflip-generation'], '1');
      assert.match(first.body, /generation 1\b/);
      // The recipe listens on the supervisor's socket and on nothing of its
      // own (Fastify given host 'localhost' would also bind [::1] itself).
      assert.deepEqual(listeningSockets(sup.active.pid).map((s) => s.fd), [3],
        `listening sockets of ${name}: ${JSON.stringify(listeningSockets(sup.active.pid))}`);

      // Bounded by count and by time; both far above what 5 deploys need, and
      // the test asserts that neither bound was reached before the end.
      const [fresh, keepalive] = [
        new Load(sup.port, { mode: 'fresh', concurrency: 2, maxRequests: 60000, maxMs: 180000, check: checkAnswer }),
        new Load(sup.port, { mode: 'keepalive', concurrency: 4, maxRequests: 200000, maxMs: 180000, check: checkAnswer }),
      ];
      const loads = [fresh, keepalive];
      const pidsOf = (gen) => new Set(loads.flatMap((l) => [...(l.pids.get(String(gen)) ?? [])]));

      // Before each deploy (and before stopping the load): the active
      // generation answers both loads, and for the cluster, answers from
      // both of its children (the pid in the body). Fresh connections land
      // on whichever child accepts first, so the fresh load reaches both.
      const servingNow = async (gen) => {
        await withDeadline(Promise.all(loads.map((l) => l.seen(gen))), `generation ${gen} to answer both loads`);
        if (name === 'cluster') {
          await withDeadline(
            fresh.until(() => pidsOf(gen).size >= CHILDREN, `${CHILDREN} cluster children of generation ${gen} answered`),
            `${CHILDREN} cluster children of generation ${gen} to answer`,
          );
        }
      };

      await servingNow(1);
      for (let i = 1; i <= DEPLOYS; i++) {
        const d = await sup.deploy();
        assert.ok(d.ok, `deploy ${i} failed: ${d.reason}`);
        assert.equal(d.gen, i + 1);
        assert.equal(d.oldEnd, 'exited with status 0', `generation ${d.old.gen} ended with "${d.oldEnd}"`);
        await servingNow(d.gen);
      }
      const last = String(DEPLOYS + 1);

      const summaries = await Promise.all(loads.map((l) => l.stop()));
      for (const s of summaries) {
        t.diagnostic(`${name} ${s.mode}: ${s.requests} requests, ${s.failed} failed, ${s.retries} retries ` +
          `(reused connection closed before any response byte), per generation ${JSON.stringify(s.generations)}` +
          (s.mode === 'keepalive' ? `, answers with Connection: close per generation ${JSON.stringify(s.closes)}` : ''));
      }
      for (const s of summaries) {
        assert.equal(s.limitHit, null, `${s.mode} load hit its ${s.limitHit} before the deploys were over`);
        assert.deepEqual(s.firstFailures, [], `${s.mode}: ${s.failed} failed requests`);
        assert.equal(s.failed, 0);
      }

      // Keep-alive clients leave a draining generation because it answers
      // them with Connection: close. Each keep-alive connection is busy (4
      // loops on at most 4 sockets), so each one open on generation g when g
      // starts draining sends another request and gets that answer. No
      // retry is needed then: the worker closes only connections that are
      // idle, and after that answer, the client does not reuse the
      // connection. (Without the marker the connections are left open until
      // they are closed as idle, and some requests meet a closed connection:
      // retries.) Every recipe, the cluster's children and Fastify included,
      // uses the same marker, so the bound is 0 for all of them.
      const ka = summaries[1];
      for (let g = 1; g <= DEPLOYS; g++) {
        assert.ok((ka.closes[g] ?? 0) >= 1,
          `keep-alive clients got no Connection: close from generation ${g} while it drained: ${JSON.stringify(ka.closes)}`);
      }
      assert.equal(ka.closes[last], undefined, `generation ${last} never drained while the load ran, yet said Connection: close`);
      for (const s of summaries) {
        assert.equal(s.retries, 0, `${s.mode}: ${s.retries} requests met a reused connection closed under them`);
      }

      if (name === 'cluster') {
        for (let g = 1; g <= DEPLOYS + 1; g++) {
          assert.equal(pidsOf(g).size, CHILDREN, `generation ${g} answered from pids ${[...pidsOf(g)]}`);
        }
      }

      const after = await request(sup.port);
      assert.equal(after.headers['x-containerflip-generation'], last);

      const { code } = await sup.stop();
      assert.equal(code, 0, sup.stderr.text());
      assert.ok(sup.stderr.find(/^containerflip: exiting with status 0$/));
    });
  }
});

describe('drain under containerflip', () => {
  test('deploy: in-flight request completes, keep-alive client gets Connection: close, idle and silent sockets do not hold the old generation, which exits 0', async (t) => {
    // drain-timeout 10m: DRAIN_GRACE_MS is far beyond every deadline here, so
    // the old generation can only leave by going idle.
    const sup = await startSupervisor(t, ['node', WORKER], { runArgs: ['--drain-timeout', '10m'] });
    const oldPid = sup.active.pid;

    // A preconnect: a connection that never sends a byte. The request below,
    // on a connection made after it, shows the old worker has accepted it
    // (one acceptor, and the backlog is first in, first out).
    const silent = net.connect(sup.port, '127.0.0.1');
    silent.on('error', () => {});
    t.after(() => silent.destroy());
    await withDeadline(once(silent, 'connect'), 'the silent connection');
    const silentClosed = once(silent, 'close');

    const idleAgent = new http.Agent({ keepAlive: true });
    t.after(() => idleAgent.destroy());
    await request(sup.port, { agent: idleAgent });
    const [idleSocket] = Object.values(idleAgent.freeSockets).flat();
    const idleClosed = once(idleSocket, 'close');

    const kaAgent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    t.after(() => kaAgent.destroy());
    assert.equal((await request(sup.port, { agent: kaAgent })).headers.connection, 'keep-alive');
    const kaHeld = request(sup.port, { agent: kaAgent, path: '/hold' });
    const freshHeld = request(sup.port, { path: '/hold' });
    await sup.stdout.waitFor(/^HELD 2$/);
    const deploy = sup.deploy();
    await sup.stderr.waitFor(new RegExp(`^\\[containerflip-node pid ${oldPid}\\] draining: no longer accepting, grace \\d+ms`));
    process.kill(oldPid, 'SIGUSR2'); // release the held responses
    const [a, b] = await Promise.all([kaHeld, freshHeld]);
    for (const r of [a, b]) {
      assert.equal(r.status, 200);
      assert.equal(r.headers['x-containerflip-generation'], '1');
      assert.equal(r.headers.connection, 'close');
    }
    assert.equal(a.reused, true);
    await withDeadline(idleClosed, 'the idle keep-alive socket to be closed');
    await withDeadline(silentClosed, 'the silent connection to be closed');
    const d = await deploy;
    assert.ok(d.ok, d.reason);
    assert.equal(d.oldEnd, 'exited with status 0');
    assert.ok(sup.stderr.find(new RegExp(`^\\[containerflip-node pid ${oldPid}\\] drained in \\d+ms \\(idle\\)`)), sup.stderr.text());
    assert.equal((await request(sup.port)).headers['x-containerflip-generation'], '2');
    assert.equal((await sup.stop()).code, 0);
  });

  test('a request that never finishes is cut at DRAIN_GRACE_MS, before the supervisor\'s deadline, and the worker exits 0', async (t) => {
    // drain-timeout 10s: the supervisor sets DRAIN_GRACE_MS=8000, and would
    // SIGKILL the worker only 2 s after the worker's own cut.
    const sup = await startSupervisor(t, ['node', WORKER], { runArgs: ['--drain-timeout', '10s'] });
    const oldPid = sup.active.pid;
    const stuck = request(sup.port, { path: '/hold' }).then(() => null, (err) => err);
    await sup.stdout.waitFor(/^HELD 1$/);
    const d = await sup.deploy();
    assert.ok(d.ok, d.reason);
    assert.equal(d.oldEnd, 'exited with status 0', sup.stderr.text());
    assert.ok(sup.stderr.find(new RegExp(`^\\[containerflip-node pid ${oldPid}\\] draining: no longer accepting, grace 8000ms`)), sup.stderr.text());
    assert.ok(sup.stderr.find(new RegExp(`^\\[containerflip-node pid ${oldPid}\\] grace period of 8000ms over: closing 1 remaining`)), sup.stderr.text());
    assert.ok((await stuck) instanceof Error);
    assert.equal(sup.stderr.find(/killed at drain deadline/), null);
    assert.equal((await sup.stop()).code, 0);
  });
});

describe('failures under containerflip', () => {
  test('a worker whose listen fails exits non-zero before READY=1; the deploy fails closed and the old generation keeps answering', async (t) => {
    const sup = await startSupervisor(t, ['node', WORKER], { env: { CF_FAIL_FROM_GEN: '2' } });
    const d = await sup.deploy();
    assert.equal(d.ok, false);
    assert.match(d.reason, /exited with status [1-9]\d* before READY=1/);
    assert.equal(sup.stderr.find(new RegExp(`^\\[containerflip-node pid ${d.pid}\\] listening`)), null, 'the failed worker never listened');
    assert.ok(sup.stderr.find(/cannot listen on fd 42/), sup.stderr.text());
    for (let i = 0; i < 3; i++) {
      const r = await request(sup.port);
      assert.equal(r.status, 200);
      assert.equal(r.headers['x-containerflip-generation'], '1');
    }
    assert.equal((await sup.stop()).code, 0);
  });

  test('under --notify-mode dgram a Node worker cannot report readiness and says why', async (t) => {
    const sup = await startSupervisor(t, ['node', WORKER], { notifyMode: 'dgram', waitReady: false });
    const { code } = await sup.waitExit();
    assert.notEqual(code, 0, 'the first generation never became ready, so run fails');
    assert.ok(sup.stderr.find(/cannot send READY=1 to NOTIFY_SOCKET=.*--notify-mode stream/), sup.stderr.text());
  });
});
