"""Run a real ``mitmdump`` subprocess (with or without the aws-masker addon) for integration tests.

    with MitmProxy(options={"masker_hosts": up.host_port}) as proxy:
        with proxied_client(proxy) as client:
            client.post(up.url + "/v1/messages", json=...)

The command is ``<venv>/bin/mitmdump -s <repo>/addon/masker.py -p 0 --set confdir=<dir>
--set termlog_verbosity=info [--set k=v ...]``; ``script=None`` leaves out ``-s``.  The port
is parsed from mitmdump's ``HTTP(S) proxy listening at *:<port>.`` line.  Output (stdout and
stderr merged) is collected line by line in ``log_lines``.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SCRIPT = REPO / "addon" / "masker.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"

# e.g. "[04:22:10.584] HTTP(S) proxy listening at *:60931."
PORT_RE = re.compile(r"proxy listening at (\S*?):(\d+)\.?\s*$")
# lines before the port line that mean the startup is going to fail
STARTUP_ERROR_RE = re.compile(r"error in script|Traceback|Error logged during startup|Errno|Error:",
                              re.IGNORECASE)
STARTUP_TIMEOUT = 20.0

_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class MitmProxyError(RuntimeError):
    pass


_LIVE: weakref.WeakSet[MitmProxy] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:  # safety net: never leave mitmdump running after the test process
    for proxy in list(_LIVE):
        proxy.stop(timeout=2)


def option_args(options: Mapping[str, Any] | None) -> list[str]:
    """``{"k": v}`` -> ``["--set", "k=v", ...]``; lists/tuples give one ``--set`` per item
    (mitmproxy appends repeated values of a sequence option), bools become true/false."""
    args: list[str] = []
    for key, value in (options or {}).items():
        values = list(value) if isinstance(value, list | tuple | set) else [value]
        if not values:
            args += ["--set", key]  # empty sequence
        for v in values:
            if isinstance(v, bool):
                v = "true" if v else "false"
            args += ["--set", f"{key}={v}"]
    return args


class MitmProxy:
    """A ``mitmdump`` subprocess.

    :param script: addon script (default ``addon/masker.py``), ``None`` for plain mitmdump.
    :param options: mitmproxy options, each passed as ``--set key=value``.
    :param extra_args: further raw command line arguments.
    :param confdir: mitmproxy confdir (CA lives there); a fresh temp dir by default.
    :param env: extra environment variables for the subprocess.
    :param port: listen port (0 = any free port).
    """

    def __init__(self, script: str | Path | None = DEFAULT_SCRIPT, options: Mapping[str, Any] | None = None,
                 *, extra_args: Iterable[str] = (), confdir: str | Path | None = None,
                 env: Mapping[str, str] | None = None, port: int = 0, mitmdump: str | Path = MITMDUMP):
        self.script = Path(script) if script is not None else None
        self.options = dict(options or {})
        self.extra_args = list(extra_args)
        self._own_confdir: tempfile.TemporaryDirectory[str] | None = None
        if confdir is None:
            self._own_confdir = tempfile.TemporaryDirectory(prefix="mitm-confdir-")
            confdir = self._own_confdir.name
        self.confdir = Path(confdir)
        self.env = dict(env or {})
        self.requested_port = port
        self.mitmdump = Path(mitmdump)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_lines: list[str] = []
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self.starts = 0

    # ---- command line ---------------------------------------------------------------
    def command(self, port: int | None = None) -> list[str]:
        cmd = [str(self.mitmdump)]
        if self.script is not None:
            cmd += ["-s", str(self.script)]
        cmd += ["-p", str(self.requested_port if port is None else port),
                "--set", f"confdir={self.confdir}", "--set", "termlog_verbosity=info"]
        return cmd + option_args(self.options) + self.extra_args

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, port: int | None = None, timeout: float = STARTUP_TIMEOUT) -> MitmProxy:
        if self.proc is not None and self.proc.poll() is None:
            raise MitmProxyError("mitmdump already running")
        if self.script is not None and not self.script.exists():
            raise MitmProxyError(f"addon script {self.script} does not exist")
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_ENV}
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
        env.update(self.env)
        mark = len(self.log_lines)
        self.port = None
        self.proc = subprocess.Popen(self.command(port), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        self.starts += 1
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_output, args=(self.proc,), daemon=True,
                                        name=f"mitmdump-{self.proc.pid}-output")
        self._reader.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.log_lines[mark:]:
                    m = PORT_RE.search(line)
                    if m:
                        self.port = int(m.group(2))
                        break
                if self.port is not None or self.proc.poll() is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.1))
        if self.port is None:
            exited = self.proc.poll()
            self.stop()
            what = (f"exited with code {exited}" if exited is not None
                    else f"printed no port in {timeout:.0f}s")
            raise MitmProxyError(f"mitmdump {what}.\ncommand: {self.command(port)}\noutput:\n"
                                 + self.output(mark))
        # mitmdump prints the port line *before* it exits on startup errors (e.g. a broken addon
        # script logs a traceback first, then "Error logged during startup, exiting...").
        if any(STARTUP_ERROR_RE.search(line) for line in self.log_lines[mark:]):
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(0.05)
        if self.proc.poll() is not None:
            code = self.proc.returncode
            self._join_reader()
            raise MitmProxyError(f"mitmdump exited during startup (code {code}).\n"
                                 f"command: {self.command(port)}\noutput:\n" + self.output(mark))
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._join_reader()
        return proc.returncode

    def restart(self, keep_port: bool = True) -> MitmProxy:
        """Stop and start again (same port by default, so ``url`` stays valid)."""
        port = self.port if keep_port else None
        self.stop()
        last: Exception | None = None
        for _ in range(20 if port else 1):
            try:
                return self.start(port=port)
            except MitmProxyError as e:  # port briefly unavailable
                last = e
                time.sleep(0.25)
        assert last is not None
        raise last

    def close(self) -> None:
        self.stop()
        if self._own_confdir is not None:
            self._own_confdir.cleanup()
            self._own_confdir = None

    def __enter__(self) -> MitmProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- output ----------------------------------------------------------------------
    def _read_output(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._cond:
                self.log_lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(5)

    def mark(self) -> int:
        """Current number of log lines; pass as ``since`` to only look at later output."""
        with self._cond:
            return len(self.log_lines)

    def output(self, since: int = 0) -> str:
        with self._cond:
            return "\n".join(self.log_lines[since:])

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 10.0, since: int = 0) -> str:
        """Wait until a log line (index >= since) matches ``pattern`` (regex search); return it."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = since
        with self._cond:
            while True:
                for line in self.log_lines[checked:]:
                    if rx.search(line):
                        return line
                checked = max(checked, len(self.log_lines))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no mitmdump log line matching {rx.pattern!r} within {timeout}s; "
                                       f"output:\n{self.output(since)[-4000:]}")
                self._cond.wait(min(remaining, 0.1))

    def find_log(self, pattern: str | re.Pattern[str], since: int = 0) -> list[str]:
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        with self._cond:
            return [line for line in self.log_lines[since:] if rx.search(line)]

    # ---- info ------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def url(self) -> str:
        if self.port is None:
            raise MitmProxyError("mitmdump not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert_path(self) -> Path:
        """mitmproxy's CA certificate (created in confdir on first start)."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def rss_kib(self) -> int:
        """Resident set size of the mitmdump process in KiB (from /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise MitmProxyError("VmRSS not found")

    def __repr__(self) -> str:
        return f"<MitmProxy script={self.script} port={self.port} running={self.running}>"


def _verify_for(proxy: MitmProxy | None) -> ssl.SSLContext | bool:
    if proxy is not None and proxy.ca_cert_path.exists():
        return ssl.create_default_context(cafile=str(proxy.ca_cert_path))
    return True


def proxied_client(proxy: MitmProxy | str | None, *, timeout: float = 10.0, **kwargs: Any) -> httpx.Client:
    """httpx.Client sending everything through ``proxy`` (None: direct), trusting mitmproxy's CA.

    Environment proxy variables are ignored (``trust_env=False``).
    """
    url = proxy.url if isinstance(proxy, MitmProxy) else proxy
    kwargs.setdefault("verify", _verify_for(proxy if isinstance(proxy, MitmProxy) else None))
    return httpx.Client(proxy=url, timeout=timeout, trust_env=False, **kwargs)


def proxied_async_client(proxy: MitmProxy | str | None, *, timeout: float = 10.0,
                         **kwargs: Any) -> httpx.AsyncClient:
    url = proxy.url if isinstance(proxy, MitmProxy) else proxy
    kwargs.setdefault("verify", _verify_for(proxy if isinstance(proxy, MitmProxy) else None))
    return httpx.AsyncClient(proxy=url, timeout=timeout, trust_env=False, **kwargs)


__all__ = ["DEFAULT_SCRIPT", "MITMDUMP", "REPO", "MitmProxy", "MitmProxyError", "option_args",
           "proxied_async_client", "proxied_client"]
