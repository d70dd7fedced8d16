"""A real Label Studio server for the tests (the ``label_studio`` session fixture in conftest.py)
and the way to run its SDK.

The server is the ``label-studio`` of ``.venv-label-studio`` (its own venv, with
``label-studio-sdk``, made by ``tests/install_tools.sh``), or the one ``DDETR_LABEL_STUDIO`` names;
SQLite, 127.0.0.1, a legacy API token, local-file serving under ``root``, and ML backends on
loopback addresses allowed (``ML_BLOCK_LOCAL_IP=false`` for the backend and
``SSRF_PROTECTION_ENABLED=false`` for the webhook Label Studio adds with it: ``ddetr serve`` runs
on 127.0.0.1).
Start-up takes 60-90 s on the CI machine, so one server serves the whole session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).resolve().parent / "labelstudio_client.py"
STARTUP_TIMEOUT = float(os.environ.get("DDETR_LABEL_STUDIO_TIMEOUT", "240"))


class StartError(RuntimeError):
    """The server did not come up; the message has the log's tail."""


@dataclass
class Server:
    url: str
    token: str
    root: Path  # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    python: str  # the server venv's python (with label-studio-sdk)
    log: Path
    startup_s: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env() -> dict[str, str]:
    """Our environment minus what would make the tool's venv import our packages."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def executable() -> str:
    return os.environ.get("DDETR_LABEL_STUDIO") or str(ROOT / ".venv-label-studio" / "bin" / "label-studio")


def run_server(base: Path) -> Iterator[Server]:
    """Start a server with its data under ``base``, yield it once it answers ``/health``, stop it
    (SIGTERM to its process group, then SIGKILL) afterwards. Raises StartError."""
    exe = executable()
    root, data = base / "root", base / "data"
    root.mkdir()
    data.mkdir()
    port, token = free_port(), "ddetr-test-token-0123456789"
    env = {
        **tool_env(),
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",  # connecting a backend on 127.0.0.1 ...
        "SSRF_PROTECTION_ENABLED": "false",  # ... and the webhook Label Studio then adds for it
        "DJANGO_DB": "sqlite",
    }
    log = base / "server.log"
    cmd = [exe, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
           "--username", "ddetr@example.com", "--password", "ddetr-test-pass", "--user-token", token]
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, env=env, cwd=base, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-30:])

    try:
        while True:
            if proc.poll() is not None:
                raise StartError(f"label-studio exited with {proc.returncode} while starting; log tail:\n{tail()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "UP":
                        break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() - t0 > STARTUP_TIMEOUT:
                raise StartError(f"label-studio did not answer /health within {STARTUP_TIMEOUT:.0f} s; log tail:\n{tail()}")
            time.sleep(1.0)
        startup = time.monotonic() - t0
        print(f"\nlabel-studio answered /health after {startup:.1f} s")
        yield Server(url, token, root, str(Path(exe).parent / "python"), log, startup)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(15)


def run_sdk(server: Server, request: dict, work: Path, timeout: float = 300) -> dict:
    """``labelstudio_client.py`` with ``request`` (plus the server's url and token) in the server's
    venv -> its JSON answer. Raises AssertionError with its stderr when it fails."""
    req = work / "sdk_request.json"
    req.write_text(json.dumps({"url": server.url, "token": server.token, **request}))
    p = subprocess.run([server.python, str(CLIENT), str(req)], capture_output=True, text=True, env=tool_env(), timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)
