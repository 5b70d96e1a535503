// In-process checks of each primitive. Anything that would change
// process-global state for good (signal handlers, exiting, the draining flag)
// either uses `signals: []` or runs last in this file; the child-process
// variants live in worker.test.mjs.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { spawn } from 'node:child_process';

import { serve, attach, notifyReady, gracefulDrain, drain, isDraining, fdMode } from '@gigacodes/containerflip';
import * as api from '@gigacodes/containerflip';
import { FIXTURES, notifyServer, tmpDir, withDeadline, withFreePort, request } from './helpers.mjs';

// Run `fn` with some environment variables set (undefined = unset), then
// restore them.
async function withEnv(vars, fn) {
  const saved = {};
  for (const [k, v] of Object.entries(vars)) {
    saved[k] = process.env[k];
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

const STANDALONE = { LISTEN_FDS: undefined, LISTEN_PID: undefined, NOTIFY_SOCKET: undefined, PORT: undefined, DRAIN_GRACE_MS: undefined };

function closedFd() {
  const fd = fs.openSync('/dev/null', 'r');
  fs.closeSync(fd);
  return fd;
}

function collectLog() {
  const lines = [];
  const log = (msg) => lines.push(msg);
  return { lines, log };
}

function closeServer(server) {
  if (!server.listening) return Promise.resolve();
  server.closeAllConnections?.();
  return new Promise((resolve) => server.close(() => resolve()));
}

describe('exports', () => {
  test('exactly the documented API', () => {
    assert.deepEqual(Object.keys(api).sort(), ['attach', 'drain', 'fdMode', 'gracefulDrain', 'isDraining', 'notifyReady', 'serve']);
  });
});

describe('fdMode', () => {
  for (const [value, expected] of [
    [undefined, false], ['', false], ['0', false], ['1', true], ['2', true], ['abc', false], ['-1', false],
  ]) {
    test(`LISTEN_FDS=${value === undefined ? '(unset)' : JSON.stringify(value)} -> ${expected}`, async () => {
      await withEnv({ LISTEN_FDS: value }, () => assert.equal(fdMode(), expected));
    });
  }

  test('does not look at LISTEN_PID (cluster children inherit the primary\'s)', async () => {
    await withEnv({ LISTEN_FDS: '1', LISTEN_PID: '1' }, () => assert.equal(fdMode(), true));
  });
});

describe('isDraining', () => {
  test('false before any drain', () => {
    assert.equal(isDraining(), false);
  });
});

describe('notifyReady', () => {
  test('is a no-op without NOTIFY_SOCKET', async () => {
    await withEnv({ NOTIFY_SOCKET: undefined }, async () => {
      assert.equal(await notifyReady(), undefined);
    });
  });

  test('is a no-op with an empty NOTIFY_SOCKET (what cluster children get)', async () => {
    await withEnv({ NOTIFY_SOCKET: '' }, async () => {
      assert.equal(await notifyReady(), undefined);
    });
  });

  test('sends READY=1\\n over a unix stream socket path', async (t) => {
    const n = await notifyServer(t);
    await withEnv({ NOTIFY_SOCKET: n.env }, async () => {
      const got = n.next();
      await notifyReady();
      assert.equal(await got, 'READY=1\n');
    });
  });

  test('reaches an abstract address written @name', async (t) => {
    const n = await notifyServer(t, { abstract: true });
    assert.match(n.env, /^@/);
    await withEnv({ NOTIFY_SOCKET: n.env }, async () => {
      const got = n.next();
      await notifyReady();
      assert.equal(await got, 'READY=1\n');
    });
  });

  test('rejects clearly when the socket does not exist', async (t) => {
    const missing = path.join(tmpDir(t), 'nobody-here.sock');
    await withEnv({ NOTIFY_SOCKET: missing }, async () => {
      await assert.rejects(notifyReady(), (err) => {
        assert.match(err.message, /cannot send READY=1 to NOTIFY_SOCKET=/);
        assert.ok(err.message.includes(missing));
        assert.equal(err.code, 'ENOENT');
        assert.match(err.message, /supervisor has gone away, or NOTIFY_SOCKET is a stale path/);
        assert.doesNotMatch(err.message, /--notify-mode/, 'a missing socket is not a wrong mode');
        return true;
      });
    });
  });

  test('rejects clearly when nothing listens at an abstract address', async () => {
    await withEnv({ NOTIFY_SOCKET: `@cf-node-nobody-${process.pid}` }, async () => {
      await assert.rejects(notifyReady(), (err) => {
        assert.match(err.message, /NOTIFY_SOCKET=@cf-node-nobody/);
        assert.equal(err.code, 'ECONNREFUSED');
        return true;
      });
    });
  });

  test('rejects when the notify socket closes before READY=1 is delivered', async (t) => {
    const n = await notifyServer(t);
    await withEnv({ NOTIFY_SOCKET: n.env }, async () => {
      // Closing the listener resets the connection still in its queue: the
      // helper says so rather than resolving as if READY=1 had arrived.
      const sent = notifyReady();
      n.server.close();
      await assert.rejects(sent, (err) => {
        assert.match(err.message, /cannot send READY=1 to NOTIFY_SOCKET=/);
        assert.ok(['EPIPE', 'ECONNRESET'].includes(err.code), err.code);
        return true;
      });
    });
  });

  test('an abstract address bound by a program other than Node: delivered, or a rejection that says why', async (t) => {
    const name = `cf-node-py-${process.pid}`;
    const receiver = spawn('python3', ['-c', `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0${name}")
s.listen(1)
print("listening", flush=True)
s.settimeout(120)
try:
    c, _ = s.accept()
    print(c.recv(64).decode(), end="", flush=True)
except socket.timeout:
    pass
`], { stdio: ['ignore', 'pipe', 'inherit'] });
    t.after(() => receiver.kill());
    let out = '';
    receiver.stdout.setEncoding('utf8');
    const listening = new Promise((resolve, reject) => {
      receiver.stdout.on('data', (d) => { out += d; if (out.includes('listening\n')) resolve(); });
      receiver.once('error', reject);
    });
    await withDeadline(listening, 'python3 to bind the abstract name');
    await withEnv({ NOTIFY_SOCKET: `@${name}` }, async () => {
      const [major, minor] = process.versions.uv.split('.').map(Number);
      if (major === 1 && minor < 48) {
        await assert.rejects(notifyReady(), /pads abstract names to 108 bytes.*use a path socket/);
      } else {
        await notifyReady();
        await withDeadline(once(receiver, 'exit'), 'the receiver to read READY=1');
        assert.equal(out, 'listening\nREADY=1\n');
      }
    });
  });

  test('rejects a NOTIFY_SOCKET that is not a unix socket address', async () => {
    await withEnv({ NOTIFY_SOCKET: 'relative/notify.sock' }, async () => {
      await assert.rejects(notifyReady(), /not a unix socket path/);
    });
  });

  test('rejects clearly when the path is not a listening socket: nothing listens, no talk of modes', async (t) => {
    const p = path.join(tmpDir(t), 'not-a-socket');
    fs.writeFileSync(p, '');
    await withEnv({ NOTIFY_SOCKET: p }, async () => {
      await assert.rejects(notifyReady(), (err) => {
        assert.equal(err.code, 'ECONNREFUSED');
        assert.match(err.message, /nothing is listening there: the supervisor has gone away, or NOTIFY_SOCKET names a stale socket/);
        assert.doesNotMatch(err.message, /--notify-mode/);
        return true;
      });
    });
  });

  test('a datagram socket there (the supervisor in its default mode) is named as the wrong mode', async (t) => {
    // Node cannot bind a unix datagram socket; python3 stands in for a
    // supervisor started without --notify-mode stream.
    const p = path.join(tmpDir(t), 'dgram.sock');
    const receiver = spawn('python3', ['-c', `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(${JSON.stringify(p)})
print("bound", flush=True)
sys.stdin.read()
`], { stdio: ['pipe', 'pipe', 'inherit'] });
    t.after(() => receiver.kill());
    let out = '';
    receiver.stdout.setEncoding('utf8');
    await withDeadline(new Promise((resolve, reject) => {
      receiver.stdout.on('data', (d) => { out += d; if (out.includes('bound\n')) resolve(); });
      receiver.once('error', reject);
    }), 'python3 to bind the datagram socket');
    await withEnv({ NOTIFY_SOCKET: p }, async () => {
      await assert.rejects(notifyReady(), (err) => {
        assert.equal(err.code, 'EPROTOTYPE');
        assert.match(err.message, /not a stream socket: run the supervisor with --notify-mode stream/);
        return true;
      });
    });
  });
});

describe('attach', () => {
  // These two need a given port (that is their point): one that was free a
  // moment ago, and another one if a parallel test took it (EADDRINUSE).
  test('standalone: listens on $PORT', async (t) => {
    await withFreePort((port) => withEnv({ ...STANDALONE, PORT: String(port) }, async () => {
      const server = http.createServer((req, res) => res.end('standalone'));
      t.after(() => closeServer(server));
      assert.equal(await attach(server), server);
      assert.equal(server.address().port, port);
      assert.equal((await request(port)).body, 'standalone');
    }));
  });

  test('standalone: the port option wins over $PORT', async (t) => {
    await withFreePort((port) => withEnv({ ...STANDALONE, PORT: '1' }, async () => {
      const server = http.createServer();
      t.after(() => closeServer(server));
      await attach(server, { port });
      assert.equal(server.address().port, port);
    }));
  });

  test('standalone: ephemeral port without PORT', async (t) => {
    await withEnv(STANDALONE, async () => {
      const server = http.createServer();
      t.after(() => closeServer(server));
      await attach(server);
      assert.ok(server.address().port > 0);
    });
  });

  test('standalone: an empty $PORT counts as unset (ephemeral port)', async (t) => {
    await withEnv({ ...STANDALONE, PORT: '' }, async () => {
      const server = http.createServer((req, res) => res.end('empty PORT'));
      t.after(() => closeServer(server));
      assert.equal(await attach(server), server);
      const { port } = server.address();
      assert.ok(port > 0);
      assert.equal((await request(port)).body, 'empty PORT');
    });
  });

  test('standalone: ignores fd when LISTEN_FDS is unset', async (t) => {
    await withEnv(STANDALONE, async () => {
      const server = http.createServer();
      t.after(() => closeServer(server));
      await attach(server, { fd: closedFd(), port: 0 });
      assert.ok(server.listening);
    });
  });

  test('rejects on a listen error (port in use)', async (t) => {
    const blocker = net.createServer().listen(0);
    await once(blocker, 'listening');
    t.after(() => blocker.close());
    await withEnv(STANDALONE, async () => {
      const server = http.createServer();
      const before = { error: server.listenerCount('error'), listening: server.listenerCount('listening') };
      await assert.rejects(attach(server, { port: blocker.address().port }), (err) => {
        assert.equal(err.code, 'EADDRINUSE');
        assert.match(err.message, /cannot listen on port/);
        return true;
      });
      assert.equal(server.listening, false);
      assert.equal(server.listenerCount('error'), before.error, 'attach leaves no listener behind');
      assert.equal(server.listenerCount('listening'), before.listening, 'attach leaves no listener behind');
    });
  });

  test('rejects a PORT that is not a port number', async () => {
    await withEnv({ ...STANDALONE, PORT: 'eighty' }, async () => {
      await assert.rejects(attach(http.createServer()), /PORT=eighty is not a TCP port number/);
    });
  });

  test('fd mode: rejects on a closed descriptor', async () => {
    await withEnv({ LISTEN_FDS: '1' }, async () => {
      const server = http.createServer();
      const fd = closedFd();
      await assert.rejects(attach(server, { fd }), (err) => {
        assert.match(err.message, new RegExp(`cannot listen on fd ${fd}`));
        assert.ok(err.code);
        return true;
      });
    });
  });

  test('fd mode: rejects a non-integer fd', async () => {
    await withEnv({ LISTEN_FDS: '1' }, async () => {
      await assert.rejects(attach(http.createServer(), { fd: 'three' }), TypeError);
    });
  });

  test('a plain net.Server is accepted', async (t) => {
    await withEnv(STANDALONE, async () => {
      const server = net.createServer((socket) => socket.end('raw\n'));
      t.after(() => closeServer(server));
      assert.equal(await attach(server), server);
      assert.ok(server.listening);
    });
  });

  test('rejects (never throws) on something that is not a server', async () => {
    const got = attach({});
    assert.ok(got instanceof Promise);
    await assert.rejects(got, /attach\(\) expects a net.Server or http.Server, got an instance of Object/);
    await assert.rejects(attach(null), /got null/);
  });
});

describe('serve', () => {
  test('attaches first, then sends READY=1, and resolves with the server', async (t) => {
    const n = await notifyServer(t);
    const server = http.createServer((req, res) => res.end('ok'));
    t.after(() => closeServer(server));
    // When READY=1 arrives, the server must already be listening.
    const listeningAtReady = new Promise((resolve) => {
      n.server.once('connection', () => resolve(server.listening));
    });
    const { lines, log } = collectLog();
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
      const result = await serve(server, { signals: [], log });
      assert.equal(result, server);
    });
    assert.equal(await withDeadline(listeningAtReady, 'the READY=1 connection'), true);
    assert.equal(await n.first(), 'READY=1\n');
    assert.ok(lines.some((l) => /listening on .* \(standalone/.test(l)), lines.join('\n'));
    assert.ok(lines.some((l) => /READY=1 sent/.test(l)), lines.join('\n'));
    assert.equal(n.messages.length, 1, 'READY=1 is sent once');
  });

  test('notify: false sends nothing', async (t) => {
    const n = await notifyServer(t);
    const server = http.createServer();
    t.after(() => closeServer(server));
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
      await serve(server, { signals: [], notify: false, log: false });
    });
    // Everything sent before our probe connection (a READY=1 would have
    // been accepted first) has arrived: nothing.
    assert.deepEqual(await n.soFar(), []);
  });

  test('rejects when READY=1 cannot be delivered', async (t) => {
    const missing = path.join(tmpDir(t), 'gone.sock');
    const server = http.createServer();
    t.after(() => closeServer(server));
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: missing }, async () => {
      await assert.rejects(serve(server, { signals: [], log: false }), /cannot send READY=1/);
    });
    assert.ok(server.listening, 'it did attach before trying READY=1');
  });

  test('rejects when attach fails, before any READY=1', async (t) => {
    const n = await notifyServer(t);
    await withEnv({ LISTEN_FDS: '1', NOTIFY_SOCKET: n.env }, async () => {
      await assert.rejects(serve(http.createServer(), { fd: closedFd(), signals: [], log: false }), /cannot listen on fd/);
    });
    assert.deepEqual(await n.soFar(), []);
  });

  test('rejects bad options before touching anything', async () => {
    await assert.rejects(serve(http.createServer(), { graceMs: -1 }), TypeError);
    await assert.rejects(serve(http.createServer(), { signals: 'SIGTERM' }), TypeError);
    await assert.rejects(serve(http.createServer(), { log: 'yes' }), TypeError);
    // As documented and typed: a function or false, nothing else.
    await assert.rejects(serve(http.createServer(), { log: true }), /option log must be a function or false, got boolean true/);
    await assert.rejects(serve(http.createServer(), { log: null }), /option log must be a function or false, got null/);
    await assert.rejects(serve('server'), TypeError);
  });

  // With the default signals: a serve() that went ahead and installed its
  // SIGTERM handler and marker before checking would show here.
  for (const [what, env, opts, expected] of [
    ['a bad fd', { LISTEN_FDS: '1' }, { fd: 'three' }, /option fd must be a non-negative integer/],
    ['a negative fd', { LISTEN_FDS: '1' }, { fd: -1 }, /option fd must be a non-negative integer/],
    ['a bad port', STANDALONE, { port: 'eighty' }, /option port string eighty is not a TCP port number/],
    ['a bad $PORT', { ...STANDALONE, PORT: '99999' }, {}, /PORT=99999 is not a TCP port number/],
    ['a notify that is not a boolean', STANDALONE, { notify: 'no' }, /option notify must be a boolean, got string no/],
    ['a notify of null', STANDALONE, { notify: null }, /option notify must be a boolean, got null/],
  ]) {
    test(`${what} is rejected before any signal handler or marker is installed`, async (t) => {
      const n = await notifyServer(t);
      const server = http.createServer();
      t.after(() => closeServer(server));
      const before = { term: process.listenerCount('SIGTERM'), request: server.listenerCount('request'), connection: server.listenerCount('connection') };
      await withEnv({ ...env, NOTIFY_SOCKET: n.env }, async () => {
        await assert.rejects(serve(server, { ...opts, log: false }), expected);
      });
      assert.equal(process.listenerCount('SIGTERM'), before.term, 'no SIGTERM handler left behind');
      assert.equal(server.listenerCount('request'), before.request, 'no request marker left behind');
      assert.equal(server.listenerCount('connection'), before.connection);
      assert.equal(server.listening, false);
      assert.deepEqual(await n.soFar(), []);
    });
  }
});

