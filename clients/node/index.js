// @gigacodes/containerflip: the worker side of the containerflip contract.
//
//   fd 3 (LISTEN_FDS >= 1)  an already-listening socket owned by the supervisor
//   NOTIFY_SOCKET           where READY=1 goes once we can serve (stream mode)
//   SIGTERM                 stop accepting, finish what is in flight, exit 0
//   DRAIN_GRACE_MS          how long a drain may take before connections are cut
//
// Zero dependencies. The helper only ever touches the server it is handed,
// plus two process-wide things: the draining flag and the set of
// signal-started drains still running. It patches nothing.

import net from 'node:net';
import os from 'node:os';
import tls from 'node:tls';

const DEFAULT_FD = 3;
const DEFAULT_GRACE_MS = 28000;
// Node calls listen(2) again on the inherited socket, which replaces its
// backlog; without a value Node would use 511. 4096 is containerflip's own
// default --backlog (the kernel caps both at net.core.somaxconn).
const INHERITED_BACKLOG = 4096;
const DEFAULT_SIGNALS = Object.freeze(['SIGTERM']);
// setTimeout() takes a signed 32-bit delay and fires after 1 ms for anything
// larger, so a longer grace period is capped here (about 24.8 days).
const MAX_GRACE_MS = 2 ** 31 - 1;
// Signals that cannot be caught: a handler for them could never run.
const UNCATCHABLE = new Set(['SIGKILL', 'SIGSTOP']);
// Node before libuv 1.48 connects to an abstract unix address padded with
// NUL bytes to the whole 108-byte sun_path (libuv/libuv#4266).
const PADS_ABSTRACT = (() => {
  const [major, minor] = (process.versions.uv ?? '0.0').split('.').map(Number);
  return major < 1 || (major === 1 && minor < 48);
})();

// Idle keep-alive connections are not cut the instant a drain starts: a
// client that is about to reuse one would see a reset. For a short while they
// stay open, so a client that sends one more request gets its answer with
// `Connection: close` and hangs up cleanly; whatever is still idle after that
// is closed. The sweep repeats, so a connection that goes idle later (its
// response had left with keep-alive before the drain began) is closed too.
const IDLE_SWEEP_MAX_MS = 500;
// A connection that has not sent a byte of a request is not idle to node:http
// (closeIdleConnections() leaves it), yet a browser's preconnect can stay
// silent for minutes and would hold a draining worker for its whole grace
// period. Once the drain is this old, such a connection is closed if it was
// silent at one sweep and still is at the next, checked again after the loop
// has read what arrived (a busy loop must not mistake unread bytes for
// silence). HTTP servers only: a plain net.Server's clients may never speak.
const SILENT_CONNECTION_MS = 1000;

// Process-global: is any drain under way?
let draining = false;

// Per server: whether the Connection: close marker is installed, the
// responses it saw in flight, the sockets it accepted since (upgraded ones
// included, which node:http stops tracking), mapped to whether their bytesRead
// counts request bytes (plain sockets, and the TLS sockets of https servers:
// not the raw sockets under those), whether the server is draining
// (and the drain's promise), whether gracefulDrain() set up signal handlers
// for it and whether one of them has fired.
const states = new WeakMap();

// Signal-initiated drains still running; the process exits when none is left.
const pendingExits = new Set();

function stateOf(server) {
  let state = states.get(server);
  if (state === undefined) {
    state = { marker: false, inflight: null, sockets: null, draining: false, drainPromise: null, graceful: false, exitPending: false };
    states.set(server, state);
  }
  return state;
}

function checkServer(server, fn) {
  if (!(server instanceof net.Server)) {
    throw new TypeError(`containerflip: ${fn}() expects a net.Server or http.Server, got ${describe(server)}`);
  }
  const h2 = http2ClassOf(server);
  if (h2 !== null) {
    throw new TypeError(`containerflip: ${fn}() does not support HTTP/2 servers (got an ${h2} from node:http2): ` +
      'HTTP/2 forbids the Connection header and drains with GOAWAY, which this helper does not send; ' +
      'use an HTTP/1.1 server from node:http or node:https');
  }
}

