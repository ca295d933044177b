/**
 * The left side panel: engine status, tok/s and queue depth, a memory gauge per device,
 * the models (load / unload) and the quick chat. It polls `{base}xllm/admin/stats`
 * while visible; the rate itself is computed on the server from sampled counters.
 */

import { Panel, Widget } from '@lumino/widgets';

import { ModelInfo, Stats, XllmApi, XllmApiError } from './api';
import { button, ChatView, el } from './chat';
import { formatBytes, formatQueue, formatRate, gpuLines, memoryGauge, statusLabel } from './format';
import { chooseChatModel, ModelRow, modelRows, notForChat, statsForUser, unloadQuestion } from './state';

/** The DOM of one model row, kept across redraws so focus and clicks survive a poll. */
interface RowNodes {
  item: HTMLLIElement;
  facts: HTMLElement;
  action: HTMLButtonElement;
}

/** The DOM of one device's memory gauge, kept across redraws. */
interface GaugeNodes {
  row: HTMLElement;
  bar: HTMLElement;
  fill: HTMLElement;
  text: HTMLElement;
  /** one line per GPU where there are several */
  gpus: HTMLElement;
}

/** How long after a reply ends the panel reads the stats again (the server notices a Stop within ~0.25 s). */
const REFRESH_AFTER_REPLY_MS = 750;

/** Side panel options. */
export interface XllmPanelOptions {
  api: XllmApi;
  /** milliseconds between stats reads while the panel is visible */
  pollInterval?: number;
  /** runs the "open playground" command */
  openPlayground?: () => void;
  /** asks the user a yes/no question (Unload of a busy model); without it the panel does not ask */
  confirm?: (title: string, question: string) => Promise<boolean>;
}

/** The xllm side panel. */
export class XllmPanel extends Panel {
  readonly chat: ChatView;
  private readonly api: XllmApi;
  private readonly interval: number;
  private readonly confirm: XllmPanelOptions['confirm'];
  private readonly summary: Widget;
  private readonly statusNode: HTMLElement;
  private readonly rateNode: HTMLElement;
  private readonly queueNode: HTMLElement;
  private readonly memoryNode: HTMLElement;
  private readonly modelsNode: HTMLElement;
  private readonly noticeNode: HTMLElement;
  private timer: number | null = null;
  private stats: Stats | null = null;
  private available: string[] = [];
  private noChat = new Set<string>();
  private rowNodes = new Map<string, RowNodes>();
  private readonly gaugeNodes = new Map<string, GaugeNodes>();
  /** models with a load/unload under way, and what their row says meanwhile */
  private busyModels = new Map<string, string>();
  private refreshing: Promise<void> | null = null;
  private lastModelFetch = 0;
  private listed: ModelInfo[] = [];
  /** why the engine figures are not shown (`admin/stats` was a 403); null: they are */
  private figuresWithheld: string | null = null;

  constructor(options: XllmPanelOptions) {
    super();
    this.api = options.api;
    this.interval = options.pollInterval ?? 2000;
    this.confirm = options.confirm;
    this.id = 'xllm-panel';
    this.addClass('xllm-Panel');

    this.summary = new Widget();
    this.summary.addClass('xllm-Panel-summary');
    const node = this.summary.node;
    const header = el('div', 'xllm-Panel-header');
    const title = el('h2', 'xllm-Panel-title');
    title.textContent = 'xllm';
    const actions = el('div', 'xllm-Panel-actions');
    actions.append(button('Refresh', 'xllm-Panel-refresh', () => void this.refresh(true)));
    if (options.openPlayground) {
      actions.append(button('Playground', 'xllm-Panel-playground', options.openPlayground));
    }
    header.append(title, actions);

    this.statusNode = el('div', 'xllm-Panel-status');
    const figures = el('div', 'xllm-Panel-figures');
    this.rateNode = el('span', 'xllm-Panel-rate');
    this.queueNode = el('span', 'xllm-Panel-queue');
    figures.append(labelled('Throughput', this.rateNode), labelled('Queue', this.queueNode));
    this.memoryNode = el('div', 'xllm-Panel-memory');
    const modelsTitle = el('h3', 'xllm-Panel-section');
    modelsTitle.textContent = 'Models';
    this.modelsNode = el('ul', 'xllm-Panel-models');
    this.noticeNode = el('div', 'xllm-Panel-notice');
    const chatTitle = el('h3', 'xllm-Panel-section');
    chatTitle.textContent = 'Quick chat';
    node.append(header, this.statusNode, figures, this.memoryNode, modelsTitle, this.modelsNode, this.noticeNode, chatTitle);

    // read again a little later too: right after a Stop the server has not yet noticed the
    // closed stream, and the queue would say "1 running" until the next poll
    this.chat = new ChatView({
      api: this.api,
      maxTokens: 256,
      onReplyEnd: () => this.refreshSoon(),
      onModelGone: () => void this.refresh(true)
    });
    this.addWidget(this.summary);
    this.addWidget(this.chat);
    this.renderStatus('offline', 'Connecting…');
  }

