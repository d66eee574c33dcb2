"""A real browser looks at the dashboards: `tensorboard` on 127.0.0.1, opened
in headless Debian `chromium`, driven over the DevTools protocol on a pipe.

Checks that the Custom Scalars dashboard draws the LSTM penalty chart with both
series (input and recurrent kernel) and that the Text dashboard shows the
`regularization/plan` table. Screenshots go to the test's temporary folder,
and to `docs/img/` when `KERASREG_UPDATE_SCREENSHOTS=1`.

Chromium missing: skipped locally, a failure under `CI=true` (CI installs it
with `.ci/install-chromium`).
"""

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import keras
import numpy as np
import pytest
from conftest import ROOT

import kerasreg

pytestmark = [
    pytest.mark.slow,
    # The page depends only on the event files, written the same way on every
    # backend (checked per backend by test_dashboards.py): one browser run.
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="one browser run is enough: TensorFlow backend only",
    ),
]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# All text of the page, shadow roots included (TensorBoard's dashboards are
# web components), without style sheets and scripts.
DEEP_TEXT = r"""(() => {
  const out = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.childNodes) {
      if (child.nodeType === 3) out.push(child.textContent);
      else if (!['STYLE', 'SCRIPT'].includes(child.nodeName)) walk(child);
    }
  };
  walk(document);
  return out.join(' ').replace(/\s+/g, ' ');
})()"""

# Drawn lines (SVG paths with data) in the custom-scalar card titled TITLE.
DRAWN_LINES = r"""((title) => {
  const all = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) { all.push(child); walk(child); }
  };
  walk(document);
  const textOf = (node) => {
    let text = '';
    const visit = (n) => {
      if (n.shadowRoot) visit(n.shadowRoot);
      for (const c of n.childNodes) {
        if (c.nodeType === 3) text += c.textContent; else visit(c);
      }
    };
    visit(node);
    return text;
  };
  const cards = all.filter((e) => e.localName ===
      'tf-custom-scalar-multi-line-chart-card' && textOf(e).includes(title));
  if (cards.length !== 1) return -1;
  const lines = [];
  const inCard = (node) => {
    if (node.shadowRoot) inCard(node.shadowRoot);
    for (const child of node.children || []) {
      if (child.localName === 'path' && child.classList.contains('line') &&
          (child.getAttribute('d') || '').length > 10) lines.push(child);
      inCard(child);
    }
  };
  inCard(cards[0]);
  return lines.length;
})"""


def chromium_binary():
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    if found is None:
        message = "Debian's chromium is not installed (run .ci/install-chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


class Chromium:
    """Headless Chromium driven over the DevTools protocol on fds 3 and 4."""

    def __init__(self, binary, width=1400, height=1000):
        self.user_dir = tempfile.mkdtemp(prefix="kerasreg-chromium-")
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()

        def pipes_to_3_and_4():
            # Duplicated above 10 first, so the two dup2 cannot clobber each other.
            read = fcntl.fcntl(commands_in, fcntl.F_DUPFD, 10)
            write = fcntl.fcntl(replies_out, fcntl.F_DUPFD, 10)
            os.dup2(read, 3)
            os.dup2(write, 4)

        flags = [
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.user_dir}",
            "--remote-debugging-pipe",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            [binary, *flags],
            pass_fds=(3, 4, commands_in, replies_out),
            preexec_fn=pipes_to_3_and_4,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_in)
        os.close(replies_out)
        self._buffer = b""
        self._id = 0
        self.size = (width, height)

    def send(self, method, params=None, session=None, timeout=60):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {method}")
            ready, _, _ = select.select([self._replies], [], [], left)
            if ready:
                chunk = os.read(self._replies, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buffer += chunk

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"})
        session = self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )["sessionId"]
        width, height = self.size
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1}
        self.send("Emulation.setDeviceMetricsOverride", {**metrics, "mobile": False},
                  session)  # fmt: skip
        self.send("Page.enable", {}, session)
        self.send("Page.navigate", {"url": url}, session)
        return session

    def evaluate(self, session, expression):
        result = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True},
            session,
        )  # fmt: skip
        return result["result"].get("value")

    def wait_for(self, session, expression, check, timeout=90):
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.evaluate(session, expression)
            if check(value):
                return value
            time.sleep(0.5)
        return value

    def screenshot(self, session, path):
        data = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self):
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)
        shutil.rmtree(self.user_dir, ignore_errors=True)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def write_lstm_run(log_dir):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.LSTM(
                8,
                kernel_regularizer=kerasreg.L2Penalty(0.01),
                recurrent_regularizer=kerasreg.L2Penalty(0.02),
                name="lstm",
            ),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5, 3)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None]
    callbacks = [
        kerasreg.WeightDecay(1e-3, where="^out/kernel$"),
        kerasreg.WeightNormLogger(log_dir, per_gate=True),
        keras.callbacks.TensorBoard(log_dir),
    ]
    model.fit(x, y, batch_size=16, epochs=8, validation_split=0.25, verbose=0,
              callbacks=callbacks)  # fmt: skip


@pytest.fixture
def tensorboard_server(tmp_path):
    log_dir = tmp_path / "logs"
    write_lstm_run(log_dir)
    with serve(log_dir) as url:
        yield url


