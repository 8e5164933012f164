"""``segue serve`` and ``segue worker``: the commands that start the API, the supervisor and the workers.

``segue serve`` checks its options (a host other than loopback needs a token), opens the data folder and the
queue, reads the model's config through a child process (this process never imports torch), starts the
supervisor with N workers and the webhook deliverer, and runs uvicorn until SIGTERM or Ctrl-C, after which the
workers give their jobs back and stop. ``segue worker`` runs workers without the API (``--workers N`` of them,
supervised), for machines that only render; with ``--worker-id`` (as the supervisor starts it) it is one
worker in this process.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import InputError
from .queue import Queue
from .queue_sqlite import SqliteQueue

log = logging.getLogger("segue.serve")
LOOPBACK_NAMES = ("localhost",)
DB_ENV = "SEGUE_DB"  # the queue URL handed to workers (a password in argv would show in ps)


def open_queue(db: str | None, data: Path) -> Queue:
    """The queue at ``db`` (``postgresql://...``), or SQLite in the data folder when ``db`` is None or a
    ``sqlite:///PATH`` URL."""
    if db is None:
        return SqliteQueue(Path(data) / "queue.db")
    if db.startswith(("postgresql://", "postgres://")):
        from .queue_pg import PostgresQueue

        return PostgresQueue(db)
    if db.startswith("sqlite:///"):
        return SqliteQueue(Path(db[len("sqlite:///") :]))
    raise InputError(f"--db {db.split('@')[-1]!r}: give a postgresql://USER@HOST/DB URL or sqlite:///PATH")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_data(path: Path) -> Path:
    """The data folder with its jobs/ and shot-cache/ folders; only its last level is created."""
    data = Path(path)
    if data.exists() and not data.is_dir():
        raise InputError(f"--data {data} exists and is not a folder")
    if not data.exists():
        if not data.parent.is_dir():
            raise InputError(f"--data {data}: folder {data.parent} does not exist (segue creates only the last level)")
        data.mkdir()
    for sub in ("jobs", "shot-cache"):
        (data / sub).mkdir(exist_ok=True)
    if not os.access(data, os.W_OK):
        raise InputError(f"--data {data} is not writable")
    return data.resolve()


def model_options(args: argparse.Namespace) -> list[str]:
    """The model, speed and memory flags of ``args`` as a worker's command line takes them. Without
    ``--threads`` the machine's cores are shared out among the workers: N workers each spinning up every
    core's worth of threads slow each other down several times over on a CPU."""
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // max(1, args.workers))
    out: list[str] = []
    for flag, value in (("--ckpt-dir", args.ckpt_dir), ("--device", args.device), ("--dtype", args.dtype),
                        ("--step-cache", args.step_cache), ("--cache-threshold", args.cache_threshold),
                        ("--cache-calibration", args.cache_calibration), ("--threads", threads)):  # fmt: skip
        if value is not None:
            out += [flag, str(value)]
    out += ["--memory", args.memory, "--attention", args.attention]
    for flag, on in (("--compile", args.compile), ("--exact", args.exact), ("--few-step", args.few_step),
                     ("--text-encoder-cpu", args.text_encoder_cpu)):  # fmt: skip
        if on:
            out.append(flag)
    if args.cfg_batch is not None:
        out.append("--cfg-batch" if args.cfg_batch else "--no-cfg-batch")
    for lora in args.lora:
        out += ["--lora", lora]
    return out


def global_flags(args: argparse.Namespace) -> list[str]:
    return ["-q"] if args.quiet else ["-v"] if args.verbose else []


def check_serve_options(args: argparse.Namespace) -> None:
    if not is_loopback(args.host) and not args.token:
        raise InputError(f"--host {args.host} is not a loopback address: give --token (or SEGUE_TOKEN) so that "
                         "every request must carry it, or serve on 127.0.0.1")  # fmt: skip
    if args.token is not None and len(args.token) < 8:
        raise InputError("--token must be at least 8 characters (a random one: python -c 'import secrets; "
                         "print(secrets.token_urlsafe())')")  # fmt: skip
    bounds = (("--workers", args.workers, 0), ("--port", args.port, 0), ("--max-pixels", args.max_pixels, 1),
              ("--webhook-retries", args.webhook_retries, 1))  # fmt: skip
    for name, value, lo in bounds:
        if value < lo:
            raise InputError(f"{name} must be >= {lo}, got {value}")
    for name, value in (("--lease", args.lease), ("--max-upload-mb", args.max_upload_mb),
                        ("--webhook-backoff", args.webhook_backoff)):  # fmt: skip
        if not value > 0:
            raise InputError(f"{name} must be > 0, got {value}")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before any worker starts (port 0: a free port, logged)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ServeState, create_app
    from .modelinfo import describe
    from .supervisor import Supervisor, worker_command
    from .webhooks import Deliverer, load_secret

    check_serve_options(args)
    sock = listen(args.host, args.port)
    data = prepare_data(args.data)
    queue = open_queue(args.db, data)
    queue.create_schema()
    secret = load_secret(data, args.webhook_secret)
    options = ["--data", str(data), "--lease", str(args.lease), *model_options(args)]
    env = {**os.environ, DB_ENV: queue.url}
    supervisor = Supervisor(queue, args.workers, worker_command(global_flags(args), options), env=env)
    supervisor.start()  # the workers load the model while the config is read
    try:
        model = describe(args.ckpt_dir, args.few_step)
    except BaseException:
        supervisor.stop()
        raise
    state = ServeState(queue, data, model, token=args.token, max_upload=int(args.max_upload_mb * 2**20),
                       max_pixels=args.max_pixels, lease_s=args.lease, workers=args.workers)  # fmt: skip
    app = create_app(state)
    deliverer = Deliverer(queue, secret, retries=args.webhook_retries, backoff=args.webhook_backoff)
    deliverer.start()
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    log.warning("segue serve: %s (model %s, %d worker%s, data %s, queue %s)", url, model.name, args.workers,
                "s" * (args.workers != 1), data, queue.url.split("@")[-1])  # fmt: skip
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", access_log=args.verbose,
                            timeout_graceful_shutdown=5)  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        deliverer.stop()
        supervisor.stop()
    return 0


