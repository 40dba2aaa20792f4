// usertrail's client for browsers and Node: events go to the usertrail
// collector (`usertrail collector`, POST /v1/events) in batches. Each event
// gets its eventId (a UUIDv7) and occurredAt when it is tracked, so a batch
// sent twice (a retry after a lost answer) is counted once downstream.
// Batches that meet a network error, 429, 503 or another 5xx are retried with
// backoff (Retry-After when the collector gives one), maxRetries times in a
// row at most: then the batch is dropped and reported to onError, so flush()
// and close() resolve while the collector is down. An event the collector
// refuses is reported to onRejected with its field errors, never retried.
// In a browser, what is still queued when the page is hidden or left goes
// out with navigator.sendBeacon, which outlives the page.

import type { FieldsByKind, Kind } from "./events.js";

export * from "./events.js";

export interface Rejection {
  event: Record<string, unknown>;
  errors: Array<{ field: string; message: string }>;
}

export interface ClientOptions {
  /** the collector's base URL, e.g. https://collect.example.com */
  endpoint: string;
  /** an API key from `usertrail keys create --source APP` */
  key: string;
  /** events per request, at most (the collector's --max-events: 1000 by default) */
  batchSize?: number;
  /** how long an event waits for others before its batch is sent */
  flushIntervalMs?: number;
  /** events held at most; past it, the oldest are dropped and reported to onError */
  maxQueue?: number;
  /** first retry delay; doubles each time up to maxRetryDelayMs */
  retryDelayMs?: number;
  /** the longest wait between two tries, Retry-After included (default 30 s) */
  maxRetryDelayMs?: number;
  /**
   * failed tries in a row (network error, 429, 5xx) the client retries; the
   * next failure drops the batch and reports a DroppedBatchError to onError.
   * Counted across batches until the collector takes one: while it stays
   * down, the batches queued behind are tried once each. Default 10, about
   * 2.5 minutes with the default delays; Infinity retries for ever (flush()
   * and close() then wait for the collector).
   */
  maxRetries?: number;
  /** events the collector refused (invalid): what and why */
  onRejected?: (rejected: Rejection[]) => void;
  /**
   * a batch given up on (401, 413, ..., or maxRetries failures in a row: a
   * DroppedBatchError, with its events) or events dropped from a full queue
   */
  onError?: (error: Error) => void;
  /** send what is queued with sendBeacon when the page is hidden (browsers) */
  beaconOnHide?: boolean;
  /** the fetch to use (default: the global one) */
  fetch?: typeof fetch;
  /** the beacon to use (default: navigator.sendBeacon where there is one) */
  sendBeacon?: (url: string, body: string) => boolean;
}

export interface FlushReport {
  accepted: number;
  rejected: number;
}

/** A batch the client gave up on (reported to onError): its events were not sent. */
export class DroppedBatchError extends Error {
  readonly events: Array<Record<string, unknown>>;

  constructor(message: string, events: Array<Record<string, unknown>>) {
    super(message);
    this.name = "DroppedBatchError";
    this.events = events;
  }
}

/** The collector refused the batch as a whole (401, 413, ...): not retried. */
class Permanent extends DroppedBatchError {}

const BEACON_MAX_BYTES = 60_000; // browsers cap a beacon near 64 KiB
const UTF8 = new TextEncoder();

/** A body's size as sent (UTF-8 bytes, not UTF-16 code units). */
function byteLength(body: string): number {
  return UTF8.encode(body).length;
}

