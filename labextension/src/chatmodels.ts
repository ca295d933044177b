/**
 * Keeps a chat's model picker in step with the server's list: a model pulled, created or
 * loaded after the chat opened shows up. The main-area chat uses it (the side panel feeds
 * its own chat from its polls); kept apart from the DOM so it is unit-tested on Node.
 */

import type { ModelInfo } from './api';
import { canChat, noChatModelsReason } from './state';

/** How often an open chat re-reads the model list (the panel's cadence for the list). */
export const CHAT_MODELS_POLL_MS = 30000;
/** A focus within this long of the last read does not read again. */
export const CHAT_MODELS_MIN_GAP_MS = 2000;

/** What the sync drives: the chat view's picker and notice line. */
export interface ChatModelTarget {
  readonly model: string | null;
  setModels(models: string[], chosen: string | null): void;
  setNotice(text: string | null): void;
}

/** Timer functions (injectable for tests). */
export interface Timers {
  setInterval(fn: () => void, ms: number): unknown;
  clearInterval(handle: unknown): void;
  now(): number;
}

const realTimers: Timers = {
  setInterval: (fn, ms) => setInterval(fn, ms),
  clearInterval: handle => clearInterval(handle as ReturnType<typeof setInterval>),
  now: () => Date.now()
};

/** Reads the chat models on open, on focus (at most every 2 s) and every 30 s while shown. */
export class ChatModelSync {
  private timer: unknown = null;
  private reading: Promise<void> | null = null;
  private lastRead = -Infinity;

  /** `preferred`: the model to select first (the side panel's choice when the chat opened). */
  constructor(
    private readonly fetchModels: () => Promise<ModelInfo[]>,
    private readonly target: ChatModelTarget,
    private preferred: string | null,
    private readonly timers: Timers = realTimers
  ) {}

  /** Read the list now (one read at a time) and offer its chat models, keeping the current pick. */
  refresh(): Promise<void> {
    if (!this.reading) {
      this.lastRead = this.timers.now();
      this.reading = this.read().finally(() => (this.reading = null));
    }
    return this.reading;
  }

  /** A refresh unless the list was read in the last `CHAT_MODELS_MIN_GAP_MS` (focus events come in bursts). */
  refreshIfStale(): Promise<void> {
    if (this.timers.now() - this.lastRead < CHAT_MODELS_MIN_GAP_MS) {
      return this.reading ?? Promise.resolve();
    }
    return this.refresh();
  }

  /** Re-read every `intervalMs` until `stop()`. */
  start(intervalMs: number = CHAT_MODELS_POLL_MS): void {
    if (this.timer === null) {
      this.timer = this.timers.setInterval(() => void this.refresh(), intervalMs);
    }
  }

  /** Stop polling (the chat was hidden or closed). */
  stop(): void {
    if (this.timer !== null) {
      this.timers.clearInterval(this.timer);
      this.timer = null;
    }
  }

  private async read(): Promise<void> {
    let ids: string[];
    try {
      ids = (await this.fetchModels()).filter(m => canChat(m.task)).map(m => m.id);
    } catch (error) {
      // keep what the picker offers: the list may be back at the next read
      this.target.setNotice(noChatModelsReason(error));
      return;
    }
    const current = this.target.model ?? this.preferred;
    const chosen = current !== null && ids.includes(current) ? current : ids[0] ?? null;
    this.preferred = chosen ?? this.preferred;
    this.target.setModels(ids, chosen);
    this.target.setNotice(ids.length ? null : noChatModelsReason(null));
  }
}
