// Form pieces shared by the clip and storyboard forms: an API error shown next to the field it concerns,
// seeds, and the output size a keyframe is fitted to (the same arithmetic as segue.settings).

// The field an API message concerns. The server's messages name the setting first ("frames must be 4n+1 ...",
// "unknown solver 'x' (solver) ...", "story: shots[1]: frames must ..."): the earliest whole-word match wins.
export function fieldOf(message, names) {
  let best = null;
  let at = Infinity;
  for (const name of names) {
    const re = new RegExp(`(^|[^\\w-])${name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}(?![\\w-])`);
    const m = re.exec(message);
    if (m && m.index < at) {
      best = name;
      at = m.index;
    }
  }
  return best;
}

// A form's error display: every field with a data-field name gets a message element after it.
export class FieldErrors {
  constructor(form, summary) {
    this.form = form;
    this.summary = summary; // where a message no field claims goes
    this.shown = [];
  }

  clear() {
    for (const { input, box } of this.shown) {
      input.removeAttribute("aria-invalid");
      box.remove();
      const ids = (input.getAttribute("aria-describedby") || "").split(" ").filter((x) => x && x !== box.id);
      if (ids.length) input.setAttribute("aria-describedby", ids.join(" "));
      else input.removeAttribute("aria-describedby");
    }
    this.shown = [];
    this.summary.textContent = "";
    this.summary.hidden = true;
  }

  // Shows message at the field named `name` (or in the summary); focuses that field. Returns the input.
  show(name, message) {
    const input = name ? this.form.querySelector(`[data-field="${CSS.escape(name)}"]`) : null;
    if (!input) {
      this.summary.textContent = message;
      this.summary.hidden = false;
      this.summary.focus();
      return null;
    }
    const box = document.createElement("p");
    box.className = "field-error";
    box.id = `${input.id || name.replace(/\W/g, "-")}-error`;
    box.textContent = message;
    const anchor = input.closest(".field") || input;
    anchor.append(box);
    input.setAttribute("aria-invalid", "true");
    const ids = (input.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
    input.setAttribute("aria-describedby", [...ids, box.id].join(" "));
    this.shown.push({ input, box });
    input.focus();
    return input;
  }

  // An ApiError: at the field the server named, else the field its message names first.
  showError(err) {
    const names = [...this.form.querySelectorAll("[data-field]")].map((el) => el.dataset.field);
    const name = err.param && names.includes(err.param) ? err.param : fieldOf(err.message, names);
    return this.show(name, err.message);
  }
}

export function newSeed() {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0] & 0x7fffffff;
}

// Output (width, height) for a first frame of w x h: the reference's fit of the model's area at its aspect, in
// multiples of the size step (VAE stride x patch), or the explicit size.
export function fittedSize(w, h, maxArea, step) {
  const ar = h / w;
  const oh = Math.floor(Math.sqrt(maxArea * ar) / step) * step;
  const ow = Math.floor(Math.sqrt(maxArea / ar) / step) * step;
  return ow >= step && oh >= step ? [ow, oh] : null;
}

// "WxH" -> [w, h], or null when the text is not that shape (the server checks the values).
export function parseSize(text) {
  const m = /^\s*(\d+)\s*[xX×]\s*(\d+)\s*$/.exec(text || "");
  return m ? [Number(m[1]), Number(m[2])] : null;
}

// The form's settings as request fields: numbers as typed (the server checks them), blanks left out.
export function settingsOf(form, names) {
  const out = {};
  for (const name of names) {
    const el = form.querySelector(`[data-field="${name}"]`);
    if (!el) continue;
    if (el.type === "checkbox") {
      if (el.checked) out[name] = true;
      continue;
    }
    const v = el.value.trim();
    if (v !== "") out[name] = v;
  }
  return out;
}

export function formatSeconds(s) {
  if (s == null || !Number.isFinite(s)) return "";
  if (s < 60) return `${Math.max(0, Math.round(s))} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${Math.round(s - m * 60)} s`;
}
