// Vercel's AI SDK as a real client of parley, headless: the AbstractChat that React's useChat wraps, over the
// DefaultChatTransport, with a minimal ChatState. tests/test_ai_sdk.py runs it and reads the one JSON line it prints.
//
//   node driver.mjs send   --session ID --text TEXT [--text TEXT...] [--regenerate] [--body JSON]
//                          [--steps '[{"send": T, "files"?: [F]}, {"regenerate": null | INDEX}, {"edit": INDEX, "text": T}]']
//                          [--last-only]
//   node driver.mjs resume --session ID [--hydrate]            (resumeStream(); --hydrate loads the history first)
//                                       [--history JSON]      (--hydrate with this history, as loaded a while ago)
//
// PARLEY_AI_SDK=ai6: the AI SDK 6 (package.json installs it under the alias ai6) instead of 7 (ai). npm installs
// 6 on Node 20, as ai 7 declares Node >= 22: people use both.
//
// --cancel-after-chars N: POST /api/v1/cancel once the assistant's text has N characters, as a stop button would.
// --stop-after-chars N: the SDK's own stop() instead (it only closes the connection); --then-resume: then call
// resumeStream() in the same chat, as useChat's resume does after a reload.
//
// --stop-at-tool: stop() as soon as a tool call's input is complete (its part is input-available): a stop
// during a tool call.
//
// A step's files are sendMessage({text, files})'s file parts: each F is {"path", "mediaType", "filename"}, sent as a
// data: URL of the file's bytes (what sendMessage makes of a FileList in a browser). In the result, a data: URL is
// shown as "data:sha256=<hex of its bytes>".
//
// --last-only: the transport sends only the last message, with the README's prepareSendMessagesRequest (the AI
// SDK's own recipe, keeping the trigger, messageId and body).
//
// --progress writes {"progress": {"status", "text"}} to stderr on each change, so a test can act mid-reply.
//
// The base URL is --base URL or $PARLEY_URL. Exit code 0 whenever a result was printed: the test judges it.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const sdk = process.env.PARLEY_AI_SDK || 'ai';
if (!['ai', 'ai6'].includes(sdk)) throw new Error(`PARLEY_AI_SDK must be ai or ai6, not ${sdk}`);
const { AbstractChat, DefaultChatTransport } = await import(sdk);

// What useChat's React state does, without React: the chat replaces messages and assigns `messages` wholesale.
class State {
  constructor(messages, onChange) {
    this.status = 'ready';
    this.error = undefined;
    this.messages = messages;
    this.onChange = onChange;
  }
  pushMessage(message) {
    this.messages = this.messages.concat(message);
    this.onChange();
  }
  popMessage() {
    this.messages = this.messages.slice(0, -1);
    this.onChange();
  }
  replaceMessage(index, message) {
    this.messages = [...this.messages.slice(0, index), this.snapshot(message), ...this.messages.slice(index + 1)];
    this.onChange();
  }
  snapshot(thing) {
    return structuredClone(thing);
  }
}

class HeadlessChat extends AbstractChat {
  constructor({ messages = [], onChange = () => {}, ...init }) {
    super({ ...init, state: new State(messages, () => onChange(this)) });
  }
  get messages() {
    return this.state.messages;
  }
  set messages(messages) {
    this.state.messages = messages; // (useChat's setMessages)
  }
}

// The README's way to show parley's sentence: a non-2xx answer's body is the error's message, and parley's body is
// {"status": "error", "message": ...}; an error part mid-stream is the sentence itself.
function sentence(error) {
  try {
    return JSON.parse(error.message).message ?? error.message;
  } catch {
    return error.message;
  }
}

// A message's parts as JSON has them (what parley's history returns): no undefined fields; a data: URL as its
// bytes' digest.
const digest = url => 'data:sha256=' + createHash('sha256').update(Buffer.from(url.split(',')[1], 'base64')).digest('hex');
const plain = parts =>
  JSON.parse(JSON.stringify(parts)).map(part =>
    part.type === 'file' && part.url.startsWith('data:') ? { ...part, url: digest(part.url) } : part,
  );

// A step's files, as sendMessage's file parts.
const fileParts = files =>
  (files ?? []).map(({ path, mediaType, filename }) => ({
    type: 'file',
    mediaType,
    filename,
    url: `data:${mediaType};base64,${readFileSync(path).toString('base64')}`,
  }));

const textOf = message => message.parts.filter(part => part.type === 'text').map(part => part.text).join('');

function lastAssistant(messages) {
  const message = messages.findLast(m => m.role === 'assistant');
  return message
    ? { id: message.id, text: textOf(message), metadata: message.metadata ?? null, parts: plain(message.parts) }
    : null;
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    base: { type: 'string', default: process.env.PARLEY_URL },
    session: { type: 'string' },
    text: { type: 'string', multiple: true, default: [] },
    body: { type: 'string', default: '{}' },
    'cancel-after-chars': { type: 'string' },
    'stop-after-chars': { type: 'string' },
    'stop-at-tool': { type: 'boolean', default: false },
    'then-resume': { type: 'boolean', default: false },
    hydrate: { type: 'boolean', default: false },
    history: { type: 'string' },
    progress: { type: 'boolean', default: false },
    regenerate: { type: 'boolean', default: false },
    'last-only': { type: 'boolean', default: false },
    steps: { type: 'string' },
    'timeout-ms': { type: 'string', default: '30000' },
  },
});