@contextlib.contextmanager
def serve(log_dir):
    """`tensorboard` on 127.0.0.1 over `log_dir`, once it has read the layout."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # until the server has read the layout
            try:
                if get_json(f"{url}/data/plugin/custom_scalars/layout"):
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("tensorboard did not start or did not load the run")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def write_gradient_run(log_dir):
    """An LSTM and a head, penalized, logged with `gradients=True`."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5, 3)),
            keras.layers.LSTM(
                8,
                kernel_regularizer=kerasreg.L2Penalty(0.01),
                recurrent_regularizer=kerasreg.L2Penalty(0.02),
                name="lstm",
            ),
            keras.layers.Dense(
                1, name="out", kernel_regularizer=kerasreg.L2Penalty(0.01)
            ),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5, 3)).astype("float32")
    y = x.sum(axis=(1, 2))[:, None]
    logger = kerasreg.WeightNormLogger(log_dir, update_freq=3, gradients=True)
    model.fit(x, y, batch_size=16, epochs=10, validation_split=0.25, verbose=0,
              callbacks=[logger, keras.callbacks.TensorBoard(log_dir)])  # fmt: skip


# Scroll the custom-scalars category titled TITLE to the top of the page.
SCROLL_TO_CATEGORY = r"""((title) => {
  const all = [];
  const walk = (node) => {
    if (node.shadowRoot) walk(node.shadowRoot);
    for (const child of node.children || []) { all.push(child); walk(child); }
  };
  walk(document);
  const panes = all.filter((e) => e.localName === 'tf-category-pane' &&
      (e.category && e.category.name === title ||
       (e.textContent || '').includes(title)));
  const heads = all.filter((e) => e.children.length === 0 &&
      (e.textContent || '').trim() === title);
  const target = heads[0] || panes[0];
  if (!target) return false;
  target.scrollIntoView({block: 'start'});
  return true;
})"""


def test_gradient_charts_render_in_a_real_browser(tmp_path):
    log_dir = tmp_path / "logs"
    write_gradient_run(log_dir)
    shot = tmp_path / "gradient_charts.png"
    with serve(log_dir) as url:
        browser = Chromium(chromium_binary(), height=1100)
        try:
            session = browser.open(f"{url}/#custom_scalars")
            categories = [
                "regularization: gradient norms per layer",
                "regularization: penalty share per layer",
                "regularization: gradient cosine per layer",
                "regularization: update ratio per layer",
            ]
            series = [
                "penalty_share/lstm/lstm_cell/kernel (train)",
                "penalty_share/lstm/lstm_cell/recurrent_kernel (validation)",
                "grad_data/lstm/lstm_cell/recurrent_kernel (validation)",
                "update_ratio/out/kernel (train)",
            ]
            text = browser.wait_for(
                session, DEEP_TEXT, lambda t: t and all(s in t for s in series)
            )
            for name in [*categories, *series]:
                assert name in text
            # Both LSTM kernels, train and validation: 4 lines; data and
            # penalty norms of both: 8; update ratios (train only): 2.
            for title, lines in [
                ("penalty share lstm", 4),
                ("gradient lstm", 8),
                ("update ratio lstm", 2),
            ]:
                drawn = browser.wait_for(
                    session,
                    f"{DRAWN_LINES}({title!r})",
                    lambda n, k=lines: n and n >= k,
                )
                assert drawn >= lines, (title, drawn)
            assert browser.evaluate(session, f"{SCROLL_TO_CATEGORY}({categories[0]!r})")
            time.sleep(1.5)  # let the charts redraw after the scroll
            browser.screenshot(session, shot)
        finally:
            browser.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("KERASREG_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(shot, ROOT / "docs" / "img" / shot.name)


def test_dashboards_render_in_a_real_browser(tensorboard_server, tmp_path):
    browser = Chromium(chromium_binary())
    shots = [tmp_path / "custom_scalars.png", tmp_path / "text_plan.png"]
    try:
        session = browser.open(f"{tensorboard_server}/#custom_scalars")
        lstm_series = [
            "penalty/lstm/lstm_cell/kernel (train)",
            "penalty/lstm/lstm_cell/recurrent_kernel (train)",
        ]
        text = browser.wait_for(
            session, DEEP_TEXT, lambda t: t and all(s in t for s in lstm_series)
        )
        assert "regularization: penalty per layer" in text
        assert "penalty lstm" in text and "Matches (2)" in text
        for series in lstm_series:
            assert series in text
        lines = browser.wait_for(
            session, f"{DRAWN_LINES}('penalty lstm')", lambda n: n and n >= 2
        )
        assert lines >= 2  # both series are drawn, not just listed
        browser.screenshot(session, shots[0])

        session = browser.open(f"{tensorboard_server}/#text")
        text = browser.wait_for(
            session, DEEP_TEXT, lambda t: t and "left out: bias" in t
        )
        assert "regularization/plan" in text
        for cell in [
            "lstm/lstm_cell/kernel (3, 32) L2Penalty(l2=0.01)",
            "lstm/lstm_cell/recurrent_kernel (8, 32) L2Penalty(l2=0.02)",
            "lstm/lstm_cell/bias (32,) none none left out: bias",
            "out/kernel (8, 1) none WeightDecay:",
        ]:
            assert cell in text
        browser.screenshot(session, shots[1])
    finally:
        browser.close()
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("KERASREG_UPDATE_SCREENSHOTS") == "1":
            shutil.copy(shot, ROOT / "docs" / "img" / shot.name)