// node:http2 exports neither server class, so look for their names along the
// prototype chain (which also catches subclasses of them). They are net.Server
// instances, but a drain would neither reach their clients nor close their
// idle sessions and would just wait out the whole grace period.
const HTTP2_CLASSES = new Set(['Http2Server', 'Http2SecureServer']);
function http2ClassOf(server) {
  for (let proto = Object.getPrototypeOf(server); proto !== null && proto !== net.Server.prototype; proto = Object.getPrototypeOf(proto)) {
    const name = Object.hasOwn(proto, 'constructor') ? proto.constructor?.name : undefined;
    if (HTTP2_CLASSES.has(name)) return name;
  }
  return null;
}

function describe(value) {
  if (value === null) return 'null';
  if (typeof value === 'object') return value.constructor ? `an instance of ${value.constructor.name}` : 'an object';
  return `${typeof value} ${String(value)}`;
}

function makeLogger(log) {
  if (log === false) return () => {};
  if (log === undefined) {
    return (msg) => {
      process.stderr.write(`[containerflip-node pid ${process.pid}] ${msg}\n`);
    };
  }
  if (typeof log !== 'function') {
    throw new TypeError(`containerflip: option log must be a function or false, got ${describe(log)}`);
  }
  return (msg) => {
    try {
      log(msg);
    } catch {
      // a broken logger must never break a drain
    }
  };
}

function resolveGraceMs(graceMs) {
  if (graceMs !== undefined) {
    if (typeof graceMs !== 'number' || !Number.isFinite(graceMs) || graceMs < 0) {
      throw new TypeError(`containerflip: option graceMs must be a non-negative number of milliseconds, got ${describe(graceMs)}`);
    }
    return Math.min(graceMs, MAX_GRACE_MS);
  }
  const env = process.env.DRAIN_GRACE_MS;
  if (env !== undefined && /^\s*\d+\s*$/.test(env)) return Math.min(Number(env), MAX_GRACE_MS);
  return DEFAULT_GRACE_MS;
}

function resolveSignals(signals) {
  if (signals === undefined) return DEFAULT_SIGNALS;
  if (!Array.isArray(signals) || !signals.every((s) => typeof s === 'string' && s.length > 0)) {
    throw new TypeError(`containerflip: option signals must be an array of signal names, got ${describe(signals)}`);
  }
  for (const s of signals) {
    if (!Object.hasOwn(os.constants.signals, s)) {
      throw new TypeError(`containerflip: option signals: ${s} is not a signal name (expected one like 'SIGTERM')`);
    }
    if (UNCATCHABLE.has(s)) {
      throw new TypeError(`containerflip: option signals: ${s} cannot be caught, so it cannot start a drain`);
    }
  }
  return signals;
}

/**
 * True when the supervisor handed us listening sockets (LISTEN_FDS >= 1).
 * LISTEN_PID is deliberately not compared with our pid: node:cluster children
 * inherit the primary's environment and still listen on fd 3 through it.
 */
export function fdMode() {
  const value = process.env.LISTEN_FDS;
  if (value === undefined || !/^\s*\d+\s*$/.test(value)) return false;
  return Number(value) >= 1;
}

/** Whether a drain has begun anywhere in this process. */
export function isDraining() {
  return draining;
}

function resolvePort(port) {
  if (port !== undefined && port !== null) return port;
  const env = process.env.PORT;
  if (env !== undefined && env !== '') return env;
  return 0;
}

// Where attach() listens: { fd } under the supervisor, { port } otherwise.
// Throws on a bad fd or port, so serve() can check before installing anything.
function resolveTarget(fd = DEFAULT_FD, port) {
  if (fdMode()) {
    if (!Number.isInteger(fd) || fd < 0) {
      throw new TypeError(`containerflip: option fd must be a non-negative integer, got ${describe(fd)}`);
    }
    return { fd };
  }
  const p = resolvePort(port);
  const n = typeof p === 'string' && /^\s*\d+\s*$/.test(p) ? Number(p) : p;
  if (!Number.isInteger(n) || n < 0 || n > 65535) {
    throw new RangeError(`containerflip: ${port === undefined || port === null ? `PORT=${p}` : `option port ${describe(p)}`} is not a TCP port number`);
  }
  return { port: n };
}

