// parley's chat page: one ES module, no framework, no build step. All URLs are relative, so the page works
// wherever parley is mounted. Whatever came from a user or a model reaches the page as text (textContent),
// never as HTML.

const $ = (id) => document.getElementById(id);
const ui = {
  newSession: $("new-session"),
  sessions: $("sessions"),
  noSessions: $("no-sessions"),
  title: $("title"),
  agentField: $("agent-field"),
  agent: $("agent"),
  deleteSession: $("delete-session"),
  renameSession: $("rename-session"),
  messages: $("messages"),
  empty: $("empty"),
  error: $("error"),
  composer: $("composer"),
  attachments: $("attachments"),
  attach: $("attach"),
  message: $("message"),
  send: $("send"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyReason: $("key-reason"),
  apiKey: $("api-key"),
};

const KEY = "parley.apiKey";
const state = {
  sessionId: null, // the open session, also in the URL's fragment
  view: 0, // bumped whenever the chat view changes, so late answers for an old view are dropped
  run: null, // the reply being followed: {sessionId, interactionId, abort, reply, stopping, stopOnStart}
  attachments: [], // [{file, uploaded: FileInfo | null, sessionId}]
  titles: new Map(),
  agents: new Map(), // session id -> its agent's name, to label its replies
  agentChoice: false, // more than one agent: new sessions may pick theirs
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// HTTP

const REASONS = {
  401: "You are not signed in.",
  409: "This session is busy with another reply.",
  413: "Too large.",
  429: "Too many replies running at once.",
  502: "The model server failed.",
  503: "parley is unavailable right now.",
};

async function errorText(response) {
  const body = await response.text().catch(() => "");
  try {
    const message = JSON.parse(body).message;
    if (typeof message === "string") return message;
  } catch {
    // not JSON: say what there is
  }
  return body.trim().slice(0, 300) || response.statusText || `HTTP ${response.status}`;
}

// Every API call: sends the stored key, asks for one on 401 (then retries), and turns failures into sentences.
async function request(path, { method = "GET", body, headers = {}, signal } = {}) {
  for (;;) {
    const key = localStorage.getItem(KEY);
    const auth = key ? { Authorization: `Bearer ${key}` } : {};
    let response;
    try {
      response = await fetch(path, { method, body, signal, headers: { ...auth, ...headers } });
    } catch (error) {
      if (signal?.aborted) throw error;
      throw new ApiError(0, `Network error: parley could not be reached (${error.message}).`);
    }
    // A 401 that asks for a bearer token wants an API key; any other (a host app's sign-in) is only reported.
    if (response.status === 401 && /^bearer/i.test(response.headers.get("www-authenticate") ?? "")) {
      await askForKey(await errorText(response));
      continue;
    }
    if (!response.ok) {
      const message = await errorText(response);
      const reason = REASONS[response.status];
      throw new ApiError(response.status, reason ? `${reason} ${message}` : `Error ${response.status}: ${message}`);
    }
    return response;
  }
}

async function getJSON(path) {
  return (await request(path)).json();
}

// URL-encoded, except for files: a multipart body would turn the message's line breaks into CRLF.
function postForm(path, fields, options = {}) {
  const values = Object.entries(fields).filter(([, value]) => value != null);
  const multipart = values.some(([, value]) => value instanceof Blob);
  const form = multipart ? new FormData() : new URLSearchParams();
  for (const [name, value] of values) form.set(name, value);
  return request(path, { method: "POST", body: form, ...options });
}

let keyPrompt = null;

// One prompt at a time, however many requests were refused meanwhile.
function askForKey(reason) {
  keyPrompt ??= new Promise((resolve) => {
    const refused = localStorage.getItem(KEY) !== null;
    ui.keyReason.textContent = refused
      ? `The saved key was refused (${reason}). Enter another one.`
      : "This server needs a key. Enter it once: this browser keeps it.";
    ui.apiKey.value = "";
    ui.keyForm.addEventListener(
      "submit",
      () => {
        localStorage.setItem(KEY, ui.apiKey.value.trim());
        keyPrompt = null;
        resolve();
      },
      { once: true },
    );
    ui.keyDialog.showModal();
    ui.apiKey.focus();
  });
  return keyPrompt;
}

// Server-sent events: yields {id, data} per event; comments (keep-alives) are skipped.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replaceAll("\r", "");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = { id: null, data: [] };
        for (const line of block.split("\n")) {
          const colon = line.indexOf(":");
          if (colon === 0) continue;
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") event.data.push(value);
          else if (field === "id") event.id = value;
        }
        if (event.data.length) yield { id: event.id, data: event.data.join("\n") };
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Messages

function chip(info) {
  const item = document.createElement("li");
  item.className = "chip";
  item.textContent = info.filename;
  if (info.size != null) item.title = `${info.filename}, ${formatSize(info.size)}`;
  return item;
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} bytes`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function messageElement(role, text, { status = null, files = [], messageId = null, agent = null } = {}) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  article.dataset.role = role;
  if (messageId) article.dataset.messageId = messageId;
  const meta = document.createElement("header");
  meta.className = "meta";
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : agent || "Assistant";
  const badge = document.createElement("span");
  badge.className = "status";
  meta.append(who, badge);
  const content = document.createElement("div");
  content.className = "content";
  content.setAttribute("data-content", "");
  content.textContent = text;
  article.append(meta, content);
  if (files.length) {
    const list = document.createElement("ul");
    list.className = "chips";
    list.setAttribute("aria-label", "Files");
    list.append(...files.map(chip));
    article.append(list);
  }
  if (status) setStatus(article, status);
  return article;
}

function setStatus(article, status) {
  article.dataset.status = status;
  // Screen readers announce the reply once it is whole, not at every token.
  article.setAttribute("aria-busy", String(status === "streaming"));
  const badge = article.querySelector(".status");
  badge.textContent = status === "complete" ? "" : status === "streaming" ? "writing…" : status;
}

// A reply's parts (the AI SDK's UIMessage parts, as history keeps them and the stream builds them): text, reasoning
// (collapsed, open while it streams) and each tool call as a card with its name, input, output or error, and state.
// Elements are kept across updates, part by part, so that a reasoning the user opened stays open.
function setParts(article, parts) {
  const nearBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 80;
  const content = article.querySelector("[data-content]");
  const shown = parts.filter((part) => partKind(part) !== null);
  if (content.childElementCount !== content.childNodes.length) content.replaceChildren(); // plain text (a user's)
  while (content.childElementCount > shown.length) content.lastElementChild.remove();
  shown.forEach((part, index) => {
    let element = content.children[index];
    if (!element || element.dataset.part !== partKind(part)) {
      const fresh = partElement(part);
      if (element) element.replaceWith(fresh);
      else content.append(fresh);
      element = fresh;
    }
    updatePart(element, part);
  });
  if (nearBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function partKind(part) {
  if (part.type === "text" || part.type === "reasoning") return part.type;
  if (part.type === "dynamic-tool" || part.type?.startsWith("tool-")) return "tool";
  return null; // step-start: no element
}

function partElement(part) {
  const kind = partKind(part);
  if (kind === "text") {
    const span = document.createElement("span");
    span.dataset.part = "text";
    return span;
  }
  if (kind === "reasoning") {
    const details = document.createElement("details");
    details.dataset.part = "reasoning";
    details.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const text = document.createElement("div");
    text.className = "reasoning-text";
    details.append(summary, text);
    return details;
  }
  const card = document.createElement("section");
  card.dataset.part = "tool";
  card.className = "tool";
  const header = document.createElement("header");
  const name = document.createElement("span");
  name.className = "tool-name";
  const badge = document.createElement("span");
  badge.className = "tool-state";
  header.append(name, badge);
  const input = document.createElement("pre");
  input.className = "tool-input";
  const output = document.createElement("pre");
  output.className = "tool-output";
  card.append(header, input, output);
  return card;
}

const TOOL_STATES = {
  "input-streaming": "preparing…",
  "input-available": "running…",
  "output-available": "done",
  "output-error": "failed",
};

function updatePart(element, part) {
  if (part.type === "text") {
    if (element.textContent !== part.text) element.textContent = part.text;
    return;
  }
  if (part.type === "reasoning") {
    const streaming = part.state === "streaming";
    // Open while it streams; closed once it is done, unless the user opened it meanwhile.
    if (streaming && !element.dataset.state) element.open = true;
    if (!streaming && element.dataset.state === "streaming") element.open = false;
    element.dataset.state = part.state ?? "done";
    element.querySelector(".reasoning-text").textContent = part.text;
    return;
  }
  const name = part.toolName ?? part.type.slice("tool-".length);
  element.dataset.toolName = name;
  element.dataset.state = part.state;
  element.querySelector(".tool-name").textContent = name;
  element.querySelector(".tool-state").textContent = TOOL_STATES[part.state] ?? part.state;
  element.querySelector(".tool-input").textContent = part.input === undefined ? "" : pretty(part.input);
  const output = element.querySelector(".tool-output");
  output.textContent =
    part.state === "output-error" ? part.errorText ?? "" : part.output === undefined ? "" : pretty(part.output);
  output.classList.toggle("error", part.state === "output-error");
  output.hidden = !output.textContent;
}

function pretty(value) {
  if (typeof value === "string") return value;
  const short = JSON.stringify(value, null, 1)?.replace(/\n\s*/g, " ") ?? String(value);
  return short.length <= 72 ? short : JSON.stringify(value, null, 2);
}

// The UI message stream's chunks, folded into parts as useChat folds them.
function applyChunk(parts, chunk, open) {
  const tool = (id) => parts.find((part) => part.type === "dynamic-tool" && part.toolCallId === id);
  switch (chunk.type) {
    case "text-start":
    case "reasoning-start": {
      const kind = chunk.type.slice(0, -"-start".length);
      open[kind] = { type: kind, text: "", state: "streaming" };
      parts.push(open[kind]);
      return true;
    }
    case "text-delta":
    case "reasoning-delta": {
      const part = open[chunk.type.slice(0, -"-delta".length)];
      if (part) part.text += chunk.delta;
      return Boolean(part);
    }
    case "text-end":
    case "reasoning-end": {
      const kind = chunk.type.slice(0, -"-end".length);
      if (open[kind]) open[kind].state = "done";
      open[kind] = null;
      return true;
    }
    case "start-step":
      parts.push({ type: "step-start" });
      return false;
    case "tool-input-start":
      parts.push({ type: "dynamic-tool", toolName: chunk.toolName, toolCallId: chunk.toolCallId, state: "input-streaming" });
      open.inputs[chunk.toolCallId] = "";
      return true;
    case "tool-input-delta": {
      const part = tool(chunk.toolCallId);
      if (!part) return false;
      open.inputs[chunk.toolCallId] = (open.inputs[chunk.toolCallId] ?? "") + chunk.inputTextDelta;
      try {
        part.input = JSON.parse(open.inputs[chunk.toolCallId]);
      } catch {
        part.input = open.inputs[chunk.toolCallId];
      }
      return true;
    }
    case "tool-input-available": {
      let part = tool(chunk.toolCallId);
      if (!part) parts.push((part = { type: "dynamic-tool", toolCallId: chunk.toolCallId }));
      Object.assign(part, { toolName: chunk.toolName, state: "input-available", input: chunk.input });
      return true;
    }
    case "tool-output-available":
    case "tool-output-error": {
      const part = tool(chunk.toolCallId);
      if (!part) return false;
      if (chunk.type === "tool-output-available") Object.assign(part, { state: "output-available", output: chunk.output });
      else Object.assign(part, { state: "output-error", errorText: chunk.errorText });
      return true;
    }
    default:
      return false;
  }
}


function addMessage(article) {
  ui.empty.hidden = true;
  ui.messages.append(article);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return article;
}

function clearMessages() {
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

// Sessions

async function loadSessions() {
  // One request: each session comes with its title (set, or its first message's).
  const { sessions } = await getJSON("api/v1/sessions?limit=100");
  ui.noSessions.hidden = sessions.length > 0;
  for (const session of sessions) {
    state.agents.set(session.ui_session_id, session.agent);
    if (session.title) state.titles.set(session.ui_session_id, session.title);
  }
  ui.sessions.replaceChildren(
    ...sessions.map((session) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#${encodeURIComponent(session.ui_session_id)}`;
      // (A session made a moment ago has no title yet: the page's own, from the message it is sending.)
      link.textContent = state.titles.get(session.ui_session_id) || "Untitled";
      link.dataset.sessionId = session.ui_session_id;
      const when = document.createElement("small");
      when.textContent = new Date(session.created_at).toLocaleString();
      link.append(when);
      if (session.ui_session_id === state.sessionId) link.setAttribute("aria-current", "page");
      item.append(link);
      return item;
    }),
  );
  const current = state.titles.get(state.sessionId);
  if (current) showTitle(current);
}

