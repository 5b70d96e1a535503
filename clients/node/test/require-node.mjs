// `make test-node` runs this first: the tests need Node >= 20.11 (node
// --test --test-timeout, Fastify 5), while the helper itself runs on >= 18.2.
// Debian 12's own nodejs is 18, so say that plainly instead of failing on a
// "bad option".
const [major, minor] = process.versions.node.split('.').map(Number);
if (major < 20 || (major === 20 && minor < 11)) {
  console.error(`make test-node: Node ${process.version} is too old for the tests (they need >= 20.11); the helper itself runs on >= 18.2`);
  process.exit(1);
}
