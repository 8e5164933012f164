// segue studio: the page `segue serve` shows at /. Screens by the address's #fragment (clip, story, queue),
// the model's defaults from /health, and the token prompt the API's 401 answers open.

import { call, onTokenNeeded } from "./js/api.js";
import { ClipView } from "./js/clip.js";
import { QueueView } from "./js/queue.js";
import * as store from "./js/store.js";
import { StoryView } from "./js/story.js";

const VIEWS = ["clip", "story", "queue"];

// The model part of /health, whatever its detail: { name, defaults: {frames, fps, ...}, size_step }.
function modelInfo(health) {
  const m = health?.model;
  if (!m) return { name: "", defaults: {} };
  if (typeof m === "string") return { name: m, defaults: {} };
  return { ...m, name: m.name || "", defaults: m.defaults || {} };
}

function describeHealth(health, model) {
  const bits = [];
  if (model.name) bits.push(`model ${model.name}`);
  const alive = health.workers_alive;
  if (Number.isInteger(alive)) {
    const of = Number.isInteger(health.workers) && health.workers !== alive ? ` of ${health.workers}` : "";
    bits.push(`${alive}${of} worker${alive === 1 && !of ? "" : "s"} ready`);
  }
  if (Number.isInteger(health.queue_depth)) bits.push(`${health.queue_depth} waiting`);
  return bits.join(" · ");
}

const HEALTH_MS = 10_000;

// /health now and every HEALTH_MS while the page is visible; the model's defaults go to the forms once.
async function watchHealth(views) {
  const status = document.getElementById("health");
  let model = null;
  for (;;) {
    try {
      const health = await call("GET", "/health");
      if (!model) {
        model = modelInfo(health);
        views.clip.setModel(model);
        views.story.setModel(model);
      }
      status.textContent = describeHealth(health, model);
    } catch (err) {
      status.textContent = `The server did not answer /health: ${err.message}`;
    }
    document.body.dataset.ready = "true";
    do await new Promise((r) => setTimeout(r, HEALTH_MS));
    while (document.hidden);
  }
}

// The token prompt: a modal dialog, asked once per browser session (the API module keeps the token).
function askToken(dialog) {
  const input = dialog.querySelector("#token-input");
  const error = dialog.querySelector("#token-error");
  return (refused) =>
    new Promise((resolve) => {
      error.textContent = refused ? "The server refused that token; try again." : "";
      input.value = "";
      dialog.addEventListener(
        "close",
        () => resolve(dialog.returnValue === "ok" && input.value ? input.value : null),
        { once: true },
      );
      dialog.returnValue = "";
      dialog.showModal();
      input.focus();
    });
}

function route(views) {
  const name = VIEWS.includes(location.hash.slice(1)) ? location.hash.slice(1) : "clip";
  for (const v of VIEWS) {
    document.getElementById(`${v}-view`).hidden = v !== name;
    const link = document.querySelector(`nav a[data-view="${v}"]`);
    if (v === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name === "queue") views.queue.show();
  return name;
}

async function main() {
  const dialog = document.getElementById("token-dialog");
  onTokenNeeded(askToken(dialog));

  const views = {};
  const useFrame = (file, target) => {
    if (target === "story") views.story.addFrame(file);
    else views.clip.useFrame(file, target);
  };
  views.queue = new QueueView(document.getElementById("queue-view"), { useFrame });
  views.story = new StoryView(document.getElementById("story-view"), { useFrame });
  views.clip = new ClipView(document.getElementById("clip-view"), {
    onSubmitted: () => {
      location.hash = "#queue"; // the clip's progress is watched there
    },
  });

  window.addEventListener("hashchange", () => {
    if (!VIEWS.includes(location.hash.slice(1))) return; // #main (the skip link) is no screen
    const name = route(views);
    document.getElementById(`${name}-title`).focus();
  });
  await store.init();
  route(views);
  views.queue.show(); // the list early: the running count, and the token prompt at once when one is needed

  watchHealth(views);
}

main();