function setTitle(sessionId, title) {
  state.titles.set(sessionId, title);
  const link = ui.sessions.querySelector(`a[data-session-id="${CSS.escape(sessionId)}"]`);
  if (link) link.firstChild.textContent = title;
  if (sessionId === state.sessionId) showTitle(title);
}

function showTitle(title) {
  ui.title.textContent = title;
  document.title = `${title} · parley`;
}

function markCurrent() {
  for (const link of ui.sessions.querySelectorAll("a")) {
    if (link.dataset.sessionId === state.sessionId) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function leaveRun() {
  // Leaving a reply only stops following it: it runs on (on_disconnect=continue) and can be rejoined.
  state.run?.abort.abort();
}

function newSession() {
  leaveRun();
  state.view += 1;
  state.sessionId = null;
  history.replaceState(null, "", location.pathname + location.search);
  showTitle("New conversation");
  ui.deleteSession.hidden = ui.renameSession.hidden = true;
  ui.agentField.hidden = !state.agentChoice;
  clearMessages();
  hideError();
  markCurrent();
  ui.message.focus();
}

async function openSession(sessionId) {
  leaveRun();
  const view = ++state.view;
  state.sessionId = sessionId;
  showTitle(state.titles.get(sessionId) || "Conversation");
  ui.deleteSession.hidden = ui.renameSession.hidden = false;
  ui.agentField.hidden = true;
  hideError();
  markCurrent();
  clearMessages();
  const path = `api/v1/sessions/${encodeURIComponent(sessionId)}`;
  let messages, files;
  try {
    [{ messages }, { files }] = await Promise.all([
      getJSON(`${path}/messages`),
      getJSON(`api/v1/files/${encodeURIComponent(sessionId)}`),
    ]);
  } catch (error) {
    if (view !== state.view) return;
    showError(error.status === 404 ? `There is no session ${sessionId} (it may have been deleted).` : error.message);
    ui.deleteSession.hidden = ui.renameSession.hidden = true;
    return;
  }
  if (view !== state.view) return;
  const byId = new Map(files.map((info) => [info.id, info]));
  let running = null;
  for (const message of messages) {
    const known = message.file_ids.map((id) => byId.get(id) ?? { filename: `${id} (deleted)` });
    const status = message.role === "assistant" ? message.status : null;
    const agent = state.agents.get(sessionId);
    const options = { status, files: known, messageId: message.id, agent };
    const article = addMessage(messageElement(message.role, message.content, options));
    if (message.role === "assistant" && message.parts) setParts(article, message.parts);
    if (status === "streaming") running = article;
  }
  if (running) await rejoin(sessionId, running);
  else refreshActions();
}

function openFromHash() {
  let sessionId;
  try {
    sessionId = decodeURIComponent(location.hash.slice(1));
  } catch {
    // A hand-made address ("/#%"): say so, and start a new conversation rather than show nothing.
    const hash = location.hash;
    newSession();
    showError(`The address ends in "${hash}", which is not a session id: this is a new conversation.`);
    return;
  }
  if (sessionId && sessionId !== state.sessionId) openSession(sessionId);
  else if (!sessionId && state.sessionId) newSession();
}

async function deleteSession() {
  const sessionId = state.sessionId;
  if (!sessionId || !confirm("Delete this session, its history and its files?")) return;
  try {
    await request(`api/v1/sessions/${encodeURIComponent(sessionId)}`, { method: "DELETE" });
  } catch (error) {
    showError(error.message);
    return;
  }
  state.titles.delete(sessionId);
  newSession();
  await loadSessions().catch((error) => showError(error.message));
}

// Sending, following and stopping a reply

function setStreaming(on) {
  ui.send.textContent = on ? "Stop" : "Send";
  ui.send.classList.toggle("danger", on);
  ui.send.classList.toggle("primary", !on);
  ui.send.disabled = false;
}

// Reads one reply's stream (the AI SDK's UI message stream, over SSE) into `run.reply` until it ends; returns
// the status history gave it (null when the stream ended without saying).
async function readReply(response, run) {
  run.interactionId = response.headers.get("x-interaction-id") ?? run.interactionId;
  if (run.stopOnStart) cancel(run); // Stop was pressed before the reply had started
  if (!(response.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
    throw new Error(`expected a stream of server-sent events, got ${response.headers.get("content-type")}`);
  }
  let status = null;
  let done = false;
  for await (const event of serverSentEvents(response.body)) {
    if (event.id) run.lastEventId = event.id;
    if (event.data === "[DONE]") {
      done = true;
      break;
    }
    const part = JSON.parse(event.data);
    if (part.type === "start") {
      // A rejoin replays the reply from its first frame: rebuild it.
      run.parts = [];
      run.open = { inputs: {} };
      run.interactionId = part.messageMetadata?.interaction_id ?? run.interactionId;
      if (part.messageId) run.reply.dataset.messageId = part.messageId;
    } else if (applyChunk(run.parts, part, run.open)) {
      run.show(run.parts);
    } else if (part.type === "error") {
      showError(`The agent failed: ${part.errorText}`);
    } else if (part.type === "message-metadata") {
      status = part.messageMetadata?.status ?? status;
    } else if (part.type === "finish") {
      status = part.messageMetadata?.status ?? status;
      done = true;
    }
  }
  // A connection cut by a proxy can end as cleanly as a finished reply: only the last frames tell them apart.
  if (!done) throw new Error("the connection ended before the reply did");
  return status;
}

// The reply's record in history (by its message id when known, else the session's last reply).
async function recorded(sessionId, reply) {
  const { messages } = await getJSON(`api/v1/sessions/${encodeURIComponent(sessionId)}/messages`);
  const id = reply.dataset.messageId;
  const assistants = messages.filter((m) => m.role === "assistant");
  return (id && assistants.find((m) => m.id === id)) || assistants.at(-1) || null;
}

function rejoinRequest(sessionId, lastEventId) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  return (signal) => request(`api/v1/chat/${encodeURIComponent(sessionId)}/stream`, { headers, signal });
}

// Reads the reply to its end; when the connection drops mid-reply, picks it up after the last frame that came.
async function readToEnd(response, run) {
  for (let attempt = 0; ; attempt += 1) {
    if (response.status === 204) return null; // nothing running (any more): history has the end
    try {
      return await readReply(response, run);
    } catch (error) {
      if (run.abort.signal.aborted || !run.lastEventId || attempt >= 2) throw error;
      response = await rejoinRequest(run.sessionId, run.lastEventId)(run.abort.signal);
    }
  }
}

// Follows a reply until it ends. A failure of `open` (the request refused) is the caller's to report. Text
// already on screen (a rejoin starts from history's text so far) only ever grows: the rejoin's replay from the
// first frame catches up with it before the display moves, so there is no flash back to empty.
async function follow(reply, sessionId, open) {
  let floor = reply.querySelectorAll("[data-content] > *").length;
  const run = {
    sessionId,
    reply,
    parts: [],
    open: { inputs: {} },
    interactionId: null,
    lastEventId: null,
    abort: new AbortController(),
    stopping: false,
    stopOnStart: false,
    show(parts) {
      // (Counted in parts shown and, within the last, in text: the replay catches up before the display moves.)
      const shown = parts.filter((part) => partKind(part) !== null);
      if (floor && shown.length < floor) return;
      const last = shown.at(-1);
      if (floor && shown.length === floor && (last.type === "text" || last.type === "reasoning")) {
        const now = reply.querySelector("[data-content]").lastElementChild?.textContent.length ?? 0;
        if (last.text.length < now - (last.type === "reasoning" ? "Reasoning".length : 0)) return;
      }
      floor = 0;
      setParts(reply, parts);
    },
  };
  state.run = run;
  setStreaming(true);
  setStatus(reply, "streaming");
  try {
    let response;
    try {
      response = await open(run.abort.signal);
    } catch (error) {
      if (run.abort.signal.aborted) return;
      throw error;
    }
    let status = null;
    try {
      status = await readToEnd(response, run);
    } catch (error) {
      if (run.abort.signal.aborted) return;
      const why = error instanceof ApiError ? error.message : error.message.replace(/\.$/, "");
      showError(`The connection dropped: ${why}. Reload the page to pick the reply up.`);
    }
    if (run.abort.signal.aborted) return;
    if (!status) {
      const message = await recorded(sessionId, reply).catch(() => null);
      if (message && response.status === 204) setParts(reply, message.parts ?? [{ type: "text", text: message.content }]);
      status = message?.status ?? "disconnected";
    }
    setStatus(reply, status);
  } finally {
    if (state.run === run) {
      state.run = null;
      setStreaming(false);
    }
  }
}

async function rejoin(sessionId, reply) {
  try {
    await follow(reply, sessionId, rejoinRequest(sessionId, null));
  } catch (error) {
    showError(error.message);
  }
}

// Sends the composer's message; or, given `text` and `replace`, an edit of a user message (it and what followed
// it are replaced); or, with `regenerate`, a new reply in the place of `replace`. `ifBusy: "interrupt"` stops the
// reply that is running (as Stop does) and sends this at once.
async function send({ text = null, replace = null, regenerate = false, ifBusy = null } = {}) {
  if ((state.run && !ifBusy) || ui.send.disabled) return;
  const fromComposer = text === null && !regenerate;
  text = fromComposer ? ui.message.value : (text ?? "");
  if (!regenerate && !text.trim()) {
    ui.message.focus();
    return;
  }
  refreshActions(true);
  hideError();
  ui.send.disabled = true;
  const view = state.view;
  let user = null;
  let reply = null;
  try {
    let sessionId = state.sessionId;
    if (!sessionId) {
      const agent = ui.agent.value || undefined;
      const created = await request("api/v1/sessions", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(agent ? { agent } : {}),
      });
      const session = await created.json();
      sessionId = session.ui_session_id;
      state.agents.set(sessionId, session.agent);
      if (view !== state.view) return;
      state.sessionId = sessionId;
      history.replaceState(null, "", `#${encodeURIComponent(sessionId)}`);
      ui.deleteSession.hidden = ui.renameSession.hidden = false;
      ui.agentField.hidden = true;
      setTitle(sessionId, text.trim().replace(/\s+/g, " ").slice(0, 80));
      loadSessions().catch((error) => showError(error.message));
    }
    const files = [];
    for (const attachment of fromComposer ? state.attachments : []) {
      if (!attachment.uploaded || attachment.sessionId !== sessionId) {
        const response = await postForm("api/v1/files", { ui_session_id: sessionId, file: attachment.file });
        attachment.uploaded = await response.json();
        attachment.sessionId = sessionId;
      }
      files.push(attachment.uploaded);
    }
    if (view !== state.view) return;
    user = regenerate ? null : addMessage(messageElement("user", text, { files }));
    reply = addMessage(messageElement("assistant", "", { status: "streaming", agent: state.agents.get(sessionId) }));
    const sent = state.attachments;
    if (fromComposer) {
      ui.message.value = "";
      setAttachments([]);
    }
    const fields = { ui_session_id: sessionId, on_disconnect: "continue" };
    if (!regenerate) fields.message = text;
    if (replace) fields.replace = replace;
    if (ifBusy) fields.if_busy = ifBusy;
    if (files.length) fields.file_ids = JSON.stringify(files.map((info) => info.id));
    const headers = { Accept: "text/event-stream" };
    try {
      await follow(reply, sessionId, (signal) => postForm("api/v1/chat", fields, { headers, signal }));
    } catch (error) {
      // Refused before it started (busy, too large, ...): nothing was recorded, so give the message back.
      user?.remove();
      reply.remove();
      if (!fromComposer) {
        await openSession(sessionId); // (an edit or a regenerate took messages off the page: show history's)
      } else {
        if (!ui.message.value) ui.message.value = text;
        if (!state.attachments.length) setAttachments(sent);
      }
      if (!ui.messages.querySelector("[data-role]")) ui.empty.hidden = false;
      throw error;
    }
    if (view === state.view && !state.run) await syncIds(sessionId);
  } catch (error) {
    showError(error.message);
  } finally {
    if (!state.run) setStreaming(false);
    refreshActions();
  }
}

// Regenerate, edit, rename

// The page's messages take history's ids (a message sent from here learns its id once its reply has ended), so
// that Edit and Regenerate can name them.
async function syncIds(sessionId) {
  const { messages } = await getJSON(`api/v1/sessions/${encodeURIComponent(sessionId)}/messages`);
  const articles = [...ui.messages.querySelectorAll("[data-role]")];
  if (sessionId !== state.sessionId || articles.length !== messages.length) return;
  articles.forEach((article, index) => {
    if (article.dataset.role === messages[index].role) article.dataset.messageId = messages[index].id;
  });
}

// Edit on each user message, Regenerate on the last reply: while no reply runs.
function refreshActions(hide = false) {
  for (const bar of ui.messages.querySelectorAll(".actions")) bar.remove();
  if (hide || state.run || !state.sessionId) return;
  const articles = [...ui.messages.querySelectorAll("[data-role]")];
  for (const article of articles) {
    if (article.dataset.role === "user" && article.dataset.messageId) {
      addAction(article, "Edit", "Edit this message", () => startEdit(article));
    }
  }
  const last = articles.at(-1);
  if (last?.dataset.role === "assistant" && last.dataset.messageId) {
    addAction(last, "Regenerate", "Answer the last message again", () => {
      last.remove();
      send({ replace: last.dataset.messageId, regenerate: true });
    });
  }
}

function addAction(article, label, title, action) {
  let bar = article.querySelector(".actions");
  if (!bar) {
    bar = document.createElement("span");
    bar.className = "actions";
    article.querySelector(".meta").append(bar);
  }
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  button.title = title;
  button.addEventListener("click", action);
  bar.append(button);
}

// Edits a user message in place: Enter sends it (it and everything after it are replaced), Esc leaves it as it was.
function startEdit(article) {
  if (state.run) return;
  const content = article.querySelector("[data-content]");
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.rows = 2;
  editor.value = content.textContent;
  editor.setAttribute("aria-label", "Edit message");
  content.replaceWith(editor);
  editor.focus();
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      const text = editor.value;
      if (!text.trim()) return;
      editor.replaceWith(content);
      const replace = article.dataset.messageId;
      while (article.nextElementSibling) article.nextElementSibling.remove();
      article.remove();
      send({ text, replace });
    } else if (event.key === "Escape") {
      event.preventDefault();
      editor.replaceWith(content);
    }
  });
}

