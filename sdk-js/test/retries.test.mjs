// Retries end: a batch the collector does not take after maxRetries failures
// in a row (network errors, 429, 5xx) is dropped and reported to onError with
// its events, so flush() and close() resolve while the collector is down.
// Against real sockets: a port nothing listens on, and a local HTTP server.
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { test } from "node:test";

import { DroppedBatchError, UsertrailClient } from "../dist/index.js";

function listen(server) {
  return new Promise((resolve) => server.listen(0, "127.0.0.1", () => resolve(server.address().port)));
}

function track(client, n) {
  const ids = [];
  for (let i = 0; i < n; i++) ids.push(client.trackInteraction({ userId: `u${i}`, type: "chat", service: "saju" }));
  return ids;
}

test("a collector that stays down: each batch is dropped and reported, flush and close resolve", async () => {
  const closed = createServer();
  const port = await listen(closed);
  await new Promise((resolve) => closed.close(resolve)); // nothing listens there now
  let tries = 0;
  const errors = [];
  const client = new UsertrailClient({
    endpoint: `http://127.0.0.1:${port}`,
    key: "ut_k_s",
    retryDelayMs: 5,
    maxRetries: 3,
    flushIntervalMs: 10,
    fetch: (...args) => {
      tries += 1;
      return fetch(...args);
    },
    onError: (error) => errors.push(error),
  });
  const ids = track(client, 2);
  assert.deepEqual(await client.flush(), { accepted: 0, rejected: 0 });
  assert.equal(tries, 4); // the first try and 3 retries
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof DroppedBatchError);
  assert.match(errors[0].message, /dropped a batch of 2 events after 4 tries.*network error/);
  assert.deepEqual(errors[0].events.map((e) => e.eventId), ids);
  assert.equal(client.pending, 0);
  // still down: the batches behind it are tried once each
  const more = track(client, 1);
  assert.deepEqual(await client.close(), { accepted: 0, rejected: 0 });
  assert.equal(tries, 5);
  assert.equal(errors.length, 2);
  assert.deepEqual(errors[1].events.map((e) => e.eventId), more);
});

test("the count starts over once the collector takes a batch; 503s count, Retry-After is capped", { timeout: 60_000 }, async () => {
  const bodies = [];
  let down = 2; // 503s before it takes one
  const server = createServer((req, res) => {
    let data = "";
    req.on("data", (chunk) => (data += chunk));
    req.on("end", () => {
      const batch = JSON.parse(data);
      bodies.push(batch);
      if (down > 0) {
        down -= 1;
        // an hour: capped by maxRetryDelayMs, or flush() would wait that long
        res
          .writeHead(503, { "Content-Type": "application/json", "Retry-After": "3600" })
          .end('{"error":{"code":"stopping","message":"the collector is shutting down"}}');
        return;
      }
      const results = batch.map((e) => ({ status: "accepted", eventId: e.eventId }));
      res.writeHead(202, { "Content-Type": "application/json" }).end(JSON.stringify({ accepted: results.length, rejected: 0, results }));
    });
  });
  const port = await listen(server);
  try {
    const errors = [];
    const client = new UsertrailClient({
      endpoint: `http://127.0.0.1:${port}`,
      key: "ut_k_s",
      retryDelayMs: 5,
      maxRetryDelayMs: 20,
      maxRetries: 2,
      flushIntervalMs: 10,
      onError: (error) => errors.push(error),
    });
    track(client, 2);
    // two 503s, then taken: 2 failures in a row is within maxRetries
    assert.deepEqual(await client.flush(), { accepted: 2, rejected: 0 });
    assert.equal(bodies.length, 3);
    assert.equal(errors.length, 0);
    // the next outage has its own count: 3 tries, then dropped
    down = Infinity;
    const ids = track(client, 3);
    assert.deepEqual(await client.close(), { accepted: 0, rejected: 0 });
    assert.equal(bodies.length, 6);
    assert.deepEqual(bodies[5], bodies[3]); // every retry the same events
    assert.equal(errors.length, 1);
    assert.match(errors[0].message, /after 3 tries.*503 the collector is shutting down/);
    assert.deepEqual(errors[0].events.map((e) => e.eventId), ids);
  } finally {
    server.close();
  }
});