  /** Read stats (and, now and then, the list of loadable models) and redraw. */
  refresh(includeModels = false): Promise<void> {
    if (this.refreshing && includeModels) {
      // a read already under way may predate a load/unload: read again after it
      return this.refreshing.then(() => this.refresh(true));
    }
    if (!this.refreshing) {
      this.refreshing = this.doRefresh(includeModels).finally(() => (this.refreshing = null));
    }
    return this.refreshing;
  }

  /** Refresh now and once more shortly after (a reply just ended). */
  private refreshSoon(): void {
    void this.refresh();
    window.setTimeout(() => void this.refresh(), REFRESH_AFTER_REPLY_MS);
  }

  private async doRefresh(includeModels: boolean): Promise<void> {
    try {
      const now = Date.now();
      // the store's model list changes rarely: re-read it every 30 s or when asked
      // (a user without the figures re-reads the list every poll: it is what says which models are loaded)
      if (includeModels || this.figuresWithheld !== null || now - this.lastModelFetch > 30000) {
        const models = await this.api.models();
        this.listed = models;
        this.available = models.map(m => m.id);
        this.noChat = notForChat(models);
        this.lastModelFetch = now;
      }
      try {
        this.stats = await this.api.stats();
        this.figuresWithheld = null;
      } catch (error) {
        if (!(error instanceof XllmApiError && error.status === 403)) {
          throw error;
        }
        // a JupyterHub's shared service keeps them to its admins: the models and the chat still work
        this.figuresWithheld = error.message;
        this.stats = statsForUser(this.listed);
      }
      this.render();
    } catch (error) {
      this.stats = null;
      this.renderStatus('offline', error instanceof XllmApiError ? error.message : 'The Jupyter server is not reachable');
    }
  }

  protected onAfterShow(): void {
    void this.refresh(true);
    this.startPolling();
  }

  protected onAfterHide(): void {
    this.stopPolling();
  }

  protected onBeforeDetach(): void {
    this.stopPolling();
  }

  dispose(): void {
    this.stopPolling();
    super.dispose();
  }

  private startPolling(): void {
    if (this.timer === null) {
      this.timer = window.setInterval(() => void this.refresh(), this.interval);
    }
  }

  private stopPolling(): void {
    if (this.timer !== null) {
      window.clearInterval(this.timer);
      this.timer = null;
    }
  }

  private renderStatus(status: Stats['status'] | 'offline', message: string | null): void {
    this.statusNode.className = `xllm-Panel-status xllm-mod-${status}`;
    this.statusNode.textContent = statusLabel(status, message);
    this.statusNode.title = message ?? '';
    const offline = status === 'offline';
    // the last rows and gauge are stale while the server cannot be read: dim them, and no
    // Load/Unload that could only fail
    this.modelsNode.classList.toggle('xllm-mod-stale', offline);
    this.memoryNode.classList.toggle('xllm-mod-stale', offline);
    if (offline) {
      this.rateNode.textContent = '–';
      this.queueNode.textContent = '–';
      for (const nodes of this.rowNodes.values()) {
        nodes.action.disabled = true;
      }
    }
  }

