// A small HTTP load client for the deploy tests, bounded by request count
// and by time, that stops by itself.
//
// Two kinds of loop:
//   fresh      a new TCP connection for every request (agent: false)
//   keepalive  requests reuse pooled connections (http.Agent keepAlive)
//
// Retry rule. A server that closes an idle keep-alive connection can cross
// paths with a client that has just sent a new request on it; the request
// then meets a closed connection before any byte of a response. RFC 9112
// §9.3.1 lets a client retry an idempotent request in exactly that case, and
// real clients do. This client does the same, and only then: the request is a
// GET, it went out on a REUSED connection, and not one byte came back on that
// connection after the request was assigned to it. Every other error (a
// refused or reset fresh connection, a bad status, a truncated body) is a
// failure. Retries are counted and reported (and the tests bound them).
//
// Per generation (X-Containerflip-Generation) it records how many answers
// came back, how many of them carried `Connection: close` (what a draining
// worker tells keep-alive clients), and which pids answered (the `pid N` in
// the examples' bodies). It emits 'answer' (generation) after each good
// answer and 'end' when the loops are over; until() waits on that.

import { EventEmitter } from 'node:events';
import http from 'node:http';

function once(port, agent, path) {
  return new Promise((resolve) => {
    let startBytes = null;
    let sock = null;
    const req = http.request({ host: '127.0.0.1', port, path, agent, method: 'GET' }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ ok: true, status: res.statusCode, headers: res.headers, body }));
      res.on('error', (err) => resolve({ ok: false, err, retryable: false }));
    });
    req.on('socket', (s) => {
      sock = s;
      startBytes = s.bytesRead;
    });
    req.on('error', (err) => {
      const noResponseByte = sock !== null && sock.bytesRead === startBytes;
      resolve({ ok: false, err, retryable: req.reusedSocket === true && noResponseByte });
    });
    req.end();
  });
}

export class Load extends EventEmitter {
  /**
   * @param {number} port
   * @param {object} o
   * @param {'fresh'|'keepalive'} o.mode
   * @param {number} o.concurrency   parallel request loops
   * @param {number} o.maxRequests   stop after this many requests (all loops)
   * @param {number} o.maxMs         stop after this long
   * @param {(r) => string|null} o.check  returns an error text for a bad answer
   */
  constructor(port, { mode, concurrency = 2, maxRequests = 20000, maxMs = 120000, path = '/', check }) {
    super();
    this.port = port;
    this.mode = mode;
    this.path = path;
    this.check = check;
    this.maxRequests = maxRequests;
    this.deadline = Date.now() + maxMs;
    this.agent = mode === 'keepalive' ? new http.Agent({ keepAlive: true, maxSockets: concurrency }) : false;
    this.stopped = false;
    this.started = 0;
    this.ok = 0;
    this.failures = [];
    this.retries = 0;
    this.generations = new Map(); // gen -> good answers
    this.closes = new Map(); // gen -> answers with Connection: close
    this.pids = new Map(); // gen -> Set of pids that answered
    // Resolves with the first good answer: the load is really flowing.
    this.flowing = new Promise((resolve) => { this.onFirstOk = resolve; });
    this.loops = Array.from({ length: concurrency }, () => this.loop());
    this.ended = false;
    Promise.all(this.loops).then(() => {
      this.ended = true;
      this.emit('end');
    });
  }

  get stopReason() {
    if (this.stopped) return 'stopped';
    if (this.started >= this.maxRequests) return 'request limit';
    if (Date.now() >= this.deadline) return 'time limit';
    return null;
  }

  async loop() {
    while (this.stopReason === null) {
      this.started += 1;
      let attempt = 0;
      for (;;) {
        const r = await once(this.port, this.agent, this.path);
        if (r.ok) {
          const problem = this.check ? this.check(r) : null;
          if (problem) this.failures.push(problem);
          else {
            this.ok += 1;
            if (this.ok === 1) this.onFirstOk();
            const g = r.headers['x-containerflip-generation'];
            this.generations.set(g, (this.generations.get(g) ?? 0) + 1);
            if (/^close$/i.test(r.headers.connection ?? '')) this.closes.set(g, (this.closes.get(g) ?? 0) + 1);
            const pid = /\bpid (\d+)/.exec(r.body)?.[1];
            if (pid) {
              if (!this.pids.has(g)) this.pids.set(g, new Set());
              this.pids.get(g).add(pid);
            }
            this.emit('answer', g);
          }
          break;
        }
        if (r.retryable && attempt < 3) {
          attempt += 1;
          this.retries += 1;
          continue;
        }
        this.failures.push(`${r.err.code ?? ''} ${r.err.message}${r.retryable ? ' (after 3 retries)' : ''}`);
        break;
      }
    }
  }

  /**
   * Resolves once `predicate(this)` holds, checked now and after every good
   * answer; rejects if the loops end first (a limit was hit or stop() was
   * called). Wrap it in a deadline: it is an event wait, not a timer.
   */
  until(predicate, what = 'a condition on the load') {
    const p = new Promise((resolve, reject) => {
      if (predicate(this)) return resolve();
      if (this.ended) return reject(new Error(`${this.mode} load ended before ${what}`));
      const onAnswer = () => {
        if (!predicate(this)) return;
        cleanup();
        resolve();
      };
      const onEnd = () => {
        cleanup();
        reject(new Error(`${this.mode} load ended (${this.stopReason ?? 'stopped'}) before ${what}`));
      };
      const cleanup = () => {
        this.off('answer', onAnswer);
        this.off('end', onEnd);
      };
      this.on('answer', onAnswer);
      this.on('end', onEnd);
    });
    // A caller that gave up (a deadline) must not get an unhandled rejection
    // later, when the load stops.
    p.catch(() => {});
    return p;
  }

  /** Resolves once generation `gen` has answered at least once. */
  seen(gen) {
    return this.until((l) => l.generations.has(String(gen)), `generation ${gen} answered`);
  }

  /** Stop the loops, wait for the requests in flight, return a summary. */
  async stop() {
    const reason = this.stopReason;
    this.stopped = true;
    await Promise.all(this.loops);
    if (this.agent) this.agent.destroy();
    return {
      mode: this.mode,
      requests: this.ok + this.failures.length,
      ok: this.ok,
      failed: this.failures.length,
      retries: this.retries,
      limitHit: reason !== null && reason !== 'stopped' ? reason : null,
      generations: Object.fromEntries([...this.generations].sort((a, b) => Number(a[0]) - Number(b[0]))),
      closes: Object.fromEntries([...this.closes].sort((a, b) => Number(a[0]) - Number(b[0]))),
      firstFailures: this.failures.slice(0, 5),
    };
  }
}
