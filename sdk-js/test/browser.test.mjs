// The client in a browser, as far as it looks at one: document.visibilityState,
// the window's addEventListener, navigator.sendBeacon, all stubbed on
// globalThis before a client is made (each test file runs in a process of its
// own). What is queued when the page is hidden or goes away leaves as beacons;
// no collector is needed, nothing is fetched.
import assert from "node:assert/strict";
import { test } from "node:test";

import { UsertrailClient } from "../dist/index.js";

const listeners = new Map(); // type -> Set of listeners
const beacons = [];
globalThis.document = { visibilityState: "visible" };
globalThis.addEventListener = (type, listener) => {
  if (!listeners.has(type)) listeners.set(type, new Set());
  listeners.get(type).add(listener);
};
globalThis.removeEventListener = (type, listener) => listeners.get(type)?.delete(listener);
// Node 21+ has a navigator of its own: replaced, not assigned to
Object.defineProperty(globalThis, "navigator", {
  configurable: true,
  writable: true,
  value: {
    sendBeacon(url, body) {
      beacons.push({ url, events: JSON.parse(body), bytes: Buffer.byteLength(body, "utf8") });
      return true;
    },
  },
});

function dispatch(type) {
  for (const listener of [...(listeners.get(type) ?? [])]) listener({ type });
}

function browserClient(fetched) {
  return new UsertrailClient({
    endpoint: "https://collect.example.com/",
    key: "ut_web_secret",
    batchSize: 50,
    flushIntervalMs: 60_000, // nothing leaves by itself during the test
    fetch: async (...args) => {
      fetched.push(args);
      throw new Error("a beacon was expected, not a fetch");
    },
  });
}

function track(client, n, user) {
  const ids = [];
  for (let i = 0; i < n; i++) {
    ids.push(client.trackInteraction({ userId: `${user}-${i % 3}`, type: "reading", service: "tarot" }));
  }
  return ids;
}

test("a hidden page sends what is queued with navigator.sendBeacon", async () => {
  beacons.length = 0;
  const fetched = [];
  const client = browserClient(fetched);
  assert.equal(listeners.get("visibilitychange")?.size, 1);
  assert.equal(listeners.get("pagehide")?.size, 1);
  const ids = track(client, 30, "tab");
  document.visibilityState = "visible";
  dispatch("visibilitychange"); // back to the tab: nothing to do
  assert.equal(beacons.length, 0);
  assert.equal(client.pending, 30);

  document.visibilityState = "hidden";
  dispatch("visibilitychange");
  assert.equal(beacons.length, 1);
  assert.equal(beacons[0].url, "https://collect.example.com/v1/events?key=ut_web_secret");
  assert.deepEqual(beacons[0].events.map((e) => e.eventId), ids);
  assert.ok(beacons[0].events.every((e) => e.kind === "interaction" && e.occurredAt));
  assert.equal(client.pending, 0);

  // tracked while hidden, then the page goes away: the rest, once
  const more = track(client, 5, "leaving");
  dispatch("pagehide");
  dispatch("pagehide");
  assert.equal(beacons.length, 2);
  assert.deepEqual(beacons[1].events.map((e) => e.eventId), more);
  assert.deepEqual(await client.close(), { accepted: 0, rejected: 0 });
  assert.equal(listeners.get("visibilitychange").size, 0);
  assert.equal(listeners.get("pagehide").size, 0);
  assert.equal(fetched.length, 0);
});

test("pagehide sends the queue even while the page still reads visible", async () => {
  // the HTML spec fires pagehide before the document turns hidden, and
  // older Safari fired no visibilitychange at all when a page was left
  beacons.length = 0;
  document.visibilityState = "visible";
  const fetched = [];
  const client = browserClient(fetched);
  const ids = track(client, 3, "safari");
  dispatch("pagehide");
  assert.equal(beacons.length, 1);
  assert.deepEqual(beacons[0].events.map((e) => e.eventId), ids);
  assert.equal(client.pending, 0);
  await client.close();
  assert.equal(fetched.length, 0);
});

test("a beacon stays under the browsers' cap in bytes, whatever the script", async () => {
  beacons.length = 0;
  const fetched = [];
  const client = browserClient(fetched);
  // Korean text: three UTF-8 bytes a character, so 40 events of 600
  // characters (fewer than a batch) are about 30,000 characters but over
  // 72,000 bytes
  const ids = [];
  for (let i = 0; i < 40; i++) {
    ids.push(
      client.trackInteraction({
        userId: `reader-${i}`,
        type: "reading",
        service: "saju",
        metadata: { note: "사주팔자".repeat(150) },
      }),
    );
  }
  document.visibilityState = "hidden";
  dispatch("visibilitychange");
  assert.ok(beacons.length >= 2, `${beacons.length} beacon(s)`);
  assert.ok(beacons.every((b) => b.bytes <= 60_000), beacons.map((b) => b.bytes).join(", "));
  assert.deepEqual(beacons.flatMap((b) => b.events.map((e) => e.eventId)), ids);
  assert.equal(client.pending, 0);
  document.visibilityState = "visible";
  await client.close();
  assert.equal(fetched.length, 0);
});

test("a batch waiting between two tries leaves with the beacon, first", async () => {
  beacons.length = 0;
  const fetched = [];
  const client = new UsertrailClient({
    endpoint: "https://collect.example.com",
    key: "ut_web_secret",
    batchSize: 20,
    flushIntervalMs: 60_000,
    retryDelayMs: 1000,
    maxRetryDelayMs: 1000,
    fetch: async (...args) => {
      fetched.push(args);
      throw new Error("offline");
    },
  });
  const first = track(client, 20, "retried"); // a whole batch: fetched at once, and fails
  while (fetched.length === 0) await new Promise((r) => setTimeout(r, 5));
  await new Promise((r) => setTimeout(r, 20)); // it now waits for its next try
  const later = track(client, 5, "queued");
  document.visibilityState = "hidden";
  dispatch("visibilitychange");
  // in beacons of a batch each, the waiting batch first
  assert.deepEqual(beacons.map((b) => b.events.length), [20, 5]);
  assert.deepEqual(beacons.flatMap((b) => b.events.map((e) => e.eventId)), [...first, ...later]);
  assert.equal(client.pending, 0);
  document.visibilityState = "visible";
  await client.close(); // the retry stood down: nothing is fetched again
  assert.equal(fetched.length, 1);
});