  private render(): void {
    const stats = this.stats;
    if (!stats) {
      return;
    }
    this.renderStatus(stats.status, stats.message);
    const withheld = this.figuresWithheld;
    this.node.classList.toggle('xllm-mod-userView', withheld !== null);
    if (withheld !== null) {
      this.statusNode.textContent = 'Ready (shared engine)';
      this.statusNode.title = `Engine figures and Load/Unload are for the engine's admins: ${withheld}`;
      this.rateNode.textContent = '–';
      this.rateNode.title = '';
      this.queueNode.textContent = '–';
    } else {
      this.rateNode.textContent = formatRate(stats.tokens_per_second);
      this.rateNode.title = `${stats.generated_tokens} tokens generated since the server started`;
      this.queueNode.textContent = formatQueue(stats.running, stats.queued);
    }

    const devices = Object.entries(stats.memory);
    const gauges = devices.map(([device, mem]) => this.renderGauge(device, memoryGauge(device, mem), gpuLines(mem)));
    const sameGauges = gauges.length === this.memoryNode.children.length && gauges.every((g, i) => this.memoryNode.children[i] === g);
    if (!sameGauges) {
      this.memoryNode.replaceChildren(...gauges);
    }
    for (const device of [...this.gaugeNodes.keys()]) {
      if (!(device in stats.memory)) {
        this.gaugeNodes.delete(device);
      }
    }

    const rows = modelRows(stats, this.available, this.noChat);
    if (rows.length === 0) {
      const empty = el('li', 'xllm-Panel-empty');
      empty.textContent = 'No models. Pull one with `xllm pull smollm2`.';
      this.rowNodes.clear();
      this.modelsNode.replaceChildren(empty);
    } else {
      this.renderRows(rows);
    }
    const ids = rows.filter(r => r.chat).map(r => r.id);
    this.chat.setModels(ids, chooseChatModel(this.chat.model, stats, ids));
  }

  /** Update (or first build) one device's memory gauge and its per-GPU lines; kept across polls so its width animates. */
  private renderGauge(device: string, gauge: ReturnType<typeof memoryGauge>, gpus: string[]): HTMLElement {
    let nodes = this.gaugeNodes.get(device);
    if (!nodes) {
      const row = el('div', 'xllm-Gauge');
      row.dataset.device = device;
      const bar = el('div', 'xllm-Gauge-bar');
      const fill = el('div', 'xllm-Gauge-fill');
      bar.append(fill);
      bar.setAttribute('role', 'meter');
      bar.setAttribute('aria-label', `${device} memory`);
      bar.setAttribute('aria-valuemin', '0');
      bar.setAttribute('aria-valuemax', '100');
      const text = el('div', 'xllm-Gauge-label');
      const gpuList = el('div', 'xllm-Gauge-devices');
      row.append(bar, text, gpuList);
      nodes = { row, bar, fill, text, gpus: gpuList };
      this.gaugeNodes.set(device, nodes);
    }
    const percent = Math.round((gauge.fraction ?? 0) * 100);
    nodes.fill.style.width = `${percent}%`;
    nodes.fill.classList.toggle('xllm-mod-warn', gauge.warn);
    nodes.bar.setAttribute('aria-valuenow', String(percent));
    nodes.bar.setAttribute('aria-valuetext', gauge.label);
    nodes.text.textContent = gauge.label;
    const shown = [...nodes.gpus.children].map(line => line.textContent);
    if (shown.length !== gpus.length || shown.some((line, i) => line !== gpus[i])) {
      nodes.gpus.replaceChildren(
        ...gpus.map(line => {
          const node = el('div', 'xllm-Gauge-device');
          node.textContent = line;
          return node;
        })
      );
    }
    return nodes.row;
  }

