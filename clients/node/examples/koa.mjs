// Koa worker: hand app.callback() to a server you create.
//   containerflip run --notify-mode stream --listen :8080 -- node examples/koa.mjs
import http from 'node:http';
import Koa from 'koa';
import { serve } from '@gigacodes/containerflip';

const generation = process.env.CONTAINERFLIP_GENERATION ?? 'standalone';

const app = new Koa();
app.use(async (ctx) => {
  ctx.set('X-Containerflip-Generation', generation);
  ctx.type = 'text/plain';
  ctx.body = `hello from generation ${generation}, pid ${process.pid}, koa\n`;
});

const server = http.createServer(app.callback());
await serve(server);
