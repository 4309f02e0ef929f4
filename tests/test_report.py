"""The HTML report: pure pieces (correlation, tables) and the real page in headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: fds 3 and 4, NUL-separated
JSON; no websocket package needed), so console messages, uncaught exceptions and failed loads are read as
events rather than scraped from logs. Skipped only when no Chromium is installed (CI: .ci/install-system.sh).
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerlab.errors import LayerlabError
from layerlab.report import collect, criticality_accuracy, generic_summary, render, table_html, write_report

from helpers import TINY_ZOO, Deadline, write  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(autouse=True)
def _deadline():
    with Deadline(150):
        yield


# -------------------------------------------------------------------------------------------- pure pieces


def _crit_table(means: dict[str, float]) -> pd.DataFrame:
    rows = []
    for model, m in means.items():
        for layer in ("conv1", "fc"):
            for trial in (0, 1):
                rows.append({"model": model, "layer": layer, "trial": trial, "mode": "randomize",
                             "criticality": m + (1.0 if layer == "fc" else -1.0) + 0.1 * trial})
    return pd.DataFrame(rows)


def test_criticality_accuracy_rho_and_adversarial_subset():
    crit = _crit_table({"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0, "adv": 90.0})
    zoo = pd.DataFrame({"model": ["a", "b", "c", "d", "adv"], "accuracy": [0.9, 0.8, 0.7, 0.6, 0.95],
                        "category": ["baseline", "augmentation", "augmentation", "optimizer", "adversarial"]})
    per_model, corr = criticality_accuracy(crit, zoo)
    assert per_model.set_index("model")["mean_criticality"].round(6).to_dict() == {
        "adv": 90.05, "a": 10.05, "b": 20.05, "c": 30.05, "d": 40.05}
    assert corr["models"].tolist() == ["all models", "without adversarial"]
    assert corr["n"].tolist() == [5, 4]
    assert corr["rho"].iloc[1] == pytest.approx(-1.0)
    assert -1.0 < corr["rho"].iloc[0] < 0.5  # the adversarial model breaks the perfect order
    few = criticality_accuracy(crit[crit["model"].isin(["a", "b"])], zoo)[1]
    assert np.isnan(few["rho"].iloc[0]) and few["n"].iloc[0] == 2
    with pytest.raises(LayerlabError, match="'model' and 'accuracy'"):
        criticality_accuracy(crit, zoo.drop(columns="accuracy"))


def test_tables_escape_cut_and_sort_numerically():
    df = pd.DataFrame({"name": ["<script>alert(1)</script>", "b", "c"], "value": [3.0, float("nan"), 10.5],
                       "cfg": [{"a": 1}, [1, 2], "x" * 300]})
    html = table_html(df, max_rows=2)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "showing the first 2 of 3 rows" in html and 'data-v="3.0"' in html and 'data-v=""' in html
    assert '{&quot;a&quot;: 1}' in html and "&hellip;" not in html
    assert "&hellip;" in table_html(df.iloc[2:], 5)
    s = generic_summary(pd.DataFrame({"model": ["a", "a", "b"], "v": [1.0, 3.0, 5.0], "t": ["x", "y", "z"]}))
    assert s.to_dict("list") == {"model": ["a", "b"], "rows": [2, 1], "mean v": [2.0, 5.0]}


def test_report_of_an_empty_or_missing_folder(tmp_path):
    with pytest.raises(LayerlabError, match="does not exist"):
        collect(tmp_path / "nope")
    page = render(collect(tmp_path))
    assert "No results" in page and "Not available here" in page and "No failed jobs" in page


# ------------------------------------------------------------------------------------ a demo-like folder


ZOO = TINY_ZOO + "  label-noise: {recipe: label-noise, attrs: {noise: 0.2}}\n"  # the tiny zoo plus a model with attrs


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory) -> Path:
    """A sweep folder like the demo's: a trained 3-model zoo, criticality, its figures, a failed job, an SVG."""
    from matplotlib.figure import Figure

    from layerlab.criticality import summarize
    from layerlab.plots.criticality import save_all
    from layerlab.sweep import run_sweep

    base = tmp_path_factory.mktemp("report")
    write(base / "zoo.yaml", ZOO)
    write(base / "s.yaml", """
        name: demo-like
        zoo: zoo.yaml
        retries: 0
        analyses:
          criticality: {trials: 2, images: 32}
          probe: {jobs: 2, fail: always, faulty: [1]}
    """)
    out = base / "out"
    result = run_sweep(base / "s.yaml", out, progress=False)
    assert result.count("done") == 7 and result.count("failed") == 1
    from layerlab.store import Store

    table = Store(out).read("criticality")
    zoo = pd.read_csv(out / "zoo" / "zoo.csv")
    save_all(summarize(table), out / "figures" / "criticality", attrs=zoo, baseline="baseline")
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1, 2], [1, 0, 2])
    (out / "figures" / "extra").mkdir(parents=True)
    fig.savefig(out / "figures" / "extra" / "only_svg.svg")  # an SVG without a PNG twin
    return out


