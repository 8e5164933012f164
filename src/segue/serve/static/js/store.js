// The jobs the page knows: their latest state from the API, kept live by Server-Sent Events, and what the page
// itself submitted (so "again" can send the same keyframes). Views subscribe to a job and redraw on change.

import { ApiError, call, readEvents } from "./api.js";
import { newSeed } from "./fields.js";
import * as saved from "./inputs.js";

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const MAX_STREAMS = 3; // a browser opens ~6 connections per host: leave room for everything else
const POLL_MS = 2000;

const jobs = new Map(); // id -> job (the API's object)
const inputs = new Map(); // id -> { fields: {name: string}, files: {name: File} } of jobs sent from this page
let savedIds = new Set(); // ids whose inputs this browser kept from earlier visits
const listeners = new Map(); // id -> Set of fn(job)
const anyListeners = new Set(); // fn(job) for every change
const submitListeners = new Set(); // fn(job) for every job this page submits
const streams = new Map(); // id -> AbortController
const resting = new Map(); // id -> time before which its events are not asked for again (the stream kept failing)
let pollTimer = null;
let polling = false;

// Before the first list: which jobs this browser can send again.
export async function init() {
  savedIds = await saved.ids();
}

export function get(id) {
  return jobs.get(id);
}

export function subscribe(id, fn) {
  if (!listeners.has(id)) listeners.set(id, new Set());
  listeners.get(id).add(fn);
  return () => listeners.get(id)?.delete(fn);
}

export function onAnyChange(fn) {
  anyListeners.add(fn);
}

export function onSubmitted(fn) {
  submitListeners.add(fn);
}

// Records a job (from a list, a submission or an event) and tells its views.
export function put(job) {
  const known = jobs.get(job.id);
  const merged = known ? { ...known, ...job } : job;
  jobs.set(job.id, merged);
  for (const fn of listeners.get(job.id) || []) fn(merged);
  for (const fn of anyListeners) fn(merged);
  track();
  return merged;
}

function forget(id) {
  jobs.delete(id);
  inputs.delete(id);
  savedIds.delete(id);
  saved.drop(id);
  streams.get(id)?.abort();
  streams.delete(id);
  for (const fn of listeners.get(id) || []) fn(null);
  for (const fn of anyListeners) fn({ id, deleted: true });
  listeners.delete(id);
}

// Submits a job: fields (strings) and files as multipart form data. Resolves to the new job.
export async function submit(fields, files) {
  const body = new FormData();
  for (const [name, value] of Object.entries(fields)) body.append(name, value);
  for (const [name, file] of Object.entries(files)) body.append(name, file, file.name);
  const job = await call("POST", "/v1/videos", { body });
  inputs.set(job.id, { fields: { ...fields }, files: { ...files } });
  saved.save(job.id, fields, files).then(() => savedIds.add(job.id));
  const known = put(job);
  for (const fn of submitListeners) fn(known);
  return known;
}

export function canRepeat(id) {
  return inputs.has(id) || savedIds.has(id);
}

// The same request again, with a new seed when asked (a story's seed is in its settings).
export async function repeat(id, { reseed = false } = {}) {
  const sent = inputs.get(id) || (await saved.load(id));
  if (!sent) throw new ApiError(0, "this job was sent from another browser: its keyframes are not here to send again");
  const fields = { ...sent.fields };
  if (reseed) {
    const seed = newSeed();
    if (fields.story) {
      const story = JSON.parse(fields.story);
      story.settings = { ...(story.settings || {}), seed };
      fields.story = JSON.stringify(story);
    } else {
      fields.seed = String(seed);
    }
  }
  return submit(fields, sent.files);
}

export async function cancel(id) {
  return put(await call("POST", `/v1/videos/${encodeURIComponent(id)}/cancel`));
}

export async function remove(id) {
  await call("DELETE", `/v1/videos/${encodeURIComponent(id)}`);
  forget(id);
}

export async function refresh(id) {
  return put(await call("GET", `/v1/videos/${encodeURIComponent(id)}`));
}

// One page of the job list, newest first.
export async function list({ status = "", limit = 20, after = "" } = {}) {
  const q = new URLSearchParams({ limit: String(limit) });
  if (status) q.set("status", status);
  if (after) q.set("after", after);
  const page = await call("GET", `/v1/videos?${q}`);
  page.data = page.data.map(put);
  return page;
}

// Keeps unfinished jobs live: events for the running ones first (up to MAX_STREAMS), polling for the rest.
function track() {
  const live = [...jobs.values()].filter((j) => !TERMINAL.has(j.status));
  live.sort((a, b) => (a.status === "in_progress" ? 0 : 1) - (b.status === "in_progress" ? 0 : 1));
  const now = Date.now();
  for (const job of live) {
    if (streams.has(job.id) || resting.get(job.id) > now) continue;
    if (streams.size >= MAX_STREAMS && job.status === "in_progress") {
      // a running job's progress matters more than a waiting one's start: take a waiting job's stream
      const waiting = [...streams.keys()].find((id) => jobs.get(id)?.status === "queued");
      if (waiting) {
        streams.get(waiting).abort();
        streams.delete(waiting);
      }
    }
    if (streams.size >= MAX_STREAMS) break;
    follow(job.id);
  }
  const unfollowed = live.some((j) => !streams.has(j.id));
  if (unfollowed && !pollTimer && !polling) pollTimer = setTimeout(poll, POLL_MS);
}

async function poll() {
  pollTimer = null;
  polling = true;
  try {
    let waiting = [...jobs.values()].filter((j) => !TERMINAL.has(j.status) && !streams.has(j.id));
    if (waiting.length > MAX_STREAMS) {
      // many waiting: one request for the whole queue, then one each for those that left it
      const page = await call("GET", "/v1/videos?status=queued&limit=100").catch(() => null);
      const queued = new Set();
      for (const job of page?.data || []) {
        if (jobs.has(job.id)) put(job);
        queued.add(job.id);
      }
      if (page) waiting = waiting.filter((j) => !queued.has(j.id));
    }
    await Promise.all(waiting.map((j) => refresh(j.id).catch(() => {})));
  } finally {
    polling = false;
  }
  track();
}

async function follow(id) {
  const ctrl = new AbortController();
  streams.set(id, ctrl);
  let failures = 0;
  while (!ctrl.signal.aborted && failures < 5) {
    try {
      await readEvents(`/v1/videos/${encodeURIComponent(id)}/events`, (_name, data) => onEvent(id, data), ctrl.signal);
      failures = 0;
    } catch (err) {
      if (ctrl.signal.aborted) break;
      if (err instanceof ApiError && err.status === 404) {
        forget(id);
        return;
      }
      failures += 1;
    }
    if (ctrl.signal.aborted) break;
    // the stream ended: the job has ended, or the connection dropped (then listen again)
    const job = await refresh(id).catch(() => null);
    if (!job || TERMINAL.has(job.status)) break;
    await new Promise((r) => setTimeout(r, 500 * failures));
  }
  if (streams.get(id) === ctrl) streams.delete(id);
  if (failures) resting.set(id, Date.now() + 30_000); // polled meanwhile
  track();
}

function onEvent(id, data) {
  if (!data || typeof data !== "object" || (data.id && data.id !== id) || !jobs.has(id)) return;
  if (data.deleted) {
    forget(id);
    return;
  }
  const update = { id, ...data };
  // a final event may carry less than the job: fetch it whole when it ends
  put(update);
  if (TERMINAL.has(update.status) && !update.report && update.status === "completed") refresh(id).catch(() => {});
}
