"""The report page's inline CSS and JavaScript (no file or network request: everything is in the page).

The JavaScript: sortable and filterable tables, a lightbox that shows any figure at full size on click, the
interactive views drawn with the embedded plotly.js when they scroll into view (``layerlabRenderAll()`` draws all
at once, for tests and printing), and the side-by-side comparison of two chosen models.
"""

CSS = """
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:2px 0;opacity:.85}nav{padding:8px 28px;background:#e8edf3;position:sticky;top:0;z-index:5;
box-shadow:0 1px 3px rgba(0,0,0,.08)}nav a{margin-right:16px;color:#1f3a5f;text-decoration:none;font-weight:600}
nav a:hover{text-decoration:underline}main{padding:8px 28px 40px;max-width:1600px;margin:0 auto}
section{background:#fff;border:1px solid #dde3ea;border-radius:8px;margin:18px 0;padding:14px 22px}
h2{margin:4px 0 10px;font-size:21px;color:#1f3a5f}h3{font-size:16px;margin:20px 0 6px;color:#1f3a5f}
.intro{max-width:70em}.intro p{margin:6px 0}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:14px;margin:10px 0}
figure{margin:0;border:1px solid #e3e7ec;border-radius:6px;padding:6px;background:#fff}
figure.wide{grid-column:1/-1}figure img{width:100%;height:auto;display:block;cursor:zoom-in}
figcaption{font-size:12px;color:#556}
.views{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:14px;margin:10px 0}
.view.wide{grid-column:1/-1}.view{border:1px solid #e3e7ec;border-radius:6px;padding:6px;min-height:200px}.view .plot{width:100%}
.view p{margin:2px 4px;font-size:12px;color:#556}
#lightbox{display:none;position:fixed;inset:0;background:rgba(10,16,24,.88);z-index:20;overflow:auto;cursor:zoom-out;
padding:24px;text-align:center}#lightbox.open{display:block}#lightbox img{max-width:none;background:#fff;
border-radius:4px}#lightbox p{color:#eee;margin:0 0 10px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}th,td{border:1px solid #dfe4ea;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f0f3f7;cursor:pointer;user-select:none;white-space:nowrap}
th[data-order=asc]::after{content:" \\25B2"}th[data-order=desc]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#fafbfc}
input.filter{margin:4px 0;padding:3px 7px;border:1px solid #cdd5df;border-radius:4px;width:22em;font-size:12.5px}
details{margin:6px 0}summary{cursor:pointer;color:#1f3a5f;font-weight:600}.note{color:#667;font-size:12px}
.scroll{overflow-x:auto;max-width:100%}code{background:#eef1f5;padding:1px 4px;border-radius:3px}
.bad{color:#a11}.ok{color:#176d2c}td.cfg{font-family:ui-monospace,monospace;font-size:11px;max-width:60em;
word-break:break-all}.pick{margin:6px 0 10px}.pick label{margin-right:18px;font-weight:600}
.pick select{font-size:13px;padding:2px 6px;margin-left:6px}
"""

