/**
 * The panel's state logic, kept apart from the DOM: the model list (loaded models plus
 * the ones that could be loaded), which model the chat uses, and the chat transcript.
 */

import type { ChatMessage, ModelInfo, Stats } from './api';
import { XllmApiError } from './api';

/** Model tasks a chat can use (as the Python client's `can_chat`). */
const CHAT_TASKS = new Set(['chat', 'adapter']);

/** False only for a model that says it serves something else (an embedding model). */
export function canChat(task: string | null): boolean {
  return task === null || CHAT_TASKS.has(task);
}

/** Ids of the models that cannot chat (the chat picker leaves them out). */
export function notForChat(models: ModelInfo[]): Set<string> {
  return new Set(models.filter(m => !canChat(m.task)).map(m => m.id));
}

/**
 * What a chat with no model to offer says, and why: the server's error when the list could
 * not be read, else that no chat model is in the store.
 */
export function noChatModelsReason(error: unknown): string {
  if (error === null || error === undefined) {
    return 'No chat model on this server: pull one (`xllm pull smollm2`) and reopen the chat.';
  }
  const why = error instanceof Error ? error.message : String(error);
  return `The model list could not be read (${why}). Reopen the chat to try again.`;
}

/**
 * The stats a user gets when the server keeps its engine figures to its admins (`admin/stats`
 * is a 403: a JupyterHub's shared xllm service, reached through the user's own server, for a
 * user who is not one of its admins): the models `v1/models` lists, the loaded ones as loaded,
 * and no memory, rate or queue figures.
 */
export function statsForUser(models: ModelInfo[]): Stats {
  return {
    object: 'xllm.stats',
    status: 'ready',
    message: null,
    time: 0,
    default_model: null,
    models: models
      .filter(m => m.loaded === true)
      .map(m => ({
        id: m.id,
        state: 'loaded',
        backend: null,
        device: '',
        memory_bytes: 0,
        running: 0,
        queued: 0,
        max_batch_size: null,
        context_length: null
      })),
    memory: {},
    running: 0,
    queued: 0,
    completed: 0,
    generated_tokens: 0,
    tokens_per_second: 0,
    rate_window_seconds: 0
  };
}

/** One row of the model list. */
export interface ModelRow {
  id: string;
  /** 'loaded', 'loading' or 'available' (in the store, not in memory) */
  state: string;
  /** loading, but waiting for models in use to free the memory it needs */
  waitingForRoom: boolean;
  memoryBytes: number;
  device: string | null;
  busy: number;
  /** false for a model the chat cannot use (an embedding model) */
  chat: boolean;
}

/** Loaded and loading models first (as the server lists them), then the rest by name. */
export function modelRows(stats: Stats | null, available: string[], noChat: ReadonlySet<string> = new Set()): ModelRow[] {
  const rows: ModelRow[] = (stats?.models ?? []).map(m => ({
    id: m.id,
    state: m.state,
    waitingForRoom: m.waiting_for_room === true,
    memoryBytes: m.memory_bytes,
    device: m.device,
    busy: m.running + m.queued,
    chat: !noChat.has(m.id)
  }));
  const seen = new Set(rows.map(r => r.id));
  const rest = available.filter(id => !seen.has(id)).sort();
  for (const id of rest) {
    rows.push({ id, state: 'available', waitingForRoom: false, memoryBytes: 0, device: null, busy: 0, chat: !noChat.has(id) });
  }
  return rows;
}

/**
 * The model the chat should use, among `available` (the models it may offer): the user's
 * pick while it is still offered, else the server's default model, else the first loaded
 * one, else any of them.
 */
export function chooseChatModel(current: string | null, stats: Stats | null, available: string[]): string | null {
  const known = new Set(available);
  // a loaded model not offered (an embedding model) is no fallback
  const loaded = (stats?.models ?? []).filter(m => m.state === 'loaded' && known.has(m.id)).map(m => m.id);
  if (current && known.has(current)) {
    return current;
  }
  const fallback = stats?.default_model;
  if (fallback && known.has(fallback)) {
    return fallback;
  }
  return loaded[0] ?? available[0] ?? null;
}

/**
 * What to ask before unloading `model`, or null when nothing would be lost: a loaded model with
 * requests running or waiting (anyone's: notebooks, other tabs, the hub's users) fails them all
 * when it is unloaded, so a click on Unload must not do that unasked.
 */
