// A small SVG line chart for the benchmarks' per-second series: panels stacked vertically that
// share one time axis, each with its own y axis (linear from zero, or logarithmic) and a few
// named lines. Plain string building, no dependencies; the output is deterministic for the same
// input, so a regenerated chart only changes where the figures did.

export interface ChartLine {
  readonly name: string;
  readonly color: string;
  /** One value per x (NaN or undefined leaves a gap). */
  readonly values: readonly (number | undefined)[];
}

export interface ChartPanel {
  readonly title: string;
  readonly unit: string;
  readonly lines: readonly ChartLine[];
  /** Logarithmic y axis (values <= 0 are left out). */
  readonly log?: boolean;
}

export interface Chart {
  readonly title: string;
  readonly subtitle?: string;
  /** The x value of every point (seconds). */
  readonly x: readonly number[];
  readonly xLabel: string;
  readonly panels: readonly ChartPanel[];
}

const width = 960;
const panelHeight = 170;
const marginLeft = 78;
const marginRight = 200;
const headerHeight = 52;
const panelGap = 34;
const footerHeight = 36;

function escapeXml(text: string): string {
  return text.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;').replaceAll('"', '&quot;');
}

/** A round step for about `count` ticks over [0, max]. */
function niceStep(max: number, count: number): number {
  const raw = max / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const scaled = raw / power;
  return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * power;
}

function formatTick(value: number): string {
  if (value === 0) return '0';
  const abs = Math.abs(value);
  if (abs >= 1e6) return `${(value / 1e6).toFixed(abs % 1e6 === 0 ? 0 : 1)}M`;
  if (abs >= 1e3) return `${(value / 1e3).toFixed(abs % 1e3 === 0 ? 0 : 1)}k`;
  if (abs >= 1) return String(Math.round(value * 10) / 10);
  return String(Number(value.toPrecision(2)));
}

function finite(values: readonly (number | undefined)[], log: boolean): number[] {
  return values.filter((value): value is number => value !== undefined && Number.isFinite(value) && (!log || value > 0));
}

export function renderChart(chart: Chart): string {
  const plotWidth = width - marginLeft - marginRight;
  const height = headerHeight + chart.panels.length * (panelHeight + panelGap) + footerHeight;
  const xMin = chart.x[0] ?? 0;
  const xMax = Math.max(xMin + 1, chart.x[chart.x.length - 1] ?? 1);
  const xAt = (x: number): number => marginLeft + ((x - xMin) / (xMax - xMin)) * plotWidth;
  const out: string[] = [];
  out.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`);
  out.push(`<rect width="${width}" height="${height}" fill="white"/>`);
  out.push(`<text x="${marginLeft}" y="22" font-size="16" font-weight="bold">${escapeXml(chart.title)}</text>`);
  if (chart.subtitle !== undefined) out.push(`<text x="${marginLeft}" y="40" fill="#444">${escapeXml(chart.subtitle)}</text>`);
  const xStep = niceStep(xMax - xMin, 10);
  chart.panels.forEach((panel, panelIndex) => {
    const top = headerHeight + panelIndex * (panelHeight + panelGap) + 14;
    const bottom = top + panelHeight - 14;
    const log = panel.log === true;
    const all = panel.lines.flatMap((line) => finite(line.values, log));
    let yMin = 0;
    let yMax = Math.max(1e-9, ...all);
    if (log) {
      yMin = 10 ** Math.floor(Math.log10(Math.max(1e-9, Math.min(...all, yMax))));
      yMax = 10 ** Math.ceil(Math.log10(yMax));
      if (yMax <= yMin) yMax = yMin * 10;
    } else {
      yMax = niceStep(yMax, 4) * Math.ceil(yMax / niceStep(yMax, 4));
    }
    const yAt = (value: number): number => log
      ? bottom - ((Math.log10(value) - Math.log10(yMin)) / (Math.log10(yMax) - Math.log10(yMin))) * (bottom - top)
      : bottom - (value / yMax) * (bottom - top);
    out.push(`<text x="${marginLeft}" y="${top - 4}" font-weight="bold">${escapeXml(panel.title)} <tspan font-weight="normal" fill="#555">(${escapeXml(panel.unit)}${log ? ', log scale' : ''})</tspan></text>`);
    out.push(`<rect x="${marginLeft}" y="${top}" width="${plotWidth}" height="${bottom - top}" fill="none" stroke="#999"/>`);
    const ticks: number[] = [];
    if (log) for (let tick = yMin; tick <= yMax * 1.0001; tick *= 10) ticks.push(tick);
    else for (let tick = 0; tick <= yMax * 1.0001; tick += niceStep(yMax, 4)) ticks.push(tick);
    for (const tick of ticks) {
      const y = yAt(tick).toFixed(1);
      out.push(`<line x1="${marginLeft}" x2="${marginLeft + plotWidth}" y1="${y}" y2="${y}" stroke="#e4e4e4"/>`);
      out.push(`<text x="${marginLeft - 6}" y="${y}" text-anchor="end" dominant-baseline="middle" fill="#333">${formatTick(tick)}</text>`);
    }
    for (let x = Math.ceil(xMin / xStep) * xStep; x <= xMax; x += xStep) {
      const at = xAt(x).toFixed(1);
      out.push(`<line x1="${at}" x2="${at}" y1="${top}" y2="${bottom}" stroke="#f0f0f0"/>`);
      if (panelIndex === chart.panels.length - 1) out.push(`<text x="${at}" y="${bottom + 16}" text-anchor="middle" fill="#333">${formatTick(x)}</text>`);
    }
    panel.lines.forEach((line, lineIndex) => {
      const segments: string[][] = [];
      let current: string[] = [];
      line.values.forEach((value, index) => {
        const x = chart.x[index];
        if (x === undefined || value === undefined || !Number.isFinite(value) || (log && value <= 0)) {
          if (current.length > 0) segments.push(current);
          current = [];
          return;
        }
        current.push(`${xAt(x).toFixed(1)},${yAt(Math.min(value, yMax)).toFixed(1)}`);
      });
      if (current.length > 0) segments.push(current);
      for (const points of segments) {
        out.push(`<polyline fill="none" stroke="${line.color}" stroke-width="1.6" points="${points.join(' ')}"/>`);
      }
      const legendY = top + 12 + lineIndex * 18;
      out.push(`<line x1="${marginLeft + plotWidth + 14}" x2="${marginLeft + plotWidth + 34}" y1="${legendY}" y2="${legendY}" stroke="${line.color}" stroke-width="3"/>`);
      out.push(`<text x="${marginLeft + plotWidth + 40}" y="${legendY}" dominant-baseline="middle">${escapeXml(line.name)}</text>`);
    });
  });
  const lastBottom = headerHeight + chart.panels.length * (panelHeight + panelGap) - panelGap + 14;
  out.push(`<text x="${marginLeft + plotWidth / 2}" y="${lastBottom + 30}" text-anchor="middle">${escapeXml(chart.xLabel)}</text>`);
  out.push('</svg>');
  return `${out.join('\n')}\n`;
}