def worker(args: argparse.Namespace) -> int:

    db = args.db or os.environ.get(DB_ENV)
    if args.lease <= 0:
        raise InputError(f"--lease must be > 0, got {args.lease}")
    data = prepare_data(args.data)
    queue = open_queue(db, data)
    queue.create_schema()
    if args.worker_id is None:
        return supervise_workers(args, queue, data)
    return run_worker(args, queue, data)


def supervise_workers(args: argparse.Namespace, queue: Queue, data: Path) -> int:
    """``segue worker --workers N``: N supervised workers and no API, until SIGTERM or Ctrl-C."""
    from .supervisor import Supervisor, worker_command

    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    options = ["--data", str(data), "--lease", str(args.lease), *model_options(args)]
    supervisor = Supervisor(queue, args.workers, worker_command(global_flags(args), options),
                            env={**os.environ, DB_ENV: queue.url})  # fmt: skip
    supervisor.start()
    log.info("segue worker: %d worker%s on %s", args.workers, "s" * (args.workers != 1), queue.url.split("@")[-1])
    try:
        while supervisor.is_alive():
            supervisor.join(timeout=1)
    finally:
        supervisor.stop()
    return 0


def run_worker(args: argparse.Namespace, queue: Queue, data: Path) -> int:
    """One worker in this process: load the model once, then render jobs until stopped."""
    import torch

    from ..accel.options import SpeedOptions
    from ..loader import load
    from .worker import Worker

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load(args.ckpt_dir, device=device, dtype=args.dtype, speed=SpeedOptions.from_args(args))
    log.info("worker %s: model %s ready in %.1fs", args.worker_id, pipe.config.name, time.perf_counter() - t0)
    Worker(queue, data, pipe, args.worker_id, lease_s=args.lease, parent_pid=args.parent_pid).run()
    return 0
