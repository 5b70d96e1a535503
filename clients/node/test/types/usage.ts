// Compiled with `tsc --noEmit` by test/package.test.mjs: every export used
// the way the README shows, plus lines that must NOT typecheck.
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import net from 'node:net';
import {
  serve,
  attach,
  notifyReady,
  gracefulDrain,
  drain,
  isDraining,
  fdMode,
  type ServeOptions,
  type DrainOptions,
  type GracefulDrainOptions,
  type AttachOptions,
  type Logger,
} from '@gigacodes/containerflip';

const server = http.createServer((req, res) => res.end('ok'));

async function main(): Promise<void> {
  const same: http.Server = await serve(server);
  const opts: ServeOptions = {
    fd: 3,
    port: 8080,
    graceMs: 1000,
    signals: ['SIGTERM', 'SIGINT'],
    notify: false,
    log: (msg: string) => console.log(msg),
  };
  await serve(server, opts);
  await serve(https.createServer(), { log: false, signals: [] });

  const raw: net.Server = await attach(net.createServer(), { fd: 3 });
  const a: AttachOptions = { port: '8080' };
  await attach(server, a);
  const admin: http.Server = await attach(http.createServer(), { fd: 4, port: 0 });
  gracefulDrain(admin);

  const r: void = await notifyReady();

  gracefulDrain(server);
  const g: GracefulDrainOptions = { graceMs: 5, signals: [], log: false };
  gracefulDrain(server, g);

  const d: DrainOptions = { graceMs: 100 };
  const p: Promise<void> = drain(server, d);
  await p;

  const b1: boolean = isDraining();
  const b2: boolean = fdMode();
  const l: Logger = (m) => process.stderr.write(m);
  void [same, raw, r, b1, b2, l];

  // @ts-expect-error graceMs is a number
  await serve(server, { graceMs: '10' });
  // @ts-expect-error notify is a boolean
  await serve(server, { notify: 'no' });
  // @ts-expect-error log is a function or false, not true
  drain(server, { log: true });
  // @ts-expect-error not a signal name
  gracefulDrain(server, { signals: ['SIGNOPE'] });
  // @ts-expect-error SIGKILL cannot be caught
  gracefulDrain(server, { signals: ['SIGKILL'] });
  // @ts-expect-error serve needs an http(s) server
  await serve(net.createServer());
  // @ts-expect-error notifyReady takes no arguments
  await notifyReady('READY=1');
  // @ts-expect-error HTTP/2 is not supported
  await serve(http2.createServer());
  // @ts-expect-error HTTP/2 is not supported
  await attach(http2.createServer());
  // @ts-expect-error HTTP/2 is not supported
  await attach(http2.createSecureServer());
  // @ts-expect-error HTTP/2 is not supported
  gracefulDrain(http2.createSecureServer());
  // @ts-expect-error HTTP/2 is not supported
  await drain(http2.createServer());
}

void main;