async function renameSession() {
  const sessionId = state.sessionId;
  if (!sessionId) return;
  const title = prompt("Rename this session", state.titles.get(sessionId) ?? "");
  if (title === null || !title.trim()) return;
  try {
    const response = await request(`api/v1/sessions/${encodeURIComponent(sessionId)}`, {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ title: title.trim().slice(0, 200) }),
    });
    setTitle(sessionId, (await response.json()).title);
  } catch (error) {
    showError(error.message);
  }
}

// Stop cancels the reply by its interaction id, which comes with the reply's first frame. Pressed before that (the
// request is on its way, or the model has not said its first word), it waits for the id: a cancel without one would
// stop whatever reply the session runs when it arrives, another tab's or the next one, and none if it came first.
function stop() {
  const run = state.run;
  if (!run || run.stopping) return;
  run.stopping = true;
  ui.send.disabled = true; // (until the cancel is answered, or the reply ends)
  if (run.interactionId) cancel(run);
  else run.stopOnStart = true;
}

async function cancel(run) {
  run.stopOnStart = false;
  try {
    await postForm("api/v1/cancel", { ui_session_id: run.sessionId, interaction_id: run.interactionId });
  } catch (error) {
    run.stopping = false;
    showError(`Stop failed: ${error.message}`);
  } finally {
    if (state.run === run) ui.send.disabled = false;
  }
}

