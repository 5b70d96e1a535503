// Type declarations for @gigacodes/containerflip.

import type { Server as NetServer } from 'node:net';
import type { Server as HttpServer } from 'node:http';
import type { Server as HttpsServer } from 'node:https';
import type { Http2Server, Http2SecureServer } from 'node:http2';

/**
 * A server the drain machinery works with: HTTP/1.x, which emits `request`
 * events and honours `Connection: close`. HTTP/2 is not supported: every
 * function rejects (or, `gracefulDrain`, throws) a `TypeError` for one.
 */
export type DrainableServer = HttpServer | HttpsServer;

/** `never` for the HTTP/2 servers, which `net.Server` would otherwise admit. */
type NotHttp2<S> = S extends Http2Server | Http2SecureServer ? never : unknown;

/** Receives one human-readable lifecycle message per call. */
export type Logger = (message: string) => void;

export interface AttachOptions {
  /**
   * Inherited listening socket descriptor, used when `LISTEN_FDS` >= 1.
   * @default 3
   */
  fd?: number;
  /**
   * Port for standalone runs (no `LISTEN_FDS`); a numeric string is accepted.
   * @default process.env.PORT, else an ephemeral port (0)
   */
  port?: number | string;
}

export interface DrainOptions {
  /**
   * How long connections may take to finish before the rest are closed.
   * Capped at 2147483647 ms, the longest delay a Node timer can wait.
   * @default process.env.DRAIN_GRACE_MS when it is a whole number of
   * milliseconds, else 28000
   */
  graceMs?: number;
  /**
   * Lifecycle logger, or `false` for silence.
   * @default a writer to process.stderr
   */
  log?: Logger | false;
}

export interface GracefulDrainOptions extends DrainOptions {
  /**
   * Signals that start the drain (and then exit 0). `[]` installs only the
   * `Connection: close` marker. Each must be a signal name known to this
   * platform that a handler can catch (not `SIGKILL` or `SIGSTOP`).
   * @default ['SIGTERM']
   */
  signals?: readonly Exclude<NodeJS.Signals, 'SIGKILL' | 'SIGSTOP'>[];
}

export interface ServeOptions extends AttachOptions, GracefulDrainOptions {
  /**
   * Send `READY=1` once listening (not when the server has begun draining
   * by then). Set `false` when another process (a cluster primary) reports
   * readiness.
   * @default true
   */
  notify?: boolean;
}

/**
 * Installs the drain machinery, attaches (fd 3 under the supervisor, else the
 * port fallback), then sends `READY=1`, in that order. Resolves with `server`.
 * Every option is checked before anything is installed.
 */
export function serve<S extends DrainableServer>(server: S, options?: ServeOptions): Promise<S>;

/**
 * Listens on the inherited descriptor (`LISTEN_FDS` >= 1) or on the fallback
 * port. Resolves with `server` once listening; rejects on a listen error,
 * when `server` is not a `net.Server`, is an HTTP/2 server, or has already
 * begun draining, and with code `ERR_SERVER_NOT_RUNNING` when it is closed
 * before it listens; when a drain closed it, it resolves (not listening). A second listener is `attach(server2, { fd: 4 })`.
 */
export function attach<S extends NetServer>(server: S & NotHttp2<S>, options?: AttachOptions): Promise<S>;

/**
 * Sends `READY=1` over `$NOTIFY_SOCKET` (an AF_UNIX stream socket; `@name`
 * is an abstract address). Resolves at once when `NOTIFY_SOCKET` is unset or
 * empty; rejects when the socket cannot be reached or the write fails.
 */
export function notifyReady(): Promise<void>;

/**
 * Installs the `Connection: close` marker and one additive handler per
 * signal that drains `server` and exits 0. Idempotent per server: a later
 * call checks its options (throws on bad ones) but the first call's stay.
 */
export function gracefulDrain(server: DrainableServer, options?: GracefulDrainOptions): void;

/**
 * Drains `server` without exiting: stops accepting, answers with
 * `Connection: close`, closes idle connections, and resolves once no
 * connection is left or at the grace deadline. Idempotent per server: every
 * call returns the same promise (a later call's options are checked, not used).
 */
export function drain(server: DrainableServer, options?: DrainOptions): Promise<void>;

/** Whether a drain has started in this process (true from then on, also once it has finished). */
export function isDraining(): boolean;

/** Whether the supervisor passed listening sockets (`LISTEN_FDS` >= 1). */
export function fdMode(): boolean;
