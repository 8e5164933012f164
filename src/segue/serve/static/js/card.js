// One job drawn as a card: status, live progress (step, ETA), each shot's state for a storyboard, the error,
// and once finished the looping video, keyframe fidelity, downloads and a frame picker; with its actions.

import { blobUrl, storedToken } from "./api.js";
import { formatSeconds } from "./fields.js";
import { FrameArchive } from "./frames.js";
import * as store from "./store.js";

const STATUS_TEXT = {
  queued: "queued",
  in_progress: "in progress",
  completed: "completed",
  failed: "failed",
  cancelled: "cancelled",
};

let serial = 0;

// What a job is: a storyboard (with its shot count) or a clip.
export function storyOf(job) {
  const s = job.settings?.story ?? job.story;
  if (s && typeof s === "object") return s;
  if (typeof s === "string") {
    try {
      return JSON.parse(s);
    } catch {
      return null;
    }
  }
  return null;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function listWords(items) {
  return items.length < 2 ? items.join("") : `${items.slice(0, -1).join(", ")} and ${items[items.length - 1]}`;
}

// Each shot's state: from the report when the job has one, else from the progress fields.
export function shotStates(job) {
  const story = storyOf(job);
  if (!story) return null; // a clip is one shot: nothing to list
  const reported = job.report?.shots;
  if (Array.isArray(reported) && reported.length) {
    return reported.map((s) => ({ index: s.index, state: s.reused ? "reused" : "rendered", seconds: s.seconds }));
  }
  const n = story.shots?.length ?? 0;
  if (!n) return null;
  const current = Number.isInteger(job.shot) ? job.shot : shotAtStep(job, n);
  return Array.from({ length: n }, (_, i) => {
    let state = "waiting";
    if (job.status === "in_progress") {
      if (current === null) state = "in the render";
      else state = i < current ? "done" : i === current ? "rendering" : "waiting";
    } else if (job.status === "cancelled" || job.status === "failed") state = job.status;
    return { index: i, state };
  });
}

// The shot a running storyboard is on, from its step: the steps run shot after shot, equal per shot when the
// film's settings set them (a shot reused from the cache passes its steps at once). null when not equal.
function shotAtStep(job, n) {
  const steps = Number(job.steps);
  if (!steps || steps % n) return null;
  return Math.min(n - 1, Math.floor((Number(job.step) || 0) / (steps / n)));
}

// The sentence under a finished storyboard: which shots were rendered again and which were reused.
export function shotSummary(states) {
  if (!states || !states.some((s) => s.state === "reused" || s.state === "rendered")) return "";
  const rendered = states.filter((s) => s.state === "rendered").map((s) => String(s.index + 1));
  const reused = states.filter((s) => s.state === "reused").map((s) => String(s.index + 1));
  if (!reused.length) return `All ${plural(states.length, "shot")} rendered.`;
  const r = rendered.length ? `Rendered again: shot${rendered.length > 1 ? "s" : ""} ${listWords(rendered)}. ` : "";
  return `${r}Reused unchanged: shot${reused.length > 1 ? "s" : ""} ${listWords(reused)} (same keyframes and settings).`;
}

// The settings worth a glance: a clip's resolved ones; a storyboard's keyframes, loop and seed.
function settingsText(job, story) {
  if (story) {
    const n = story.keyframes?.length ?? 0;
    const seed = story.settings?.seed;
    return [plural(n, "keyframe") + (story.loop ? ", loop" : ""), seed != null ? `seed ${seed}` : ""];
  }
  const s = job.settings || {};
  return [
    s.frames != null ? `${s.frames} frames` : "",
    s.size ? String(s.size).replace("x", "×") : "",
    s.steps != null ? plural(s.steps, "step") : "",
    s.guidance != null ? `guidance ${s.guidance}` : "",
    s.seed != null ? `seed ${s.seed}` : "",
  ];
}

export class JobCard {
  // useFrame(file, target) puts a picked frame into a form ("first", "last" or "story").
  constructor(job, { useFrame, template = document.getElementById("job-template") }) {
    this.id = job.id;
    this.useFrame = useFrame;
    this.el = template.content.firstElementChild.cloneNode(true);
    this.el.dataset.id = job.id;
    const q = (sel) => this.el.querySelector(sel);
    this.parts = {
      title: q(".job-title"), badge: q(".badge"), meta: q(".meta"), progress: q("progress"),
      progressText: q(".progress-text"), shots: q(".shots"), shotSummary: q(".shot-summary"), error: q(".job-error"),
      result: q(".result"), video: q("video"), fidelity: q(".fidelity tbody"), mp4: q(".download-mp4"),
      frames: q(".download-frames"), picker: q(".picker"), range: q(".picker-range"), index: q(".picker-index"),
      preview: q(".picker-preview"), pickerStatus: q(".picker-status"), actionError: q(".action-error"),
    };
    const uid = `job-${++serial}`;
    this.parts.title.id = `${uid}-title`;
    this.el.querySelector("article").setAttribute("aria-labelledby", this.parts.title.id);
    this.parts.progress.id = `${uid}-progress`;
    this.parts.progress.setAttribute("aria-labelledby", `${uid}-title`);
    this.parts.progress.setAttribute("aria-describedby", `${uid}-progress-text`);
    this.parts.progressText.id = `${uid}-progress-text`;
    this.parts.range.id = `${uid}-frame`;
    this.el.querySelector(".picker-label").htmlFor = this.parts.range.id;
    this.videoLoaded = false;
    this.archive = null;
    this.urls = [];
    this.bindActions();
    this.bindPicker();
    this.unsubscribe = store.subscribe(job.id, (j) => (j ? this.update(j) : this.destroy()));
    this.update(job);
  }

  update(job) {
    const p = this.parts;
    const story = storyOf(job);
    const prompt = story ? story.shots?.map((s) => s.prompt).find(Boolean) : job.settings?.prompt;
    const kind = story ? `Storyboard, ${plural(story.shots?.length ?? 0, "shot")}` : "Clip";
    p.title.textContent = prompt ? `${kind}: ${prompt}` : kind;
    p.badge.textContent = STATUS_TEXT[job.status] || job.status;
    p.badge.dataset.status = job.status;
    this.el.dataset.status = job.status;
    const created = job.created_at ? new Date(job.created_at * 1000) : null;
    p.meta.textContent = [
      created && !Number.isNaN(created.getTime()) ? created.toLocaleString() : "",
      ...settingsText(job, story),
      job.attempts > 1 ? `attempt ${job.attempts}` : "",
      `id ${job.id}`,
    ].filter(Boolean).join(" · ");
    this.updateProgress(job);
    this.updateShots(job);
    p.error.hidden = !job.error;
    p.error.textContent = job.error ? `Error: ${job.error}` : "";
    const live = !store.TERMINAL.has(job.status);
    this.button("cancel").hidden = !live;
    this.button("delete").hidden = live;
    for (const act of ["again", "again-seed"]) {
      this.button(act).hidden = !store.canRepeat(job.id); // its keyframes were sent from another browser
    }
    if (job.status === "completed") this.showResult(job);
  }

  updateProgress(job) {
    const p = this.parts;
    const progress = job.status === "completed" ? 100 : Math.max(0, Math.min(100, Number(job.progress) || 0));
    p.progress.value = progress;
    p.progress.setAttribute("aria-valuetext", `${Math.round(progress)}%`);
    const bits = [];
    if (job.steps) bits.push(`step ${job.step ?? 0} of ${job.steps}`);
    bits.push(`${Math.round(progress)}%`);
    if (job.status === "in_progress" && job.eta_s != null) bits.push(`about ${formatSeconds(job.eta_s)} left`);
    if (job.status === "queued") bits.push("waiting for a worker");
    if (job.status === "cancelled" || job.status === "failed") {
      p.progressText.textContent = job.step ? `stopped at step ${job.step} of ${job.steps}` : "stopped before its first step";
      return;
    }
    p.progressText.textContent = bits.join(" · ");
  }

  updateShots(job) {
    const p = this.parts;
    const states = shotStates(job);
    p.shots.hidden = !states;
    p.shotSummary.hidden = true;
    if (!states) return;
    p.shots.replaceChildren(
      ...states.map((s) => {
        const li = document.createElement("li");
        li.dataset.state = s.state;
        const secs = s.state === "rendered" && s.seconds != null ? ` in ${formatSeconds(s.seconds)}` : "";
        li.textContent = `Shot ${s.index + 1}: ${s.state === "reused" ? "reused from the cache" : s.state}${secs}`;
        return li;
      }),
    );
    const summary = shotSummary(states);
    p.shotSummary.textContent = summary;
    p.shotSummary.hidden = !summary;
  }

  async showResult(job) {
    const p = this.parts;
    p.result.hidden = false;
    const base = `/v1/videos/${encodeURIComponent(job.id)}/content`;
    const rows = (job.report?.keyframes || []).map((k) => {
      const tr = document.createElement("tr");
      for (const v of [k.index + 1, k.frame, k.psnr?.toFixed(2) ?? "n/a", k.delta_e?.toFixed(2) ?? "n/a"]) {
        const td = document.createElement("td");
        td.textContent = String(v);
        tr.append(td);
      }
      return tr;
    });
    p.fidelity.replaceChildren(...rows);
    p.fidelity.closest("table").hidden = !rows.length;
    p.mp4.href = base;
    p.mp4.download = `segue-${job.id}.mp4`;
    p.frames.href = `${base}?variant=frames`;
    p.frames.download = `segue-${job.id}-frames.zip`;
    if (job.report?.frames) {
      p.range.max = String(job.report.frames - 1);
    }
    if (this.videoLoaded) return;
    this.videoLoaded = true;
    p.video.setAttribute("aria-label", `Video of ${p.title.textContent}`);
    try {
      p.video.src = storedToken() ? this.keep(await blobUrl(base)) : base;
      p.video.play().catch(() => {}); // autoplay may wait for a gesture; the controls are there
    } catch (err) {
      this.actionError(`The video could not be loaded: ${err.message}`);
    }
  }

  keep(url) {
    this.urls.push(url);
    return url;
  }

  button(act) {
    return this.el.querySelector(`[data-act="${act}"]`);
  }

  actionError(message) {
    const box = this.parts.actionError;
    box.textContent = message;
    box.hidden = !message;
  }

  bindActions() {
    const run = (act, fn) =>
      this.button(act).addEventListener("click", async () => {
        this.actionError("");
        try {
          await fn();
        } catch (err) {
          this.actionError(err.message);
        }
      });
    run("cancel", () => store.cancel(this.id));
    run("delete", () => store.remove(this.id));
    run("again", () => store.repeat(this.id));
    run("again-seed", () => store.repeat(this.id, { reseed: true }));
    // with a token, links cannot carry it: fetch the file and hand the browser a blob
    for (const link of [this.parts.mp4, this.parts.frames]) {
      link.addEventListener("click", async (e) => {
        if (!storedToken() || link.dataset.blob) return;
        e.preventDefault();
        try {
          link.href = this.keep(await blobUrl(link.href));
          link.dataset.blob = "1";
          link.click();
        } catch (err) {
          this.actionError(err.message);
        }
      });
    }
  }

  bindPicker() {
    const p = this.parts;
    p.picker.addEventListener("toggle", () => {
      if (p.picker.open && !this.archive) this.loadFrames();
    });
    p.range.addEventListener("input", () => this.showFrame());
    for (const b of p.picker.querySelectorAll("[data-use]")) {
      b.addEventListener("click", async () => {
        if (!this.archive) return;
        const i = Number(p.range.value);
        const file = await this.archive.frame(i, `segue-${this.id}`);
        this.useFrame(file, b.dataset.use);
        p.pickerStatus.textContent = `Frame ${i} is now ${b.dataset.use === "story" ? "in the storyboard" : `the ${b.dataset.use} keyframe`}.`;
      });
    }
  }

  async loadFrames() {
    const p = this.parts;
    p.pickerStatus.textContent = "Loading the frames…";
    try {
      this.archive = await FrameArchive.fetch(this.id);
      p.range.max = String(Math.max(0, this.archive.length - 1));
      p.pickerStatus.textContent = `${this.archive.length} frames: move the slider to pick one.`;
      await this.showFrame();
    } catch (err) {
      p.pickerStatus.textContent = `The frames could not be loaded: ${err.message}`;
    }
  }

  async showFrame() {
    const p = this.parts;
    const i = Number(p.range.value);
    p.index.textContent = String(i);
    if (!this.archive) return;
    const want = (this.wanted = i);
    const file = await this.archive.frame(i, `segue-${this.id}`);
    if (want !== this.wanted) return; // the slider moved on while this frame decoded
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
    this.previewUrl = URL.createObjectURL(file);
    p.preview.src = this.previewUrl;
    p.preview.alt = `Frame ${i} of the result`;
  }

  destroy() {
    this.unsubscribe();
    for (const url of this.urls) URL.revokeObjectURL(url);
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
    this.el.remove();
  }
}
