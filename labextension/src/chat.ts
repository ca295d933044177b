/**
 * The quick chat: a model picker, a transcript and a prompt box. Replies stream from
 * `{base}xllm/v1/chat/completions`; Stop aborts the request, which cancels the
 * generation on the server. Used in the side panel and as a main-area widget.
 */

import { Widget } from '@lumino/widgets';

import { XllmApi } from './api';
import { atBottom, chatKeyAction, failureText, modelGone, Transcript, Turn } from './state';

/** Chat box options. */
export interface ChatViewOptions {
  api: XllmApi;
  /** most tokens per reply (keeps the quick chat quick) */
  maxTokens?: number;
  /** extra CSS class, e.g. for the main-area variant */
  className?: string;
  /** called after each reply ends (the panel re-reads its stats) */
  onReplyEnd?: () => void;
  /** called when a reply failed because its model is gone (deleted, renamed): re-read the model list now */
  onModelGone?: () => void;
  /** called when the chat is shown (true) or hidden or closed (false): the main-area chat polls its models meanwhile */
  onVisible?: (visible: boolean) => void;
}

/** A streaming chat box bound to one xllm server. */
export class ChatView extends Widget {
  readonly transcript = new Transcript();
  private readonly api: XllmApi;
  private readonly maxTokens: number;
  private readonly select: HTMLSelectElement;
  private readonly log: HTMLDivElement;
  private readonly notice: HTMLDivElement;
  private readonly input: HTMLTextAreaElement;
  private readonly send: HTMLButtonElement;
  private readonly clearButton: HTMLButtonElement;
  private abort: AbortController | null = null;
  private models: string[] = [];
  private readonly onReplyEnd: () => void;
  private readonly onModelGone: () => void;
  private readonly onVisible: (visible: boolean) => void;

  constructor(options: ChatViewOptions) {
    super();
    this.api = options.api;
    this.maxTokens = options.maxTokens ?? 512;
    this.onReplyEnd = options.onReplyEnd ?? (() => undefined);
    this.onModelGone = options.onModelGone ?? (() => undefined);
    this.onVisible = options.onVisible ?? (() => undefined);
    this.addClass('xllm-Chat');
    if (options.className) {
      this.addClass(options.className);
    }
    const bar = el('div', 'xllm-Chat-bar');
    this.select = el('select', 'xllm-Chat-model');
    this.select.title = 'Model for this chat';
    this.select.setAttribute('aria-label', 'Chat model');
    this.clearButton = button('Clear', 'xllm-Chat-clear', () => this.clear());
    bar.append(this.select, this.clearButton);
    this.notice = el('div', 'xllm-Chat-notice');
    this.notice.setAttribute('role', 'status');
    this.notice.hidden = true;
    this.log = el('div', 'xllm-Chat-log');
    this.log.setAttribute('role', 'log');
    this.log.setAttribute('aria-label', 'Chat transcript');
    this.log.setAttribute('aria-live', 'polite');
    const form = el('div', 'xllm-Chat-form');
    this.input = el('textarea', 'xllm-Chat-input');
    this.input.rows = 2;
    // short enough for a narrow panel; the tooltip has the Shift+Enter hint
    this.input.placeholder = 'Ask the shared model (Enter sends)';
    this.input.title = 'Enter sends, Shift+Enter starts a new line, Escape stops a reply';
    this.input.setAttribute('aria-label', 'Message');
    this.input.addEventListener('keydown', event => {
      if (chatKeyAction(event, this.abort !== null) === 'send') {
        event.preventDefault();
        void this.submit();
      }
    });
    // Escape anywhere in the chat stops a streaming reply (and only then: else it is JupyterLab's)
    this.node.addEventListener('keydown', event => {
      if (chatKeyAction(event, this.abort !== null, event.target instanceof HTMLSelectElement) === 'stop') {
        event.preventDefault();
        event.stopPropagation();
        this.stop();
      }
    });
    this.send = button('Send', 'xllm-Chat-send', () => (this.abort ? this.stop() : void this.submit()), true);
    form.append(this.input, this.send);
    this.node.append(bar, this.notice, this.log, form);
  }

  /** The model chats go to (null when the server has none). */
  get model(): string | null {
    return this.select.value || null;
  }

  /** Offer these models, selecting `chosen`. */
  setModels(models: string[], chosen: string | null): void {
    const same = models.length === this.models.length && models.every((m, i) => m === this.models[i]);
    if (!same) {
      this.models = [...models];
      this.select.replaceChildren(...models.map(id => new Option(id, id)));
    }
    if (chosen !== null && this.select.value !== chosen && models.includes(chosen)) {
      this.select.value = chosen;
    }
    this.select.disabled = models.length === 0;
  }

  /** Show (or, with null, hide) a line under the picker, e.g. why it offers no model. */
  setNotice(text: string | null): void {
    this.notice.textContent = text ?? '';
    this.notice.hidden = !text;
  }