// A server that has begun draining must not start accepting again: nothing
// would ever close it.
function checkNotDraining(server, fn) {
  if (states.get(server)?.draining) {
    throw new Error(`containerflip: ${fn}() was given a server that is already draining; it would never be closed again`);
  }
}

/**
 * Start accepting: on the inherited descriptor (default 3) under the
 * supervisor, otherwise on `port` / $PORT / an ephemeral port.
 * Resolves with the server once it listens, or (not listening) when a drain
 * closed it first; rejects on any listen error, on a bad argument, for a
 * server that has begun draining, and for one closed before it listened.
 */
export function attach(server, options = {}) {
  const { fd, port } = options ?? {};
  return new Promise((resolve) => {
    // Thrown inside the executor, so it rejects: functions that return a
    // promise never throw, and `.catch()` and `await` see every error alike.
    checkServer(server, 'attach');
    checkNotDraining(server, 'attach');
    resolve(listenOn(server, resolveTarget(fd, port)));
  });
}

// The code of attach()'s rejection when the server was closed (not by a
// drain) before it was listening: Node emits neither 'listening' nor 'error'.
const CLOSED_BEFORE_LISTENING = 'ERR_SERVER_NOT_RUNNING';

function listenOn(server, target) {
  return new Promise((resolve, reject) => {
    const where = target.fd !== undefined ? `fd ${target.fd}` : `port ${target.port}`;
    let over = false;
    const settled = () => {
      over = true;
      server.removeListener('error', onError);
      server.removeListener('listening', onListening);
      server.removeListener('close', onClose);
    };
    const onError = (err) => {
      settled();
      const wrapped = new Error(`containerflip: cannot listen on ${where}: ${err.message}`, { cause: err });
      if (err.code) wrapped.code = err.code;
      reject(wrapped);
    };
    const onListening = () => {
      settled();
      resolve(server);
    };
    const onClose = () => {
      settled();
      // A drain began: it is in charge now and ends the process when it is
      // done; failing here would make the caller exit before that.
      if (states.get(server)?.draining) {
        resolve(server);
        return;
      }
      const err = new Error(`containerflip: the server was closed before it listened on ${where}`);
      err.code = CLOSED_BEFORE_LISTENING;
      reject(err);
    };
    server.once('error', onError);
    server.once('listening', onListening);
    // A tick late: the 'close' of a close() made before this listen is
    // already queued (a next-tick event) and must pass unseen, or it would
    // settle a listen that goes ahead (and leave its error unhandled). A
    // close() from now on queues its 'close' behind this.
    process.nextTick(() => {
      if (!over) server.once('close', onClose);
    });
    try {
      // For a descriptor Node takes the backlog only as a separate argument.
      if (target.fd !== undefined) server.listen(target, INHERITED_BACKLOG);
      else server.listen(target);
    } catch (err) {
      onError(err);
    }
  });
}

/**
 * Send READY=1 to $NOTIFY_SOCKET over a unix stream connection (the
 * supervisor's --notify-mode stream). Without NOTIFY_SOCKET it does nothing.
 */
export function notifyReady() {
  return notify('READY=1\n');
}

function notify(payload) {
  const address = process.env.NOTIFY_SOCKET;
  if (address === undefined || address === '') return Promise.resolve();
  let path;
  if (address.startsWith('@')) {
    path = `\0${address.slice(1)}`; // Linux abstract namespace
  } else if (address.startsWith('/')) {
    path = address;
  } else {
    return Promise.reject(new Error(
      `containerflip: NOTIFY_SOCKET=${address} is not a unix socket path (expected /path or @abstract)`));
  }
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path });
    let settled = false;
    const fail = (err) => {
      if (settled) return;
      settled = true;
      socket.destroy();
      const wrapped = new Error(
        `containerflip: cannot send ${payload.trim()} to NOTIFY_SOCKET=${address}: ${err.message}${notifyHint(err.code, address)}`,
        { cause: err },
      );
      if (err.code) wrapped.code = err.code;
      reject(wrapped);
    };
    socket.on('error', fail);
    socket.once('connect', () => {
      // On a unix stream socket, a completed write already sits in the
      // peer's receive queue, so closing right after loses nothing.
      socket.end(payload, (err) => {
        if (err) {
          fail(err);
          return;
        }
        if (settled) return;
        settled = true;
        socket.destroy();
        resolve();
      });
    });
  });
}