describe('gracefulDrain', () => {
  test('signals: [] installs only the Connection: close marker', () => {
    const server = http.createServer();
    const before = { term: process.listenerCount('SIGTERM'), int: process.listenerCount('SIGINT') };
    gracefulDrain(server, { signals: [] });
    assert.equal(server.listenerCount('request'), 1);
    assert.equal(process.listenerCount('SIGTERM'), before.term);
    assert.equal(process.listenerCount('SIGINT'), before.int);
  });

  test('a bad signal name is refused before anything is installed', () => {
    const server = http.createServer();
    const before = { term: process.listenerCount('SIGTERM'), foo: process.listenerCount('SIGFOO') };
    assert.throws(() => gracefulDrain(server, { signals: ['SIGTERM', 'SIGFOO'] }), /SIGFOO is not a signal name/);
    assert.throws(() => gracefulDrain(server, { signals: ['SIGTERM', 'SIGKILL'] }), /SIGKILL cannot be caught/);
    assert.throws(() => gracefulDrain(server, { signals: ['SIGSTOP'] }), /SIGSTOP cannot be caught/);
    assert.throws(() => gracefulDrain(server, { signals: ['sigterm'] }), /sigterm is not a signal name/);
    assert.equal(server.listenerCount('request'), 0);
    assert.equal(process.listenerCount('SIGTERM'), before.term);
    assert.equal(process.listenerCount('SIGFOO'), before.foo);
    // Nothing half-done is left behind: a good call afterwards installs.
    gracefulDrain(server, { signals: [] });
    assert.equal(server.listenerCount('request'), 1);
  });

  test('is idempotent per server', () => {
    const server = http.createServer();
    gracefulDrain(server, { signals: [] });
    gracefulDrain(server, { signals: [] });
    assert.equal(server.listenerCount('request'), 1);
  });

  test('prepends its request listener', () => {
    const handler = () => {};
    const server = http.createServer(handler);
    gracefulDrain(server, { signals: [] });
    const listeners = server.listeners('request');
    assert.equal(listeners.length, 2);
    assert.equal(listeners[1], handler, 'the app handler stays, after the marker');
  });

  test('touches nothing outside a drain: keep-alive is left alone', async (t) => {
    const server = http.createServer((req, res) => res.end('ok'));
    gracefulDrain(server, { signals: [] });
    await withEnv(STANDALONE, () => attach(server));
    t.after(() => closeServer(server));
    const agent = new http.Agent({ keepAlive: true });
    t.after(() => agent.destroy());
    const r = await request(server.address().port, { agent });
    assert.equal(r.headers.connection, 'keep-alive');
    assert.equal(isDraining(), false);
  });
});

