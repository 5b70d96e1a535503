// Express worker: build the http.Server yourself instead of app.listen().
//   containerflip run --notify-mode stream --listen :8080 -- node examples/express.mjs
import http from 'node:http';
import express from 'express';
import { serve } from '@gigacodes/containerflip';

const generation = process.env.CONTAINERFLIP_GENERATION ?? 'standalone';

const app = express();
app.get('/', (req, res) => {
  res.set('X-Containerflip-Generation', generation);
  res.type('text/plain').send(`hello from generation ${generation}, pid ${process.pid}, express\n`);
});

const server = http.createServer(app);
await serve(server);