/** A UUIDv7: 48 bits of Unix milliseconds, then random bits (RFC 9562). */
export function uuid7(now: number = Date.now()): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  let ms = now;
  for (let i = 5; i >= 0; i--) {
    bytes[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  bytes[6] = 0x70 | (bytes[6] & 0x0f);
  bytes[8] = 0x80 | (bytes[8] & 0x3f);
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class UsertrailClient {
  private readonly endpoint: string;
  private readonly key: string;
  private readonly batchSize: number;
  private readonly flushIntervalMs: number;
  private readonly maxQueue: number;
  private readonly retryDelayMs: number;
  private readonly maxRetryDelayMs: number;
  private readonly maxRetries: number;
  private readonly options: ClientOptions;
  private queue: Array<Record<string, unknown>> = [];
  private inFlight = 0;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private sending: Promise<void> | undefined;
  private closed = false;
  private accepted = 0;
  private rejected = 0;
  private failuresInARow = 0; // tries the collector did not answer, since it last did
  // a batch waiting to be tried again, which a beacon may take over
  private retrying: Array<Record<string, unknown>> | undefined;
  // pagehide: the page is going away (it may still read visible, and older
  // Safari fires no visibilitychange then);
  // visibilitychange: only to hidden (a tab in the background may never return)
  private readonly onHide = (event?: Event): void => {
    if (
      event?.type === "pagehide" ||
      typeof document === "undefined" ||
      document.visibilityState === "hidden"
    ) {
      this.beacon();
    }
  };

  constructor(options: ClientOptions) {
    if (!options.endpoint) throw new Error("usertrail: endpoint is required");
    if (!options.key) throw new Error("usertrail: key is required");
    this.options = options;
    this.endpoint = options.endpoint.replace(/\/+$/, "");
    this.key = options.key;
    this.batchSize = options.batchSize ?? 100;
    this.flushIntervalMs = options.flushIntervalMs ?? 1000;
    this.maxQueue = options.maxQueue ?? 10_000;
    this.retryDelayMs = options.retryDelayMs ?? 500;
    this.maxRetryDelayMs = options.maxRetryDelayMs ?? 30_000;
    this.maxRetries = options.maxRetries ?? 10;
    if (!(this.maxRetries >= 0)) throw new Error("usertrail: maxRetries must be 0 or more");
    if ((options.beaconOnHide ?? true) && typeof addEventListener === "function" && typeof document !== "undefined") {
      addEventListener("visibilitychange", this.onHide);
      addEventListener("pagehide", this.onHide);
    }
  }

  /** Queue an event; returns its eventId at once. */
  track<K extends Kind>(kind: K, fields: FieldsByKind[K]): string {
    if (this.closed) throw new Error("usertrail: the client is closed");
    const event: Record<string, unknown> = {
      ...fields,
      kind,
      eventId: fields.eventId ?? uuid7(),
      occurredAt: fields.occurredAt ?? new Date().toISOString(),
    };
    this.queue.push(event);
    if (this.queue.length > this.maxQueue) {
      const dropped = this.queue.splice(0, this.queue.length - this.maxQueue);
      this.options.onError?.(new Error(`usertrail: queue full, ${dropped.length} oldest events dropped`));
    }
    if (this.queue.length >= this.batchSize) {
      this.kick();
    } else if (this.timer === undefined) {
      this.timer = setTimeout(() => this.kick(), this.flushIntervalMs);
    }
    return event.eventId as string;
  }

  trackInteraction(fields: FieldsByKind["interaction"]): string {
    return this.track("interaction", fields);
  }

  trackPreferences(fields: FieldsByKind["preferences.updated"]): string {
    return this.track("preferences.updated", fields);
  }

  trackOnboarding(fields: FieldsByKind["onboarding.completed"]): string {
    return this.track("onboarding.completed", fields);
  }

  eraseUser(fields: FieldsByKind["user.erased"]): string {
    return this.track("user.erased", fields);
  }

  /** Events not yet answered for: queued, or in a request. */
  get pending(): number {
    return this.queue.length + this.inFlight;
  }

  /** Send everything queued; resolves with what was accepted and rejected since the last flush. */
  async flush(): Promise<FlushReport> {
    while (this.queue.length > 0 || this.sending !== undefined) {
      this.kick();
      await this.sending;
    }
    const report = { accepted: this.accepted, rejected: this.rejected };
    this.accepted = this.rejected = 0;
    return report;
  }

  /** Flush, then refuse new events. */
  async close(): Promise<FlushReport> {
    const report = await this.flush();
    this.closed = true;
    if (this.timer !== undefined) {
      clearTimeout(this.timer); // nothing left to send: no timer keeps Node running
      this.timer = undefined;
    }
    if (typeof removeEventListener === "function") {
      removeEventListener("visibilitychange", this.onHide);
      removeEventListener("pagehide", this.onHide);
    }
    return report;
  }

  /** Send what is queued with sendBeacon (the page is going away). */
  beacon(): boolean {
    const send =
      this.options.sendBeacon ??
      (typeof navigator !== "undefined" && typeof navigator.sendBeacon === "function"
        ? (url: string, body: string) => navigator.sendBeacon(url, body)
        : undefined);
    if (this.retrying !== undefined) {
      // a batch between two tries would die with the page: it leaves now,
      // first, and its retry stands down (deliver)
      this.queue.unshift(...this.retrying);
      this.inFlight = 0;
      this.retrying = undefined;
    }
    if (send === undefined || this.queue.length === 0) return false;
    const url = `${this.endpoint}/v1/events?key=${encodeURIComponent(this.key)}`;
    let all = true;
    while (this.queue.length > 0) {
      let n = Math.min(this.queue.length, this.batchSize);
      let body = JSON.stringify(this.queue.slice(0, n));
      while (byteLength(body) > BEACON_MAX_BYTES && n > 1) {
        n = Math.ceil(n / 2);
        body = JSON.stringify(this.queue.slice(0, n));
      }
      if (!send(url, body)) {
        all = false; // the browser refused it: left queued for fetch
        break;
      }
      this.queue.splice(0, n);
    }
    return all;
  }

  private kick(): void {
    if (this.timer !== undefined) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    if (this.sending === undefined && this.queue.length > 0) {
      this.sending = this.drain().finally(() => {
        this.sending = undefined;
        if (this.queue.length > 0 && this.timer === undefined) {
          this.timer = setTimeout(() => this.kick(), this.flushIntervalMs);
        }
      });
    }
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      // out of the queue before it is sent: a beacon (page hidden meanwhile)
      // sends only what no request carries
      const batch = this.queue.splice(0, this.batchSize);
      this.inFlight = batch.length;
      try {
        await this.deliver(batch);
      } catch (error) {
        this.options.onError?.(error as Error);
      } finally {
        this.inFlight = 0;
      }
    }
  }

  private async deliver(batch: Array<Record<string, unknown>>): Promise<void> {
    const doFetch = this.options.fetch ?? globalThis.fetch;
    let delay = this.retryDelayMs;
    const body = JSON.stringify(batch);
    for (let tries = 1; ; tries++) {
      let wait = delay;
      let failure: string;
      try {
        const response = await doFetch(`${this.endpoint}/v1/events`, {
          method: "POST",
          headers: { "Content-Type": "application/json", Authorization: `Bearer ${this.key}` },
          body,
          // a request small enough outlives the page, as a beacon does
          keepalive: byteLength(body) <= BEACON_MAX_BYTES,
        });
        const answer = (await response.json().catch(() => ({}))) as Record<string, any>;
        if (response.status === 202) {
          this.failuresInARow = 0;
          this.settle(batch, answer);
          return;
        }
        const message = answer?.error?.message ?? response.statusText;
        if (response.status !== 429 && response.status < 500) {
          this.failuresInARow = 0; // it answered: up, but this batch is refused
          throw new Permanent(
            `usertrail: the collector refused a batch of ${batch.length}: ${response.status} ${message}`,
            batch,
          );
        }
        failure = `${response.status} ${message}`;
        // at least what it asks for (Retry-After), up to maxRetryDelayMs
        const after = Number(response.headers.get("Retry-After"));
        if (after > 0) wait = Math.max(wait, after * 1000);
      } catch (error) {
        if (error instanceof Permanent) throw error;
        // a network error: the collector may have taken the batch; the
        // retry carries the same eventIds, counted once downstream
        failure = `network error: ${(error as Error)?.message ?? String(error)}`;
      }
      this.failuresInARow += 1;
      if (this.failuresInARow > this.maxRetries) {
        throw new DroppedBatchError(
          `usertrail: dropped a batch of ${batch.length} events after ${tries} tries ` +
            `(${this.failuresInARow} failures in a row; the last: ${failure})`,
          batch,
        );
      }
      this.retrying = batch;
      await sleep(Math.min(wait, this.maxRetryDelayMs));
      if (this.retrying !== batch) return; // taken over by a beacon (or queued again)
      this.retrying = undefined;
      delay = Math.min(delay * 2, this.maxRetryDelayMs);
    }
  }

  private settle(batch: Array<Record<string, unknown>>, body: Record<string, any>): void {
    const results: Array<Record<string, any>> = Array.isArray(body.results) ? body.results : [];
    const rejections: Rejection[] = [];
    results.forEach((result, i) => {
      if (result.status === "rejected") rejections.push({ event: batch[i], errors: result.errors ?? [] });
    });
    this.accepted += batch.length - rejections.length;
    this.rejected += rejections.length;
    if (rejections.length > 0) this.options.onRejected?.(rejections);
  }
}
