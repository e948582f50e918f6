"""The warm runner: `embed-collections run` in a process that already has Prefect imported and the models loaded.

With the warm server alone, a nightly re-run still pays for its own process:
Prefect's import and the flow's start (about 2 s here) and, when one chunk
changed, the dense model's import and load (about 3 s). ``embed-collections
server start`` therefore also starts this runner beside the server. It imports
Prefect, the flow and the stages once, loads the CPU models of the settings it
was started with (:func:`embedder.preload.preload_models`), and waits on a
Unix socket. ``embed-collections run`` in the same Prefect home, when it finds
the runner alive and started from the same code and the same import-time
environment, hands it its arguments, working directory, environment and its
stdin/stdout/stderr, and the runner forks a child that runs the command as the
CLI would, with its output on the caller's terminal. The caller waits for the
exit status, which it exits with.

What stays as without the runner:

- the run: the child runs the same command, on the same server; a model the
  preload did not load (another model, another setting) is loaded by the run;
- Ctrl-C and SIGTERM: the caller forwards them to the child, whose handlers
  stop the run between two batches, and a second one ends it at once;
- a caller killed hard: the child notices that the caller's end of the socket
  closed and kills itself and its children, as the killed process would have died;
- anything that cannot be served (another Prefect home, an environment variable
  read at import time that differs, code changed on disk since the runner
  started, a dead runner, a GPU host): the run runs in its own process, as before.

Nothing is encoded and nothing touches CUDA in the runner itself: a thread
pool that has run once does not survive a fork, and a GPU run loads its models
in its own process, under the GPU lease. So on a host with a usable GPU (and
``force_cpu`` off) no runner starts.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from embedder.io.atomic import atomic_write_text
from embedder.procs import descendants, owner_dead, pid_start_time
from flows.warm_server import prefect_home, stop_group, stop_recorded

RECORD = "embedder-runner.json"
LOG = "embedder-runner.log"
# Read once, when a module is imported: Prefect's settings, the hub's offline mode, the thread pools, the
# import path. A caller whose values differ cannot be served by a process that imported with the runner's.
IMPORT_TIME_ENV = ("PREFECT_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_", "TORCH",
                   "PYTORCH_", "CUDA_", "OMP_", "MKL_", "OPENBLAS_", "TOKENIZERS_", "FASTEMBED_", "PYTHON",
                   "LD_", "VIRTUAL_ENV", "TQDM_")
# Whose source the runner imported: an upgrade or an edit on disk retires it.
PACKAGES = ("embedder", "tasks", "flows", "deployments")
MESSAGE_BYTES = 1 << 20
# How long a run waits for the runner to take it before it runs in its own process.
ACCEPT_TIMEOUT_S = 60.0
# The exit status the runner's process exits with on a host where it must not run (a usable GPU).
EXIT_NOT_HERE = 3


@dataclass(frozen=True)
class Runner:
    """A recorded runner."""

    pid: int
    started: int | None
    host: str
    address: str
    env: dict[str, str]
    code: str
    models: list[str]

    def owner(self) -> dict[str, object]:
        """The record's owner fields, as :func:`embedder.procs.owner_dead` reads them."""
        return {"pid": self.pid, "host": self.host, "started": self.started}


def address(home: Path) -> str:
    """The runner's socket address for ``home``: Linux's abstract namespace, so no path length or stale file."""
    return "\0embedder-runner-" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:24]


def import_time_env(env: dict[str, str] | os._Environ[str], home: Path) -> dict[str, str]:
    """The variables of ``env`` that a process reads when it imports, with ``PREFECT_HOME`` made explicit."""
    picked = {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)}
    picked["PREFECT_HOME"] = str(home.resolve())
    return dict(sorted(picked.items()))


def code_fingerprint() -> str:
    """The interpreter, this project's source files (path, size, mtime) and the installed packages' directory."""
    h = hashlib.sha256(sys.executable.encode())
    root = Path(__file__).resolve().parent.parent
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    with contextlib.suppress(OSError):
        h.update(str(Path(sysconfig.get_paths()["purelib"]).stat().st_mtime_ns).encode())
    return h.hexdigest()[:24]


