// The admin's fleet page: fetches the last hour (workers.selectors.fleet_history) every
// 10 seconds and draws it with uPlot (vendored under vendor/uplot).
(function () {
  "use strict";
  const root = document.getElementById("fleet");
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  const charts = {};

  // Labels come from worker heartbeats: keep them to the characters a label may have.
  const clean = (text) => String(text).replace(/[^\w@.+:\- ]/g, "?");

  function width() {
    return Math.max(320, Math.min(1100, root.clientWidth - 20));
  }

  function draw(id, x, named, options) {
    const keys = Object.keys(named);
    const data = [x, ...keys.map((k) => named[k])];
    const signature = keys.join("|");
    const existing = charts[id];
    if (existing && existing.signature === signature) {
      existing.plot.setData(data);
      return;
    }
    if (existing) existing.plot.destroy();
    const series = [{}].concat(
      keys.map((k, i) => ({
        label: clean(k),
        stroke: COLORS[i % COLORS.length],
        width: 2,
        spanGaps: false,
        points: { show: options.points || false },
      }))
    );
    const plot = new uPlot(
      {
        width: width(),
        height: 220,
        series: series,
        scales: options.scales || {},
        axes: [{}, { label: options.unit || "" }],
      },
      data,
      document.getElementById(id)
    );
    charts[id] = { plot: plot, signature: signature };
  }

  function showWorkers(workers) {
    const box = document.getElementById("fleet-workers");
    box.textContent = "";
    if (!workers.length) {
      box.textContent = "No worker has reported yet.";
      return;
    }
    for (const w of workers) {
      const item = document.createElement("span");
      const state = !w.online ? "offline" : !w.healthy ? "unhealthy" : "online";
      item.textContent = `${w.name} (${w.gpu}): ${state}`;
      if (state !== "online") item.className = "off";
      box.appendChild(item);
    }
  }

  async function refresh() {
    try {
      const response = await fetch(root.dataset.url, { credentials: "same-origin" });
      if (!response.ok) throw new Error(response.status);
      const d = await response.json();
      const busy = Object.keys(d.busy.series).length ? d.busy.series : { "no answers": d.busy.x.map(() => 0) };
      draw("chart-busy", d.busy.x, busy, { unit: "share", scales: { y: { range: [0, 1] } } });
      const queues = Object.keys(d.queues.series).length ? d.queues : { x: [d.now], series: { waiting: [0] } };
      draw("chart-queues", queues.x, queues.series, { unit: "messages", points: true });
      draw("chart-first-token", d.first_token.x, { p50: d.first_token.p50, p95: d.first_token.p95 }, { unit: "s", points: true });
      draw(
        "chart-events",
        d.events.x,
        { "model loads": d.events.loads, "failed questions": d.events.failed_questions, "failed ingestion jobs": d.events.failed_jobs },
        { unit: "per minute" }
      );
      showWorkers(d.workers);
      document.getElementById("fleet-updated").textContent = new Date().toLocaleTimeString();
      root.dataset.drawn = String(Number(root.dataset.drawn || 0) + 1);
    } catch (error) {
      document.getElementById("fleet-updated").textContent = `failed (${error.message}); retrying`;
    }
  }

  refresh();
  setInterval(refresh, 10000);
})();
