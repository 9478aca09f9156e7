"""Hub ids download as with lm-eval's `hf`, proven against a tiny model served on 127.0.0.1 (HF_ENDPOINT).

The server emulates the few hub endpoints huggingface_hub and transformers call: HEAD/GET on
`/{repo}/resolve/{revision}/{file}` (X-Repo-Commit, ETag, Content-Length; 404 with X-Error-Code RepoNotFound or
EntryNotFound) and the `/api/models/...` listings. The loads run in a subprocess, because huggingface_hub reads
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = "lmr-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parent.parent

LOAD = r"""
import json, sys
from lm_eval_retrieval.errors import UserInputError
from lm_eval_retrieval.models.ret_approx import RetApproxLM

result = {}
for name in sys.argv[2:]:
    try:
        lm = RetApproxLM(pretrained=name, output_path=sys.argv[1])
        result[name] = {"name": lm.model_name, "layers": lm.model.config.num_hidden_layers}
    except UserInputError as error:
        result[name] = {"error": str(error)}
print("RESULT " + json.dumps(result))
"""


class FakeHub(BaseHTTPRequestHandler):
    """Serves `files` (relative name -> bytes) as the repo REPO at commit COMMIT; everything else is a 404."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def _answer(self, with_body: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.requests.append(f"{self.command} {path}")
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":  # /{org}/{name}/resolve/{revision}/{file...}
            self._file("/".join(parts[:2]), "/".join(parts[4:]), with_body)
        elif len(parts) >= 4 and parts[:2] == ["api", "models"]:  # /api/models/{org}/{name}[/revision|tree/...]
            self._api("/".join(parts[2:4]), parts[4:], with_body)
        else:
            self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, with_body)

    def _file(self, repo: str, name: str, with_body: bool) -> None:
        if repo != REPO:
            self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, with_body)
        elif name not in self.files:
            missing = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT}
            self._send(404, b"", missing, with_body)
        else:
            body = self.files[name]
            etag = '"' + hashlib.sha256(body).hexdigest() + '"'
            headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/octet-stream"}
            self._send(200, body, headers, with_body)

    def _api(self, repo: str, rest: list[str], with_body: bool) -> None:
        if repo != REPO:
            self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, with_body)
            return
        if rest[:1] == ["tree"]:  # /api/models/{repo}/tree/{revision}/{folder}: list a folder
            folder = "/".join(rest[2:])
            entries = [
                {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                for name, body in sorted(self.files.items())
                if os.path.dirname(name) == folder
            ]
            if folder and not entries:
                self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, with_body)
                return
            body = json.dumps(entries).encode()
        else:  # model info, at a revision or not
            body = json.dumps({
                "id": REPO, "modelId": REPO, "sha": COMMIT, "private": False, "gated": False, "disabled": False,
                "siblings": [{"rfilename": name} for name in sorted(self.files)], "tags": [],
            }).encode()
        self._send(200, body, {"Content-Type": "application/json", "X-Repo-Commit": COMMIT}, with_body)

    def _send(self, status: int, body: bytes, headers: dict[str, str], with_body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body and body:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def fake_hub(tiny_model_dir):
    """The tiny Llama served on 127.0.0.1 by a daemon thread, shut down at the end of the module."""
    folder = Path(tiny_model_dir)
    handler = type("Hub", (FakeHub,), {
        "files": {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()},
        "requests": [],
    })
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _load(names: list[str], endpoint: str, hf_home: Path, offline: bool, out: Path) -> dict:
    own = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(own)}
    env.update({
        "HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "10", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
    })
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(out), *names], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_hub_ids_download_online_and_load_offline_from_the_cache(fake_hub, tmp_path) -> None:
    endpoint, requests = fake_hub
    hf_home = tmp_path / "hf-home"
    misspelt = "lmr-test/tiny-lama"

    online = _load([REPO, misspelt], endpoint, hf_home, offline=False, out=tmp_path / "online")
    assert online[REPO] == {"name": "tiny-llama", "layers": 2}, (online, requests)
    assert any(r.startswith(f"GET /{REPO}/resolve/") and r.endswith("/model.safetensors") for r in requests), requests
    assert list((hf_home / "hub").glob("models--lmr-test--tiny-llama/snapshots/*/config.json"))
    error = online[misspelt]["error"]
    assert misspelt in error and "not found on the Hugging Face hub" in error and "\n" not in error

    before = len(requests)
    offline = _load([REPO, "lmr-test/never-downloaded"], endpoint, hf_home, offline=True, out=tmp_path / "offline")
    assert offline[REPO] == {"name": "tiny-llama", "layers": 2}
    error = offline["lmr-test/never-downloaded"]["error"]
    assert "`hf download lmr-test/never-downloaded`" in error and "\n" not in error
    assert len(requests) == before  # offline means no request at all


def test_an_unreachable_hub_is_a_one_line_error(tmp_path) -> None:
    """A network error online (nothing listens on the port) names the download command, not a traceback."""
    import socket

    with socket.socket() as probe:  # a free port, closed again: connections to it are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _load([REPO], f"http://127.0.0.1:{port}", tmp_path / "hf-home", offline=False, out=tmp_path / "out")
    error = result[REPO]["error"]
    assert f"`hf download {REPO}`" in error and "\n" not in error
