"""Command line: `watcher run` (the daemon) and `watcher demo` (embedded S3 + samples)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from watcher.core.settings import Settings, SettingsError, load_settings, settings_help

if TYPE_CHECKING:
    from watcher.service.daemon import Daemon

# Exit statuses, the same in every mode: 1 is about documents (`--once`: an error
# record or a document not finished), 2 about the set-up (settings, a port, S3 that
# cannot be listed, an engine that does not start).
EXIT_UNFINISHED = 1
EXIT_CONFIG = 2


def _settings() -> Settings | None:
    """The settings, or None after saying on stderr what is wrong with them."""
    try:
        return load_settings()
    except SettingsError as exc:
        for line in exc.lines:
            print(f"watcher: {line}", file=sys.stderr)
        return None


def _check() -> int:
    settings = _settings()
    if settings is None:
        return EXIT_CONFIG
    from watcher.cli.check import run_check

    return run_check(settings)


def _run(once: bool = False) -> int:
    settings = _settings()
    if settings is None:
        return EXIT_CONFIG

    from watcher.core.logs import configure_logging
    from watcher.service.console import stop_summary
    from watcher.service.daemon import Daemon

    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    if ":" not in settings.s3_access_key.get_secret_value():
        # Cloud.ru signs with "<tenant_id>:<key_id>"; a bare key id is a common copy slip
        # there, while other S3 providers use bare ids, so warn rather than refuse.
        from watcher.core.logs import get_logger

        get_logger("watcher").warning(
            "access_key_not_cloudru_form",
            hint="Cloud.ru expects CLOUDRU_S3_ACCESS_KEY as <tenant_id>:<key_id>",
        )

    async def main() -> Daemon:
        daemon = Daemon(settings, once=once)
        daemon.install_signal_handlers()
        await daemon.run()
        return daemon

    try:
        daemon = asyncio.run(main())
    except OSError as exc:
        # Nearly always the health port being taken; say so in one line, not a traceback.
        print(f"watcher: cannot start: {start_error(exc, settings.http_host, settings.http_port)}",
              file=sys.stderr)
        return EXIT_CONFIG
    if once:
        return _once_report(daemon)
    if daemon.for_people:
        for line in stop_summary(daemon.stopped()):
            print(line, flush=True)
    return 0


def start_error(exc: OSError, host: str, port: int, option: str = "WATCHER_HTTP_PORT") -> str:
    """Nearly always the health port being taken: say which setting moves it."""
    if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
        return f"cannot listen on {host}:{port}: {exc.strerror}; set {option} to a free port"
    return str(exc)


def _once_report(daemon: Daemon) -> int:
    """The summary on stderr (stdout keeps the JSON logs), and the exit status."""
    from watcher.service.console import once_summary

    run = daemon.once_run()
    for line in once_summary(run):
        print(f"watcher: {line}", file=sys.stderr)
    if daemon.start_problem:
        return EXIT_CONFIG
    if run.failures or run.unfinished or run.earlier_errors or run.reason:
        return EXIT_UNFINISHED
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="watcher", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the daemon against the S3 endpoint in the environment",
        description="Run the daemon. Its settings come from environment variables "
        "(or files in WATCHER_SECRETS_DIR).",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--once", action="store_true",
                     help="process everything pending, print a summary, drain and exit: 0 when "
                     "every document has a result, 1 when any got an error record (in this run "
                     "or an earlier one) or could not be finished, 2 when the settings, the "
                     "health port, S3 or the engine kept it from starting")
    sub.add_parser(
        "check", help="check the configuration, S3 access and the engine before deploying",
        description="Validate the settings (as `watcher run` reads them), then probe S3 "
        "(credentials, bucket, list/write/delete under the prefixes, conditional writes, "
        "clock skew) and the engine, one line each. Exit 0 when all pass, 1 when any fails, "
        "2 for bad settings.",
    )
    demo = sub.add_parser("demo", help="embedded SeaweedFS + CPU engine + the sample documents")
    demo.add_argument("--keep-running", action="store_true",
                      help="keep the daemon and S3 server up after the samples are done")
    demo.add_argument("--http-port", type=int, default=8081, help="port of /health (default 8081)")
    demo.add_argument("--s3-port", type=int, default=0,
                      help="port of the embedded S3 server (default: a free one, new each run)")
    demo.add_argument("--data-dir", type=Path, default=None,
                      help="keep the S3 server's data here across runs (default: a temporary "
                      "directory, deleted when the demo stops)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check()
    if args.command == "run":
        return _run(once=args.once)
    from watcher.cli.demo import DemoCannotStart, run_demo

    try:
        return run_demo(keep_running=args.keep_running, http_port=args.http_port,
                        s3_port=args.s3_port, data_dir=args.data_dir)
    except DemoCannotStart as exc:
        print(f"watcher: cannot start the demo: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        why = start_error(exc, "127.0.0.1", args.http_port, "--http-port")
        print(f"watcher: cannot start the demo: {why}", file=sys.stderr)
        return EXIT_CONFIG

