import { errorFrom, parseChatChunk, RequestFn, SseParser, XllmApi, XllmApiError } from '../api';

interface Call {
  path: string;
  init?: RequestInit;
}

/** A RequestFn that records calls and answers with `reply(path)`. */
function fake(reply: (path: string, init?: RequestInit) => Response): { request: RequestFn; calls: Call[] } {
  const calls: Call[] = [];
  return {
    calls,
    request: async (path, init) => {
      calls.push({ path, init });
      return reply(path, init);
    }
  };
}

function json(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), { status, headers: { 'Content-Type': 'application/json' } });
}

/** A streamed response whose body arrives in exactly these byte pieces. */
function streamed(pieces: Uint8Array[], status = 200): Response {
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      for (const p of pieces) {
        controller.enqueue(p);
      }
      controller.close();
    }
  });
  return new Response(body, { status, headers: { 'Content-Type': 'text/event-stream' } });
}

function sse(...events: unknown[]): string {
  return events.map(e => `data: ${typeof e === 'string' ? e : JSON.stringify(e)}\n\n`).join('');
}

function delta(content: string, finish: string | null = null): unknown {
  return { choices: [{ index: 0, delta: { content }, finish_reason: finish }] };
}

describe('SseParser', () => {
  it('joins events split across chunks and ignores comments', () => {
    const p = new SseParser();
    expect(p.feed(': keep-alive\n\nda')).toEqual([]);
    expect(p.feed('ta: {"a":1}\r\n\r\ndata: x\ndata: y\n')).toEqual(['{"a":1}']);
    expect(p.feed('\n')).toEqual(['x\ny']);
  });

  it('reads a CRLF split across two chunks as one line end, not a blank line', () => {
    const p = new SseParser();
    // the CR ends one chunk and the LF begins the next: one event of two data lines, not two events
    expect(p.feed('data: a\r')).toEqual([]);
    expect(p.feed('\ndata: b\r')).toEqual([]);
    expect(p.feed('\n\r')).toEqual(['a\nb']); // the blank line's CR ends the event as it comes
    expect(p.feed('\ndata: e\n\n')).toEqual(['e']); // and its LF ends nothing more
    // a lone CR is a line end of its own (the next chunk does not begin with LF): the event still ends
    expect(p.feed('data: c\r')).toEqual([]);
    expect(p.feed('\r')).toEqual(['c']);
    expect(p.feed('')).toEqual([]);
    expect(p.feed('data: d\r\n\r\n')).toEqual(['d']);
  });
});

describe('parseChatChunk', () => {
  it('reads content, finish reason, usage, errors and the end marker', () => {
    expect(parseChatChunk('[DONE]')).toBeNull();
    expect(parseChatChunk(JSON.stringify(delta('Hi')))).toMatchObject({ content: 'Hi', finishReason: null, error: null });
    expect(parseChatChunk(JSON.stringify({ choices: [], usage: { prompt_tokens: 3, completion_tokens: 2 } }))?.usage).toEqual({
      prompt_tokens: 3,
      completion_tokens: 2
    });
    expect(parseChatChunk(JSON.stringify({ error: { message: 'boom' } }))?.error).toBe('boom');
  });

  it("reads a reasoning model's thinking apart from the content", () => {
    const thought = { choices: [{ index: 0, delta: { reasoning_content: 'plan', reasoning: 'plan' }, finish_reason: null }] };
    expect(parseChatChunk(JSON.stringify(thought))).toMatchObject({ content: '', thinking: 'plan' });
    const vllm = { choices: [{ index: 0, delta: { reasoning: 'only vLLM' }, finish_reason: null }] };
    expect(parseChatChunk(JSON.stringify(vllm))?.thinking).toBe('only vLLM');
    expect(parseChatChunk(JSON.stringify(delta('Hi')))?.thinking).toBe('');
  });
});

describe('errorFrom', () => {
  it('keeps the server message of an OpenAI error body', async () => {
    const err = await errorFrom(json({ error: { message: "The model 'x' does not exist", type: 'invalid_request_error', param: 'model', code: 'model_not_found' } }, 404));
    expect(err).toBeInstanceOf(XllmApiError);
    expect(err.message).toBe("The model 'x' does not exist");
    expect(err.status).toBe(404);
    expect(err.code).toBe('model_not_found');
  });

  it('explains a bare 404 (extension not enabled)', async () => {
    const err = await errorFrom(new Response('<html>Not Found</html>', { status: 404 }));
    expect(err.message).toMatch(/extension is not enabled/);
  });
});

