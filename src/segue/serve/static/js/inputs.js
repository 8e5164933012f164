// What this browser sent for each job (its fields and keyframe files), kept in IndexedDB so "again" works after
// a reload too. The API keeps no way to download a job's inputs; only the newest KEEP requests are kept here.
// Where IndexedDB is unavailable (some private windows) every call quietly does nothing.

const DB_NAME = "segue-studio";
const STORE = "inputs";
const KEEP = 50;

let opening = null;

function db() {
  opening ??= new Promise((resolve) => {
    let req;
    try {
      req = indexedDB.open(DB_NAME, 1);
    } catch {
      resolve(null);
      return;
    }
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => resolve(null);
    req.onblocked = () => resolve(null);
  });
  return opening;
}

// Runs fn(store) in one transaction; resolves to the request's result (null on any failure).
async function run(mode, fn) {
  const d = await db();
  if (!d) return null;
  return new Promise((resolve) => {
    try {
      const tx = d.transaction(STORE, mode);
      const req = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req ? req.result : null);
      tx.onerror = () => resolve(null);
      tx.onabort = () => resolve(null);
    } catch {
      resolve(null);
    }
  });
}

export async function save(id, fields, files) {
  await run("readwrite", (s) => s.put({ fields, files, at: Date.now() }, id));
  const all = (await run("readonly", (s) => s.getAll())) || [];
  const ids = (await run("readonly", (s) => s.getAllKeys())) || [];
  if (ids.length <= KEEP) return;
  const oldest = ids.map((k, i) => [all[i]?.at ?? 0, k]).sort((a, b) => a[0] - b[0]).slice(0, ids.length - KEEP);
  await run("readwrite", (s) => {
    for (const [, k] of oldest) s.delete(k);
    return null;
  });
}

export async function load(id) {
  return (await run("readonly", (s) => s.get(id))) || null;
}

export async function drop(id) {
  await run("readwrite", (s) => s.delete(id));
}

export async function ids() {
  return new Set((await run("readonly", (s) => s.getAllKeys())) || []);
}
