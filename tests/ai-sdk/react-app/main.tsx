// A chat app as a newcomer writes it from the README's useChat section ("From a React app: useChat"): the
// section's code as it stands, between the two lines of `=` below (tests/test_use_chat.py checks that it is);
// around it, only what the section leaves out: a session to chat in, and the rendering. The test type-checks it
// (tsconfig.json) and builds it (vite.config.js) as Vite's react-ts template does, and drives it in Chromium.
import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';

// The session: the one in the address (?session=ID), else a new one, put there so that a reload opens it again.
async function session(): Promise<string> {
  const url = new URL(location.href);
  const id = url.searchParams.get('session');
  if (id) return id;
  const created: { ui_session_id: string } = await fetch('/api/v1/sessions', { method: 'POST' }).then(r => r.json());
  url.searchParams.set('session', created.ui_session_id);
  window.history.replaceState(null, '', url);
  return created.ui_session_id;
}
const sessionId = await session();

// ==================================================================================================== README
import { useEffect, useState } from 'react';
import { useChat } from '@ai-sdk/react';
import { DefaultChatTransport, type UIMessage } from 'ai';

// parley's messages: UIMessages whose metadata says which reply of which session, and how it ended.
type Message = UIMessage<{ ui_session_id: string; interaction_id: string; status?: string }>;

// Before the chat renders: the history, whose messages useChat takes as they are ({id, role, parts, metadata}).
const load = (id: string): Promise<Message[]> =>
  fetch(`/api/v1/sessions/${id}/messages`).then(r => r.json()).then(body => body.messages);
const history = await load(sessionId);                   // a session made with POST /api/v1/sessions

function Chat({ sessionId, history }: { sessionId: string; history: Message[] }) {
  const { messages, setMessages, sendMessage, regenerate, resumeStream, status, error } = useChat<Message>({
    id: sessionId,                                       // parley's ui_session_id
    messages: history,
    transport: new DefaultChatTransport({
      api: '/api/v1/chat',
      body: { on_disconnect: 'continue' },
      // Only the new message (parley has the history), as the AI SDK's own recipe sends it, with what regenerate()
      // and edits need: the whole chat, its files and all, would soon pass the body's limit.
      prepareSendMessagesRequest: ({ id, messages, body, trigger, messageId }) =>
        ({ body: { ...body, id, message: messages.at(-1), trigger, messageId } }),
    }),
  });
  // A reply that was running when the history was read: rejoin it; one that ended meanwhile (204) is still
  // marked streaming here, and the history has its end.
  useEffect(() => {
    resumeStream().then(async () => {
      if (history.at(-1)?.metadata?.status === 'streaming') setMessages(await load(sessionId));
    });
  }, []);
  // Stop: ask parley to stop the reply by its interaction id, which the reply's start puts in its metadata (with
  // status 'streaming'). Pressed before that, Stop waits for it: a cancel without the id would stop whatever reply
  // the session runs when it arrives (another tab's, or none yet).
  const [stopping, setStopping] = useState(false);
  const last = messages.at(-1);
  const running = last?.role === 'assistant' && last.metadata?.status === 'streaming' ? last.metadata.interaction_id : '';
  useEffect(() => {
    if (!stopping || !running) return;
    setStopping(false);
    const body = new URLSearchParams({ ui_session_id: sessionId, interaction_id: running });
    fetch('/api/v1/cancel', { method: 'POST', body });
  }, [stopping, running]);
  useEffect(() => { if (status === 'ready' || status === 'error') setStopping(false); }, [status]); // (it ended: no stop)
  const stop = () => setStopping(true);
  // parley's errors are JSON: show the sentence.
  const problem = error && (() => { try { return JSON.parse(error.message).message; } catch { return error.message; } })();
  // Regenerate: regenerate(); edit a message of the user's: sendMessage({ text, messageId }); attach files:
  // sendMessage({ text, files }) with an <input type="file">'s FileList. History follows all three.
  // ==================================================================================================== README

  // The rendering: each message with its files, its text and how it ended; Regenerate on the last reply, Edit on the
  // user's; files to attach beside the message box.
  const [draft, setDraft] = useState('');
  const [files, setFiles] = useState<FileList | undefined>(undefined);
  const [editing, setEditing] = useState<{ id: string; text: string } | null>(null);
  const busy = status === 'submitted' || status === 'streaming';
  const textOf = (message: Message) => message.parts.map(part => (part.type === 'text' ? part.text : '')).join('');
  return (
    <main data-chat-status={status}>
      {messages.map(message => (
        <article key={message.id} data-id={message.id} data-role={message.role} data-status={message.metadata?.status ?? ''}>
          {editing?.id === message.id ? (
            <form
              onSubmit={event => {
                event.preventDefault();
                sendMessage({ text: editing.text, messageId: message.id });
                setEditing(null);
              }}
            >
              <input aria-label="Edited message" value={editing.text} onChange={event => setEditing({ id: message.id, text: event.target.value })} />
            </form>
          ) : (
            <p data-text style={{ whiteSpace: 'pre-wrap' }}>{textOf(message)}</p>
          )}
          {message.parts.map((part, index) =>
            part.type === 'file' ? <a key={index} data-file href={part.url} download={part.filename}>{part.filename}</a> : null,
          )}
          {message.role === 'user' && !busy && !editing && (
            <button onClick={() => setEditing({ id: message.id, text: textOf(message) })}>Edit</button>
          )}
          {message === last && message.role === 'assistant' && !busy && <button onClick={() => regenerate()}>Regenerate</button>}
        </article>
      ))}
      {problem && <p role="alert">{problem}</p>}
      <form
        onSubmit={event => {
          event.preventDefault();
          sendMessage({ text: draft, files });
          setDraft('');
          setFiles(undefined);
          event.currentTarget.reset(); // (the file input is uncontrolled: this empties it)
        }}
      >
        <input aria-label="Message" value={draft} onChange={event => setDraft(event.target.value)} />
        <input aria-label="Attach" type="file" multiple onChange={event => setFiles(event.target.files ?? undefined)} />
        {busy ? <button type="button" onClick={stop}>Stop</button> : <button type="submit">Send</button>}
      </form>
    </main>
  );
}

createRoot(document.getElementById('root')!).render(
  <StrictMode>
    <Chat sessionId={sessionId} history={history} />
  </StrictMode>,
);
