// The clip screen: one or two keyframes, the prompt and the main settings with the model's defaults shown,
// and the size the keyframes will be fitted to; submits one job.

import { FieldErrors, fittedSize, newSeed, parseSize, settingsOf } from "./fields.js";
import { KeyframeSlot } from "./keyframes.js";
import * as store from "./store.js";

const SETTINGS = [
  "prompt", "frames", "size", "steps", "seed", "guidance", "shift", "solver", "guidance_steps", "color_match",
];

export class ClipView {
  constructor(root, { onSubmitted }) {
    this.root = root;
    this.form = root.querySelector("#clip-form");
    this.onSubmitted = onSubmitted;
    this.model = null;
    this.errors = new FieldErrors(this.form, this.form.querySelector(".form-error"));
    this.status = this.form.querySelector(".status");
    this.fit = root.querySelector("#clip-fit");
    this.$ = (id) => root.querySelector(`#clip-${id}`);
    this.slots = {};
    for (const el of root.querySelectorAll(".drop[data-slot]")) {
      this.slots[el.dataset.slot] = new KeyframeSlot(el, () => this.updateFit());
    }
    this.form.querySelector(".new-seed").addEventListener("click", () => {
      this.$("seed").value = String(newSeed());
    });
    this.$("seed").value = String(newSeed());
    this.$("frames").addEventListener("input", () => this.updateDuration());
    this.$("duration").addEventListener("change", () => this.fromDuration());
    this.$("size").addEventListener("input", () => this.updateFit());
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
  }

  // The model's defaults as the fields' values (what the server uses when a field is left as it is).
  setModel(model) {
    this.model = model;
    const d = model.defaults || {};
    const put = (id, v) => {
      if (v == null) return;
      const el = this.$(id);
      el.value = String(v);
      el.dataset.default = String(v);
    };
    put("frames", d.frames);
    put("steps", d.steps);
    put("guidance", d.guidance);
    put("shift", d.shift);
    put("solver", d.solver);
    if (d.guidance_steps != null) put("guidance-steps", d.guidance_steps);
    const neg = this.$("negative");
    if (d.negative_prompt != null && !neg.value) {
      neg.value = d.negative_prompt;
      neg.dataset.default = d.negative_prompt;
    }
    this.updateDuration();
    this.updateFit();
  }

  fps() {
    return this.model?.defaults?.fps || null;
  }

  updateDuration() {
    const frames = Number(this.$("frames").value);
    const note = this.$("frames-note");
    const fps = this.fps();
    if (fps && frames > 0) {
      this.$("duration").value = (frames / fps).toFixed(2).replace(/\.?0+$/, "");
      note.textContent = `${frames} frames at ${fps} fps; 4n+1 (5, 9, 13, …)`;
    } else note.textContent = "4n+1 (5, 9, 13, …)";
  }

  // Duration in seconds -> the nearest frame count of the form 4n+1.
  fromDuration() {
    const fps = this.fps();
    const secs = Number(this.$("duration").value);
    if (!fps || !(secs > 0)) return;
    const n = Math.max(1, Math.round((secs * fps - 1) / 4));
    this.$("frames").value = String(4 * n + 1);
    this.updateDuration();
  }

  // The output size and how each keyframe is fitted to it.
  updateFit() {
    const first = this.slots.first.image;
    const last = this.slots.last.image;
    if (!first) {
      this.fit.textContent = last ? "Add a first keyframe: the clip starts from it." : "";
      return;
    }
    const asked = parseSize(this.$("size").value);
    const m = this.model;
    const out = asked || (m?.defaults?.max_area && m.size_step ? fittedSize(first.width, first.height, m.defaults.max_area, m.size_step) : null);
    if (!out) {
      this.fit.textContent = "The output size follows the model's area at the first keyframe's aspect.";
      return;
    }
    const [w, h] = out;
    const how = (img) => (img.width === w && img.height === h ? "used as it is" : "scaled to cover it and centre-cropped");
    const parts = [`Output: ${w}×${h}.`, `First keyframe ${first.width}×${first.height}: ${how(first)}.`];
    if (last) parts.push(`Last keyframe ${last.width}×${last.height}: ${how(last)}.`);
    this.fit.textContent = parts.join(" ");
  }

  // A frame of a result as a keyframe ("first" or "last").
  useFrame(file, which) {
    return this.slots[which].set(file);
  }

  async submit() {
    this.errors.clear();
    const first = this.slots.first.image;
    if (!first) {
      this.errors.show("first", "Add a first keyframe: pick an image or drop one here.");
      return;
    }
    const fields = settingsOf(this.form, SETTINGS);
    const neg = this.$("negative");
    if (neg.value !== (neg.dataset.default ?? "")) fields.negative_prompt = neg.value;
    const files = { first: first.file };
    if (this.slots.last.image) files.last = this.slots.last.image.file;
    const button = this.form.querySelector("button[type=submit]");
    button.disabled = true;
    this.status.textContent = "Sending…";
    try {
      const job = await store.submit(fields, files);
      this.status.textContent = `Queued as ${job.id}.`;
      this.onSubmitted(job);
    } catch (err) {
      this.status.textContent = "";
      this.errors.showError(err);
    } finally {
      button.disabled = false;
    }
  }
}
