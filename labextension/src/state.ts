/**
 * The panel's state logic, kept apart from the DOM: the model list (loaded models plus
 * the ones that could be loaded), which model the chat uses, and the chat transcript.
 */

import type { ChatMessage, Stats } from './api';

/** One row of the model list. */
export interface ModelRow {
  id: string;
  /** 'loaded', 'loading' or 'available' (in the store, not in memory) */
  state: string;
  memoryBytes: number;
  device: string | null;
  busy: number;
}

/** Loaded and loading models first (as the server lists them), then the rest by name. */
export function modelRows(stats: Stats | null, available: string[]): ModelRow[] {
  const rows: ModelRow[] = (stats?.models ?? []).map(m => ({
    id: m.id,
    state: m.state,
    memoryBytes: m.memory_bytes,
    device: m.device,
    busy: m.running + m.queued
  }));
  const seen = new Set(rows.map(r => r.id));
  const rest = available.filter(id => !seen.has(id)).sort();
  for (const id of rest) {
    rows.push({ id, state: 'available', memoryBytes: 0, device: null, busy: 0 });
  }
  return rows;
}

/**
 * The model the chat should use: the user's pick while it is still known, else the
 * server's default model, else the first loaded one, else any model at all.
 */
export function chooseChatModel(current: string | null, stats: Stats | null, available: string[]): string | null {
  const loaded = (stats?.models ?? []).filter(m => m.state === 'loaded').map(m => m.id);
  const known = new Set([...loaded, ...available]);
  if (current && known.has(current)) {
    return current;
  }
  const fallback = stats?.default_model;
  if (fallback && known.has(fallback)) {
    return fallback;
  }
  return loaded[0] ?? available[0] ?? null;
}

/** One turn shown in the chat log. */
export interface Turn {
  role: ChatMessage['role'];
  content: string;
  /** an error shown in place of (or after) the reply */
  error?: string;
  /** true while the reply is still streaming */
  pending?: boolean;
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
    // a question whose answer failed is left out too, so roles keep alternating
    const done = this.turns.filter((t, i) => {
      const next = this.turns[i + 1];
      const failed = t.role === 'user' && next?.role === 'assistant' && !!next.error;
      return !failed && !t.pending && !t.error && t.content;
    });
    return done.slice(-this.maxTurns).map(t => ({ role: t.role, content: t.content }));
  }

  /** Forget everything. */
  clear(): void {
    this.turns.length = 0;
  }
}