JS = r"""
(function () {
  // ----------------------------------------------------------------------------- sortable, filterable tables
  document.querySelectorAll('table.sortable th').forEach(function (th) {
    th.addEventListener('click', function () {
      var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
      var asc = th.dataset.order !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.order; });
      th.dataset.order = asc ? 'asc' : 'desc';
      var value = function (row) { var c = row.cells[col]; return c ? (c.dataset.v !== undefined ? c.dataset.v : c.textContent) : ''; };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = value(a), y = value(b), nx = Number(x), ny = Number(y);
        var cmp = (x !== '' && y !== '' && !isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  document.querySelectorAll('input.filter').forEach(function (input) {
    var table = input.parentElement.querySelector('table');
    input.addEventListener('input', function () {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean), shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        var text = r.textContent.toLowerCase();
        var keep = words.every(function (w) { return text.indexOf(w) >= 0; });
        r.style.display = keep ? '' : 'none'; shown += keep ? 1 : 0;
      });
      input.title = shown + ' rows shown';
    });
  });

  // -------------------------------------------------------------------------------------------- lightbox
  var box = document.getElementById('lightbox'), boxImg = box.querySelector('img'), boxCap = box.querySelector('p');
  document.querySelectorAll('figure img').forEach(function (img) {
    img.addEventListener('click', function () {
      boxImg.src = img.src; boxImg.alt = img.alt; boxCap.textContent = img.alt + ' (full size; click or Esc to close)';
      box.classList.add('open');
    });
  });
  var close = function () { box.classList.remove('open'); boxImg.removeAttribute('src'); };
  box.addEventListener('click', close);
  document.addEventListener('keydown', function (e) { if (e.key === 'Escape') close(); });

  // ----------------------------------------------------------------------------------- interactive views
  var config = {responsive: true, displaylogo: false, displayModeBar: 'hover', modeBarButtonsToRemove: ['sendDataToCloud']};
  var spec = function (id) { return JSON.parse(document.getElementById(id).textContent); };
  var draw = function (el) {
    if (el.dataset.drawn) return;
    el.dataset.drawn = '1';
    var s = spec(el.dataset.spec);
    Plotly.newPlot(el, s.data, s.layout, config);
  };
  var plots = document.querySelectorAll('.plot[data-spec]');
  if ('IntersectionObserver' in window) {
    var seen = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { draw(e.target); seen.unobserve(e.target); } });
    }, {rootMargin: '400px'});
    plots.forEach(function (el) { seen.observe(el); });
  } else { plots.forEach(draw); }
  // then the rest, one at a time while the page is idle, so that scrolling, printing and screenshots find them drawn
  var rest = Array.prototype.slice.call(plots), later = function () {
    var el = rest.shift(); if (!el) return; draw(el); setTimeout(later, 40);
  };
  window.addEventListener('load', function () { setTimeout(later, 200); });

  // ------------------------------------------------------------------------------- two models side by side
  var cmp = document.getElementById('compare-data');
  var drawCompare = function () {};
  if (cmp) {
    var data = JSON.parse(cmp.textContent), a = document.getElementById('compare-a'), b = document.getElementById('compare-b');
    drawCompare = function () {
      data.panels.forEach(function (p) {
        var el = document.getElementById('compare-' + p.key), traces = [];
        [[a.value, 'solid'], [b.value, 'dash']].forEach(function (pick) {
          var s = (data.values[p.key] || {})[pick[0]];
          if (s) traces.push({type: 'scatter', mode: 'lines+markers', name: pick[0], x: s.x, y: s.y,
                              line: {color: data.colors[pick[0]], dash: pick[1]}, marker: {size: 5},
                              hovertemplate: pick[0] + '<br>%{x}: %{y:.3f}<extra></extra>'});
        });
        var layout = {title: {text: p.title, font: {size: 13}, x: 0.01, xanchor: 'left'}, height: 340,
                      margin: {l: 60, r: 10, t: 60, b: 80}, xaxis: {tickangle: -50, automargin: true},
                      yaxis: {title: {text: p.unit}}, showlegend: true, paper_bgcolor: '#fff', plot_bgcolor: '#fff',
                      legend: {orientation: 'h', x: 0, y: 1.0, yanchor: 'bottom', xanchor: 'left'}};
        if (!traces.length) {
          layout.xaxis.visible = false; layout.yaxis.visible = false;
          layout.annotations = [{text: 'neither ' + a.value + ' nor ' + b.value + ' is in this analysis',
                                 showarrow: false, xref: 'paper', yref: 'paper', x: 0.5, y: 0.5}];
        }
        Plotly.react(el, traces, layout, config);
      });
    };
    a.addEventListener('change', drawCompare); b.addEventListener('change', drawCompare);
    drawCompare();
  }
  window.layerlabRenderAll = function () { plots.forEach(draw); drawCompare(); return plots.length; };
})();
"""