def read_record(home: Path) -> Runner | None:
    """The recorded runner of ``home``, or None when there is no readable record."""
    try:
        d = json.loads((home / RECORD).read_text(encoding="utf-8"))
        return Runner(pid=int(d["pid"]), started=d.get("started"), host=str(d["host"]), address=str(d["address"]),
                      env=dict(d["env"]), code=str(d["code"]), models=list(d.get("models", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(home: Path) -> Runner | None:
    """The recorded runner of ``home`` when its process is alive on this host; None otherwise."""
    record = read_record(home)
    if record is None or record.host != socket.gethostname() or owner_dead(record.owner()):
        return None
    return record


def mismatch(record: Runner, home: Path) -> str | None:
    """Why this process's runs cannot be served by ``record``, or None when they can."""
    mine = import_time_env(os.environ, home)
    if mine != record.env:
        names = sorted(k for k in mine.keys() | record.env.keys() if mine.get(k) != record.env.get(k))
        return f"it was started with other values of {', '.join(names)}"
    if code_fingerprint() != record.code:
        return "the code on disk changed since it started (`embed-collections server stop`, then `start`)"
    return None


# --- the caller's side ------------------------------------------------------------------------------------


def _recv(sock: socket.socket) -> dict[str, Any] | None:
    try:
        data = sock.recv(MESSAGE_BYTES)
    except TimeoutError:
        raise
    except OSError:
        return None
    return json.loads(data) if data else None


def dispatch(argv: list[str]) -> int | None:
    """Run ``embed-collections <argv>`` in the warm runner of this Prefect home; its exit status, or None.

    None means the runner cannot serve this run (there is none, or it differs in
    a way the line printed on stderr says) and the caller runs it itself.
    """
    home = prefect_home()
    record = alive(home)
    if record is None:
        return None
    why = mismatch(record, home)
    if why is not None:
        print(f"not using the warm runner (pid {record.pid}): {why}", file=sys.stderr)
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(record.address)
    except OSError:
        sock.close()
        return None
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    umask = os.umask(0o022)
    os.umask(umask)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds, "umask": umask}
    # A runner that is alive but does not answer (stopped, swamped) is not waited for: closing the
    # socket ends a child it may fork later, so the run never happens twice.
    sock.settimeout(ACCEPT_TIMEOUT_S)
    try:
        socket.send_fds(sock, [json.dumps(request).encode()], fds)
        reply = _recv(sock)
    except OSError:
        reply = {"refused": f"it did not answer within {ACCEPT_TIMEOUT_S:g} s"}
    sock.settimeout(None)
    if reply is None or "accepted" not in reply:
        reason = (reply or {}).get("refused", "it closed the connection")
        print(f"not using the warm runner (pid {record.pid}): {reason}", file=sys.stderr)
        sock.close()
        return None

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):
            sock.send(json.dumps({"signal": signum}).encode())

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    while True:
        message = _recv(sock)
        if message is None:
            print(f"error: the warm runner (pid {record.pid}) ended this run without its exit status; see "
                  f"{home / LOG}", file=sys.stderr)
            return 1
        if "exit" in message:
            return int(message["exit"])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- the runner's side ------------------------------------------------------------------------------------


def _exit_status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.send(json.dumps(message).encode())


def serve(home: Path, config_file: Path | None, server_owner: dict[str, Any]) -> int:
    """Import, preload, then serve runs of ``home`` until the warm server is gone; the exit status.

    Called as ``python -m flows.warm_runner`` by ``embed-collections server
    start``, with the caller's environment (the values recorded for matching).
    """
    env = import_time_env(os.environ, home)
    code = code_fingerprint()
    # On a GPU host, fork and CUDA do not mix; NVML answers without initialising CUDA in this process.
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    from embedder.settings import resolve_run_config

    cfg = resolve_run_config(config_file, {"collections": [], "output_dir": str(home / "runner-output")})
    if not cfg.force_cpu:
        import torch

        if torch.cuda.is_available():
            print("a GPU is usable here: each run loads its models in its own process, under the GPU lease; "
                  "no warm runner", flush=True)
            return EXIT_NOT_HERE
    del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
    from flows import cli

    cli._prefect_defaults()  # the warm server's URL and the rest, as each run sets them
    import flows.embed_collections  # noqa: F401  (Prefect, the tasks and the stages, once)
    from embedder.preload import preload_models

    with contextlib.suppress(ImportError):
        import tqdm

        tqdm.tqdm.monitor_interval = 0  # no monitor thread in a process that forks
    models = [p.line() for p in preload_models(cfg)]
    for line in models:
        print(f"preload: {line}", flush=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address(home))
    listener.listen(16)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the loop through the wakeup fd
    atomic_write_text(home / RECORD, json.dumps({
        "pid": os.getpid(), "started": pid_start_time(os.getpid()), "host": socket.gethostname(),
        "address": address(home), "env": env, "code": code, "models": models}))
    print(f"serving runs of {home} (pid {os.getpid()})", flush=True)
    running: dict[int, socket.socket] = {}
    try:
        while not owner_dead(server_owner):
            ready, _, _ = select.select([listener.fileno(), wake_r], [], [], 2.0)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(running)
            if listener.fileno() in ready:
                conn, _ = listener.accept()
                _accept(conn, running, listener, (wake_r, wake_w), server_owner)
        print("the warm server is gone: stopping", flush=True)
    finally:
        record = read_record(home)
        if record is not None and record.pid == os.getpid():
            (home / RECORD).unlink(missing_ok=True)
    return 0


def _reap(running: dict[int, socket.socket]) -> None:
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = running.pop(pid, None)
        if conn is not None:
            code = _exit_status(status)
            print(f"run {pid} exited {code}", flush=True)
            _send(conn, {"exit": code})
            conn.close()


def _accept(conn: socket.socket, running: dict[int, socket.socket], listener: socket.socket,
            wake: tuple[int, int], server_owner: dict[str, Any]) -> None:
    # Only this user's processes: a run executes with the runner's rights.
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
    fds: list[int] = []
    try:
        if uid != os.getuid():
            conn.close()
            return
        conn.settimeout(10.0)
        data, fds, _flags, _addr = socket.recv_fds(conn, MESSAGE_BYTES, 3)
        conn.settimeout(None)
        request = json.loads(data)
    except (OSError, ValueError) as exc:
        print(f"a request could not be read: {exc}", flush=True)
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    if owner_dead(server_owner):
        _send(conn, {"refused": "its warm server is gone"})
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(conn, listener, wake, request, fds)
    for fd in fds:
        os.close(fd)
    running[pid] = conn
    print(f"run {pid}: {' '.join(request['argv'])} (in {request['cwd']})", flush=True)
    _send(conn, {"accepted": pid})


def _child(conn: socket.socket, listener: socket.socket, wake: tuple[int, int], request: dict[str, Any],
           fds: list[int]) -> NoReturn:
    """The forked child: the caller's descriptors, directory and environment, then the CLI command."""
    code = 1
    try:
        from embedder import startup

        startup.mark(startup.RUNNER)  # this process's start: /proc's start time is only to the second
        listener.close()
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        given = list(request["fds"])
        for target in (0, 1, 2):
            if target in given:
                os.dup2(fds[given.index(target)], target)
            else:
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, target)
                os.close(null)
        for fd in fds:
            os.close(fd)
        os.chdir(request["cwd"])
        os.umask(int(request.get("umask", 0o022)))  # the files the run writes get the caller's permissions
        os.environ.clear()
        os.environ.update(request["env"])
        threading.Thread(target=_watch_caller, args=(conn,), name="warm-runner-caller", daemon=True).start()
        from flows.cli import app

        app(args=list(request["argv"]), prog_name="embed-collections", standalone_mode=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the caller sees it on its stderr, as from its own process
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()  # Prefect's log and event workers drain, as at a normal exit
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _watch_caller(conn: socket.socket) -> None:
    """Signals the caller forwards; its end closing means it was killed, and the run dies with it."""
    while True:
        try:
            data = conn.recv(MESSAGE_BYTES)
        except OSError:
            data = b""
        if not data:
            for pid in descendants(os.getpid()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            os.kill(os.getpid(), int(json.loads(data)["signal"]))


# --- started and stopped by `embed-collections server` -----------------------------------------------------


def start(home: Path, server_owner: dict[str, Any], config_file: Path | None = None,
          timeout_s: float = 300.0) -> tuple[Runner | None, str]:
    """Start the runner of ``home`` beside its warm server; the runner (None when none runs) and a line about it."""
    running = alive(home)
    if running is not None:
        return running, f"warm runner already running (pid {running.pid})"
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    args = [sys.executable, "-m", "flows.warm_runner", "--home", str(home), "--server",
            json.dumps(server_owner)] + (["--config", str(config_file)] if config_file else [])
    with open(home / LOG, "w", encoding="utf-8") as log:
        # Its own session, like the server's: it outlives this command and a Ctrl-C in its shell.
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(home))
    deadline = time.monotonic() + timeout_s
    while True:
        record = read_record(home)
        if record is not None and record.pid == proc.pid:
            loaded = "; ".join(record.models) or "no models"
            return record, f"warm runner started (pid {proc.pid}; {loaded})"
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc.pid)
            tail = (home / LOG).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
            return None, f"no warm runner: {tail[0] if tail else 'it exited'} (see {home / LOG})"
        time.sleep(0.2)


def stop(home: Path) -> Runner | None:
    """Stop the runner of ``home`` (with the runs it forked); what was stopped."""
    record = read_record(home)
    if record is not None:
        stop_recorded(home / RECORD, record.owner())
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.warm_runner --home H --server OWNER [--config F]``: serve until the server is gone."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.warm_runner")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--server", required=True, help="The warm server's owner record (JSON).")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    return serve(args.home, args.config, json.loads(args.server))


if __name__ == "__main__":
    sys.exit(main())
