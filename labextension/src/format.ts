/**
 * Pure formatting helpers for the panel: bytes, rates, the memory gauge and status labels.
 * No DOM and no JupyterLab imports, so jest tests them directly.
 */

import type { DeviceMemory, EngineStatus } from './api';

const UNITS = ['B', 'KB', 'MB', 'GB', 'TB'];

/** Bytes as a short human string in powers of 1000, as `xllm ps`, `xllm list` and `%xllm ps` write them
 * (538060288 -> "538 MB" beside their "538.1 MB"; with 1024 the panel said 513 MB for the same model). */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !isFinite(bytes) || bytes < 0) {
    return '–';
  }
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < UNITS.length - 1) {
    value /= 1000;
    unit++;
  }
  let digits = unit === 0 || value >= 100 ? 0 : value >= 10 ? 1 : 2;
  // rounding may reach the next size: 999.6 KB is "1.00 MB", not "1000 KB"; 99.96 MB "100 MB", not "100.0 MB"
  if (Number(value.toFixed(digits)) >= 1000 && unit < UNITS.length - 1) {
    value /= 1000;
    unit++;
    digits = 2;
  } else if (digits > 0 && Number(value.toFixed(digits)) >= 10 ** (3 - digits)) {
    digits--;
  }
  return `${value.toFixed(digits)} ${UNITS[unit]}`;
}

/** A generation rate: "0 tok/s" when idle, one decimal below 100. */
export function formatRate(tokensPerSecond: number | null | undefined): string {
  const v = tokensPerSecond ?? 0;
  if (!isFinite(v) || v <= 0) {
    return '0 tok/s';
  }
  return `${v >= 100 ? Math.round(v) : v.toFixed(1)} tok/s`;
}

/** What the memory gauge draws for one device kind. */
export interface Gauge {
  /** 0..1 share of the limit in use; null when there is no known limit */
  fraction: number | null;
  /** e.g. "1.2 GB of 8.0 GB budget" */
  label: string;
  /** which limit the fraction is measured against */
  limit: 'budget' | 'device' | 'none';
  /** true when the budget (or device) is nearly full */
  warn: boolean;
}

/** The gauge for one device: against the budget when one is set, else the device's total. */
export function memoryGauge(device: string, mem: DeviceMemory): Gauge {
  const used = mem.used_bytes;
  const name = device === 'cuda' ? 'GPU' : 'RAM';
  let limit: Gauge['limit'] = 'none';
  let total = 0;
  if (mem.budget_bytes > 0) {
    limit = 'budget';
    total = mem.budget_bytes;
  } else if (mem.total_bytes && mem.total_bytes > 0) {
    limit = 'device';
    total = mem.total_bytes;
  }
  if (limit === 'none') {
    return { fraction: null, label: `${formatBytes(used)} used (${name}, no budget)`, limit, warn: false };
  }
  const fraction = Math.min(1, Math.max(0, used / total));
  const what = limit === 'budget' ? `${name} budget` : name;
  return { fraction, label: `${formatBytes(used)} of ${formatBytes(total)} ${what}`, limit, warn: fraction >= 0.9 };
}

/** One line per GPU where the CUDA row spans several ("GPU 1: 30.0 GB used, 50.0 GB free of 80.0 GB"): the gauge
 * sums them, which hides one full GPU beside an empty one. None for one GPU (the gauge says it all) or another kind. */
export function gpuLines(mem: DeviceMemory): string[] {
  const gpus = mem.devices ?? [];
  if (gpus.length < 2) {
    return [];
  }
  return gpus.map(
    g => `GPU ${g.index}: ${formatBytes(g.used_bytes)} used, ${formatBytes(g.free_bytes)} free of ${formatBytes(g.total_bytes)}`
  );
}

/** The status line's words for an engine status. */
export function statusLabel(status: EngineStatus | 'offline', message?: string | null): string {
  switch (status) {
    case 'ready':
      return 'Ready';
    case 'starting':
      return 'Starting…';
    case 'loading':
      return message || 'Loading a model…';
    case 'unhealthy':
      return message || 'Engine stopped: restart the server';
    default:
      return message || 'Not reachable';
  }
}

/** Queue depth in words: "idle", "2 running", "2 running · 3 waiting". */
export function formatQueue(running: number, queued: number): string {
  if (!running && !queued) {
    return 'idle';
  }
  const parts = [`${running} running`];
  if (queued) {
    parts.push(`${queued} waiting`);
  }
  return parts.join(' · ');
}
