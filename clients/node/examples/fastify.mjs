// Fastify worker. Fastify insists on calling listen() itself, so use the
// primitives: drain machinery first, then listen on fd 3, then READY=1.
//   containerflip run --notify-mode stream --listen :8080 -- node examples/fastify.mjs
import Fastify from 'fastify';
import { fdMode, gracefulDrain, notifyReady } from '@gigacodes/containerflip';

const generation = process.env.CONTAINERFLIP_GENERATION ?? 'standalone';

const fastify = Fastify();
fastify.get('/', async (request, reply) => {
  reply.header('X-Containerflip-Generation', generation).type('text/plain');
  return `hello from generation ${generation}, pid ${process.pid}, fastify\n`;
});

gracefulDrain(fastify.server); // SIGTERM: stop accepting, Connection: close, exit 0
await fastify.listen(fdMode() ? { fd: 3 } : { port: Number(process.env.PORT ?? 0) });
await notifyReady(); // only now: we are accepting on the socket
