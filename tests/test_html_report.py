"""The HTML reports, loaded in a real headless browser (Debian's chromium, see .ci/install_chromium.sh).

The browser is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: NUL-terminated
JSON on fds 3 and 4), with nothing but the standard library: the test reads the DOM, every console
message, uncaught exception and network request, and saves a screenshot into its tmp dir.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from onnxzero.html_report import render_optimize_html, render_profile_html, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: the HTML report's browser test needs Debian's chromium package "
                             "(run .ci/install_chromium.sh)")


class Browser:
    """A headless chromium driven over --remote-debugging-pipe."""

    def __init__(self, profile_dir: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # chromium reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
             "--hide-scrollbars", f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank"],
            # close_fds would close 3 and 4 after preexec_fn; Python's own fds are non-inheritable anyway
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=1280, height=900, deviceScaleFactor=1,
                  mobile=False)

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, *, session: bool = False, timeout: float = 30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def load(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        end = time.monotonic() + 30
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._read(end - time.monotonic()))
        self.eval("1")  # flush: events the page emitted while loading arrive before this reply

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert messages and error log entries (failed loads, CSP...)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append((d.get("exception") or {}).get("description") or d.get("text", "exception"))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(json.dumps(p.get("args"))[:300])
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "")[:300])
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> Path:
        h = self.eval("Math.ceil(document.documentElement.scrollHeight)")
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=1280, height=int(h), deviceScaleFactor=1,
                  mobile=False)
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def optimized():
    """A real, fast optimize of LeNet-5 (objective MACs, two techniques)."""
    from onnxzero.data import load_dataset
    from onnxzero.load import load_model
    from onnxzero.search import SearchOptions, optimize

    ds = load_dataset(__import__("onnxzero.zoo", fromlist=["default_data"]).default_data("zoo:lenet5"))
    opts = SearchOptions(eps=3, techniques=("spatial", "sparse-quant"), objective="macs", latency_runs=6)
    return optimize(load_model("zoo:lenet5"), ds.inputs, ds.labels, opts)


@pytest.fixture(scope="module")
def profiled():
    from onnxzero.profile import profile_model
    from onnxzero.profile.effectual import effectual_macs

    return profile_model("zoo:lenet5", runs=2), effectual_macs("zoo:lenet5")


def _counts(b: Browser, selectors: dict[str, str]) -> dict[str, int]:
    return {k: b.eval(f"document.querySelectorAll({json.dumps(s)}).length") for k, s in selectors.items()}


@needs_chromium
def test_optimize_page_in_browser(browser, optimized, tmp_path):
    report = optimized.report
    explored = [c.to_json() for c in optimized.combined]
    page = tmp_path / "optimize.html"
    write_html(page, render_optimize_html(report, explored=explored))
    browser.load(page.as_uri())
    assert browser.errors() == []
    assert browser.requests() == [page.as_uri()]  # self-contained: nothing else is fetched
    n = _counts(browser, {"site rows": "#sites tbody tr", "summary rows": "#summary tbody tr",
                          "plots": "svg.plot", "explored": "#plot-macs circle.explored",
                          "front": "#plot-macs circle.front", "front rows": "#pareto tbody tr",
                          "diamonds": "#plot-latency rect.pt"})
    assert n == {"site rows": len(report["sites"]), "summary rows": 3, "plots": 2, "explored": len(explored),
                 "front": len(report["pareto"]), "front rows": len(report["pareto"]), "diamonds": 2}
    names = browser.eval("[...document.querySelectorAll('#sites tbody tr td:first-child')].map(e => e.textContent)")
    assert names == [s["node"] for s in report["sites"]]  # full names, as in the model
    cells = browser.eval("[...document.querySelectorAll('#summary tbody tr:first-child td')].map(e => e.textContent)")
    assert cells[1] == f"{report['baseline']['accuracy'] * 100:.2f}%" and cells[2] == f"{report['baseline']['macs']:,}"
    # hover shows the point's figures in the tooltip
    tip = browser.eval("""(() => { const c = document.querySelector('#plot-macs circle.front');
        c.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
        const t = document.getElementById('oz-tip'); return [t.style.display, t.textContent]; })()""")
    assert tip[0] == "block" and "MACs" in tip[1] and "top-1" in tip[1]
    browser.eval("document.body.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}))")  # tooltip off
    shot = browser.screenshot(tmp_path / "optimize.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_chromium
def test_profile_page_in_browser(browser, profiled, tmp_path):
    from onnxzero.profile.compare import compare_models

    rep, eff = profiled
    j = rep.to_json()
    page = tmp_path / "profile.html"
    write_html(page, render_profile_html(rep))
    browser.load(page.as_uri())
    assert browser.errors() == []
    assert browser.requests() == [page.as_uri()]
    n = _counts(browser, {"bars": "#latency-bars rect.bar", "node rows": "#nodes tbody tr",
                          "heat maps": "svg.heatmap", "site rows": "#profile-sites tbody tr"})
    assert n == {"bars": len(j["nodes"]), "node rows": len(j["nodes"]), "heat maps": len(j["activations"]),
                 "site rows": len(j["sites"])}
    for i, a in enumerate(j["activations"]):  # a row per class plus "all", a cell per filter
        cells = browser.eval(f"document.querySelectorAll('#heat-{i} rect.cell').length")
        assert cells == (len(rep.classes) + 1) * len(a["per_channel"])
    browser.screenshot(tmp_path / "profile.png")

    # the JSON form, with the effectual and side-by-side tables added
    j["effectual"] = eff.to_json()
    cmp_ = compare_models(["zoo:lenet5", "zoo:alexnet-mnist"], runs=2)
    j["compare"] = cmp_.to_json()
    write_html(page, render_profile_html(j))
    browser.load(page.as_uri())
    assert browser.errors() == []
    n = _counts(browser, {"effectual rows": "#effectual tbody tr", "compare rows": "#compare tbody tr",
                          "heat maps": "svg.heatmap", "cells": "#heat-0 rect.cell"})
    assert n == {"effectual rows": len(eff.layers) + 1, "compare rows": 2, "heat maps": len(j["activations"]),
                 "cells": len(j["activations"][0]["per_channel"])}

    # `profile A B`: the side-by-side table alone, from the objects
    write_html(page, render_profile_html(compare=cmp_))
    browser.load(page.as_uri())
    assert browser.errors() == []
    assert browser.eval("[...document.querySelectorAll('#compare tbody td:first-child')].map(e => e.textContent)") == [
        "zoo:lenet5", "zoo:alexnet-mnist"]
    assert browser.eval("document.title") == "onnxzero profile: zoo:lenet5, zoo:alexnet-mnist"


@needs_chromium
def test_names_are_text_not_markup(browser, tmp_path):
    evil = "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>&amp;"
    report = {"eps": 1, "objective": "macs", "split": {"validation": 10},
              "baseline": {"accuracy": 0.9, "macs": 100, "latency_ms": 1.0},
              "optimized": {"accuracy": 0.89, "macs": 50, "latency_ms": 0.8}, "latency_ratio": 0.8,
              "mac_reduction": 0.5, "validation_loss": 1.0, "met_eps": True,
              "sites": [{"node": evil, "technique": "lazy", "setting": {"ratio": 0.5}, "macs_before": 100, "macs_after": 50}],
              "pareto": [{"accuracy": 0.9, "macs": 100, "latency_ms": 1.0, "label": evil}]}
    page = tmp_path / "evil.html"
    write_html(page, render_optimize_html(report))
    browser.load(page.as_uri())
    assert browser.eval("window.__pwned === undefined") is True
    assert browser.eval("document.querySelector('#sites tbody td').textContent") == evil
    assert browser.requests() == [page.as_uri()]  # the <img> was never created, so never fetched


@needs_chromium
def test_harness_sees_errors(browser, tmp_path):
    # the checks above can fail: a page with a script error, a console.error and a fetch is caught
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); missing_function();</script>"
                    "<img src='https://cdn.example.invalid/x.png'></body></html>")
    browser.load(page.as_uri())
    errs = browser.errors()
    assert any("boom" in e for e in errs) and any("missing_function" in e for e in errs)
    assert "https://cdn.example.invalid/x.png" in browser.requests()


def test_missing_keys_are_tolerated():
    # a report without optimized figures or points (nothing met eps) still renders, and says why
    page = render_optimize_html({"eps": 0.5, "objective": "latency", "baseline": {"accuracy": 0.9, "macs": 10, "latency_ms": 1},
                                 "optimized": None, "sites": [], "met_eps": False, "new_key": {"x": 1}})
    assert "no configuration met eps = 0.5" in page and "<table id=\"sites\"" in page
    assert "<script src" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert render_profile_html({}).startswith("<!DOCTYPE html>")


def test_unknown_point_lists_get_a_table_and_a_series():
    # a front another search adds (e.g. the run-time speed dial's points) is listed and plotted, not dropped
    pts = [{"speed": 0.0, "accuracy": 0.98, "macs": 200, "latency_ms": 1.0},
           {"speed": 1.0, "accuracy": 0.95, "macs": 100, "latency_ms": 0.5}]
    page = render_optimize_html({"eps": 3, "objective": "latency", "baseline": {"accuracy": 0.99, "macs": 300, "latency_ms": 1.2},
                                 "sites": [], "speed_dial": {"points": pts}, "split": {"validation": 5}})
    assert page.count("<table id=\"points-speed_dial\"") == 1
    table = page.split("<table id=\"points-speed_dial\"")[1].split("</table>")[0]
    assert table.count("<tr>") == 3 and "95.00%" in table and "0.5000" in table
    assert page.count("circle class=\"pt extra\"") == 4  # two points in each of the two plots


def test_unwritable_path_is_one_line_error(tmp_path):
    from onnxzero.errors import UserError
    from onnxzero.html_report import check_html_path

    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "report.html"
    with pytest.raises(UserError, match=r"^cannot write .*/file/report.html: .*/file is not a directory$"):
        write_html(bad, "<html></html>")
    with pytest.raises(UserError, match=r"^output path .* is a directory, expected a file path$"):
        check_html_path(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written
    ok = check_html_path(tmp_path / "new" / "dir" / "r.html")  # missing folders are created on write
    assert write_html(ok, "<p>x</p>").read_text() == "<p>x</p>"
