// The storyboard screen: a strip of keyframes (add, replace, reorder by drag or by the Move buttons, remove),
// a prompt and frame count per shot, loop and colour matching; renders the film as one job and shows each
// shot's state, so an edit that touches one keyframe shows which shots were rendered again.

import { JobCard } from "./card.js";
import { FieldErrors, fieldOf, fittedSize, newSeed, parseSize } from "./fields.js";
import { carriesFiles, droppedImage, readImage } from "./keyframes.js";
import * as store from "./store.js";

const DRAG_TYPE = "application/x-segue-keyframe";

// "12" -> 12 and "2.5" -> 2.5; anything else stays text for the server to name in its message.
function number(text) {
  const t = text.trim();
  return t !== "" && Number.isFinite(Number(t)) ? Number(t) : t;
}

export class StoryView {
  constructor(root, { useFrame }) {
    this.root = root;
    this.form = root.querySelector("#story-form");
    this.strip = root.querySelector("#story-strip");
    this.fit = root.querySelector("#story-fit");
    this.status = this.form.querySelector(".status");
    this.errors = new FieldErrors(this.form, this.form.querySelector(".form-error"));
    this.renderBox = root.querySelector("#story-render");
    this.useFrame = useFrame;
    this.model = null;
    this.keyframes = []; // [{ key, image: {file, url, width, height} }]
    this.shots = []; // [{ prompt, frames }]: shot i runs from keyframe i to i+1 (the last: back to 0 in a loop)
    this.nextKey = 1;
    this.card = null;
    this.$ = (id) => root.querySelector(`#story-${id}`);
    this.$("seed").value = String(newSeed());
    this.form.querySelector(".new-seed").addEventListener("click", () => {
      this.$("seed").value = String(newSeed());
    });
    this.$("loop").addEventListener("change", () => this.render());
    this.$("size").addEventListener("input", () => this.updateFit());
    const add = this.$("add");
    const addInput = this.$("add-input");
    addInput.addEventListener("change", async () => {
      await this.addFiles([...addInput.files]);
      addInput.value = "";
    });
    add.addEventListener("dragover", (e) => {
      if (!carriesFiles(e)) return;
      e.preventDefault();
      add.classList.add("over");
    });
    add.addEventListener("dragleave", () => add.classList.remove("over"));
    add.addEventListener("drop", (e) => {
      add.classList.remove("over");
      if (!carriesFiles(e)) return;
      e.preventDefault();
      this.addFiles([...e.dataTransfer.files]);
    });
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.submit();
    });
    this.render();
  }

  setModel(model) {
    this.model = model;
    const d = model.defaults || {};
    for (const [id, v] of [["steps", d.steps], ["guidance", d.guidance]]) {
      if (v != null) this.$(id).value = String(v);
    }
    this.render();
  }

  async addFiles(files) {
    const problems = [];
    for (const file of files) {
      try {
        this.keyframes.push({ key: this.nextKey++, image: await readImage(file) });
        this.shots.push({ prompt: "", frames: "" });
      } catch (err) {
        problems.push(err.message);
      }
    }
    this.render();
    this.errors.clear();
    if (problems.length) this.errors.show("keyframes", problems.join(" "));
  }

  // A frame of a result, added at the end of the strip.
  addFrame(file) {
    return this.addFiles([file]);
  }

  async replace(i, file) {
    try {
      const image = await readImage(file);
      URL.revokeObjectURL(this.keyframes[i].image.url);
      this.keyframes[i].image = image;
      this.render(`[data-field="keyframes[${i}]"]`);
    } catch (err) {
      this.errors.clear();
      this.errors.show(`keyframes[${i}]`, err.message);
    }
  }

  move(from, to, focus) {
    if (to < 0 || to >= this.keyframes.length || from === to) return;
    const [kf] = this.keyframes.splice(from, 1);
    this.keyframes.splice(to, 0, kf);
    this.render(focus ? `[data-key="${kf.key}"] [data-move="${focus}"]` : null);
  }

  removeAt(i) {
    const [kf] = this.keyframes.splice(i, 1);
    URL.revokeObjectURL(kf.image.url);
    this.shots.splice(i, 1);
    const next = this.keyframes[Math.min(i, this.keyframes.length - 1)];
    this.render(next ? `[data-key="${next.key}"] [data-move="remove"]` : "#story-add-input");
  }

  shotCount() {
    const n = this.keyframes.length;
    return this.$("loop").checked ? n : Math.max(0, n - 1);
  }

  // Redraws the strip from the state; `focusSel` names the control to focus afterwards.
  render(focusSel = null) {
    const n = this.keyframes.length;
    const shots = this.shotCount();
    const defaultFrames = this.model?.defaults?.frames;
    this.strip.replaceChildren(...this.keyframes.map((kf, i) => this.card_(kf, i, n, i < shots, defaultFrames)));
    this.strip.hidden = n === 0;
    this.updateFit();
    if (focusSel) this.root.querySelector(focusSel)?.focus();
  }

  card_(kf, i, n, hasShot, defaultFrames) {
    const li = document.createElement("li");
    li.className = "kf";
    li.dataset.key = String(kf.key);
    const id = `story-kf-${kf.key}`;
    const { file, url, width, height } = kf.image;
    li.innerHTML = `
      <div class="kf-frame field">
        <img alt="">
        <p class="size"></p>
        <div class="kf-buttons">
          <span class="file-button"><input type="file" accept="image/*" id="${id}-replace"><label for="${id}-replace">Replace</label></span>
          <button type="button" data-move="earlier">Move earlier</button>
          <button type="button" data-move="later">Move later</button>
          <button type="button" data-move="remove">Remove</button>
        </div>
      </div>`;
    const frame = li.querySelector(".kf-frame");
    frame.draggable = true; // the picture and its buttons: a drag in the shot's text selects text
    const img = li.querySelector("img");
    img.src = url;
    img.alt = `Keyframe ${i + 1}: ${file.name}`;
    img.draggable = false;
    li.querySelector(".size").textContent = `Keyframe ${i + 1} · ${file.name} · ${width}×${height}`;
    const replace = li.querySelector("input[type=file]");
    replace.dataset.field = `keyframes[${i}]`;
    replace.setAttribute("aria-label", `Replace keyframe ${i + 1}`);
    replace.addEventListener("change", () => replace.files.length && this.replace(i, replace.files[0]));
    const label = (b, text) => b.setAttribute("aria-label", `${text} keyframe ${i + 1}`);
    const [earlier, later, remove] = li.querySelectorAll("[data-move]");
    label(earlier, "Move earlier:");
    label(later, "Move later:");
    label(remove, "Remove");
    earlier.disabled = i === 0;
    later.disabled = i === n - 1;
    earlier.addEventListener("click", () => this.move(i, i - 1, i - 1 === 0 ? "later" : "earlier"));
    later.addEventListener("click", () => this.move(i, i + 1, i + 1 === n - 1 ? "earlier" : "later"));
    remove.addEventListener("click", () => this.removeAt(i));
    if (hasShot) li.append(this.shotFields(i, n, defaultFrames));
    this.bindDrag(li, frame, i);
    return li;
  }

  shotFields(i, n, defaultFrames) {
    const shot = this.shots[i];
    const id = `story-shot-${i}`;
    const box = document.createElement("fieldset");
    box.className = "shot";
    box.innerHTML = `
      <legend></legend>
      <div class="field"><label for="${id}-prompt">Prompt</label><textarea id="${id}-prompt" rows="3"></textarea></div>
      <div class="field"><label for="${id}-frames">Frames</label><input id="${id}-frames" type="number" inputmode="numeric"></div>`;
    box.querySelector("legend").textContent = `Shot ${i + 1} (keyframes ${i + 1} → ${((i + 1) % n) + 1})`;
    const prompt = box.querySelector("textarea");
    const frames = box.querySelector("input");
    prompt.dataset.field = `shots[${i}].prompt`;
    frames.dataset.field = `shots[${i}].frames`;
    prompt.value = shot.prompt;
    frames.value = shot.frames || (defaultFrames ? String(defaultFrames) : "");
    prompt.addEventListener("input", () => (shot.prompt = prompt.value));
    frames.addEventListener("input", () => (shot.frames = frames.value));
    return box;
  }

  // Reorder by dragging a keyframe onto another; files dropped on a card replace its keyframe.
  bindDrag(li, handle, i) {
    handle.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData(DRAG_TYPE, String(i));
      e.dataTransfer.effectAllowed = "move";
      li.classList.add("dragging");
    });
    handle.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (e) => {
      const types = [...e.dataTransfer.types];
      if (!types.includes(DRAG_TYPE) && !carriesFiles(e)) return;
      e.preventDefault();
      li.classList.add("over");
    });
    li.addEventListener("dragleave", () => li.classList.remove("over"));
    li.addEventListener("drop", (e) => {
      li.classList.remove("over");
      const from = e.dataTransfer.getData(DRAG_TYPE);
      if (from !== "") {
        e.preventDefault();
        this.move(Number(from), i, null);
      } else if (carriesFiles(e)) {
        e.preventDefault();
        const file = droppedImage(e.dataTransfer);
        if (file) this.replace(i, file);
      }
    });
  }

  updateFit() {
    const first = this.keyframes[0]?.image;
    const m = this.model;
    const asked = parseSize(this.$("size").value);
    const out = first && (asked || (m?.defaults?.max_area && m.size_step ? fittedSize(first.width, first.height, m.defaults.max_area, m.size_step) : null));
    if (!out) {
      this.fit.textContent = first ? "" : "Add two or more keyframes (one with Loop).";
      return;
    }
    const [w, h] = out;
    const fitted = this.keyframes.filter((k) => k.image.width !== w || k.image.height !== h).length;
    this.fit.textContent = `Film size: ${w}×${h}${fitted ? `; ${fitted} of ${this.keyframes.length} keyframes are scaled to cover it and centre-cropped` : ""}.`;
  }

  storyJson() {
    const settings = {};
    for (const name of ["seed", "steps", "guidance"]) {
      const v = this.$(name).value;
      if (v.trim() !== "") settings[name] = number(v);
    }
    const size = this.$("size").value.trim();
    if (size) settings.size = size;
    if (this.$("color-match").checked) settings.color_match = true;
    const shots = this.shots.slice(0, this.shotCount()).map((s) => {
      const shot = { prompt: s.prompt };
      const frames = (s.frames || "").trim();
      if (frames) shot.frames = number(frames);
      return shot;
    });
    return {
      loop: this.$("loop").checked,
      settings,
      keyframes: this.keyframes.map((_, i) => ({ image: `keyframe${i}` })),
      shots,
    };
  }

  // The field of a story error: the server names "story" for all of them, so the message decides.
  // "story: shots[1]: frames must ..." -> that shot's frames; "keyframes[2] ..." or a file field -> that card;
  // a film setting it names ("size 9x9: ...") -> that field.
  fieldOfMessage(err) {
    const file = /^keyframe(\d+)$/.exec(err.param || "");
    if (file) return `keyframes[${file[1]}]`;
    const shot = /shots\[(\d+)\]:?\s*(.*)/.exec(err.message);
    const text = shot ? shot[2] : err.message;
    if (shot && /^frames\b/.test(text)) return `shots[${shot[1]}].frames`;
    if (shot && /^prompt\b/.test(text)) return `shots[${shot[1]}].prompt`;
    const kf = /keyframes\[(\d+)\]/.exec(err.message);
    if (kf) return `keyframes[${kf[1]}]`;
    const settings = [...this.form.querySelectorAll(".settings [data-field]")].map((el) => el.dataset.field);
    return fieldOf(text, settings) ?? (shot ? `shots[${shot[1]}].prompt` : null);
  }

  async submit() {
    this.errors.clear();
    if (this.keyframes.length < (this.$("loop").checked ? 1 : 2)) {
      this.errors.show("keyframes", "A film needs two keyframes or more (one is enough with Loop).");
      return;
    }
    const files = {};
    this.keyframes.forEach((kf, i) => (files[`keyframe${i}`] = kf.image.file));
    const fields = { story: JSON.stringify(this.storyJson()) };
    const button = this.form.querySelector("button[type=submit]");
    button.disabled = true;
    this.status.textContent = "Sending…";
    try {
      const job = await store.submit(fields, files);
      this.status.textContent = `Queued as ${job.id}.`;
      this.showJob(job);
    } catch (err) {
      this.status.textContent = "";
      const own = err.param && this.form.querySelector(`[data-field="${CSS.escape(err.param)}"]`);
      this.errors.show(own ? err.param : this.fieldOfMessage(err), err.message);
    } finally {
      button.disabled = false;
    }
  }

  // The film's job under the form: its shots' states as it renders.
  showJob(job) {
    this.card?.destroy();
    this.card = new JobCard(job, { useFrame: this.useFrame });
    this.renderBox.querySelector(".story-job").replaceChildren(this.card.el);
    this.renderBox.hidden = false;
  }
}