def test_report_holds_every_section(demo_like):
    data = collect(demo_like)
    names = [a.name for a in data.analyses]
    assert names == ["criticality", "extra", "probe", "training"]
    crit = data.analyses[0]
    assert len(crit.figures) >= 4 and all(p.suffix == ".png" for p in crit.figures)
    assert crit.shards["model"].tolist() and set(crit.versions.columns) >= {"torch", "shards"}
    assert data.analyses[1].figures[0].suffix == ".svg"
    assert data.correlations["n"].iloc[0] == 3 and len(data.per_model) == 3
    assert len(data.failures) == 1 and data.sweeps[0]["name"] == "demo-like"
    path = write_report(demo_like)
    page = path.read_text()
    assert path == demo_like / "report.html" and oct(path.stat().st_mode)[-3:] != "600"
    from layerlab.report.views import plotly_js

    assert plotly_js() in page  # embedded, not linked
    ours = page.replace(plotly_js(), "")  # plotly.js holds URL strings it never loads (the browser test checks requests)
    assert "http://" not in ours.replace("http://www.w3.org", "") and "https://" not in ours
    # every static figure but the accuracy scatter (drawn interactively instead), the SVG, the lightbox's <img>
    shown = [p for p in crit.figures if p.stem != "criticality_vs_accuracy"]
    assert page.count("<figure") == len(shown) + 1 and page.count("<img ") == len(shown) + 2
    assert ">Layer criticality</h2>" in page and ">Training runs</h2>" in page and "<h2>training</h2>" not in page
    assert "Gavrikov" in page and "This run." in page  # the introduction, with this run's numbers
    assert 'id="compare-a"' in page and page.count('class="plot"') >= 4  # views + the comparison's panels


def test_summaries_aggregate_only_measures():
    from layerlab.report import SUMMARIES

    tract = pd.DataFrame({"optimizer": ["sgd"] * 4, "method": ["vanilla"] * 2 + ["tract"] * 2, "budget": [6] * 4,
                          "seed": [0, 1, 0, 1], "epoch": [6] * 4, "test_acc": [0.5, 0.7, 0.8, 0.9]})
    s = SUMMARIES.get("tract")(tract)
    assert "epoch" not in s.columns and "seed" not in s.columns
    assert s.set_index("method")["final_test_acc"].round(6).to_dict() == {"vanilla": 0.6, "tract": 0.85}
    assert s["seeds"].tolist() == [2, 2]
    cka = pd.DataFrame({"run": ["r"] * 4, "layer": ["a", "a", "b", "b"], "label": ["a", "a", "b", "b"],
                        "epoch_a": [0, 0, 0, 0], "epoch_b": [5, 9, 5, 9], "cka": [0.9, 0.8, 0.7, 0.4]})
    c = SUMMARIES.get("dynamics-cka")(cka).iloc[0]
    assert c["CKA first-last (mean over layers)"] == pytest.approx(0.6) and c["layer that changed most"] == "b"
    g = generic_summary(pd.DataFrame({"model": ["m", "m"], "ref_index": [1, 4], "seed": [0, 1], "v": [1.0, 2.0],
                                      "epoch_a": [2, 5]}))
    assert g.columns.tolist() == ["model", "rows", "mean v"]


