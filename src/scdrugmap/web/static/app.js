// scDrugMap pages: draw plotly charts from embedded JSON, sort tables, follow a job's progress.
(function () {
  "use strict";

  function drawCharts() {
    document.querySelectorAll(".chart[data-figure]").forEach(function (element) {
      var source = document.getElementById(element.dataset.figure);
      if (!source || typeof Plotly === "undefined") { return; }
      var figure = JSON.parse(source.textContent);
      Plotly.newPlot(element, figure.data, figure.layout, {responsive: true, displaylogo: false})
        .then(function () { element.dataset.rendered = "1"; });
    });
  }

  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    if (!cell) { return numeric ? -Infinity : ""; }
    var raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
    if (!numeric) { return raw.toLowerCase(); }
    var number = parseFloat(String(raw).replace(/,/g, ""));
    return isNaN(number) ? -Infinity : number;
  }

  function makeSortable(table) {
    table.querySelectorAll("thead th").forEach(function (header, index) {
      header.classList.add("sort");
      header.title = "sort";
      header.addEventListener("click", function () {
        var numeric = header.dataset.type === "number";
        var ascending = header.dataset.order !== "asc";
        table.querySelectorAll("thead th").forEach(function (h) { delete h.dataset.order; });
        header.dataset.order = ascending ? "asc" : "desc";
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
          return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  }

  function filterBundles() {
    var model = document.getElementById("model-select");
    var bundles = document.getElementById("bundle-select");
    if (!model || !bundles) { return; }
    function apply() {
      var firstVisible = null;
      Array.prototype.forEach.call(bundles.options, function (option) {
        if (!option.dataset.model) { return; }
        var visible = option.dataset.model === model.value;
        option.hidden = !visible;
        option.disabled = !visible;
        if (visible && firstVisible === null) { firstVisible = option; }
      });
      var current = bundles.options[bundles.selectedIndex];
      if (!current || current.disabled) { bundles.value = firstVisible ? firstVisible.value : ""; }
    }
    model.addEventListener("change", apply);
    apply();
  }

  function followJob() {
    var progress = document.getElementById("job-progress");
    if (!progress || !progress.dataset.poll) { return; }
    var bar = progress.querySelector(".bar");
    var stage = document.getElementById("job-stage");
    var url = "/api" + window.location.pathname.replace(/\/$/, "");
    function poll() {
      fetch(url, {headers: {"accept": "application/json"}, cache: "no-store"})
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (job) {
          if (!job) { return; }
          if (job.status !== "queued" && job.status !== "running") { window.location.reload(); return; }
          bar.style.width = (job.progress * 100).toFixed(1) + "%";
          stage.textContent = job.stage + " · " + Math.round(job.progress * 100) + "%";
          document.getElementById("job-state").textContent = job.status;
          window.setTimeout(poll, 1500);
        })
        .catch(function () { window.setTimeout(poll, 5000); });
    }
    window.setTimeout(poll, 1000);
  }

  function autoSubmit() {
    document.querySelectorAll("select.autosubmit").forEach(function (select) {
      select.addEventListener("change", function () { select.form.submit(); });
    });
    document.querySelectorAll("select[data-navigate]").forEach(function (select) {
      select.addEventListener("change", function () {
        window.location.href = select.dataset.navigate + encodeURIComponent(select.value);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    document.querySelectorAll("table.sortable").forEach(makeSortable);
    filterBundles();
    followJob();
    autoSubmit();
  });
})();
