"""`mvit serve`: the model loaded once, answering over HTTP (the API and a web page; see docs/serving.md)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer

from mvit.cli.common import PRECISION_HELP, PrecisionChoice, device_option, load_model, model_option
from mvit.cli.output import say
from mvit.errors import MvitError
from mvit.serve.settings import TOKEN_ENV, ServeSettings, is_loopback

DEFAULTS = {name: field.default for name, field in ServeSettings.model_fields.items()}


def serve_command(
    model_file: Optional[Path] = model_option(),
    host: str = typer.Option(DEFAULTS["host"], "--host", help="address to listen on; any but a loopback address needs a token"),
    port: int = typer.Option(DEFAULTS["port"], "--port", min=0, max=65535, help="port to listen on; 0 for any free port (printed)"),
    token: Optional[str] = typer.Option(None, "--token", envvar=TOKEN_ENV, show_envvar=True,
                                        help=f"the token every /v1 request must send as `Authorization: Bearer TOKEN` (16 characters or more); prefer ${TOKEN_ENV}, which `ps` does not show"),
    workers: int = typer.Option(DEFAULTS["workers"], "--workers", min=1, max=64, help="processes, each with its own copy of the model, sharing the CPU cores"),
    precision: PrecisionChoice = typer.Option(PrecisionChoice.auto, "--precision", help=PRECISION_HELP),
    device: str = device_option(),
    max_batch: int = typer.Option(DEFAULTS["max_batch"], "--max-batch", min=1, help="most images in one backbone pass"),
    max_wait_ms: float = typer.Option(DEFAULTS["max_wait_ms"], "--max-wait-ms", min=0.0, help="how long an image may wait for others to join its batch"),
    model_threads: int = typer.Option(DEFAULTS["model_threads"], "--model-threads", min=0, max=64, help="threads running batches, sharing the cores; 0: two on a CPU, one on a GPU"),
    max_queue: int = typer.Option(DEFAULTS["max_queue"], "--max-queue", min=1, help="images accepted and not yet answered; beyond, requests get 503 and Retry-After"),
    max_upload_mb: float = typer.Option(DEFAULTS["max_upload_bytes"] / 2**20, "--max-upload-mb", min=0.001, help="largest request body, in MiB (413 above)"),
    max_images: int = typer.Option(DEFAULTS["max_images"], "--max-images", min=1, help="most files in one /v1/predict request"),
    max_pixels: int = typer.Option(DEFAULTS["max_pixels"], "--max-pixels", min=1, help="largest image, in pixels, read from its header before decoding (413 above)"),
    body_timeout_s: float = typer.Option(DEFAULTS["body_timeout_s"], "--body-timeout-s", help="seconds a request's body may take to arrive (408 after, freeing its place in the queue)"),
    max_client_requests: int = typer.Option(DEFAULTS["max_client_requests"], "--max-client-requests", min=1, help="upload requests in flight per client address (429 and Retry-After above)"),
    root_path: str = typer.Option("", "--root-path", help="the path prefix a reverse proxy serves mvit under, e.g. /mvit"),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="a Host header to accept (repeat; default: the loopback names on loopback, else any)"),
    log_level: str = typer.Option("info", "--log-level", help="the server's log: critical, error, warning, info or debug"),
) -> None:
    """Serve the model over HTTP: a JSON API under /v1 and a web page at /. Ctrl+C or SIGTERM stops it after the requests in flight."""
    try:
        import uvicorn
    except ImportError:
        raise MvitError("`mvit serve` needs the serve extra: pip install 'mvit[serve]'") from None
    from pydantic import ValidationError

    try:
        settings = ServeSettings(
            model=model_file, host=host, port=port, token=token, device=device, precision=precision.value, workers=workers,
            max_batch=max_batch, max_wait_ms=max_wait_ms, model_threads=model_threads, max_queue=max_queue, max_upload_bytes=round(max_upload_mb * 2**20),
            max_images=max_images, max_pixels=max_pixels, body_timeout_s=body_timeout_s, max_client_requests=max_client_requests, root_path=root_path.rstrip("/"), allowed_hosts=tuple(allowed_host),
        )
    except ValidationError as error:
        first = error.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        raise MvitError(where + first["msg"].removeprefix("Value error, ")) from None
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise MvitError(f"--log-level is critical, error, warning, info or debug, got {log_level!r}")
    listening = _bind(host, port)  # before the model loads: a taken port fails at once
    model = load_model(model_file, device)
    config = dict(log_level=log_level, proxy_headers=True, timeout_graceful_shutdown=30, server_header=False)
    address = f"[{host}]" if ":" in host else host
    say(f"mvit serves {model_file or 'the bundled model'} on http://{address}:{listening.getsockname()[1]}{settings.root_path}/ "
        f"(the API under /v1, its docs at /docs){'' if is_loopback(host) else ', token required'}; Ctrl+C stops it")
    try:
        if workers == 1:
            from mvit.serve.app import create_app

            uvicorn.Server(uvicorn.Config(create_app(model, settings), **config)).run(sockets=[listening])
        else:  # each worker loads its own model: this one only checked that the file loads
            import os

            from mvit.serve.app import SETTINGS_ENV

            del model
            os.environ[SETTINGS_ENV] = settings.model_dump_json()
            uvicorn.run("mvit.serve.app:app_from_environment", factory=True, workers=workers, fd=listening.fileno(), **config)
    except KeyboardInterrupt:  # Ctrl+C: the server finished its requests and stopped, as asked
        pass
    say("mvit serve stopped")


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or one sentence saying why it cannot be."""
    try:
        family, kind, protocol, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise MvitError(f"--host {host} is not an address or a name this machine can resolve") from None
    # the protocol named (TCP), not left 0: asyncio then sets TCP_NODELAY on each connection, without
    # which a keep-alive client's delayed ACK held every answer about 40 ms
    listening = socket.socket(family, kind, protocol)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        if error.errno == 98:  # EADDRINUSE
            raise MvitError(f"port {port} on {host} is in use by another program; choose another --port") from None
        raise MvitError(f"cannot listen on {host}:{port}: {error.strerror}; choose another --host or --port") from None
    listening.set_inheritable(True)  # worker processes accept on it too
    return listening