def test_compare_data_orders_layers_forward_and_keeps_each_analysis_value():
    from layerlab.report.views import compare_data

    cka = pd.DataFrame({"run": ["r"] * 6, "layer": ["output", "layer10", "layer2"] * 2,
                        "label": ["output", "layer10", "layer2"] * 2, "epoch_a": [0] * 6, "epoch_b": [3] * 3 + [9] * 3,
                        "cka": [0.5, 0.6, 0.7, 0.1, 0.2, 0.3]})
    crit = pd.DataFrame({"model": ["m"] * 4, "layer": ["b", "a", "b", "a"], "label": ["B", "A", "B", "A"],
                         "index": [1, 0, 1, 0], "trial": [0, 0, 1, 1], "mode": ["randomize"] * 4,
                         "criticality": [10.0, 50.0, 20.0, 70.0]})
    d = compare_data({"dynamics-cka": cka, "criticality": crit})
    assert d["cka"]["r"] == {"x": ["layer2", "layer10", "output"], "y": [0.3, 0.2, 0.1]}  # first -> last checkpoint
    assert d["criticality"]["m"] == {"x": ["A", "B"], "y": [60.0, 15.0]}  # forward order, mean over trials


def test_titles_in_words_and_intros_with_numbers(demo_like):
    from layerlab.report import title
    from layerlab.report.text import intro_html

    assert title("dynamics-cka") == "CKA between checkpoints" and title("my_new-analysis") == "My new analysis"
    crit = collect(demo_like).analyses[0].table
    text = intro_html("criticality", {"criticality": crit})
    per = crit.groupby(["model", "layer"])["criticality"].mean()
    assert f"mean criticality {per.mean():.1f} %" in text and "3 models" in text


def test_demo_step_writes_the_report_and_prints_its_path(demo_like, capsys):
    from layerlab.demo import DEMO_STEPS, DemoContext

    DEMO_STEPS.get("report")(DemoContext(demo_like))
    printed = capsys.readouterr().out.strip()
    assert printed == f"report: {(demo_like / 'report.html').resolve()}"


