import { formatBytes, formatQueue, formatRate, gpuLines, memoryGauge, statusLabel } from '../format';

describe('formatBytes', () => {
  it('scales by 1000 with sensible precision', () => {
    expect(formatBytes(0)).toBe('0 B');
    expect(formatBytes(999)).toBe('999 B');
    expect(formatBytes(1500)).toBe('1.50 KB');
    expect(formatBytes(15_000_000)).toBe('15.0 MB');
    expect(formatBytes(270e9)).toBe('270 GB');
  });

  it('agrees with `xllm ps` (538.1 MB) on the same model, not 513 MB in powers of 1024', () => {
    expect(formatBytes(538060288)).toBe('538 MB');
    expect(formatBytes(25276194816)).toBe('25.3 GB');
  });

  it('never shows four digits where rounding reaches the next size', () => {
    expect(formatBytes(999_600)).toBe('1.00 MB');
    expect(formatBytes(999_499)).toBe('999 KB');
    expect(formatBytes(99_960_000)).toBe('100 MB');
    expect(formatBytes(9_999_000)).toBe('10.0 MB');
    expect(formatBytes(999.7e12)).toBe('1000 TB'); // no larger unit
  });

  it('shows a dash for unknown values', () => {
    expect(formatBytes(null)).toBe('–');
    expect(formatBytes(undefined)).toBe('–');
    expect(formatBytes(-1)).toBe('–');
    expect(formatBytes(NaN)).toBe('–');
  });
});

describe('formatRate', () => {
  it('is zero when idle and rounds large rates', () => {
    expect(formatRate(0)).toBe('0 tok/s');
    expect(formatRate(null)).toBe('0 tok/s');
    expect(formatRate(12.345)).toBe('12.3 tok/s');
    expect(formatRate(1938.4)).toBe('1938 tok/s');
  });
});

describe('memoryGauge', () => {
  it('measures against the budget when one is set', () => {
    const g = memoryGauge('cpu', { used_bytes: 500e6, budget_bytes: 1e9, total_bytes: 16e9 });
    expect(g.limit).toBe('budget');
    expect(g.fraction).toBeCloseTo(0.5);
    expect(g.label).toBe('500 MB of 1.00 GB RAM budget');
    expect(g.warn).toBe(false);
  });

  it('falls back to the device total, and warns when nearly full', () => {
    const g = memoryGauge('cuda', { used_bytes: 95, budget_bytes: 0, total_bytes: 100 });
    expect(g.limit).toBe('device');
    expect(g.fraction).toBeCloseTo(0.95);
    expect(g.warn).toBe(true);
    expect(g.label).toContain('GPU');
  });

  it('has no fraction without any known limit and clamps overflow', () => {
    expect(memoryGauge('cpu', { used_bytes: 10, budget_bytes: 0, total_bytes: null }).fraction).toBeNull();
    expect(memoryGauge('cpu', { used_bytes: 300, budget_bytes: 100, total_bytes: null }).fraction).toBe(1);
  });
});

describe('gpuLines', () => {
  const gpu = (index: number, used: number, total: number) => ({
    index,
    used_bytes: used,
    free_bytes: total - used,
    total_bytes: total
  });

  it('shows each GPU of several, which the summed gauge hides', () => {
    const mem = { used_bytes: 70e9, budget_bytes: 0, total_bytes: 160e9, devices: [gpu(0, 78e9, 80e9), gpu(1, 2e9, 80e9)] };
    expect(gpuLines(mem)).toEqual(['GPU 0: 78.0 GB used, 2.00 GB free of 80.0 GB', 'GPU 1: 2.00 GB used, 78.0 GB free of 80.0 GB']);
  });

  it('adds nothing for one GPU, the RAM row or a server that sends no devices', () => {
    expect(gpuLines({ used_bytes: 1e9, budget_bytes: 0, total_bytes: 80e9, devices: [gpu(0, 5e9, 80e9)] })).toEqual([]);
    expect(gpuLines({ used_bytes: 1e9, budget_bytes: 0, total_bytes: 16e9 })).toEqual([]);
    expect(gpuLines({ used_bytes: 1e9, budget_bytes: 0, total_bytes: 80e9, devices: [] })).toEqual([]);
  });
});

describe('statusLabel and formatQueue', () => {
  it('words every status', () => {
    expect(statusLabel('ready')).toBe('Ready');
    expect(statusLabel('loading', 'Still loading tiny.')).toBe('Still loading tiny.');
    expect(statusLabel('unhealthy')).toMatch(/restart/);
    expect(statusLabel('offline', 'HTTP 404')).toBe('HTTP 404');
  });

  it('summarises the queue', () => {
    expect(formatQueue(0, 0)).toBe('idle');
    expect(formatQueue(2, 0)).toBe('2 running');
    expect(formatQueue(2, 3)).toBe('2 running · 3 waiting');
  });
});
