import type { ModelInfo } from '../api';
import { XllmApiError } from '../api';
import { CHAT_MODELS_MIN_GAP_MS, CHAT_MODELS_POLL_MS, ChatModelSync, ChatModelTarget, Timers } from '../chatmodels';

/** A picker that records what it was told, as ChatView.setModels/setNotice would show it. */
class Picker implements ChatModelTarget {
  models: string[] = [];
  model: string | null = null;
  notice: string | null = null;
  setModels(models: string[], chosen: string | null): void {
    this.models = [...models];
    this.model = chosen !== null && models.includes(chosen) ? chosen : this.model !== null && models.includes(this.model) ? this.model : models[0] ?? null;
  }
  setNotice(text: string | null): void {
    this.notice = text;
  }
}

/** Timers driven by the test: `tick()` runs the interval callbacks, `clock` is now(). */
class FakeTimers implements Timers {
  clock = 0;
  callbacks = new Map<number, () => void>();
  private next = 1;
  setInterval(fn: () => void): unknown {
    this.callbacks.set(this.next, fn);
    return this.next++;
  }
  clearInterval(handle: unknown): void {
    this.callbacks.delete(handle as number);
  }
  now(): number {
    return this.clock;
  }
  tick(ms: number): void {
    this.clock += ms;
    this.callbacks.forEach(fn => fn());
  }
}

function info(id: string, task: string | null = 'chat'): ModelInfo {
  return { id, task, loaded: false };
}

/** A server whose model list the test changes, counting the reads. */
function server(initial: ModelInfo[]) {
  const state = { models: initial, reads: 0, fail: null as Error | null };
  const fetch = async (): Promise<ModelInfo[]> => {
    state.reads++;
    if (state.fail) {
      throw state.fail;
    }
    return [...state.models];
  };
  return { state, fetch };
}

describe('ChatModelSync (the main-area chat picker)', () => {
  it('offers a model pulled after the chat opened at the next poll, keeping the pick', async () => {
    const { state, fetch } = server([info('tiny'), info('minilm', 'embedding')]);
    const picker = new Picker();
    const timers = new FakeTimers();
    const sync = new ChatModelSync(fetch, picker, 'tiny', timers);
    await sync.refresh();
    expect(picker.models).toEqual(['tiny']);
    expect(picker.model).toBe('tiny');
    sync.start();
    state.models = [info('tiny'), info('minilm', 'embedding'), info('smollm2')];
    timers.tick(CHAT_MODELS_POLL_MS);
    await sync.refresh(); // the poll's read (one at a time: this awaits it)
    expect(picker.models).toEqual(['tiny', 'smollm2']);
    expect(picker.model).toBe('tiny');
    expect(picker.notice).toBeNull();
    sync.stop();
    expect(timers.callbacks.size).toBe(0);
  });

  it('re-reads on focus, but not twice within the gap', async () => {
    const { state, fetch } = server([]);
    const picker = new Picker();
    const timers = new FakeTimers();
    const sync = new ChatModelSync(fetch, picker, null, timers);
    await sync.refresh();
    expect(picker.models).toEqual([]);
    expect(picker.notice).toMatch(/No chat model/);
    state.models = [info('created')];
    await sync.refreshIfStale(); // a focus right after opening: no second read
    expect(state.reads).toBe(1);
    timers.clock += CHAT_MODELS_MIN_GAP_MS;
    await sync.refreshIfStale();
    expect(state.reads).toBe(2);
    expect(picker.models).toEqual(['created']);
    expect(picker.model).toBe('created');
    expect(picker.notice).toBeNull();
  });

  it('keeps the offered models when a read fails, and says why', async () => {
    const { state, fetch } = server([info('tiny')]);
    const picker = new Picker();
    const sync = new ChatModelSync(fetch, picker, null, new FakeTimers());
    await sync.refresh();
    state.fail = new XllmApiError('server stopping', 503);
    await sync.refresh();
    expect(picker.models).toEqual(['tiny']);
    expect(picker.notice).toMatch(/server stopping/);
  });

  it('moves to another model when the picked one is gone', async () => {
    const { state, fetch } = server([info('a'), info('b')]);
    const picker = new Picker();
    const sync = new ChatModelSync(fetch, picker, 'b', new FakeTimers());
    await sync.refresh();
    expect(picker.model).toBe('b');
    state.models = [info('a')];
    await sync.refresh();
    expect(picker.model).toBe('a');
  });
});