// What a failed notify connection most likely means, by its error code.
function notifyHint(code, address) {
  switch (code) {
    case 'EPROTOTYPE':
      // A stream connect to a datagram socket: the supervisor listens, in
      // the other mode.
      return ' (the socket there is not a stream socket: run the supervisor with --notify-mode stream)';
    case 'ECONNREFUSED':
      if (address.startsWith('@') && PADS_ABSTRACT) {
        return ` (this Node, libuv ${process.versions.uv}, pads abstract names to 108 bytes, ` +
          'so only a receiver that binds the padded name can accept; use a path socket)';
      }
      return ' (nothing is listening there: the supervisor has gone away, or NOTIFY_SOCKET names a stale socket)';
    case 'ENOENT':
      return ' (no such socket: the supervisor has gone away, or NOTIFY_SOCKET is a stale path)';
    default:
      return '';
  }
}

// The one request-path hook: prepended so it runs before handlers that flush
// their headers synchronously. Outside a drain it only remembers the response
// until it is done, so a drain can still mark responses that are in flight.
function installMarker(server, state) {
  if (state.marker) return;
  state.marker = true;
  state.inflight = new Set();
  state.sockets = new Map();
  const track = (socket, carriesRequests) => {
    state.sockets.set(socket, carriesRequests);
    socket.once('close', () => state.sockets.delete(socket));
  };
  const encrypted = server instanceof tls.Server;
  server.on('connection', (socket) => track(socket, !encrypted));
  if (encrypted) server.on('secureConnection', (socket) => track(socket, true));
  server.prependListener('request', (req, res) => {
    if (state.draining) {
      if (!res.headersSent) res.setHeader('Connection', 'close');
      return;
    }
    state.inflight.add(res);
    res.once('close', () => state.inflight.delete(res));
  });
}

/**
 * Drain `server` without exiting: stop accepting, answer what is in flight
 * with `Connection: close`, close idle keep-alive connections, and resolve
 * once no connection is left or at the grace deadline (after cutting the
 * rest). Idempotent per server.
 */
export function drain(server, options = {}) {
  let state;
  let graceMs;
  let log;
  try {
    checkServer(server, 'drain');
    const opts = options ?? {};
    graceMs = resolveGraceMs(opts.graceMs);
    log = makeLogger(opts.log);
    // Options are checked every time, but only the first call's are used.
    state = stateOf(server);
    if (state.drainPromise) return state.drainPromise;
  } catch (err) {
    return Promise.reject(err);
  }
  installMarker(server, state);
  draining = true;
  state.draining = true;

  // Responses that are in flight and have not sent their headers yet leave
  // with `Connection: close` too.
  for (const res of state.inflight) {
    if (!res.headersSent) res.setHeader('Connection', 'close');
  }
  state.inflight.clear();

  state.drainPromise = new Promise((resolve) => {
    // A monotonic clock: a step of the wall clock must not end the silence.
    const started = performance.now();
    let done = false;
    let sweep = null;
    let deadline = null;
    const finish = (how) => {
      if (done) return;
      done = true;
      if (sweep) clearInterval(sweep);
      if (deadline) clearTimeout(deadline);
      log(`drained in ${Math.round(performance.now() - started)}ms (${how})`);
      resolve();
    };

    log(`draining: no longer accepting, grace ${graceMs}ms`);
    // A listen still under way completes later (a cluster child's goes through
    // the primary): close again, a draining server never accepts.
    server.on('listening', () => net.Server.prototype.close.call(server));
    // net.Server's close, not http.Server's: since Node 19 the latter also
    // destroys every idle keep-alive connection at once, which races with
    // clients that are just reusing one. The callback runs once the last
    // connection is gone (with an error argument if the server was not
    // listening any more, which changes nothing here).
    net.Server.prototype.close.call(server, () => finish('idle'));

    const silent = new WeakSet();
    const closeIdle = () => {
      if (typeof server.closeIdleConnections !== 'function') return;
      server.closeIdleConnections();
      if (performance.now() - started < SILENT_CONNECTION_MS) return;
      const again = [];
      for (const [socket, carriesRequests] of state.sockets) {
        if (!carriesRequests || socket.bytesRead > 0) continue;
        if (silent.has(socket)) again.push(socket);
        else silent.add(socket);
      }
      // After this turn's poll phase has read whatever had arrived.
      if (again.length > 0) {
        setImmediate(() => {
          for (const socket of again) if (socket.bytesRead === 0) socket.destroy();
        });
      }
    };
    const sweepMs = Math.max(1, Math.min(IDLE_SWEEP_MAX_MS, Math.floor(graceMs / 4)));
    sweep = setInterval(closeIdle, sweepMs);
    sweep.unref();

    deadline = setTimeout(() => {
      server.getConnections((err, count) => {
        if (done) return;
        log(`grace period of ${graceMs}ms over: closing ${err ? 'all' : count} remaining connection(s)`);
        if (typeof server.closeAllConnections === 'function') server.closeAllConnections();
        // Upgraded connections (WebSocket) left the http module's books.
        for (const socket of state.sockets.keys()) socket.destroy();
        finish('grace period over');
      });
    }, graceMs);
    deadline.unref();
  });
  return state.drainPromise;
}

