// The REST API of `segue serve`, as the page uses it: requests with the bearer token, errors as ApiError
// (with the form field they concern), Server-Sent Events read from a fetch stream (EventSource cannot send
// an Authorization header) and files fetched as blobs for the same reason.

const TOKEN_KEY = "segue.token";

export class ApiError extends Error {
  constructor(status, message, param = null) {
    super(message);
    this.status = status;
    this.param = param; // the request field the server named, when it named one
  }
}

// Asks the person for the token; set by the page (app.js). Resolves to the token, or null when they give up.
let askToken = async () => null;
export function onTokenNeeded(fn) {
  askToken = fn;
}

export function storedToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders(token, extra = {}) {
  return token ? { ...extra, Authorization: `Bearer ${token}` } : { ...extra };
}

// One token prompt at a time, however many requests were refused together.
let pendingAsk = null;
async function renewToken(refused) {
  if (!pendingAsk) {
    pendingAsk = askToken(refused).finally(() => {
      pendingAsk = null;
    });
  }
  const token = await pendingAsk;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  return token;
}

// fetch with the token; a 401 asks for the token (once for all waiting requests) and tries again.
export async function send(method, path, { body, headers = {}, signal } = {}) {
  for (;;) {
    const used = storedToken();
    const res = await fetch(path, { method, body, signal, headers: authHeaders(used, headers) });
    if (res.status !== 401) return res;
    // A request sent with an older token may be refused after the person gave a new one: it tries again
    // with the new one, and neither forgets it nor asks again.
    const current = storedToken();
    if (current && current !== used) continue;
    sessionStorage.removeItem(TOKEN_KEY);
    const token = await renewToken(Boolean(used));
    if (!token) throw await errorOf(res);
  }
}

// The JSON answer of a request, or an ApiError with the server's own message.
export async function call(method, path, options = {}) {
  const res = await send(method, path, options);
  if (!res.ok) throw await errorOf(res);
  if (res.status === 204) return null;
  const type = res.headers.get("content-type") || "";
  return type.includes("json") ? res.json() : res.text();
}

// The message and field of an error answer: FastAPI's {"detail": "..."} or its validation list
// [{"loc": [..., "field"], "msg"}], or OpenAI's {"error": {"message", "param"}}.
export async function errorOf(res) {
  let data = null;
  try {
    data = await res.clone().json();
  } catch {
    const text = (await res.text()).trim();
    const plain = text && !text.startsWith("<") && text.length < 500; // not an HTML error page
    return new ApiError(res.status, plain ? text : `${res.status} ${res.statusText}`.trim());
  }
  if (data && typeof data.error === "object" && data.error) {
    return new ApiError(res.status, String(data.error.message ?? res.statusText), data.error.param ?? null);
  }
  const detail = data?.detail ?? data?.message ?? data?.error;
  if (Array.isArray(detail) && detail.length) {
    const first = detail[0];
    const loc = Array.isArray(first.loc) ? first.loc.filter((x) => x !== "body" && x !== "query") : [];
    const param = loc.length ? String(loc[loc.length - 1]) : null;
    const msg = detail.map((d) => (d.loc ? `${d.loc.filter((x) => x !== "body").join(".")}: ` : "") + d.msg);
    return new ApiError(res.status, msg.join("; "), param);
  }
  if (detail && typeof detail === "object") {
    return new ApiError(res.status, String(detail.message ?? JSON.stringify(detail)), detail.param ?? null);
  }
  return new ApiError(res.status, detail ? String(detail) : `${res.status} ${res.statusText}`);
}

// A file of the API as an object URL (the caller revokes it).
export async function blobUrl(path) {
  const res = await send("GET", path);
  if (!res.ok) throw await errorOf(res);
  return URL.createObjectURL(await res.blob());
}

export async function blob(path) {
  const res = await send("GET", path);
  if (!res.ok) throw await errorOf(res);
  return res.blob();
}

// Server-Sent Events of a stream: calls onEvent(name, data) for each event (data parsed as JSON when it is)
// until the stream ends or signal aborts. Resolves when the server closes the stream.
export async function readEvents(path, onEvent, signal) {
  const res = await send("GET", path, { headers: { Accept: "text/event-stream" }, signal });
  if (!res.ok) throw await errorOf(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  const dispatch = () => {
    if (data.length) {
      const text = data.join("\n");
      let value = text;
      try {
        value = JSON.parse(text);
      } catch {
        // plain text data stays text
      }
      onEvent(name, value);
    }
    name = "message";
    data = [];
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") dispatch();
      else if (line.startsWith(":")) continue;
      else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
      }
    }
  }
  dispatch();
}
