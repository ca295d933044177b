import type { Stats, StatsModel } from '../api';
import { XllmApiError } from '../api';
import { atBottom, canChat, chatKeyAction, chooseChatModel, failureText, modelGone, modelRows, noChatModelsReason, notForChat, statsForUser, Transcript, Turn, unloadQuestion } from '../state';

/** A reply that has ended with `fields` (content, error or note). */
function ended(turn: Turn, fields: Partial<Turn>): void {
  Object.assign(turn, { pending: false, ...fields });
}

function model(id: string, extra: Partial<StatsModel> = {}): StatsModel {
  return { id, state: 'loaded', backend: 'transformers', device: 'cpu', memory_bytes: 100, running: 0, queued: 0, max_batch_size: 8, context_length: 2048, ...extra };
}

function stats(models: StatsModel[], defaultModel: string | null = null): Stats {
  return {
    object: 'xllm.stats', status: 'ready', message: null, time: 0, default_model: defaultModel, models,
    memory: {}, running: 0, queued: 0, completed: 0, generated_tokens: 0, tokens_per_second: 0, rate_window_seconds: 0
  };
}

describe('modelRows', () => {
  it('lists loaded models first, then the store by name, without duplicates', () => {
    const rows = modelRows(stats([model('b', { running: 1, queued: 2 }), model('z', { state: 'loading' })]), ['c', 'b', 'a']);
    expect(rows.map(r => [r.id, r.state])).toEqual([['b', 'loaded'], ['z', 'loading'], ['a', 'available'], ['c', 'available']]);
    expect(rows[0].busy).toBe(3);
  });

  it('says when a load waits for models in use to free memory', () => {
    const rows = modelRows(stats([model('b', { state: 'loading', waiting_for_room: true }), model('c', { state: 'loading' })]), []);
    expect(rows.map(r => [r.id, r.waitingForRoom])).toEqual([['b', true], ['c', false]]);
  });

  it('marks the models the chat cannot use', () => {
    const rows = modelRows(stats([model('emb')]), ['tiny', 'emb'], new Set(['emb']));
    expect(rows.map(r => [r.id, r.chat])).toEqual([['emb', false], ['tiny', true]]);
  });

  it('works before the first stats arrive', () => {
    expect(modelRows(null, ['x']).map(r => r.state)).toEqual(['available']);
  });
});

describe('chooseChatModel', () => {
  const s = stats([model('tiny'), model('loading', { state: 'loading' })], 'smollm2');

  it('keeps the user pick while it is known', () => {
    expect(chooseChatModel('other', s, ['tiny', 'other'])).toBe('other');
  });

  it('falls back to the default model, then the first loaded one, then anything', () => {
    expect(chooseChatModel('gone', s, ['tiny', 'smollm2'])).toBe('smollm2');
    expect(chooseChatModel(null, s, ['tiny'])).toBe('tiny');
    expect(chooseChatModel(null, stats([]), ['zeta'])).toBe('zeta');
    expect(chooseChatModel(null, null, [])).toBeNull();
  });
});

describe('chat models', () => {
  it('says why the picker is empty: the server error, or no chat model in the store', () => {
    const failed = noChatModelsReason(new XllmApiError('Invalid API key', 401));
    expect(failed).toContain('Invalid API key');
    expect(failed).toContain('could not be read');
    expect(noChatModelsReason(null)).toContain('xllm pull');
    expect(noChatModelsReason(new TypeError('Failed to fetch'))).toContain('Failed to fetch');
  });


  it('leaves out models that serve another task', () => {
    expect([canChat('chat'), canChat('adapter'), canChat(null), canChat('embedding')]).toEqual([true, true, true, false]);
    const models = [{ id: 'tiny', task: 'chat', loaded: null }, { id: 'all-minilm', task: 'embedding', loaded: null }, { id: 'old', task: null, loaded: null }];
    expect([...notForChat(models)]).toEqual(['all-minilm']);
  });

  it('builds a user view from the model list when the engine figures are withheld', () => {
    // a hub's shared service answers admin/stats with 403 to a user who is not its admin
    const listed = [
      { id: 'all-minilm', task: 'embedding', loaded: true },
      { id: 'smollm2', task: 'chat', loaded: true },
      { id: 'qwen', task: 'chat', loaded: false },
      { id: 'old', task: null, loaded: null }
    ];
    const s = statsForUser(listed);
    expect(s.status).toBe('ready');
    expect(s.models.map(m => [m.id, m.state])).toEqual([['all-minilm', 'loaded'], ['smollm2', 'loaded']]);
    expect(s.memory).toEqual({});
    const rows = modelRows(s, listed.map(m => m.id), notForChat(listed));
    expect(rows.map(r => [r.id, r.state, r.chat])).toEqual([
      ['all-minilm', 'loaded', false], ['smollm2', 'loaded', true], ['old', 'available', true], ['qwen', 'available', true]
    ]);
    // the chat takes the loaded chat model, not the first in the list
    expect(chooseChatModel(null, s, ['old', 'qwen', 'smollm2'])).toBe('smollm2');
  });

  it('never falls back to a loaded model the chat does not offer', () => {
    // an embedding model loaded first, no default: the chat takes the chat model
    const s = stats([model('all-minilm'), model('tiny')]);
    expect(chooseChatModel(null, s, ['tiny', 'smollm2'])).toBe('tiny');
    expect(chooseChatModel('all-minilm', s, ['tiny'])).toBe('tiny');
  });
});