describe('XllmApi', () => {
  it('reads stats and model ids from the right paths', async () => {
    const { request, calls } = fake(path =>
      path === 'v1/models' ? json({ object: 'list', data: [{ id: 'tiny' }, { id: 'smollm2' }] }) : json({ object: 'xllm.stats', status: 'ready' })
    );
    const api = new XllmApi(request);
    expect((await api.stats()).status).toBe('ready');
    expect(await api.modelIds()).toEqual(['tiny', 'smollm2']);
    expect(calls.map(c => c.path)).toEqual(['admin/stats', 'v1/models']);
  });

  it('reads the task each model says it serves', async () => {
    const { request } = fake(() =>
      json({
        object: 'list',
        data: [
          { id: 'tiny', xllm: { loaded: true, details: { task: 'chat' } } },
          { id: 'all-minilm', xllm: { loaded: false, details: { task: 'embedding' } } },
          { id: 'other' }
        ]
      })
    );
    expect(await new XllmApi(request).models()).toEqual([
      { id: 'tiny', task: 'chat', loaded: true },
      { id: 'all-minilm', task: 'embedding', loaded: false },
      { id: 'other', task: null, loaded: null }
    ]);
  });

  it('posts load, unload and playground with JSON bodies', async () => {
    const { request, calls } = fake(path =>
      path.endsWith('unload') ? json({ id: 'tiny', unloaded: true }) : path === 'playground' ? json({ url: '/proxy/7860/' }) : json({ id: 'tiny' })
    );
    const api = new XllmApi(request);
    await api.load('tiny');
    expect(await api.unload('tiny')).toBe(true);
    expect(await api.playground()).toBe('/proxy/7860/');
    expect(calls.map(c => [c.path, c.init?.method, c.init?.body])).toEqual([
      ['admin/models/load', 'POST', '{"model":"tiny"}'],
      ['admin/models/unload', 'POST', '{"model":"tiny"}'],
      ['playground', 'POST', '{}']
    ]);
  });

  it('turns error answers into XllmApiError', async () => {
    const api = new XllmApi(fake(() => json({ error: { message: 'Not enough memory', code: 'insufficient_memory' } }, 503)).request);
    await expect(api.load('big')).rejects.toMatchObject({ message: 'Not enough memory', status: 503, code: 'insufficient_memory' });
  });

  it('streams a chat, even with multi-byte characters split between chunks', async () => {
    const bytes = new TextEncoder().encode(sse(delta('Hé'), delta('llo ✓', 'stop'), { choices: [], usage: { prompt_tokens: 4, completion_tokens: 2 } }, '[DONE]'));
    // cut inside the 'é' and inside the '✓' so the decoder must carry partial characters
    const e = bytes.indexOf(0xc3); // first byte of 'é'
    const check = bytes.indexOf(0xe2); // first byte of '✓'
    expect(e > 0 && check > e).toBe(true);
    const cuts = [0, e + 1, check + 1, check + 2, bytes.length];
    const pieces = cuts.slice(1).map((end, i) => bytes.slice(cuts[i], end));
    const { request, calls } = fake(() => streamed(pieces));
    const seen: string[] = [];
    const result = await new XllmApi(request).chat({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], maxTokens: 8, onDelta: d => seen.push(d) });
    expect(seen.join('')).toBe('Héllo ✓');
    expect(result).toEqual({ text: 'Héllo ✓', finishReason: 'stop', usage: { prompt_tokens: 4, completion_tokens: 2 } });
    const body = JSON.parse(String(calls[0].init?.body));
    expect(calls[0].path).toBe('v1/chat/completions');
    expect(body).toMatchObject({ model: 'tiny', stream: true, max_tokens: 8, messages: [{ role: 'user', content: 'Hi' }] });
  });

  it("streams a reasoning model's thinking to onThinking, never into the text", async () => {
    const think = (text: string): unknown => ({ choices: [{ index: 0, delta: { reasoning_content: text }, finish_reason: null }] });
    const pieces = [new TextEncoder().encode(sse(think('plan'), think(' it'), delta('The answer.', 'stop'), '[DONE]'))];
    const { request } = fake(() => streamed(pieces));
    const seen: string[] = [];
    const thoughts: string[] = [];
    const result = await new XllmApi(request).chat({
      model: 'think',
      messages: [],
      onDelta: d => seen.push(d),
      onThinking: t => thoughts.push(t)
    });
    expect([seen, thoughts]).toEqual([['The answer.'], ['plan', ' it']]);
    expect(result).toMatchObject({ text: 'The answer.', thinking: 'plan it', finishReason: 'stop' });
  });

  it('raises the error event of a stream that fails after it started', async () => {
    const { request } = fake(() => streamed([new TextEncoder().encode(sse(delta('a'), { error: { message: 'engine stopped' } }))]));
    const got: string[] = [];
    await expect(new XllmApi(request).chat({ model: 'tiny', messages: [], onDelta: d => got.push(d) })).rejects.toThrow('engine stopped');
    expect(got).toEqual(['a']);
  });

  it('says so when a stream closes before its finish reason', async () => {
    const { request } = fake(() => streamed([new TextEncoder().encode(sse(delta('half an ans')))]));
    const got: string[] = [];
    await expect(new XllmApi(request).chat({ model: 'tiny', messages: [], onDelta: d => got.push(d) })).rejects.toMatchObject({ code: 'stream_incomplete' });
    expect(got).toEqual(['half an ans']);
  });

  it('says so when a stream ends with [DONE] but no finish reason', async () => {
    const { request } = fake(() => streamed([new TextEncoder().encode(sse(delta('half an ans')) + 'data: [DONE]\n\n')]));
    await expect(new XllmApi(request).chat({ model: 'tiny', messages: [], onDelta: () => undefined })).rejects.toMatchObject({ code: 'stream_incomplete' });
  });

  it('ends a stream with a finish reason but no [DONE] normally', async () => {
    const { request } = fake(() => streamed([new TextEncoder().encode(sse(delta('whole', 'stop')))]));
    await expect(new XllmApi(request).chat({ model: 'tiny', messages: [], onDelta: () => undefined })).resolves.toMatchObject({ text: 'whole', finishReason: 'stop' });
  });

  it('refuses a chat the server rejects before streaming', async () => {
    const { request } = fake(() => json({ error: { message: "The model 'nope' does not exist", code: 'model_not_found' } }, 404));
    await expect(new XllmApi(request).chat({ model: 'nope', messages: [], onDelta: () => undefined })).rejects.toMatchObject({ code: 'model_not_found' });
  });
});