class DevTools:
    """A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str, profile: str, timeout: float = 60) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds() -> None:  # chromium reads commands on fd 3 and writes replies and events on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout, self._buf, self._id, self.events = timeout, b"", 0, []

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit status {self.proc.poll()})")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + self.timeout
        while True:
            m = self._message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._message(deadline))

    def evaluate(self, session: str, expression: str):
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and browser log errors seen so far."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(f"exception: {json.dumps(p.get('exceptionDetails'))[:500]}")
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self._w)
            os.close(self._r)


def _png_size(png: bytes) -> tuple[int, int]:
    import struct

    return struct.unpack(">II", png[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; see .ci/install-system.sh)")
def test_report_in_headless_chromium(demo_like, tmp_path):
    path = write_report(demo_like)
    browser = DevTools(CHROMIUM, tempfile.mkdtemp(dir=tmp_path, prefix="profile-"))
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=sid)
        browser.call("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1,
                                                             "mobile": False}, sid)
        browser.call("Page.navigate", {"url": path.resolve().as_uri()}, sid)
        browser.wait_for("Page.loadEventFired")
        images = browser.evaluate(sid, "Promise.all([...document.images].map(i => i.decode().then(() => 0, () => 0)))"
                                       ".then(() => [...document.querySelectorAll('figure img')].map(i => [i.alt, i.complete, i.naturalWidth]))")
        assert len(images) >= 4, images  # 3+ criticality figures (the scatter is interactive), the SVG
        assert all(ok and width > 0 for _, ok, width in images), images
        sections = browser.evaluate(sid, "[...document.querySelectorAll('main > section')].map(s => [s.id, s.querySelector('h2').textContent])")
        assert [s[0] for s in sections] == ["a-criticality", "a-training", "a-extra", "a-probe", "compare", "runs"]
        assert [s[1] for s in sections] == ["Layer criticality", "Training runs", "Extra", "Probe",
                                            "Two models side by side", "Sweeps and failures"]
        # every section and table titled in words, not in raw keys
        titles = browser.evaluate(sid, "[...document.querySelectorAll('h2, h3')].map(h => h.textContent)")
        assert all(t[:1].isupper() and "_" not in t and not any(ch == "-" for ch in t.split()[0]) for t in titles), titles
        text = browser.evaluate(sid, "document.body.innerText")
        assert "Spearman rho" in text and "failing on purpose" in text and "torch" in text and "zoo.csv" in text
        assert "What it measures." in text and "This run." in text
        # every interactive view draws (plotly marks its node), the comparison too
        drawn = browser.evaluate(sid, "(() => { const n = layerlabRenderAll(); return [n, "
                                      "document.querySelectorAll('.js-plotly-plot').length]; })()")
        assert drawn[0] >= 3 and drawn[1] >= drawn[0] + 1, drawn
        heat = browser.evaluate(sid, "document.querySelector('[data-view=criticality-heatmap] .plot').data[0].z.length")
        assert heat == 3  # one row per model
        # the comparison redraws for the chosen models
        pick = ("(() => { const a = document.getElementById('compare-a'), b = document.getElementById('compare-b');"
                " a.value = 'adam'; b.value = 'label-noise'; b.dispatchEvent(new Event('change'));"
                " return document.getElementById('compare-criticality').data.map(t => t.name); })()")
        assert browser.evaluate(sid, pick) == ["adam", "label-noise"]
        # every figure enlarges on click, and the lightbox closes again
        enlarge = ("(() => [...document.querySelectorAll('figure img')].map(img => { img.click();"
                   " const box = document.getElementById('lightbox'); const ok = box.classList.contains('open')"
                   " && box.querySelector('img').src === img.src && getComputedStyle(box).display === 'block';"
                   " box.click(); return ok && !box.classList.contains('open'); }))()")
        assert all(browser.evaluate(sid, enlarge))
        width = browser.evaluate(sid, "Math.max(...[...document.querySelectorAll('figure img')].map(i => i.getBoundingClientRect().width))")
        assert width >= 600  # readable at 1,400 px (the old page capped figures at 520 px)
        # a filter box hides the rows without the word
        filt = ("(() => { const box = document.querySelector('#a-criticality details input.filter');"
                " const t = box.parentElement.querySelector('table'); box.value = 'label-noise';"
                " box.dispatchEvent(new Event('input')); const rows = [...t.tBodies[0].rows];"
                " const shown = rows.filter(r => r.style.display !== 'none');"
                " return [rows.length, shown.length, shown.every(r => r.textContent.includes('label-noise'))]; })()")
        total, shown, right = browser.evaluate(sid, filt)
        assert 0 < shown < total and right
        # clicking a header sorts its table: the per-model summary of criticality by mean criticality, both ways
        order = ("(() => { const t = document.querySelector('#t-criticality table.sortable');"
                 " const th = [...t.tHead.rows[0].cells].find(c => c.textContent === 'criticality'); th.click();"
                 " const col = th.cellIndex; return [...t.tBodies[0].rows].map(r => Number(r.cells[col].dataset.v)); })()")
        up, down = browser.evaluate(sid, order), browser.evaluate(sid, order)
        assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == 3
        height = browser.call("Page.getLayoutMetrics", session=sid)["cssContentSize"]["height"]
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                       "clip": {"x": 0, "y": 0, "width": 1400,
                                                                "height": min(height, 8000), "scale": 1}}, sid)
        png = base64.b64decode(shot["data"])
        browser.evaluate(sid, "1")  # drain events that arrived after the load
        assert browser.problems() == []
        requests = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
        assert requests and all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
    finally:
        browser.close()
    assert png[:4] == b"\x89PNG" and _png_size(png)[0] == 1400 and _png_size(png)[1] >= 2000 and len(png) > 100_000
    (tmp_path / "report.png").write_bytes(png)
    if os.environ.get("LAYERLAB_SCREENSHOT"):  # keep it for a person to look at
        Path(os.environ["LAYERLAB_SCREENSHOT"]).write_bytes(png)