describe('HTTP/2 servers are refused with a TypeError', () => {
  const Http2Server = http2.createServer().constructor;
  class MyHttp2Server extends Http2Server {}
  const cases = [
    ['http2.createServer()', () => http2.createServer(), /an Http2Server from node:http2/],
    ['http2.createSecureServer()', () => http2.createSecureServer({}), /an Http2SecureServer from node:http2/],
    ['http2.createServer({ allowHTTP1: true })', () => http2.createServer({ allowHTTP1: true }), /an Http2Server/],
    ['a subclass of Http2Server', () => new MyHttp2Server(), /an Http2Server/],
  ];
  for (const [what, make, name] of cases) {
    test(`${what}: serve, attach and drain reject, gracefulDrain throws, nothing is installed`, async (t) => {
      const n = await notifyServer(t);
      const server = make();
      t.after(() => closeServer(server));
      const before = { term: process.listenerCount('SIGTERM'), request: server.listenerCount('request') };
      const unsupported = (fn) => (err) => {
        assert.ok(err instanceof TypeError, err);
        assert.match(err.message, new RegExp(`${fn}\\(\\) does not support HTTP/2 servers`));
        assert.match(err.message, name);
        return true;
      };
      await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
        await assert.rejects(serve(server, { log: false }), unsupported('serve'));
        await assert.rejects(attach(server), unsupported('attach'));
        await assert.rejects(drain(server, { log: false }), unsupported('drain'));
        assert.throws(() => gracefulDrain(server, { log: false }), unsupported('gracefulDrain'));
      });
      assert.equal(server.listening, false);
      assert.equal(process.listenerCount('SIGTERM'), before.term);
      assert.equal(server.listenerCount('request'), before.request);
      assert.equal(isDraining(), false, 'no drain was started');
      assert.deepEqual(await n.soFar(), []);
    });
  }

  test('HTTP/1 servers from node:http and node:https are still accepted', () => {
    gracefulDrain(http.createServer(), { signals: [] });
    gracefulDrain(https.createServer(), { signals: [] });
  });
});

