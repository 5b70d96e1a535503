// Plain node:http worker.
//   containerflip run --notify-mode stream --listen :8080 -- node examples/http.mjs
// Standalone (no supervisor): PORT=8080 node examples/http.mjs
import http from 'node:http';
import { serve } from '@gigacodes/containerflip';

const generation = process.env.CONTAINERFLIP_GENERATION ?? 'standalone';

const server = http.createServer((req, res) => {
  res.setHeader('X-Containerflip-Generation', generation);
  res.setHeader('Content-Type', 'text/plain');
  res.end(`hello from generation ${generation}, pid ${process.pid}, plain http\n`);
});

await serve(server); // attach (fd 3 or PORT), then READY=1, drain on SIGTERM