  /**
   * Update the model rows in place: a row's nodes are reused while its model is listed, so
   * a poll's redraw neither takes the keyboard focus off a button nor swallows a click.
   */
  private renderRows(rows: ModelRow[]): void {
    const wanted = new Set(rows.map(r => r.id));
    for (const id of [...this.rowNodes.keys()]) {
      if (!wanted.has(id)) {
        this.rowNodes.get(id)!.item.remove();
        this.rowNodes.delete(id);
      }
    }
    const items = rows.map(row => this.updateRow(row));
    const inOrder = items.length === this.modelsNode.children.length && items.every((item, i) => this.modelsNode.children[i] === item);
    if (!inOrder) {
      // only when the order changed (a load or unload): moving nodes drops their focus
      this.modelsNode.replaceChildren(...items);
    }
  }

  private updateRow(row: ModelRow): HTMLLIElement {
    let nodes = this.rowNodes.get(row.id);
    if (!nodes) {
      const item = el('li', 'xllm-Model');
      item.dataset.model = row.id;
      const name = el('span', 'xllm-Model-name');
      name.textContent = row.id;
      name.title = row.id;
      const facts = el('span', 'xllm-Model-facts');
      // the handler reads the row's state at click time: the row outlives many polls
      const action = button('Load', 'xllm-Model-action', () => void this.toggle(row.id, item.dataset.state === 'loaded'));
      item.append(name, facts, action);
      nodes = { item, facts, action };
      this.rowNodes.set(row.id, nodes);
    }
    const { item, facts, action } = nodes;
    const loaded = row.state === 'loaded';
    const pending = this.busyModels.get(row.id);
    item.className = `xllm-Model xllm-mod-${row.state}`;
    item.dataset.state = row.state;
    facts.textContent =
      pending !== undefined
        ? pending
        : row.state === 'available'
          ? 'not loaded'
          : row.state === 'loading'
            ? row.waitingForRoom
              ? 'waiting for room…'
              : 'loading…'
            : this.figuresWithheld !== null
              ? 'loaded'
              : `${row.device ?? ''} · ${formatBytes(row.memoryBytes)}${row.busy ? ` · ${row.busy} busy` : ''}`;
    facts.title = facts.textContent + (row.chat ? '' : ' (not a chat model)');
    const label = loaded ? 'Unload' : 'Load';
    action.textContent = label;
    action.setAttribute('aria-label', `${label} ${row.id}`);
    action.classList.toggle('jp-mod-accept', !loaded);
    action.classList.toggle('jp-mod-reject', loaded);
    action.disabled = row.state === 'loading' || pending !== undefined;
    action.style.display = this.figuresWithheld !== null ? 'none' : ''; // loading and unloading are the admins' too
    return item;
  }

  private async toggle(model: string, loaded: boolean): Promise<void> {
    if (loaded && this.confirm && !(await this.unloadConfirmed(model))) {
      return;
    }
    this.busyModels.set(model, loaded ? 'unloading…' : 'loading…');
    this.noticeNode.classList.remove('xllm-mod-error');
    this.noticeNode.textContent = loaded ? `Unloading ${model}…` : `Loading ${model}…`;
    this.render();
    try {
      if (loaded) {
        await this.api.unload(model);
      } else {
        await this.api.load(model);
      }
      this.noticeNode.textContent = '';
    } catch (error) {
      this.noticeNode.classList.add('xllm-mod-error');
      this.noticeNode.textContent = error instanceof XllmApiError ? error.message : String(error);
    } finally {
      this.busyModels.delete(model);
      await this.refresh(true);
    }
  }

  /** True unless `model` is answering requests and the user, asked, says no. */
  private async unloadConfirmed(model: string): Promise<boolean> {
    let stats = this.stats;
    try {
      stats = await this.api.stats(); // the last poll may be 2 s old: count the requests as of the click
    } catch {
      // keep the last poll's figures
    }
    const question = unloadQuestion(model, stats);
    return question === null || (await this.confirm!(`Unload ${model}?`, question));
  }
}

function labelled(label: string, value: HTMLElement): HTMLElement {
  const node = el('div', 'xllm-Figure');
  const name = el('span', 'xllm-Figure-name');
  name.textContent = label;
  node.append(name, value);
  return node;
}