/**
 * Install the `Connection: close` marker and, for each of `signals`
 * (default SIGTERM), a handler that drains the server and then exits 0.
 * Additive: other listeners for those signals are left alone. Idempotent per
 * server.
 */
export function gracefulDrain(server, options = {}) {
  checkServer(server, 'gracefulDrain');
  const opts = options ?? {};
  const signals = resolveSignals(opts.signals);
  if (opts.graceMs !== undefined) resolveGraceMs(opts.graceMs);
  const log = makeLogger(opts.log);
  // Options are checked every time, but only the first call's are used.
  const state = stateOf(server);
  if (state.graceful) return;
  state.graceful = true;
  installMarker(server, state);
  for (const signal of signals) {
    process.on(signal, () => {
      // Staying subscribed matters: with no listener left, a second signal
      // would take its default action and kill the process mid-drain.
      if (state.exitPending) {
        log(`${signal} received again: already draining`);
        return;
      }
      state.exitPending = true;
      log(`${signal} received`);
      const pending = drain(server, { graceMs: opts.graceMs, log: opts.log }).then(() => {
        pendingExits.delete(pending);
        if (pendingExits.size === 0) {
          log('exiting with status 0');
          process.exit(0);
        }
      });
      pendingExits.add(pending);
    });
  }
}

/**
 * The whole contract in one call: drain machinery first, then attach (fd 3
 * or the PORT fallback), then READY=1. Resolves with the server. Every option
 * is checked before anything is installed.
 */
export async function serve(server, options = {}) {
  checkServer(server, 'serve');
  const opts = options ?? {};
  const log = makeLogger(opts.log);
  if (opts.graceMs !== undefined) resolveGraceMs(opts.graceMs);
  resolveSignals(opts.signals);
  if (opts.notify !== undefined && typeof opts.notify !== 'boolean') {
    throw new TypeError(`containerflip: option notify must be a boolean, got ${describe(opts.notify)}`);
  }
  const target = resolveTarget(opts.fd, opts.port);
  checkNotDraining(server, 'serve');

  gracefulDrain(server, { graceMs: opts.graceMs, signals: opts.signals, log: opts.log });
  await listenOn(server, target);
  if (!server.listening) {
    // A stop signal during start-up closed it first: nothing to announce.
    log('draining before it listened, READY=1 not sent');
    return server;
  }
  const addr = server.address();
  const where = typeof addr === 'string' ? addr : addr ? `${addr.address}:${addr.port}` : 'unknown address';
  log(target.fd !== undefined ? `listening on fd ${target.fd} (${where})` : `listening on ${where} (standalone, no LISTEN_FDS)`);
  if (opts.notify !== false) {
    // A drain that began while we were starting up (a stop signal already,
    // here or at another server of this process) means this process is on
    // its way out: announcing it would be a lie.
    if (draining || stateOf(server).draining) {
      log('draining already, READY=1 not sent');
      return server;
    }
    await notifyReady();
    if (process.env.NOTIFY_SOCKET) log('READY=1 sent');
  }
  return server;
}