  /** Send the prompt box's text (no-op while a reply streams or when empty). */
  async submit(): Promise<void> {
    const text = this.input.value.trim();
    const model = this.model;
    if (!text || this.abort) {
      return;
    }
    const reply = this.transcript.ask(text);
    const messages = this.transcript.messages();
    this.input.value = '';
    if (!model) {
      reply.pending = false;
      reply.error = 'No chat model is available: load one in the xllm panel.';
      this.render(true);
      return;
    }
    this.abort = new AbortController();
    this.setBusy(true);
    this.render(true); // a question just sent is shown, however far up the log was scrolled
    const node = this.log.lastElementChild?.querySelector('.xllm-Chat-text') as HTMLElement | null;
    try {
      const result = await this.api.chat({
        model,
        messages,
        maxTokens: this.maxTokens,
        signal: this.abort.signal,
        onDelta: delta => {
          reply.content += delta;
          if (node) {
            // follow the reply only while the log is at its end: a user who scrolled up to read stays put
            const follow = atBottom(this.log);
            node.textContent = reply.content;
            if (reply.thinking && node.parentElement) {
              showThinking(node.parentElement, reply); // the answer began: the thinking folds away
            }
            if (follow) {
              this.log.scrollTop = this.log.scrollHeight;
            }
          }
        },
        onThinking: piece => {
          reply.thinking = (reply.thinking ?? '') + piece;
          if (node?.parentElement) {
            const follow = atBottom(this.log);
            showThinking(node.parentElement, reply);
            if (follow) {
              this.log.scrollTop = this.log.scrollHeight;
            }
          }
        }
      });
      if (result.finishReason === 'length') {
        reply.note = `Cut off at the ${this.maxTokens}-token limit.`;
      }
    } catch (error) {
      if (this.abort.signal.aborted) {
        reply.note = 'Stopped.';
      } else {
        reply.error = failureText(error);
        if (modelGone(error)) {
          // the picker still offers it (the list is re-read every 30 s): every send would fail the same way
          this.onModelGone();
        }
      }
    } finally {
      reply.pending = false;
      this.abort = null;
      this.setBusy(false);
      this.render();
      this.onReplyEnd();
    }
  }

  /** Stop the streaming reply (the server cancels the generation when the stream closes). */
  stop(): void {
    this.abort?.abort();
  }

  /** Empty the transcript (stops a reply in progress). */
  clear(): void {
    this.stop();
    this.transcript.clear();
    this.render();
  }

  /** Closing the chat (a main-area chat's tab) stops its reply: the server frees the slot at once. */
  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.stop();
    super.dispose();
  }

  protected onAfterAttach(): void {
    this.input.focus();
  }

  protected onAfterShow(): void {
    this.onVisible(true);
  }

  protected onAfterHide(): void {
    this.onVisible(false);
  }

  protected onBeforeDetach(): void {
    this.onVisible(false);
  }

  private setBusy(busy: boolean): void {
    this.send.textContent = busy ? 'Stop' : 'Send';
    this.send.classList.toggle('xllm-mod-stop', busy);
    // a screen reader reads the reply once it is whole, not each streamed piece of it
    this.log.setAttribute('aria-busy', String(busy));
  }

  /** Draw the transcript; the log scrolls to its end if it was there (or `toEnd`), else stays where the user left it. */
  private render(toEnd = false): void {
    const follow = toEnd || atBottom(this.log);
    this.log.replaceChildren(...this.transcript.turns.map(turnNode));
    if (follow) {
      this.log.scrollTop = this.log.scrollHeight;
    }
  }
}

function turnNode(turn: Turn): HTMLElement {
  const node = el('div', `xllm-Chat-turn xllm-mod-${turn.role}`);
  const text = el('div', 'xllm-Chat-text');
  text.textContent = turn.content;
  node.append(text);
  if (turn.thinking) {
    showThinking(node, turn);
  }
  if (turn.pending) {
    node.classList.add('xllm-mod-pending');
  }
  if (turn.note) {
    const note = el('div', 'xllm-Chat-note');
    note.textContent = turn.note;
    node.append(note);
  }
  if (turn.error) {
    const err = el('div', 'xllm-Chat-error');
    err.textContent = turn.error;
    node.append(err);
  }
  return node;
}

/** Show `turn`'s thinking in `node` above its text: a dim, folded "Thinking" block, open while no answer has come. */
export function showThinking(node: HTMLElement, turn: Turn): void {
  let box = node.querySelector('.xllm-Chat-thinking') as HTMLDetailsElement | null;
  if (!box) {
    box = el('details', 'xllm-Chat-thinking');
    const label = el('summary', 'xllm-Chat-thinkingLabel');
    label.textContent = 'Thinking';
    box.append(label, el('div', 'xllm-Chat-thinkingText'));
    node.prepend(box);
  }
  const text = box.querySelector('.xllm-Chat-thinkingText') as HTMLElement;
  text.textContent = (turn.thinking ?? '').trim(); // model text: shown as text, never as HTML
  const answered = String(!!turn.content);
  if (box.dataset.answered !== answered) {
    // opened while the model thinks, folded once the answer begins; in between the reader's own toggle stands
    box.dataset.answered = answered;
    box.open = !turn.content;
  }
}

/** A new element with a class. */
export function el<K extends keyof HTMLElementTagNameMap>(tag: K, className: string): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = className;
  return node;
}

/** A jp-styled button; `primary` ones are drawn in the accent colour. */
export function button(label: string, className: string, onClick: () => void, primary = false): HTMLButtonElement {
  const node = el('button', `jp-Button jp-mod-styled ${primary ? 'jp-mod-accept' : 'jp-mod-reject'} ${className}`);
  node.type = 'button';
  node.textContent = label;
  node.addEventListener('click', onClick);
  return node;
}
