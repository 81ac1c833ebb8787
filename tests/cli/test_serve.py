"""``safa serve``: the web app, through ``gradio_client`` and in a real browser.

One server per module (``python -m safa serve`` on a free loopback port, the built-in model,
its files in a temporary folder), stopped at the end. The browser test drives headless
Chromium (Debian's ``chromium``) over the DevTools protocol on a pipe (no extra package),
generates once and keeps a screenshot of the page in ``out/test-output/serve.png``; it skips
with one line where no Chromium is installed.
"""
from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (make install)")
soundfile = pytest.importorskip("soundfile")

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "out" / "test-output" / "serve.png"
SAMPLE_RATE = 16000  # the built-in model's
STARTUP_SECONDS = 240  # imports of torch, diffusers and gradio on a busy 2-core machine


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, results: Path, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.results, self.proc, self.log = url, results, proc, log

    def files(self) -> set:
        return {p.name for p in self.results.iterdir()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("serve")
    results, log = base / "results", base / "server.log"
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "safa", "serve", "--quiet", "--port", str(port),
                                 "--results", str(results)], cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"safa serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"safa serve did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(url, results, proc, log)
    finally:
        started = time.monotonic()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        print(f"safa serve stopped in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def client(server):
    client = gradio_client.Client(server.url, verbose=False)
    yield client
    client.close()  # its heartbeat stream would hold the server's shutdown


def _request(prompt: str = "rain", seconds: float = 12.0, steps: int = 2, **changes: Any) -> List[Any]:
    """The /generate endpoint's arguments in the order of safa.serve.jobs.FIELDS."""
    values = dict(prompt=prompt, length=seconds, loop=False, method="safa", method_params="guide=0.3:swap_interval=1",
                  steps=steps, seed=0, guidance_scale=1.0, negative_prompt="", overlap=0.2, view_batch_size=0,
                  decode="auto", height=0)
    values.update(changes)
    return list(values.values())


def test_fields_match_the_page_order():
    from safa.serve.jobs import FIELDS
    assert list(dict(prompt=0, length=0, loop=0, method=0, method_params=0, steps=0, seed=0, guidance_scale=0,
                     negative_prompt=0, overlap=0, view_batch_size=0, decode=0, height=0)) == list(FIELDS)


def test_help_says_where_it_listens_without_loading_torch_or_gradio():
    code = ("import sys\nfrom safa.commands import serve\nimport argparse\np = argparse.ArgumentParser()\n"
            "serve.add_parser(p.add_subparsers())\ntry:\n    p.parse_args(['serve', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('loaded:', 'torch' in sys.modules, 'gradio' in sys.modules, file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.stderr.strip().splitlines()[-1] == "loaded: False False", run.stderr[-2000:]
    help_text = " ".join(run.stdout.split())
    assert "default 127.0.0.1: this machine only" in help_text and "0.0.0.0" in help_text
    assert "default 7860" in help_text


def test_bad_flags_are_one_line_errors():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for flag, value, says in (("--port", "70000", "must be an int in [0, 65535], got 70000"),
                              ("--max-queue", "0", "must be an int >= 1, got 0")):
        run = subprocess.run([sys.executable, "-m", "safa", "serve", flag, value], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=120)
        assert run.returncode == 2
        assert run.stderr.strip() == f"safa serve: error: argument {flag}: {says} (see safa serve --help)"


def test_method_defaults_are_the_method_objects():
    from safa.serve.jobs import method_defaults
    assert method_defaults("safa") == "guide=0.3:swap_interval=1"
    assert method_defaults("multidiffusion") == "triangular=false:gaussian=false"
    assert method_defaults("multidiffusion_triangular") == "gaussian=false"  # triangular is the shorthand's
    assert method_defaults("mad") == "steps=0.5:cross_attention=canvas"
    # loss / anchor have no plain default: the method's own
    assert method_defaults("syncdiffusion") == "weight=20.0:decay=0.95:steps=0.2:sync_freq=1"


@pytest.mark.parametrize("changes, field", [
    (dict(prompt="snow"), "prompt"), (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(seed=-1), "seed"),
    (dict(length=0), "length"), (dict(length=12, loop=True), "length"), (dict(overlap=0.7), "overlap"),
    (dict(method="nope"), "method"), (dict(method="mad", method_params=""), "method"),
    (dict(method_params="guide=2"), "method_params"),
    (dict(method_params="swap_interval"), "method_params"), (dict(view_batch_size=-1), "view_batch_size"),
    (dict(decode="nope"), "decode"),
])
def test_each_bad_field_is_named(changes, field):
    from safa.serve.jobs import FIELDS, FieldError
    studio = _studio()
    values = dict(zip(FIELDS, _request(**changes)))
    with pytest.raises(FieldError) as caught:
        studio.parse(values)
    assert caught.value.field == field, str(caught.value)
    assert "\n" not in str(caught.value)
    assert studio.parse(dict(zip(FIELDS, _request()))).method == "safa:guide=0.3:swap_interval=1"


_STUDIO: Dict[str, Any] = {}


def _studio():
    if "studio" not in _STUDIO:
        import tempfile

        from safa import JointDiffusion
        from safa.serve.jobs import Studio
        from safa.texture import make_texture_pipeline
        _STUDIO["studio"] = Studio(JointDiffusion(make_texture_pipeline()), "builtin:texture", tempfile.mkdtemp())
    return _STUDIO["studio"]


def test_generation_round_trip(server, client):
    before = server.files()
    result = client.predict(*_request(seconds=12.0, steps=2, loop=False), api_name="/generate")
    status, audio, spectrogram, layout, timings, download, table, files = result
    assert status.startswith("Done")
    info = soundfile.info(audio)
    assert (info.samplerate, info.frames, info.channels) == (SAMPLE_RATE, 12 * SAMPLE_RATE, 1)
    assert np.isfinite(soundfile.read(download)[0]).all()
    assert Path(spectrogram).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert layout.startswith("2 views of 10.24 s")
    assert "2 steps in" in timings and "in all" in timings
    assert table["headers"][:2] == ["time", "prompt"] and table["data"][-1][1] == "rain"
    new = server.files() - before
    assert len(new) == 2 and {Path(n).suffix for n in new} == {".wav", ".png"}  # the audio and its spectrogram


def test_a_request_that_cannot_fit_is_refused_with_the_estimate(server, client):
    before = server.files()
    with pytest.raises(Exception) as caught:  # gradio_client's AppError: the message, not a traceback
        client.predict(*_request(seconds=1e7), api_name="/generate")
    message = str(caught.value)
    assert "Refused, it would not fit in memory" in message and "needs about" in message and "fits" in message
    assert "Traceback" not in message
    assert server.files() == before


def test_bad_input_is_named(server, client):
    with pytest.raises(Exception) as caught:
        client.predict(*_request(prompt="snow"), api_name="/generate")
    assert "the built-in model knows rain" in str(caught.value)
    with pytest.raises(Exception) as caught:
        client.predict(*_request(steps=0), api_name="/generate")
    assert "steps must be a whole number in [1, 10000], got 0" in str(caught.value)


def test_cancel_stops_the_request_and_writes_nothing(server, client):
    before = server.files()
    job = client.submit(*_request(seconds=60.0, steps=400), api_name="/generate")
    deadline = time.monotonic() + 120
    while True:  # running: a denoising step reported
        status = job.status()
        if status.progress_data and status.progress_data[0].desc == "denoising" \
                and (status.progress_data[0].index or 0) >= 1:
            break
        assert not job.done() and time.monotonic() < deadline, status
        time.sleep(0.1)
    assert status.progress_data[0].length == 400 and status.progress_data[0].unit == "steps"
    job.cancel()
    started = time.monotonic()
    while not job.done():
        assert time.monotonic() - started < 30
        time.sleep(0.1)
    assert job.status().code.name == "CANCELLED"
    # The next request runs once the cancelled one has let the model go (one at a time): had the
    # cancelled one gone on, it would have finished its 400 steps and its files first.
    result = client.predict(*_request(seconds=12.0, steps=2), api_name="/generate")
    new = server.files() - before
    assert len(new) == 2 and all(Path(result[1]).stem in n for n in new), new
    assert not any(".tmp" in n or n.startswith(".") for n in server.files())


def test_evaluate_tab(server, client):
    status, table, plot = client.predict(["safa", "multidiffusion"], 2, 24, 2, 0, False, api_name="/evaluate")
    assert status == "Done."
    assert "safa" in table and "multidiffusion" in table and "HF ovl/int" in table
    assert plot is not None


# -- the page in a browser ---------------------------------------------------------------------
class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe``: JSON messages ending in NUL
    on file descriptors 3 (commands) and 4 (answers) of the browser."""

    def __init__(self, chromium: str, user_dir: Path) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        argv = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-pipe",
                f"--user-data-dir={user_dir}", "--window-size=1280,900", "about:blank"]
        self.pid = os.posix_spawn(chromium, argv, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, to_browser, 3), (os.POSIX_SPAWN_DUP2, from_browser, 4),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)])
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id = b"", 0
        self.session: Optional[str] = None

    def send(self, method: str, params: Optional[Dict[str, Any]] = None, timeout: float = 60.0) -> Dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError(f"no answer to {method} in {timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the pipe")
            self._buffer += chunk

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"the page did not show {what} within {timeout} s")
            time.sleep(0.25)

    def close(self) -> None:
        try:
            self.session = None
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        os.close(self._read)
        os.close(self._write)


_SET_FIELD = """((id, value) => {
  const el = document.querySelector(`#${id} input, #${id} textarea`);
  el.value = value; el.dispatchEvent(new Event('input', {bubbles: true}));
  el.dispatchEvent(new Event('change', {bubbles: true})); return true; })"""


def test_the_page_in_a_browser(request, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium): browser test skipped")
    server = request.getfixturevalue("server")
    browser = DevTools(chromium, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": server.url})["targetId"]
        browser.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.wait_for("!!document.querySelector('#generate-button')", 60, "the Generate button")
        for field, value in (("length", "12"), ("steps", "2")):
            assert browser.evaluate(f"{_SET_FIELD}('{field}', '{value}')")
        browser.evaluate("document.querySelector('#generate-button').click()")
        status = browser.wait_for("(() => { const s = document.querySelector('#status').innerText;"
                                  " return s.includes('Done') ? s : ''; })()", 180, "a finished generation")
        assert ".wav" in status
        browser.wait_for("(() => { const i = document.querySelector('#spectrogram img');"
                         " return i && i.complete && i.naturalWidth > 0; })()", 30, "the spectrogram")
        assert "2 views of 10.24 s" in browser.evaluate("document.querySelector('#layout textarea').value")
        assert "2 steps in" in browser.evaluate("document.querySelector('#timings textarea').value")
        height = browser.send("Page.getLayoutMetrics")["cssContentSize"]["height"]
        browser.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": int(min(height, 4000)),
                                                             "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.5)  # a layout pass at the new size
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    finally:
        browser.close()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.write_bytes(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 50_000
    print(f"screenshot of the page: {SCREENSHOT}")


class _RecordingJob:
    """A :class:`safa.serve.jobs.Job` run on this thread, recording every report; cancelled at
    the first report of the phase ``cancel_at`` with at least ``done`` done, if given."""

    def __init__(self, cancel_at: Optional[str] = None, done: float = 0) -> None:
        from safa.serve.jobs import Job
        self.job, self.reports, self.cancel_at, self.done = Job(lambda job: None), [], cancel_at, done

    def report(self, phase: str, done: float = 0, total: float = 0, unit: str = "") -> None:
        self.reports.append((phase, done, total, unit))
        if phase == self.cancel_at and done >= self.done:
            self.job.cancel()
        self.job.report(phase, done, total, unit)


def test_progress_counts_the_steps_then_the_decoded_seconds():
    from safa.serve.jobs import FIELDS
    studio = _studio()
    request = studio.parse(dict(zip(FIELDS, _request(seconds=24.0, steps=3, decode="tiled"))))
    job = _RecordingJob()
    result = studio.generate(request, job)
    steps = [r for r in job.reports if r[0] == "denoising"]
    assert [r[1] for r in steps] == [0, 1, 2, 3] and {r[2:] for r in steps} == {(3, "steps")}
    decoded = [r for r in job.reports if r[0] == "decoding"]
    assert len(decoded) > 1 and decoded[-1][1:] == (24.0, 24.0, "s of audio")  # tile by tile, to the end
    assert [r[1] for r in decoded] == sorted(r[1] for r in decoded)
    assert os.path.exists(result.output_path) and os.path.exists(result.spectrogram_path)
    for path in (result.output_path, result.spectrogram_path):
        os.remove(path)


# Inside the library call (after its first step, after its first decoded tile), and after the
# audio was written (while the spectrogram is drawn: the audio is removed again).
@pytest.mark.parametrize("phase, done", [("denoising", 1), ("decoding", 1), ("drawing the spectrogram", 0)])
def test_a_cancel_at_any_phase_leaves_no_file(phase, done):
    from safa.serve.jobs import FIELDS, Cancelled
    studio = _studio()
    request = studio.parse(dict(zip(FIELDS, _request(seconds=24.0, steps=2, decode="tiled"))))
    before = set(os.listdir(studio.results_dir))
    with pytest.raises(Cancelled, match=f"cancelled while {phase}"):
        studio.generate(request, _RecordingJob(cancel_at=phase, done=done))
    assert set(os.listdir(studio.results_dir)) == before  # nor a temporary one
    assert not studio.lock.locked()


def test_an_image_model_gives_a_png_of_the_width_asked(tmp_path):
    from PIL import Image

    from safa import JointDiffusion
    from safa.serve.jobs import FIELDS, Studio
    from safa.testing import tiny_sd_pipeline
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    studio = Studio(JointDiffusion(pipe), "tiny-sd", str(tmp_path))
    assert studio.kind == "image" and studio.prompt_names is None  # any prompt
    request = studio.parse(dict(zip(FIELDS, _request(prompt="a photo", seconds=320, method_params="", height=64,
                                                     guidance_scale=None))))
    job = _RecordingJob()
    result = studio.generate(request, job)
    assert Image.open(result.output_path).size == (320, 64) and result.spectrogram_path is None
    assert os.listdir(tmp_path) == [os.path.basename(result.output_path)]
    assert [r[1:] for r in job.reports if r[0] == "decoding"][-1] == (320, 320, "pixel columns")
    assert result.summary.startswith("320 px wide: 2 steps in")