// Attachments

function setAttachments(attachments) {
  state.attachments = attachments;
  ui.attachments.replaceChildren(
    ...attachments.map((attachment, index) => {
      const item = chip({ filename: attachment.file.name, size: attachment.file.size });
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${attachment.file.name}`);
      remove.addEventListener("click", () => setAttachments(state.attachments.filter((_, i) => i !== index)));
      item.append(remove);
      return item;
    }),
  );
}

// Agents

async function loadAgents() {
  const { agents } = await getJSON("api/v1/agents");
  // The server's default (PARLEY_AGENT) comes first; the API does not say which agent it is.
  const byDefault = document.createElement("option");
  byDefault.value = "";
  byDefault.textContent = "default";
  ui.agent.replaceChildren(
    byDefault,
    ...agents.map((agent) => {
      const option = document.createElement("option");
      option.value = agent.name;
      option.textContent = agent.name;
      option.title = agent.description;
      return option;
    }),
  );
  ui.agentField.hidden = state.sessionId !== null || agents.length < 2;
  state.agentChoice = agents.length > 1;
}

// Wiring

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.run) stop();
  else send();
});
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!state.run) send();
    // A reply is still being written: offer to stop it and send this (if_busy=interrupt).
    else if (ui.message.value.trim() && confirm("A reply is still being written. Stop it and send this message?")) {
      const text = ui.message.value;
      ui.message.value = "";
      send({ text, ifBusy: "interrupt" });
    }
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.run && !ui.keyDialog.open) {
    event.preventDefault();
    stop();
  }
});
ui.attach.addEventListener("change", () => {
  const added = [...ui.attach.files].map((file) => ({ file, uploaded: null, sessionId: null }));
  setAttachments([...state.attachments, ...added]);
  ui.attach.value = "";
});
ui.newSession.addEventListener("click", newSession);
ui.deleteSession.addEventListener("click", deleteSession);
ui.renameSession.addEventListener("click", renameSession);
// Without a key nothing works: the prompt stays until one is given.
ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault());
window.addEventListener("hashchange", openFromHash);

async function start() {
  if (location.hash.length <= 1) newSession();
  try {
    await loadAgents();
    await loadSessions();
  } catch (error) {
    showError(error.message);
  }
  openFromHash();
}

start();
