// The frames of a finished job, read from its PNG zip (`?variant=frames`): a small reader of the zip format's
// central directory (stored and deflated entries; deflate is the browser's own DecompressionStream).

import { blob } from "./api.js";

const EOCD = 0x06054b50; // end of central directory
const CENTRAL = 0x02014b50; // central directory file header
const LOCAL = 0x04034b50; // local file header

export class FrameArchive {
  constructor(buffer, entries) {
    this.buffer = buffer;
    this.entries = entries; // [{ name, method, offset, size }] sorted by name: frame order
  }

  static async fetch(jobId) {
    const data = await blob(`/v1/videos/${encodeURIComponent(jobId)}/content?variant=frames`);
    const buffer = await data.arrayBuffer();
    return new FrameArchive(buffer, readDirectory(buffer));
  }

  get length() {
    return this.entries.length;
  }

  // Frame i as a PNG File named after the job and the frame.
  async frame(i, prefix) {
    const e = this.entries[i];
    const view = new DataView(this.buffer);
    if (view.getUint32(e.offset, true) !== LOCAL) throw new Error(`frames zip: ${e.name} has no local header`);
    const start = e.offset + 30 + view.getUint16(e.offset + 26, true) + view.getUint16(e.offset + 28, true);
    const raw = new Uint8Array(this.buffer, start, e.size);
    let bytes;
    if (e.method === 0) bytes = raw;
    else if (e.method === 8) bytes = await new Response(new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate-raw"))).arrayBuffer();
    else throw new Error(`frames zip: ${e.name} uses compression method ${e.method}`);
    const base = e.name.split("/").pop();
    return new File([bytes], `${prefix}-${base}`, { type: "image/png" });
  }
}

function readDirectory(buffer) {
  const view = new DataView(buffer);
  const n = buffer.byteLength;
  let end = -1;
  for (let i = n - 22; i >= Math.max(0, n - 22 - 65535); i--) {
    if (view.getUint32(i, true) === EOCD) {
      end = i;
      break;
    }
  }
  if (end < 0) throw new Error("frames zip: not a zip file");
  const count = view.getUint16(end + 10, true);
  let at = view.getUint32(end + 16, true);
  if (at === 0xffffffff) throw new Error("frames zip: zip64 archives are not read here");
  const decoder = new TextDecoder();
  const entries = [];
  for (let k = 0; k < count; k++) {
    if (view.getUint32(at, true) !== CENTRAL) throw new Error("frames zip: damaged central directory");
    const method = view.getUint16(at + 10, true);
    const size = view.getUint32(at + 20, true);
    const nameLen = view.getUint16(at + 28, true);
    const extraLen = view.getUint16(at + 30, true);
    const commentLen = view.getUint16(at + 32, true);
    const offset = view.getUint32(at + 42, true);
    const name = decoder.decode(new Uint8Array(buffer, at + 46, nameLen));
    if (name.toLowerCase().endsWith(".png")) entries.push({ name, method, offset, size });
    at += 46 + nameLen + extraLen + commentLen;
  }
  entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  return entries;
}
