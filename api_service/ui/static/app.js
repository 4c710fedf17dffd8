/* The dashboard's only script of its own: charts from data- attributes, and a banner when the
   API cannot be reached. Loaded as a file: the Content-Security-Policy allows no inline script. */
(function () {
  "use strict";

  var plots = [];

  function chartWidth(el) {
    return Math.max(240, Math.min(el.clientWidth || 640, 960));
  }

  function drawCharts(root) {
    if (typeof uPlot === "undefined") {
      return;
    }
    root.querySelectorAll("[data-chart]:not([data-drawn])").forEach(function (el) {
      var data = JSON.parse(el.getAttribute("data-chart"));
      el.setAttribute("data-drawn", "true");
      plots.push({ el: el, plot: new uPlot({
        width: chartWidth(el),
        height: 180,
        scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(1, max + 1)]; } } },
        series: [
          {},
          { label: "open ports", stroke: "#2563eb", width: 2, points: { show: true, size: 7, fill: "#2563eb" } }
        ],
        axes: [{}, { label: "open ports" }]
      }, [data.x, data.y], el) });
    });
  }

  function showNetError(show) {
    var banner = document.getElementById("net-error");
    if (banner) {
      banner.hidden = !show;
    }
  }

  document.addEventListener("DOMContentLoaded", function () { drawCharts(document); });
  window.addEventListener("resize", function () {
    plots.forEach(function (entry) {
      entry.plot.setSize({ width: chartWidth(entry.el), height: 180 });
    });
  });
  document.addEventListener("htmx:sendError", function () { showNetError(true); });
  document.addEventListener("htmx:sseError", function () { showNetError(true); });
  document.addEventListener("htmx:sseOpen", function () { showNetError(false); });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail && event.detail.successful) {
      showNetError(false);
    }
  });
})();