describe('Transcript', () => {
  it('sends earlier good turns as history, not the pending reply', () => {
    const t = new Transcript();
    const first = t.ask('Hi');
    expect(t.messages()).toEqual([{ role: 'user', content: 'Hi' }]);
    first.content = 'Hello!';
    first.pending = false;
    t.ask('Again');
    expect(t.messages()).toEqual([
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello!' },
      { role: 'user', content: 'Again' }
    ]);
  });

  it('drops failed exchanges so roles keep alternating, and caps the history', () => {
    const t = new Transcript(2);
    ended(t.ask('Q1'), { error: 'model not found' });
    ended(t.ask('Q2'), { content: 'A2' });
    t.ask('Q3');
    expect(t.messages()).toEqual([
      { role: 'assistant', content: 'A2' },
      { role: 'user', content: 'Q3' }
    ]);
    t.clear();
    expect(t.turns).toHaveLength(0);
  });

  it("sends a reasoning model's answers back without their thinking, and drops a reply that only thought", () => {
    const t = new Transcript();
    ended(t.ask('Q1'), { content: 'A1', thinking: 'plan it' });
    ended(t.ask('Q2'), { thinking: 'still thinking', note: 'Cut off at the 8-token limit.' });
    t.ask('Q3');
    expect(t.messages()).toEqual([
      { role: 'user', content: 'Q1' },
      { role: 'assistant', content: 'A1' },
      { role: 'user', content: 'Q3' }
    ]);
  });

  it('drops a question stopped before any answer, keeps a partly answered one', () => {
    const t = new Transcript();
    ended(t.ask('Q1'), { note: 'Stopped.' });
    ended(t.ask('Q2'), { content: 'A2 (half)', note: 'Stopped.' });
    t.ask('Q3');
    expect(t.messages()).toEqual([
      { role: 'user', content: 'Q2' },
      { role: 'assistant', content: 'A2 (half)' },
      { role: 'user', content: 'Q3' }
    ]);
  });
});

describe('unloadQuestion', () => {
  it('asks first when the model has requests running or waiting: unloading fails them', () => {
    const s = stats([model('a', { running: 2, queued: 1 }), model('b')]);
    const question = unloadQuestion('a', s);
    expect(question).toContain('a is answering 3 requests');
    expect(question).toContain('Unload it anyway?');
    expect(unloadQuestion('a', stats([model('a', { running: 1 })]))).toContain('a is answering 1 request now');
  });

  it('does not ask for an idle model, one not loaded, or without stats', () => {
    const s = stats([model('a'), model('c', { state: 'loading', queued: 4 })]);
    expect(unloadQuestion('a', s)).toBeNull();
    expect(unloadQuestion('x', s)).toBeNull();
    expect(unloadQuestion('a', null)).toBeNull();
  });
});

describe('modelGone', () => {
  it('is true only for a model_not_found answer', () => {
    expect(modelGone(new XllmApiError("The model 'b' does not exist", 404, 'model_not_found'))).toBe(true);
    expect(modelGone(new XllmApiError('busy', 429, 'server_busy'))).toBe(false);
    expect(modelGone(new XllmApiError('HTTP 404: the xllm server extension is not enabled', 404))).toBe(false);
    expect(modelGone(new Error('network'))).toBe(false);
    expect(modelGone(null)).toBe(false);
  });
});

describe('chatKeyAction', () => {
  const key = (k: string, extra: Partial<{ shiftKey: boolean; isComposing: boolean }> = {}) => ({ key: k, shiftKey: false, isComposing: false, ...extra });

  it('sends on Enter, not on Shift+Enter', () => {
    expect(chatKeyAction(key('Enter'), false)).toBe('send');
    expect(chatKeyAction(key('Enter', { shiftKey: true }), false)).toBeNull();
  });

  it('leaves an Enter that ends an input method composition alone', () => {
    expect(chatKeyAction(key('Enter', { isComposing: true }), false)).toBeNull();
    // Safari: the keydown of the Enter that ends a composition has isComposing false but keyCode 229
    const safari = { ...key('Enter'), keyCode: 229 };
    expect(chatKeyAction(safari, false)).toBeNull();
    expect(chatKeyAction({ ...safari, key: 'Escape' }, true)).toBeNull();
    const plain = { ...safari, keyCode: 13 };
    expect(chatKeyAction(plain, false)).toBe('send');
  });

  it('stops on Escape only while a reply streams', () => {
    expect(chatKeyAction(key('Escape'), true)).toBe('stop');
    expect(chatKeyAction(key('Escape'), false)).toBeNull();
    expect(chatKeyAction(key('a'), true)).toBeNull();
  });

  it('leaves an Escape on the model picker to the picker (it closes its open list)', () => {
    expect(chatKeyAction(key('Escape'), true, true)).toBeNull();
    expect(chatKeyAction(key('Escape'), true, false)).toBe('stop');
  });
});

describe('failureText', () => {
  it("keeps the server's message, and names a server that cannot be reached", () => {
    expect(failureText(new XllmApiError('Not enough memory', 503))).toBe('Not enough memory');
    expect(failureText(new TypeError('Failed to fetch'))).toBe('The Jupyter server is not reachable (Failed to fetch).');
    expect(failureText('odd')).toBe('The request failed: odd');
  });
});

describe('atBottom', () => {
  it('is true at the end of the log (within a fraction of a line) and when nothing scrolls', () => {
    expect(atBottom({ scrollTop: 400, scrollHeight: 600, clientHeight: 200 })).toBe(true);
    expect(atBottom({ scrollTop: 395.5, scrollHeight: 600, clientHeight: 200 })).toBe(true);
    expect(atBottom({ scrollTop: 0, scrollHeight: 100, clientHeight: 200 })).toBe(true);
  });

  it('is false once the user scrolled up to read (a streaming reply must not pull the log back down)', () => {
    expect(atBottom({ scrollTop: 0, scrollHeight: 600, clientHeight: 200 })).toBe(false);
    expect(atBottom({ scrollTop: 380, scrollHeight: 600, clientHeight: 200 })).toBe(false);
  });
});
