"""A real `bitlm serve` process on a tiny model, for black-box tests: started once per module."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("httpx")
if not __import__("bitlm.cli", fromlist=["native_available"]).native_available():
    pytest.skip("bitlm serve needs the native kernels", allow_module_level=True)

SRC = str(Path(__file__).resolve().parents[2] / "src")
START_TIMEOUT = 90  # seconds: the first start converts the model to the native file


class ServerProcess:
    """`python -m bitlm serve -m MODEL --port 0 ARGS` on 127.0.0.1; url from the address it logs."""

    def __init__(self, model_dir: Path, log_path: Path, *args):
        env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}
        env.pop("BITLM_API_KEY", None)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bitlm", "serve", "-m", str(model_dir), "--host",
                                      "127.0.0.1", "--port", "0", "-t", "1", *map(str, args)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", self.log())
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bitlm serve did not start:\n{self.log()}")
            time.sleep(0.05)
        self.model = Path(model_dir).name

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the server and wait for its exit; its return code (killed if it hangs: an error)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self._log.close()
                raise AssertionError(f"bitlm serve did not stop within {timeout} s of signal {sig}") from None
        self._log.close()
        return self.proc.returncode

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=kwargs.pop("timeout", 60), **kwargs)


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """start_server(model_dir, *args) -> ServerProcess; each is stopped (SIGTERM) at the module's end, and
    must then exit as SIGTERM asks, without a traceback in its log (no bug was hit)."""
    started = []

    def start(model_dir, *args):
        s = ServerProcess(model_dir, tmp_path_factory.mktemp("serve") / "server.log", *args)
        started.append(s)
        return s

    yield start
    for s in started:
        code = s.stop()
        assert code in (0, -signal.SIGTERM), s.log()
        assert "Traceback" not in s.log(), s.log()
