"""HTML reports, checked in a real browser: a single-run report and a comparison load in headless Chromium with no
console error, fit a 1280 px wide window without horizontal scrolling, carry every section id, and every picture
decodes. Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: NUL-separated JSON on
file descriptors 3 and 4), so nothing beyond the standard library is needed; the browser tests skip when there is
no chromium (Debian: apt-get install chromium)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

SECTIONS = ["verdict", "evidence", "where", "side-effects", "reproduce"]
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium browser on PATH (Debian: apt-get "
                                                               "install chromium) to load the reports")


# ----------------------------------------------------------------------------- a tiny DevTools client

class Browser:
    """Headless Chromium with the DevTools protocol on a pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, width: int = 1280, height: int = 2000):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self.profile = tempfile.mkdtemp(prefix="netmend-chromium-")

        def fds():                           # in the child: the pipe ends on 3 and 4, kept across exec
            a, b = os.dup(cmd_r), os.dup(out_w)          # copies first: either end may already sit on 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
             f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=False,
            preexec_fn=fds)
        os.close(cmd_r)
        os.close(out_w)
        self.width, self.height = width, height
        self._id, self._buf, self.events = 0, b"", []

    def _read(self, timeout: float) -> dict:
        import select

        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read(timeout)
            if e.get("method") == method:
                return e
            self.events.append(e)

    def load(self, path: Path) -> dict:
        """Open a file in a fresh tab at the window's size; return what the page reports and its console errors."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for m in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(m, session=s)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False}, session=s)
        self.events.clear()
        self.send("Page.navigate", {"url": path.resolve().as_uri()}, session=s)
        self.wait_for("Page.loadEventFired")
        probe = """JSON.stringify({
            scrollWidth: document.documentElement.scrollWidth, bodyScrollWidth: document.body.scrollWidth,
            innerWidth: window.innerWidth,
            ids: Array.from(document.querySelectorAll('section[id]')).map(e => e.id),
            images: Array.from(document.images).map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                                                            shown: i.getBoundingClientRect().width}))})"""
        res = self.send("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=s)
        out = json.loads(res["result"]["value"])
        time.sleep(0.2)                                          # late console messages
        self.send("Runtime.evaluate", {"expression": "1"}, session=s)
        errors = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(p["entry"].get("text", "error"))
        out["errors"] = errors
        self.send("Target.closeTarget", {"targetId": target})
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._out_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("needs a chromium browser on PATH (Debian: apt-get install chromium) to load the reports")
    b = Browser()
    try:
        b.send("Browser.getVersion", timeout=60)
    except (RuntimeError, TimeoutError, OSError) as exc:
        b.close()
        pytest.skip(f"chromium does not start headless here: {exc}")
    yield b
    b.close()


# ----------------------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory, backdoored, digits):
    """Run folders of real repairs of the tiny backdoored digits model (one accepted, one the gate may reject), a
    fairness repair of a small biased table, and a safety repair of a toy network."""
    from netmend import api
    from netmend.defects.backdoor import BackdoorOptions, backdoor_from_info
    from netmend.report.record import write_run

    root = tmp_path_factory.mktemp("report")
    model, info = backdoored
    out, seconds = {}, {}
    for method in ("rectify-static", "p-clarc"):
        d = backdoor_from_info(info, BackdoorOptions(pairs=2, repair_fraction=0.1), data=digits)
        r = api.repair(model, d, method=method)
        t = time.perf_counter()
        write_run(root / "demo" / "runs" / method, info, r, source="model", defect=d,
                  command=f"netmend repair model --method {method}")
        seconds[method] = time.perf_counter() - t
        out[method] = root / "demo" / "runs" / method
    out["fairness"] = _fairness_run(root / "fairness")
    out["safety"] = _safety_run(root / "safety")
    out["root"], out["seconds"] = root, seconds
    return out


def _fairness_run(out: Path) -> Path:
    from netmend import api
    from netmend.data.tabular import TabularData, split_tabular
    from netmend.defects.fairness import FairnessDefect, FairnessOptions, train_fairness
    from netmend.report.record import write_run

    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(0, 3, (600,), generator=g), torch.randint(0, 4, (600,), generator=g),
                     torch.randint(0, 2, (600,), generator=g)], 1).float()
    data = TabularData("synthetic", x, (x[:, 0] + x[:, 1] >= 3).long(), ["a", "b", "c"], [0, 0, 0], [2, 3, 1],
                       {"group": 0, "flag": 2})                  # the label reads the protected column: biased
    model, info = train_fairness("synthetic", "mlp", seed=1, epochs=20, protected="group", data=data)
    d = FairnessDefect(data, split_tabular(len(data.y), 0), "group", FairnessOptions(pairs=10, uniform_samples=500))
    r = api.repair(model, d, method="finetune", max_accuracy_drop=1.0)
    write_run(out, info, r, defect=d)
    return out


def _safety_run(out: Path) -> Path:
    from netmend import api
    from netmend.data.vnnlib import parse_vnnlib
    from netmend.defects.safety import SafetyDefect, SafetyOptions
    from netmend.report.record import write_run
    from netmend.zoo.acasxu import acasxu

    prop = parse_vnnlib("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                        "(declare-const Y_1 Real)\n(assert (<= X_0 1.0))\n(assert (>= X_0 -1.0))\n"
                        "(assert (<= X_1 1.0))\n(assert (>= X_1 -1.0))\n(assert (<= Y_0 Y_1))\n", "toy")
    net = acasxu([2], 2, hidden=[8])                 # advisory 0 (the unsafe one) where x0 ≤ −0.8
    with torch.no_grad():
        net.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]] + [[0.0, 0.0]] * 6))
        net.fc1.bias.copy_(torch.tensor([0.0, 0.0, 1.0] + [0.0] * 5))
        net.fc2.weight.copy_(torch.tensor([[1.0, -1.0, 0.0] + [0.0] * 5, [0.0, 0.0, -0.8] + [0.0] * 5]))
        net.fc2.bias.zero_()
    d = SafetyDefect(net.eval(), prop, SafetyOptions(counterexamples=32, satisfying=200, heldout_counterexamples=32,
                                                     falsify_starts=128, falsify_steps=20, eval_samples=5000,
                                                     eval_falsify_starts=64, fidelity_samples=2000))
    r = api.repair(net, d, method="finetune")
    write_run(out, {"arch": "acasxu", "defect": {"kind": "safety"}}, r, defect=d)
    return out


# ----------------------------------------------------------------------------- without a browser

def _self_contained(text: str) -> None:
    assert "<script" not in text.lower() and "<link" not in text.lower()
    for ref in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert not re.match(r"[a-z]+://", ref), ref                        # no network, no absolute file URL
        assert ref.startswith(("data:image/png;base64,", "#")) or not ref.startswith("data:"), ref[:40]
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text


def test_run_report_is_self_contained_and_says_what_happened(runs):
    text = (runs["rectify-static"] / "report.html").read_text()
    _self_contained(text)
    assert "Accepted by the acceptance gate" in text or "Rejected by the acceptance gate" in text
    assert "attack success rate (ASR)" in text and "lower is better" in text and "R-Acc" in text
    assert "netmend repair model --method rectify-static" in text                 # the exact command
    assert 'href="metrics.json"' in text and 'href="edit.safetensors"' in text    # relative links to the run's files
    assert "torch" in text and "python" in text and "platform" in text
    assert (runs["rectify-static"] / "evidence.npz").stat().st_size < 50_000
    assert max(runs["seconds"].values()) < 2.0 + 3.0     # evidence + report while writing the folder (slack for CI)
    # every metric a defect reports has a direction: asr_clean is not "higher is better"
    from netmend.report.html import DOWN, UP, metric_info

    m = json.loads((runs["rectify-static"] / "metrics.json").read_text())
    assert metric_info("asr_clean")[1] == DOWN and metric_info("robust_accuracy")[1] == UP
    for key, v in m["before"].items():
        if isinstance(v, (int, float)) and not key.startswith("n_"):
            assert metric_info(key)[2], key


def test_every_reported_metric_has_a_direction_and_unit():
    """The metric keys of every defect's metrics() (read from their sources) are in the report's table."""
    from netmend.report.html import METRICS

    src = Path(__file__).resolve().parents[1] / "src" / "netmend" / "defects"
    keys = set()
    for f in src.glob("*.py"):
        body = "\n".join(re.findall(r"def (?:metrics|pattern_metrics|leakages)\(.*?(?=\n    def |\n\S|\Z)", f.read_text(), re.S))
        keys |= set(re.findall(r'"([a-z_]+)":', body)) | set(re.findall(r'out\["([a-z_]+)"\]', body))
    keys -= {"per_class_accuracy", "violation_rate_ci", "fidelity_region"}
    missing = sorted(k for k in keys if k not in METRICS and not k.startswith("n_"))
    assert not missing, missing


def test_rejected_run_and_fairness_and_safety_evidence(runs):
    from netmend.report.evidence import load

    pc = json.loads((runs["p-clarc"] / "metrics.json").read_text())
    text = (runs["p-clarc"] / "report.html").read_text()
    if pc["accepted"] is False:
        assert "(rejected)" in text and "candidate" in text
    ev = load(runs["fairness"] / "evidence.npz")
    assert ev["meta"]["kind"] == "fairness" and ev["meta"]["groups"] == ["group=0", "group=1", "group=2"]
    assert "positive rate" in (runs["fairness"] / "report.html").read_text()
    ev = load(runs["safety"] / "evidence.npz")
    assert ev["meta"]["kind"] == "safety" and ev["violated_before"].any()
    assert "property is violated" in (runs["safety"] / "report.html").read_text()


def test_report_command_writes_a_comparison(runs, tmp_path):
    from netmend.report.html import write_report

    out = tmp_path / "cmp" / "compare.html"
    write_report([runs["root"] / "demo"], out, title="two methods")      # a folder of run folders
    text = out.read_text()
    _self_contained(text)
    assert "rectify-static" in text and "p-clarc" in text
    assert 'href="../../' not in text or "runs/rectify-static/metrics.json" in text     # relative to the page


# ----------------------------------------------------------------------------- in the browser

def _check_page(browser: Browser, path: Path) -> dict:
    page = browser.load(path)
    assert page["errors"] == [], page["errors"]
    assert page["innerWidth"] == 1280
    assert page["scrollWidth"] <= 1280 and page["bodyScrollWidth"] <= 1280, page
    assert page["ids"] == SECTIONS
    assert page["images"], "no picture"
    for img in page["images"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0, img
        assert img["shown"] <= 1280
    return page


@needs_chromium
def test_single_run_reports_in_chromium(browser, runs):
    for name in ("rectify-static", "p-clarc", "fairness", "safety"):
        _check_page(browser, runs[name] / "report.html")


@needs_chromium
def test_comparison_report_in_chromium(browser, runs, tmp_path):
    from netmend.report.html import write_report

    out = write_report([runs["rectify-static"], runs["p-clarc"], runs["fairness"]], tmp_path / "mixed.html")
    page = _check_page(browser, out)
    assert len(page["images"]) >= 3
    out = write_report([runs["root"] / "demo"], runs["root"] / "report.html", title="demo-style comparison")
    _check_page(browser, out)


def test_netmend_report_command(runs, tmp_path):
    netmend = shutil.which("netmend") or str(Path(__import__("sys").executable).parent / "netmend")
    env = {**os.environ, "NETMEND_QUIET": "1"}
    out = tmp_path / "one.html"
    p = subprocess.run([netmend, "report", str(runs["rectify-static"]), "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    _self_contained(out.read_text())
    assert "netmend repair: rectify-static" in out.read_text()
    p = subprocess.run([netmend, "report", str(runs["rectify-static"]), "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and ".html" in p.stderr, p.stderr
    p = subprocess.run([netmend, "report", str(tmp_path), "--out", str(tmp_path / "y.html")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "not a run folder" in p.stderr, p.stderr
