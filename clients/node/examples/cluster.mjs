// node:cluster worker: one primary (the supervisor's direct child) and
// CLUSTER_WORKERS children sharing the inherited socket.
//   containerflip run --notify-mode stream --listen :8080 -- node examples/cluster.mjs
//
// The primary owns the contract: it sends READY=1 once every child listens,
// and on SIGTERM it drains the children and exits 0 when the last one is gone.
// Children get NOTIFY_SOCKET='' so they can never signal readiness early.
import cluster from 'node:cluster';
import http from 'node:http';
import os from 'node:os';
import { serve, notifyReady } from '@gigacodes/containerflip';

const generation = process.env.CONTAINERFLIP_GENERATION ?? 'standalone';
const size = Number(process.env.CLUSTER_WORKERS ?? os.availableParallelism?.() ?? os.cpus().length);

// Each child accepts on the shared socket itself, instead of the primary
// accepting and passing connections round-robin: connections the primary had
// accepted but not yet handed over would be dropped when the last child
// closes during a drain.
cluster.schedulingPolicy = cluster.SCHED_NONE;

if (cluster.isPrimary) {
  // Ready means `size` children listening at the same moment: a child that
  // listened and then died no longer counts, and its replacement does not
  // count twice. READY=1 goes out once, and never once draining.
  const listening = new Set();
  let ready = false;
  let draining = false;
  const fork = () => cluster.fork({ NOTIFY_SOCKET: '' });
  for (let i = 0; i < size; i++) fork();

  cluster.on('listening', (worker) => {
    listening.add(worker.id);
    if (listening.size === size && !ready && !draining) {
      ready = true;
      notifyReady().catch((err) => {
        console.error(err.message);
        process.exit(1);
      });
    }
  });
  cluster.on('exit', (worker, code, signal) => {
    const wasListening = listening.delete(worker.id);
    const why = `cluster child ${worker.process.pid} died (${signal ?? code})`;
    if (draining) {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
    } else if (wasListening && listening.size === 0) {
      // Node closes the primary's handle on the shared socket along with
      // the last child listening on it, so no new child could listen:
      // exit, and containerflip starts the generation again (connections
      // wait in the socket's backlog meanwhile).
      console.error(`${why} and no child listens any more; exiting`);
      process.exit(1);
    } else {
      console.error(`${why}; forking a new one`);
      fork();
    }
  });
  process.on('SIGTERM', () => {
    if (draining) return;
    draining = true;
    const children = Object.values(cluster.workers);
    if (children.length === 0) process.exit(0);
    for (const w of children) w.process.kill('SIGTERM');
  });
} else {
  // A child's listen({ fd: 3 }) is carried out by the primary, on the
  // descriptor the primary inherited from containerflip.
  const server = http.createServer((req, res) => {
    res.setHeader('X-Containerflip-Generation', generation);
    res.setHeader('Content-Type', 'text/plain');
    res.end(`hello from generation ${generation}, pid ${process.pid}, cluster child ${cluster.worker.id}\n`);
  });
  await serve(server, { notify: false });
}
