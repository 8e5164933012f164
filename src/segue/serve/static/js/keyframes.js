// Keyframe images on the page: reading a file's size, and a drop zone that takes a file from the picker or by
// drag and drop and shows it with its size.

// { file, url, width, height } of an image file, or an Error the browser could not decode it.
export async function readImage(file) {
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.src = url;
  try {
    await img.decode();
  } catch {
    URL.revokeObjectURL(url);
    throw new Error(`${file.name}: the browser cannot read this image`);
  }
  return { file, url, width: img.naturalWidth, height: img.naturalHeight };
}

// The first image file of a drop (a DataTransfer), or null.
export function droppedImage(dataTransfer) {
  const files = [...(dataTransfer?.files || [])];
  return files.find((f) => f.type.startsWith("image/")) || files[0] || null;
}

// True while a drag carries files (not text or a keyframe being reordered).
export function carriesFiles(event) {
  return [...(event.dataTransfer?.types || [])].includes("Files");
}

// A drop zone around a file input: <div class="drop" data-slot="first"> with an <input type=file>, its
// <label>, an <img> and a <p class="size">. Calls onChange(image | null) when the keyframe changes.
export class KeyframeSlot {
  constructor(root, onChange) {
    this.root = root;
    this.input = root.querySelector("input[type=file]");
    this.preview = root.querySelector("img");
    this.sizeText = root.querySelector(".size");
    this.clearButton = root.querySelector("button.clear");
    this.message = root.querySelector(".slot-error");
    this.onChange = onChange;
    this.image = null;
    this.input.addEventListener("change", () => {
      if (this.input.files.length) this.set(this.input.files[0]);
    });
    this.clearButton?.addEventListener("click", () => this.set(null));
    root.addEventListener("dragover", (e) => {
      if (!carriesFiles(e)) return;
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
      root.classList.add("over");
    });
    root.addEventListener("dragleave", () => root.classList.remove("over"));
    root.addEventListener("drop", (e) => {
      root.classList.remove("over");
      const file = droppedImage(e.dataTransfer);
      if (!file) return;
      e.preventDefault();
      this.set(file);
    });
  }

  // Takes a File (or null to empty the slot).
  async set(file) {
    this.message.textContent = "";
    if (!file) {
      this.show(null);
      return;
    }
    try {
      this.show(await readImage(file));
    } catch (err) {
      this.show(null);
      this.message.textContent = err.message;
    }
  }

  show(image) {
    if (this.image) URL.revokeObjectURL(this.image.url);
    this.image = image;
    this.input.value = "";
    this.root.classList.toggle("filled", Boolean(image));
    if (image) {
      this.preview.src = image.url;
      this.preview.alt = image.file.name;
      this.sizeText.textContent = `${image.file.name}: ${image.width}×${image.height}`;
    } else {
      this.preview.removeAttribute("src");
      this.preview.alt = "";
      this.sizeText.textContent = "No image yet";
    }
    if (this.clearButton) this.clearButton.hidden = !image;
    this.onChange(image);
  }
}