// From here on a drain has happened in this process: isDraining() is true.
describe('drain', () => {
  test('default grace is $DRAIN_GRACE_MS, else 28000', async () => {
    for (const [env, expected] of [[undefined, 28000], ['1234', 1234], ['not-a-number', 28000]]) {
      const server = http.createServer();
      const { lines, log } = collectLog();
      await withEnv({ DRAIN_GRACE_MS: env }, () => drain(server, { log }));
      assert.ok(lines.some((l) => l.includes(`grace ${expected}ms`)), `DRAIN_GRACE_MS=${env}: ${lines.join('\n')}`);
    }
    const { lines, log } = collectLog();
    await withEnv({ DRAIN_GRACE_MS: '1234' }, () => drain(http.createServer(), { log, graceMs: 55 }));
    assert.ok(lines.some((l) => l.includes('grace 55ms')), 'the option wins over the environment');
  });

  test('stops accepting, answers with Connection: close, resolves when idle; isDraining; idempotent', async (t) => {
    const held = [];
    const server = http.createServer((req, res) => {
      if (req.url === '/hold') held.push(res);
      else res.end('ok');
    });
    gracefulDrain(server, { signals: [] });
    await withEnv(STANDALONE, () => attach(server));
    const { port } = server.address();
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    t.after(() => agent.destroy());

    // A keep-alive connection, idle when the drain starts.
    const first = await request(port, { agent });
    assert.equal(first.headers.connection, 'keep-alive');

    // A request in flight on another connection, not answered yet.
    // (once() is registered after the handler, so held[0] is set when it resolves.)
    const arrived = once(server, 'request');
    const heldRequest = request(port, { path: '/hold' });
    await withDeadline(arrived, 'the held request to arrive');
    assert.equal(held.length, 1);

    const { lines, log } = collectLog();
    const p1 = drain(server, { log });
    const p2 = drain(server, { log });
    assert.equal(p1, p2, 'same promise for the same server');
    assert.equal(isDraining(), true);
    assert.equal(server.listening, false, 'stopped accepting');

    // The idle keep-alive connection is reused at once: it is not cut under
    // the client, the answer carries Connection: close.
    const second = await request(port, { agent });
    assert.equal(second.reused, true);
    assert.equal(second.status, 200);
    assert.equal(second.headers.connection, 'close');

    // The in-flight request completes, also with Connection: close.
    held[0].end('held done');
    const h = await heldRequest;
    assert.equal(h.body, 'held done');
    assert.equal(h.headers.connection, 'close');

    await withDeadline(p1, 'the drain to finish');
    assert.ok(lines.some((l) => /drained in \d+ms \(idle\)/.test(l)), lines.join('\n'));

    // New connections are refused now (nobody else holds this socket).
    await assert.rejects(request(port), { code: 'ECONNREFUSED' });
  });

  test('closes idle keep-alive connections without waiting for the grace period', async (t) => {
    const server = http.createServer((req, res) => res.end('ok'));
    server.keepAliveTimeout = 0; // Node's own idle timeout must not be what closes it
    await withEnv(STANDALONE, () => attach(server));
    const agent = new http.Agent({ keepAlive: true });
    t.after(() => agent.destroy());
    await request(server.address().port, { agent });
    const [socket] = Object.values(agent.freeSockets).flat();
    assert.ok(socket, 'a pooled idle socket');
    const closed = once(socket, 'close');
    const { lines, log } = collectLog();
    await withDeadline(drain(server, { graceMs: 600000, log }), 'the drain of an idle connection');
    await withDeadline(closed, 'the idle socket to be closed');
    assert.ok(lines.some((l) => /\(idle\)/.test(l)), lines.join('\n'));
  });

  test('keeps sweeping: a connection that goes idle after the first sweep is closed too', async (t) => {
    // B's response left with keep-alive before the drain began, so the drain
    // cannot mark it; B goes idle only after A (idle from the start) has been
    // closed by a sweep. Only a later sweep can close B and let the drain end.
    let streaming = null;
    const server = http.createServer((req, res) => {
      if (req.url === '/stream') {
        res.writeHead(200, { 'Content-Type': 'text/plain' });
        res.write('part 1\n');
        streaming = res;
      } else {
        res.end('ok');
      }
    });
    server.keepAliveTimeout = 0; // Node's own idle timeout must not be what closes them
    await withEnv(STANDALONE, () => attach(server));
    const { port } = server.address();
    const agentA = new http.Agent({ keepAlive: true });
    const agentB = new http.Agent({ keepAlive: true });
    t.after(() => { agentA.destroy(); agentB.destroy(); });

    await request(port, { agent: agentA });
    const [socketA] = Object.values(agentA.freeSockets).flat();
    assert.ok(socketA, 'a pooled idle socket');
    const closedA = once(socketA, 'close');

    const arrived = once(server, 'request');
    const b = request(port, { agent: agentB, path: '/stream' });
    await withDeadline(arrived, 'the streaming request to arrive');
    assert.ok(streaming?.headersSent, 'B\'s headers left before the drain');

    const { lines, log } = collectLog();
    const drained = drain(server, { graceMs: 600000, log });
    await withDeadline(closedA, 'the first sweep to close the idle socket A');

    streaming.end('part 2\n');
    const rb = await withDeadline(b, 'B\'s response');
    assert.equal(rb.headers.connection, 'keep-alive', 'B was answered as keep-alive: only a sweep can close it');
    const [socketB] = Object.values(agentB.freeSockets).flat();
    assert.ok(socketB, 'B is a pooled idle socket now');
    const closedB = once(socketB, 'close');

    await withDeadline(drained, 'the drain to end once a later sweep closed B');
    await withDeadline(closedB, 'B to be closed by the worker');
    assert.ok(lines.some((l) => /drained in \d+ms \(idle\)/.test(l)), lines.join('\n'));
  });

  // A connection to `port` that the server has accepted.
  async function accepted(server, port) {
    const seen = once(server, 'connection');
    const socket = net.connect(port, '127.0.0.1');
    socket.on('error', () => {});
    await withDeadline(Promise.all([once(socket, 'connect'), seen]), 'the connection to be accepted');
    return socket;
  }

  test('closes a connection that never sent a byte (a preconnect); one holding half a request finishes it', async (t) => {
    const server = http.createServer((req, res) => res.end('ok'));
    gracefulDrain(server, { signals: [] }); // the helper sees connections from here on
    await withEnv(STANDALONE, () => attach(server));
    const { port } = server.address();
    const silent = await accepted(server, port);
    const partial = await accepted(server, port);
    t.after(() => { silent.destroy(); partial.destroy(); });
    const reply = [];
    partial.on('data', (chunk) => reply.push(chunk));
    partial.write('GET / HTTP/1.1\r\nHost: x\r\n');

    const silentClosed = once(silent, 'close');
    const { lines, log } = collectLog();
    const drained = drain(server, { graceMs: 600000, log });
    await withDeadline(silentClosed, 'the silent connection to be closed');
    assert.equal(partial.destroyed, false, 'the connection with half a request is still open');

    const partialEnded = once(partial, 'end');
    partial.write('\r\n');
    await withDeadline(partialEnded, 'the answer to the finished request');
    const text = Buffer.concat(reply).toString('latin1');
    assert.match(text, /^HTTP\/1\.1 200 /);
    assert.match(text, /\r\nconnection: close\r\n/i);
    assert.match(text, /\r\n\r\nok$/);
    await withDeadline(drained, 'the drain to end');
    assert.ok(lines.some((l) => /drained in \d+ms \(idle\)/.test(l)), lines.join('\n'));
  });

  test('https: a TLS connection with no request byte after the handshake is closed too', async (t) => {
    const server = https.createServer({
      key: fs.readFileSync(path.join(FIXTURES, 'tls-key.pem')),
      cert: fs.readFileSync(path.join(FIXTURES, 'tls-cert.pem')),
    }, (req, res) => res.end('ok'));
    gracefulDrain(server, { signals: [] });
    await withEnv(STANDALONE, () => attach(server));
    const secured = once(server, 'secureConnection');
    const client = tls.connect({ port: server.address().port, host: '127.0.0.1', rejectUnauthorized: false });
    client.on('error', () => {});
    t.after(() => client.destroy());
    await withDeadline(Promise.all([once(client, 'secureConnect'), secured]), 'the TLS handshake');

    const closed = once(client, 'close');
    const { lines, log } = collectLog();
    await withDeadline(drain(server, { graceMs: 600000, log }), 'the drain of a silent TLS connection');
    await withDeadline(closed, 'the silent TLS connection to be closed');
    assert.ok(lines.some((l) => /drained in \d+ms \(idle\)/.test(l)), lines.join('\n'));
  });

  test('cuts what is left at the grace deadline and resolves', async (t) => {
    const server = http.createServer(() => { /* never answers */ });
    await withEnv(STANDALONE, () => attach(server));
    t.after(() => server.closeAllConnections()); // only if the drain left one open
    const stuck = request(server.address().port, { path: '/never' });
    await withDeadline(once(server, 'request'), 'the request to arrive');
    const { lines, log } = collectLog();
    await withDeadline(drain(server, { graceMs: 50, log }), 'the forced end of the drain');
    // Wrapped so that a connection left open fails here, not at the file's timeout.
    await assert.rejects(withDeadline(stuck, 'the stuck request to be cut'), (err) => ['ECONNRESET'].includes(err.code) || /socket hang up/.test(err.message));
    assert.ok(lines.some((l) => /grace period of 50ms over: closing 1 remaining/.test(l)), lines.join('\n'));
    assert.equal(isDraining(), true);
  });

  test('at the grace deadline an upgraded connection (WebSocket) is cut too', async (t) => {
    const server = http.createServer();
    server.on('upgrade', (req, socket) => {
      socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n');
      socket.on('data', () => {}); // the application keeps it open for good
    });
    gracefulDrain(server, { signals: [] });
    await withEnv(STANDALONE, () => attach(server));
    const client = net.connect(server.address().port, '127.0.0.1');
    t.after(() => client.destroy());
    const clientClosed = once(client, 'close');
    client.on('error', () => {});
    client.write('GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n');
    let head = '';
    client.setEncoding('utf8');
    await withDeadline(new Promise((resolve) => client.on('data', (d) => { head += d; if (head.includes('\r\n\r\n')) resolve(); })), 'the 101 answer');
    assert.match(head, /^HTTP\/1.1 101 /);
    const { lines, log } = collectLog();
    await withDeadline(drain(server, { graceMs: 50, log }), 'the forced end of the drain');
    await withDeadline(clientClosed, 'the upgraded connection to be cut');
    assert.ok(lines.some((l) => /grace period of 50ms over: closing 1 remaining/.test(l)), lines.join('\n'));
  });

  test('a grace period beyond what a timer can hold is capped, not turned into 1 ms', async (t) => {
    for (const [opts, env] of [[{ graceMs: 2 ** 31 + 10 }, undefined], [{}, '99999999999']]) {
      const server = http.createServer(() => { /* never answers */ });
      await withEnv(STANDALONE, () => attach(server));
      const client = net.connect(server.address().port, '127.0.0.1');
      client.on('error', () => {});
      client.write('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
      await withDeadline(once(server, 'request'), 'the request to arrive');
      const { lines, log } = collectLog();
      let settled = false;
      // Wrapped so withEnv does not wait for the drain itself.
      const { drained } = await withEnv({ DRAIN_GRACE_MS: env }, () => ({ drained: drain(server, { ...opts, log }) }));
      drained.then(() => { settled = true; });
      // Node runs an overflowed delay as 1 ms; timers fire in deadline order,
      // so by the time this 20 ms one runs, that one would have.
      await new Promise((resolve) => setTimeout(resolve, 20));
      assert.equal(settled, false, lines.join('\n'));
      assert.ok(lines.some((l) => /grace 2147483647ms/.test(l)), lines.join('\n'));
      assert.ok(!lines.some((l) => /over/.test(l)), lines.join('\n'));
      client.destroy();
      await withDeadline(drained, 'the drain to end once the client hung up');
      assert.ok(lines.some((l) => /\(idle\)/.test(l)), lines.join('\n'));
    }
  });

  test('$DRAIN_GRACE_MS sets the deadline when graceMs is not given', async () => {
    const server = http.createServer(() => {});
    await withEnv(STANDALONE, () => attach(server));
    const stuck = request(server.address().port).catch((err) => err);
    await withDeadline(once(server, 'request'), 'the request to arrive');
    const { lines, log } = collectLog();
    await withEnv({ DRAIN_GRACE_MS: '40' }, () => withDeadline(drain(server, { log }), 'the forced end of the drain'));
    assert.ok(lines.some((l) => /grace period of 40ms over/.test(l)), lines.join('\n'));
    assert.ok((await stuck) instanceof Error);
  });

  test('log: false stays silent', async () => {
    const writes = [];
    const orig = process.stderr.write;
    process.stderr.write = (chunk, ...rest) => {
      writes.push(String(chunk));
      return orig.call(process.stderr, chunk, ...rest);
    };
    try {
      const server = http.createServer();
      await withEnv(STANDALONE, () => attach(server));
      await drain(server, { log: false });
    } finally {
      process.stderr.write = orig;
    }
    assert.deepEqual(writes.filter((w) => w.includes('containerflip')), []);
  });

  test('a server drained before it listens cannot be attached or served: it would never be closed', async (t) => {
    const n = await notifyServer(t);
    const server = http.createServer();
    t.after(() => closeServer(server));
    await drain(server, { log: false });
    const before = { term: process.listenerCount('SIGTERM'), request: server.listenerCount('request') };
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
      await assert.rejects(attach(server), /attach\(\) was given a server that is already draining/);
      await assert.rejects(serve(server, { log: false }), /serve\(\) was given a server that is already draining/);
    });
    assert.equal(server.listening, false);
    assert.equal(process.listenerCount('SIGTERM'), before.term, 'serve() installed nothing');
    assert.equal(server.listenerCount('request'), before.request);
    assert.deepEqual(await n.soFar(), [], 'no READY=1');
  });

  test('serve() sends no READY=1 for a server whose drain began while it was starting', async (t) => {
    const n = await notifyServer(t);
    const server = http.createServer();
    t.after(() => closeServer(server));
    // Runs before attach's own 'listening' listener: the drain (a stop
    // signal, say) begins before serve() gets to READY=1.
    server.once('listening', () => { drain(server, { log: false }); });
    const { lines, log } = collectLog();
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
      assert.equal(await serve(server, { signals: [], log }), server);
    });
    assert.deepEqual(await n.soFar(), [], 'no READY=1 from a draining server');
    assert.ok(lines.some((l) => /READY=1 not sent/.test(l)), lines.join('\n'));
    assert.ok(!lines.some((l) => /READY=1 sent/.test(l)), lines.join('\n'));
  });

  test('a drain before the listen completes: serve() and attach() resolve, not listening, without READY=1', async (t) => {
    const n = await notifyServer(t);
    const { lines, log } = collectLog();
    const served = http.createServer();
    const attached = http.createServer();
    t.after(() => Promise.all([closeServer(served), closeServer(attached)]));
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
      // listen() returns before 'listening' (a next-tick event); the drain
      // closes the server in between, so 'listening' never comes.
      const s = serve(served, { signals: [], log });
      drain(served, { log: false });
      assert.equal(await withDeadline(s, 'serve() to settle'), served);
      const a = attach(attached);
      drain(attached, { log: false });
      assert.equal(await withDeadline(a, 'attach() to settle'), attached);
    });
    assert.equal(served.listening, false);
    assert.equal(attached.listening, false);
    assert.deepEqual(await n.soFar(), [], 'no READY=1');
    assert.ok(lines.some((l) => /draining before it listened, READY=1 not sent/.test(l)), lines.join('\n'));
  });

  test('attach() rejects a server closed before it listens; a close() just before attach() is no such thing', async (t) => {
    const closedFirst = http.createServer();
    const closing = http.createServer();
    t.after(() => Promise.all([closeServer(closedFirst), closeServer(closing)]));
    await withEnv(STANDALONE, async () => {
      // close() in the same tick as the listen, after it: never listens.
      const a = attach(closing);
      closing.close();
      await assert.rejects(withDeadline(a, 'attach() to settle'),
        (err) => err.code === 'ERR_SERVER_NOT_RUNNING' && /closed before it listened on port 0$/.test(err.message));
      // close() before the listen: its 'close' event comes after the listen
      // began, which goes ahead.
      closedFirst.close();
      assert.equal(await withDeadline(attach(closedFirst), 'attach() after close()'), closedFirst);
    });
    assert.equal(closedFirst.listening, true);
    assert.equal(closing.listening, false);
  });

  test('a close() just before an attach() that fails: the listen error rejects, nothing is left unhandled', async (t) => {
    const taken = net.createServer();
    await new Promise((resolve) => taken.listen(0, '127.0.0.1', resolve));
    t.after(() => closeServer(taken));
    const server = http.createServer();
    server.close();
    await withEnv(STANDALONE, async () => {
      await assert.rejects(withDeadline(attach(server, { port: taken.address().port }), 'attach() to settle'),
        (err) => err.code === 'EADDRINUSE' && /cannot listen on port \d+/.test(err.message));
    });
    assert.equal(server.listenerCount('error'), 0, 'attach() left no error listener behind');
  });

  test('serve() sends no READY=1 while another server of the process is draining', async (t) => {
    const n = await notifyServer(t);
    const other = http.createServer();
    const server = http.createServer();
    t.after(() => Promise.all([closeServer(other), closeServer(server)]));
    const { lines, log } = collectLog();
    await withEnv({ ...STANDALONE, NOTIFY_SOCKET: n.env }, async () => {
      server.once('listening', () => { drain(other, { log: false }); });
      assert.equal(await serve(server, { signals: [], log }), server);
    });
    assert.equal(server.listening, true);
    assert.deepEqual(await n.soFar(), [], 'no READY=1 from a process that is draining');
    assert.ok(lines.some((l) => /READY=1 not sent/.test(l)), lines.join('\n'));
  });

  test('a plain net.Server keeps a client that never speaks until the grace deadline', async (t) => {
    const server = net.createServer(() => {});
    gracefulDrain(server, { signals: [] });
    await withEnv(STANDALONE, () => attach(server));
    const quiet = await accepted(server, server.address().port);
    t.after(() => quiet.destroy());
    const { lines, log } = collectLog();
    await withDeadline(drain(server, { graceMs: 3000, log }), 'the drain');
    assert.ok(lines.some((l) => /grace period of 3000ms over: closing 1 remaining/.test(l)), lines.join('\n'));
  });

  test('a listen that completes after the drain began is closed again', async (t) => {
    const server = http.createServer();
    t.after(() => closeServer(server));
    await drain(server, { log: false });
    const closed = once(server, 'close');
    server.listen(0, '127.0.0.1');
    await withDeadline(closed, 'the late listener to be closed');
    assert.equal(server.listening, false);
  });

  test('a repeated call checks its options, though only the first call\'s are used', async () => {
    const server = http.createServer();
    const first = drain(server, { log: false });
    await assert.rejects(drain(server, { graceMs: Number.NaN }), TypeError);
    assert.equal(drain(server, { graceMs: 5 }), first);
    await first;
    const other = http.createServer();
    gracefulDrain(other, { signals: [] });
    assert.throws(() => gracefulDrain(other, { signals: 'SIGTERM' }), TypeError);
    assert.throws(() => gracefulDrain(other, { log: 7 }), TypeError);
    gracefulDrain(other, { signals: [] });
    assert.equal(other.listenerCount('request'), 1);
  });

  test('rejects bad options', async () => {
    await assert.rejects(drain(http.createServer(), { graceMs: Number.NaN }), TypeError);
    await assert.rejects(drain(42), /drain\(\) expects a net.Server or http.Server, got number 42/);
    await assert.rejects(drain(undefined), /got undefined/);
  });
});
