/**
 * Requests to the xllm routes under `{base}xllm/`, independent of how they are sent.
 *
 * The panel gives `XllmApi` a `RequestFn` built on JupyterLab's `ServerConnection`
 * (token + XSRF handled there, see connection.ts); tests give it a fake. Errors from the
 * server arrive in the OpenAI shape and become `XllmApiError` with the server's message.
 */

/** Sends `init` to `path` (relative to `{base}xllm/`, no leading slash). */
export type RequestFn = (path: string, init?: RequestInit) => Promise<Response>;

export type EngineStatus = 'ready' | 'starting' | 'loading' | 'unhealthy';

/** One GPU's memory in `memory.cuda.devices`, as `torch.cuda.mem_get_info` reads it. */
export interface GpuMemory {
  index: number;
  /** everything on this GPU, other processes included */
  used_bytes: number;
  free_bytes: number;
  total_bytes: number;
}

/** One device kind's memory, from `/admin/stats`. */
export interface DeviceMemory {
  used_bytes: number;
  /** 0 = no budget configured */
  budget_bytes: number;
  /** physical memory of the device, when the server knows it (on CUDA: all its GPUs together) */
  total_bytes: number | null;
  /** CUDA only: each GPU's own figures (absent from older servers) */
  devices?: GpuMemory[];
}

/** A loaded (or loading) model in `/admin/stats`. */
export interface StatsModel {
  id: string;
  state: 'loaded' | 'loading' | string;
  /** a loading model whose load waits for models in use to free memory (absent from older servers) */
  waiting_for_room?: boolean;
  backend: string | null;
  device: string;
  memory_bytes: number;
  running: number;
  queued: number;
  max_batch_size: number | null;
  context_length: number | null;
}

/** The document of `GET /admin/stats`. */
export interface Stats {
  object: 'xllm.stats';
  status: EngineStatus;
  message: string | null;
  time: number;
  default_model: string | null;
  models: StatsModel[];
  memory: Record<string, DeviceMemory>;
  running: number;
  queued: number;
  completed: number;
  generated_tokens: number;
  tokens_per_second: number;
  rate_window_seconds: number;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

/** A model `GET v1/models` lists, with the task it says it serves (null: not stated). */
export interface ModelInfo {
  id: string;
  /** 'chat', 'embedding', 'adapter', ... (`xllm.details.task`) */
  task: string | null;
  /** in memory now (`xllm.loaded`; null: not stated) */
  loaded: boolean | null;
}

/** Token usage reported at the end of a streamed chat. */
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
}

/** An error answer from the server (or the network), with the server's own message. */
export class XllmApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string | null = null
  ) {
    super(message);
    this.name = 'XllmApiError';
  }
}

/** The message of an OpenAI-shaped error body, else a plain description of the status. */
export async function errorFrom(response: Response): Promise<XllmApiError> {
  let text = '';
  try {
    text = await response.text();
  } catch {
    // the body is gone; the status is all we have
  }
  try {
    const body = JSON.parse(text);
    const err = body?.error;
    if (err && typeof err.message === 'string') {
      return new XllmApiError(err.message, response.status, err.code ?? null);
    }
  } catch {
    // not JSON: fall through
  }
  const reason = response.status === 404 ? 'the xllm server extension is not enabled' : response.statusText || 'request failed';
  return new XllmApiError(`HTTP ${response.status}: ${reason}`, response.status);
}

/**
 * Incremental parser for a server-sent event stream: feed text as it arrives, get the
 * `data:` payloads of every complete event. Handles CRLF, comments and split chunks.
 */
export class SseParser {
  private buffer = '';
  /** the last chunk ended with CR: an LF that begins the next one is the same line end (a CRLF split in two) */
  private afterCR = false;

  /** Payloads completed by `chunk` (joined `data:` lines of each event). */
  feed(chunk: string): string[] {
    if (this.afterCR && chunk.length) {
      chunk = chunk.startsWith('\n') ? chunk.slice(1) : chunk;
      this.afterCR = false;
    }
    if (chunk.length) {
      this.afterCR = chunk.endsWith('\r'); // read as a line end now: a lone CR is one, and the event may end here
    }
    this.buffer += chunk.replace(/\r\n?/g, '\n');
    const out: string[] = [];
    let end: number;
    while ((end = this.buffer.indexOf('\n\n')) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      const data = block
        .split('\n')
        .filter(line => line.startsWith('data:'))
        .map(line => line.slice(line.startsWith('data: ') ? 6 : 5));
      if (data.length) {
        out.push(data.join('\n'));
      }
    }
    return out;
  }
}

/** What one streamed chat chunk carries for the first choice. */
export interface ChatChunk {
  content: string;
  /** a reasoning model's thinking (the server's `reasoning_content`): never part of `content` */
  thinking: string;
  finishReason: string | null;
  usage: Usage | null;
  error: string | null;
}

/** Read one `data:` payload of a chat completion stream ("[DONE]" -> null). */
export function parseChatChunk(payload: string): ChatChunk | null {
  if (payload.trim() === '[DONE]') {
    return null;
  }
  const chunk = JSON.parse(payload);
  if (chunk.error) {
    return { content: '', thinking: '', finishReason: 'error', usage: null, error: String(chunk.error.message ?? chunk.error) };
  }
  const choice = chunk.choices?.[0];
  return {
    content: choice?.delta?.content ?? '',
    thinking: choice?.delta?.reasoning_content ?? choice?.delta?.reasoning ?? '',
    finishReason: choice?.finish_reason ?? null,
    usage: chunk.usage ?? null,
    error: null
  };
}