export function unloadQuestion(model: string, stats: Stats | null): string | null {
  const m = (stats?.models ?? []).find(x => x.id === model && x.state === 'loaded');
  const busy = m ? m.running + m.queued : 0;
  if (busy <= 0) {
    return null;
  }
  const requests = busy === 1 ? '1 request' : `${busy} requests`;
  return `${model} is answering ${requests} now (from this panel, notebooks or other users). Unloading it stops them with an error. Unload it anyway?`;
}

/** One turn shown in the chat log. */
export interface Turn {
  role: ChatMessage['role'];
  content: string;
  /** an error shown in place of (or after) the reply */
  error?: string;
  /** true while the reply is still streaming */
  pending?: boolean;
  /** a remark under a reply that ended early, e.g. "Stopped." (the reply still counts) */
  note?: string;
  /** a reasoning model's thinking, shown folded above the reply; never sent back as history */
  thinking?: string;
}

/** The chat transcript: what is shown, and what is sent as history. */
export class Transcript {
  readonly turns: Turn[] = [];

  constructor(private readonly maxTurns = 20) {}

  /** Add the user's message and an empty, pending assistant turn; returns the latter. */
  ask(text: string): Turn {
    this.turns.push({ role: 'user', content: text });
    const reply: Turn = { role: 'assistant', content: '', pending: true };
    this.turns.push(reply);
    return reply;
  }

  /** The messages to send for the pending reply: earlier good turns, newest last, capped. */
  messages(): ChatMessage[] {
    // a question whose answer failed (or was stopped before any text) is left out too, so
    // roles keep alternating
    const done = this.turns.filter((t, i) => {
      const next = this.turns[i + 1];
      const unanswered = !!next && next.role === 'assistant' && (!!next.error || (!next.pending && !next.content));
      const failed = t.role === 'user' && unanswered;
      return !failed && !t.pending && !t.error && t.content;
    });
    return done.slice(-this.maxTurns).map(t => ({ role: t.role, content: t.content }));
  }

  /** Forget everything. */
  clear(): void {
    this.turns.length = 0;
  }
}

/** True for a chat that failed because its model is gone from the server (deleted or renamed since the list was read). */
export function modelGone(error: unknown): boolean {
  return typeof error === 'object' && error !== null && (error as { code?: unknown }).code === 'model_not_found';
}

/** What a key pressed in the chat does. */
export type ChatKeyAction = 'send' | 'stop' | null;

/**
 * The chat's keys: Enter sends (Shift+Enter is a new line), Escape stops a streaming reply
 * (except an Escape on the model picker, `onSelect`, which is the picker's).
 * An Enter that confirms an input method's composition (Japanese, Chinese, Korean) only
 * ends the composition: sending then would send half-typed text.
 */
export function chatKeyAction(
  key: { key: string; shiftKey: boolean; isComposing: boolean; keyCode?: number },
  streaming: boolean,
  onSelect = false
): ChatKeyAction {
  // Safari sends the keydown that ends a composition with isComposing false, but keyCode 229
  if (key.isComposing || key.keyCode === 229) {
    return null;
  }
  if (key.key === 'Enter' && !key.shiftKey) {
    return 'send';
  }
  // an Escape on a <select> closes its open list of options: that must not stop the reply too
  if (key.key === 'Escape' && streaming && !onSelect) {
    return 'stop';
  }
  return null;
}

/**
 * A failed chat request in words: the server's message, or for a request that never got an
 * answer (fetch's TypeError: the server is down or the connection dropped) what that means.
 */
export function failureText(error: unknown): string {
  if (error instanceof XllmApiError) {
    return error.message;
  }
  if (error instanceof TypeError) {
    return `The Jupyter server is not reachable (${error.message}).`;
  }
  return `The request failed: ${String(error)}`;
}

/** How near its end (px) a scrolled box still counts as at its end: a fraction of a line, for rounding and zoom. */
export const AT_END_SLACK = 8;

/** True when the scrollable `box` shows its last line (or has nothing to scroll): a streaming reply may follow it there. */
export function atBottom(box: { scrollTop: number; scrollHeight: number; clientHeight: number }): boolean {
  return box.scrollHeight - box.scrollTop - box.clientHeight <= AT_END_SLACK;
}