const action = positionals[0];
if (!values.base || !values.session || !['send', 'resume'].includes(action)) {
  console.error('usage: driver.mjs send|resume --base URL --session ID [--text T] [--hydrate] [--cancel-after-chars N]');
  process.exit(2);
}
const base = values.base.replace(/\/$/, '');
const session = values.session;

// A cancel is an ordinary HTTP call from the app: the SDK's own stop() only closes the connection.
async function cancel() {
  const response = await fetch(`${base}/api/v1/cancel`, {
    method: 'POST',
    body: new URLSearchParams({ ui_session_id: session }),
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

async function history() {
  const response = await fetch(`${base}/api/v1/sessions/${encodeURIComponent(session)}/messages`);
  if (!response.ok) throw new Error(`history: ${response.status} ${await response.text()}`);
  return (await response.json()).messages;
}

const statuses = [];
const result = { action, session, cancel: null, finish: null, timedOut: false };
let cancelling = null;
const chars = name => (values[name] === undefined ? null : Number(values[name]));
const cancelAfterChars = chars('cancel-after-chars');
const stopAfterChars = chars('stop-after-chars');
let stopping = null;

let lastProgress = '';

function onChange(chat) {
  if (statuses.at(-1) !== chat.status) statuses.push(chat.status);
  const assistant = lastAssistant(chat.messages);
  if (values.progress) {
    const progress = JSON.stringify({ progress: { status: chat.status, text: assistant?.text ?? null } });
    if (progress !== lastProgress) process.stderr.write(progress + '\n');
    lastProgress = progress;
  }
  if (cancelAfterChars !== null && cancelling === null && assistant && assistant.text.length >= cancelAfterChars) {
    result.textAtCancel = assistant.text;
    cancelling = cancel().then(outcome => (result.cancel = outcome));
  }
  if (stopAfterChars !== null && stopping === null && assistant && assistant.text.length >= stopAfterChars) {
    stopping = chat.stop();
  }
  const toolRunning = assistant?.parts.some(part => part.type === 'dynamic-tool' && part.state === 'input-available');
  if (values['stop-at-tool'] && stopping === null && toolRunning) stopping = chat.stop();
}

let messages = [];
if (values.hydrate) {
  // What a page does on load before useChat({resume: true}), as the README shows: the history as it comes (each
  // message is a UIMessage, with the parts useChat keeps: a new chat built from them shows the conversation as it
  // streamed), then rejoin.
  messages = values.history === undefined ? await history() : JSON.parse(values.history);
  result.hydrated = messages.map(m => ({ id: m.id, role: m.role, text: textOf(m) }));
}

const chat = new HeadlessChat({
  id: session,
  messages,
  transport: new DefaultChatTransport({
    api: `${base}/api/v1/chat`,
    body: JSON.parse(values.body),
    // The README's: only the new message (parley has the history), with what regenerate() and edits need.
    ...(values['last-only'] && {
      prepareSendMessagesRequest: ({ id, messages, body, trigger, messageId }) =>
        ({ body: { ...body, id, message: messages.at(-1), trigger, messageId } }),
    }),
  }),
  onChange,
  onFinish: ({ isAbort, isDisconnect, isError, finishReason }) => {
    result.finish = { isAbort, isDisconnect, isError, finishReason: finishReason ?? null };
  },
});

const timer = setTimeout(() => {
  result.timedOut = true;
  chat.stop();
}, Number(values['timeout-ms']));

try {
  if (action === 'resume') {
    await chat.resumeStream();
    // The README's last line: a reply that ended between the history and the rejoin (204: nothing to resume) is
    // still marked streaming here; the history has its end.
    if (values.hydrate && messages.at(-1)?.metadata?.status === 'streaming') chat.messages = await history();
  }
  // Several --text: one turn after another in the same chat, as a user would type them.
  else for (const text of values.text) await chat.sendMessage({ text });
  // The "regenerate" button: the last reply is asked for again (trigger regenerate-message).
  if (values.regenerate) await chat.regenerate();
  // --steps: what a person does in a chat, in order; a message is named by its index in chat.messages.
  for (const step of values.steps === undefined ? [] : JSON.parse(values.steps)) {
    if ('send' in step) await chat.sendMessage({ text: step.send, files: fileParts(step.files) });
    else if ('regenerate' in step) {
      await chat.regenerate(step.regenerate === null ? {} : { messageId: chat.messages.at(step.regenerate).id });
    } else if ('edit' in step) await chat.sendMessage({ text: step.text, messageId: chat.messages.at(step.edit).id });
    else throw new Error(`unknown step ${JSON.stringify(step)}`);
    if (chat.status !== 'ready') break;
  }
  if (cancelling) await cancelling;
  if (stopping) {
    await stopping;
    result.stopped = { status: chat.status, assistant: lastAssistant(chat.messages), finish: result.finish };
    result.finish = null;
    if (values['then-resume']) await chat.resumeStream();
  }
} catch (error) {
  result.thrown = String(error?.stack ?? error);
} finally {
  clearTimeout(timer);
}

Object.assign(result, {
  status: chat.status,
  error: chat.error ? { name: chat.error.name, message: chat.error.message, statusCode: chat.error.statusCode, sentence: sentence(chat.error) } : null,
  statuses,
  assistant: lastAssistant(chat.messages),
  messages: chat.messages.map(m => ({
    id: m.id,
    role: m.role,
    text: textOf(m),
    metadata: m.metadata ?? null,
    parts: plain(m.parts),
  })),
});
process.stdout.write(JSON.stringify(result) + '\n');