/** Options of one streamed chat request. */
export interface ChatOptions {
  model: string;
  messages: ChatMessage[];
  maxTokens?: number;
  temperature?: number;
  signal?: AbortSignal;
  /** called with each piece of text as it arrives */
  onDelta: (text: string) => void;
  /** called with each piece of a reasoning model's thinking as it arrives (before the reply's text) */
  onThinking?: (text: string) => void;
}

/** The end of a streamed chat. */
export interface ChatResult {
  text: string;
  /** a reasoning model's thinking, where it thought (not part of `text`) */
  thinking?: string;
  finishReason: string | null;
  usage: Usage | null;
}

/** The xllm routes the panel uses. */
export class XllmApi {
  constructor(private readonly request: RequestFn) {}

  private async json<T>(path: string, init?: RequestInit): Promise<T> {
    const response = await this.request(path, init);
    if (!response.ok) {
      throw await errorFrom(response);
    }
    return (await response.json()) as T;
  }

  private post<T>(path: string, body: unknown): Promise<T> {
    return this.json<T>(path, { method: 'POST', body: JSON.stringify(body), headers: { 'Content-Type': 'application/json' } });
  }

  /** `GET admin/stats`: status, models, memory, queue and tok/s. */
  stats(): Promise<Stats> {
    return this.json<Stats>('admin/stats');
  }

  /** `GET v1/models`: every model the server can serve (loaded or in the store) and its task. */
  async models(): Promise<ModelInfo[]> {
    const body = await this.json<{ data: { id: string; xllm?: { loaded?: unknown; details?: { task?: unknown } } }[] }>('v1/models');
    return body.data.map(m => {
      const task = m.xllm?.details?.task;
      const loaded = m.xllm?.loaded;
      return { id: m.id, task: typeof task === 'string' ? task : null, loaded: typeof loaded === 'boolean' ? loaded : null };
    });
  }

  /** `GET v1/models`: ids of every model the server can serve (loaded or in the store). */
  async modelIds(): Promise<string[]> {
    return (await this.models()).map(m => m.id);
  }

  /** `POST admin/models/load`: returns once the model is in memory. */
  load(model: string): Promise<unknown> {
    return this.post('admin/models/load', { model });
  }

  /** `POST admin/models/unload`: true when the model was loaded. */
  async unload(model: string): Promise<boolean> {
    const body = await this.post<{ unloaded: boolean }>('admin/models/unload', { model });
    return body.unloaded;
  }

  /** `POST playground`: the URL of the Gradio playground, started on first use. */
  async playground(): Promise<string> {
    const body = await this.post<{ url: string }>('playground', {});
    return body.url;
  }

  /** `POST v1/chat/completions` with `stream: true`; text goes to `onDelta` as it arrives. */
  async chat(options: ChatOptions): Promise<ChatResult> {
    const body: Record<string, unknown> = {
      model: options.model,
      messages: options.messages,
      stream: true,
      stream_options: { include_usage: true }
    };
    if (options.maxTokens !== undefined) {
      body.max_tokens = options.maxTokens;
    }
    if (options.temperature !== undefined) {
      body.temperature = options.temperature;
    }
    const response = await this.request('v1/chat/completions', {
      method: 'POST',
      body: JSON.stringify(body),
      headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
      signal: options.signal
    });
    if (!response.ok) {
      throw await errorFrom(response);
    }
    if (!response.body) {
      throw new XllmApiError('The server sent no stream', response.status);
    }
    const result: ChatResult = { text: '', finishReason: null, usage: null };
    const parser = new SseParser();
    const decoder = new TextDecoder();
    const reader = response.body.getReader();
    try {
      for (;;) {
        const { done: closed, value } = await reader.read();
        const payloads = parser.feed(closed ? decoder.decode() : decoder.decode(value, { stream: true }));
        let done = closed;
        for (const payload of payloads) {
          const chunk = parseChatChunk(payload);
          if (chunk === null) {
            done = true; // [DONE]: the end, checked below as a closed stream is
            break;
          }
          if (chunk.error !== null) {
            throw new XllmApiError(chunk.error, response.status);
          }
          if (chunk.thinking) {
            result.thinking = (result.thinking ?? '') + chunk.thinking;
            options.onThinking?.(chunk.thinking);
          }
          if (chunk.content) {
            result.text += chunk.content;
            options.onDelta(chunk.content);
          }
          result.finishReason = chunk.finishReason ?? result.finishReason;
          result.usage = chunk.usage ?? result.usage;
        }
        if (done) {
          if (result.finishReason === null) {
            // the connection closed cleanly mid-reply (a restarted server, a proxy's timeout), or
            // ended with [DONE] but no finish reason: the text so far is not the whole answer
            throw new XllmApiError('The reply stopped short: the stream closed before the server finished it.', response.status, 'stream_incomplete');
          }
          return result;
        }
      }
    } catch (error) {
      // stop reading: closing the stream makes the server cancel the generation
      reader.cancel().catch(() => undefined);
      throw error;
    } finally {
      reader.releaseLock();
    }
  }
}
