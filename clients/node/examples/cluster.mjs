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
  let listening = 0;
  let draining = false;
  const fork = () => cluster.fork({ NOTIFY_SOCKET: '' });
  for (let i = 0; i < size; i++) fork();

  cluster.on('listening', () => {
    listening += 1;
    if (listening === size) {
      notifyReady().catch((err) => {
        console.error(err.message);
        process.exit(1);
      });
    }
  });
  cluster.on('exit', (worker, code, signal) => {
    if (!draining) {
      console.error(`cluster child ${worker.process.pid} died (${signal ?? code}); forking a new one`);
      fork();
    } else if (Object.keys(cluster.workers).length === 0) {
      process.exit(0);
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
  // listen({ fd: 3 }) in a cluster child is resolved by the primary against
  // its own fd 3, the socket containerflip passed in.
  const server = http.createServer((req, res) => {
    res.setHeader('X-Containerflip-Generation', generation);
    res.setHeader('Content-Type', 'text/plain');
    res.end(`hello from generation ${generation}, pid ${process.pid}, cluster child ${cluster.worker.id}\n`);
  });
  await serve(server, { notify: false });
}
