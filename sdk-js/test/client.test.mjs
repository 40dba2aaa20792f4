// The client against a running collector (tests/test_sdk_js.py starts one
// on a real broker and passes its URL and a key): what the collector accepts
// is written to USERTRAIL_SDK_JS_OUT, and the Python side checks that every
// one of those events is in the events topic.
import assert from "node:assert/strict";
import { appendFileSync } from "node:fs";
import { createServer } from "node:http";
import { test } from "node:test";

import { UsertrailClient, uuid7 } from "../dist/index.js";

const endpoint = process.env.USERTRAIL_COLLECTOR_URL;
const key = process.env.USERTRAIL_COLLECTOR_KEY;
const out = process.env.USERTRAIL_SDK_JS_OUT;
assert.ok(endpoint && key && out, "run by tests/test_sdk_js.py, which starts a collector");

function record(ids) {
  appendFileSync(out, ids.map((id) => `${id}\n`).join(""));
}

test("uuid7 is a lower-case UUIDv7 that sorts by time", () => {
  const pattern = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
  const a = uuid7(1_700_000_000_000);
  const b = uuid7(1_700_000_000_001);
  assert.match(a, pattern);
  assert.ok(a < b);
});

test("batches reach the collector, every event accepted once", async () => {
  const client = new UsertrailClient({ endpoint, key, batchSize: 100, flushIntervalMs: 50 });
  const ids = [];
  for (let i = 0; i < 250; i++) {
    ids.push(
      client.trackInteraction({
        userId: `js-user-${i % 9}`,
        type: ["reading", "chat", "feedback"][i % 3],
        service: "tarot",
        rating: 1 + (i % 5),
        metadata: { i },
      }),
    );
  }
  ids.push(client.trackPreferences({ userId: "js-user-1", preferredThemes: ["love"] }));
  const report = await client.close();
  assert.deepEqual(report, { accepted: 251, rejected: 0 });
  assert.equal(new Set(ids).size, 251);
  record(ids);
});

test("an invalid event is reported with its field, the rest accepted", async () => {
  const rejected = [];
  const client = new UsertrailClient({
    endpoint,
    key,
    flushIntervalMs: 10,
    onRejected: (r) => rejected.push(...r),
  });
  const good = client.trackInteraction({ userId: "js-user-x", type: "chat", service: "saju" });
  client.trackInteraction({ userId: "js-user-x", type: "dance", service: "saju" });
  const report = await client.flush();
  assert.deepEqual(report, { accepted: 1, rejected: 1 });
  assert.equal(rejected.length, 1);
  assert.equal(rejected[0].errors[0].field, "type");
  assert.equal(rejected[0].event.type, "dance");
  record([good]);
});

test("on page hide the queue goes out as beacons the collector takes", async () => {
  const sent = [];
  // a browser's sendBeacon: a text/plain POST the page does not wait for
  const sendBeacon = (url, body) => {
    sent.push(fetch(url, { method: "POST", body, headers: { "Content-Type": "text/plain;charset=UTF-8" } }));
    return true;
  };
  const client = new UsertrailClient({ endpoint, key, batchSize: 40, flushIntervalMs: 60_000, sendBeacon });
  const ids = [];
  for (let i = 0; i < 100; i++) {
    ids.push(client.trackInteraction({ userId: `beacon-${i % 4}`, type: "reading", service: "saju" }));
  }
  // the first 40 filled a batch: a request carries them already
  assert.equal(client.pending, 100);
  assert.equal(client.beacon(), true);
  assert.equal(client.pending, 40);
  assert.deepEqual(await client.flush(), { accepted: 40, rejected: 0 }); // that request
  const responses = await Promise.all(sent);
  assert.equal(responses.length, 2); // 40 + 20: nothing twice
  let accepted = 0;
  for (const response of responses) {
    assert.equal(response.status, 202);
    accepted += (await response.json()).accepted;
  }
  assert.equal(accepted, 60);
  await client.close();
  record(ids);
});

test("a refused key is an error, not a retry loop", async () => {
  const errors = [];
  const client = new UsertrailClient({
    endpoint,
    key: "ut_nope_nope",
    flushIntervalMs: 10,
    onError: (e) => errors.push(e),
  });
  client.trackInteraction({ userId: "u", type: "chat", service: "saju" });
  await client.flush();
  assert.equal(errors.length, 1);
  assert.match(errors[0].message, /401/);
  assert.equal(client.pending, 0);
});

test("503 and 429 are retried with the same event ids until accepted", async () => {
  const bodies = [];
  const server = createServer((req, res) => {
    let data = "";
    req.on("data", (chunk) => (data += chunk));
    req.on("end", () => {
      bodies.push(JSON.parse(data));
      const n = bodies.length;
      if (n === 1) {
        res.writeHead(503, { "Content-Type": "application/json" }).end('{"error":{"code":"stopping","message":"x"}}');
      } else if (n === 2) {
        res
          .writeHead(429, { "Content-Type": "application/json", "Retry-After": "1" })
          .end('{"error":{"code":"buffer_full","message":"x"}}');
      } else {
        const results = bodies[n - 1].map((e) => ({ status: "accepted", eventId: e.eventId }));
        res.writeHead(202, { "Content-Type": "application/json" }).end(JSON.stringify({ accepted: results.length, rejected: 0, results }));
      }
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  try {
    const { port } = server.address();
    const client = new UsertrailClient({ endpoint: `http://127.0.0.1:${port}`, key, retryDelayMs: 20, flushIntervalMs: 10 });
    client.trackInteraction({ userId: "u", type: "chat", service: "saju" });
    client.trackInteraction({ userId: "u", type: "share", service: "saju" });
    const started = Date.now();
    const report = await client.close();
    assert.deepEqual(report, { accepted: 2, rejected: 0 });
    assert.equal(bodies.length, 3);
    assert.deepEqual(bodies[2], bodies[0]); // the same events, ids and times: counted once
    assert.ok(Date.now() - started >= 1000, "Retry-After was not honoured");
  } finally {
    server.close();
  }
});
