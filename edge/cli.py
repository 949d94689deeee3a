"""``welltegra-agent``: run the edge agent and look after its buffer.

    welltegra-agent run -c FILE               collect, buffer and upload until SIGINT/SIGTERM
    welltegra-agent check-config -c FILE      load the configuration, print a summary
    welltegra-agent test-connections -c FILE  token, gateway health, each data source
    welltegra-agent buffer stats -c FILE      what the buffer holds (--json for a machine)
    welltegra-agent buffer check -c FILE      integrity check; damaged batches are set aside
    welltegra-agent buffer export -c FILE     pending batches as JSON lines, for support

A configuration error is printed with its file and key path and exits with status 2; a failed
connection test exits with status 1. Nothing else here calls ``sys.exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from edge.agent import Agent, freeze_long_lived, open_buffer, token_client, uploader_settings
from edge.buffer import BufferError, BufferStats
from edge.collectors.base import CollectorError
from edge.config import AgentConfig, AgentConfigError, LoggingConfig, load_agent_config
from edge.oauth import TokenError
from edge.uploader import gateway_health

__all__ = ["configure_logging", "main"]

log = logging.getLogger("welltegra_agent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="welltegra-agent", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str, target: Any = commands) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = target.add_parser(name, help=help_text)
        command.add_argument("-c", "--config", type=Path, required=True, help="config.yaml")
        return command

    with_config("run", "collect, buffer and upload until stopped")
    with_config("check-config", "load the configuration and print a summary")
    with_config("test-connections", "check the token, the gateway and every data source")
    buffer = commands.add_parser("buffer", help="inspect the local buffer")
    buffer_commands = buffer.add_subparsers(dest="buffer_command", required=True)
    stats = with_config("stats", "what the buffer holds", buffer_commands)
    stats.add_argument("--json", action="store_true", help="one JSON object")
    with_config("check", "integrity check; damaged batches go to the dead letters", buffer_commands)
    with_config("export", "pending batches as JSON lines on stdout", buffer_commands)
    return parser


class _Redact(logging.Filter):
    """Defence in depth: a secret that reaches a log line anyway is masked."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self._secrets):
            for secret in self._secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: LoggingConfig, secrets: Sequence[str] = ()) -> None:
    """Console always; a rotating file when ``logging.file`` is set."""
    if settings.format == "json":
        formatter: logging.Formatter = _JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                settings.file,
                maxBytes=settings.max_size_mb * 1024 * 1024,
                backupCount=settings.backup_count,
                encoding="utf-8",
            )
        )
    redact = _Redact(secrets)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redact)
    logging.basicConfig(level=settings.level, handlers=handlers, force=True)


async def _run(config: AgentConfig) -> None:
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await agent.start()
        freeze_long_lived()
        await stop.wait()
        log.info("stopping: sealing open data, unsent batches stay in the buffer")
    finally:
        await agent.stop()


async def _test_connections(config: AgentConfig) -> bool:
    ok = True

    def report(what: str, error: str | None, detail: str = "") -> None:
        nonlocal ok
        ok = ok and error is None
        print(f"{what:<32} {'ok' if error is None else 'FAILED'}  {error or detail}")

    tokens = token_client(config)
    try:
        await tokens.token()
        report("oauth token", None, config.oauth.token_url)
    except TokenError as exc:
        report("oauth token", str(exc))
    finally:
        await tokens.aclose()
    try:
        status = await gateway_health(uploader_settings(config))
        report("gateway", None if status == "SERVING" else status, config.api.grpc_target)
    except grpc.aio.AioRpcError as exc:
        report("gateway", f"{config.api.grpc_target}: {exc.code().name}: {exc.details()}")
    for source in config.data_sources:
        name = f"source {source.name}"
        if not source.enabled:
            print(f"{name:<32} skipped (disabled)")
            continue
        try:
            report(name, None, await asyncio.wait_for(source.build().probe(), timeout=30))
        except (CollectorError, TimeoutError, OSError) as exc:
            report(name, str(exc) or type(exc).__name__)
    return ok


def _format_stats(stats: BufferStats) -> str:
    def when(instant: float | None) -> str:
        return "-" if instant is None else datetime.fromtimestamp(instant, UTC).isoformat()

    per_point = stats.bytes_per_point
    return "\n".join(
        [
            f"buffer             {stats.path}",
            f"agent id           {stats.agent_id}",
            f"pending            {stats.pending_batches} batches, {stats.pending_points} points,"
            f" {stats.pending_gap_records} loss records",
            f"oldest batch       {when(stats.oldest_sealed_at)}",
            f"points from        {when(stats.oldest_point)} to {when(stats.newest_point)}",
            f"dead letters       {stats.dead_letter_batches} batches,"
            f" {stats.dead_letter_points} points",
            f"size               {stats.used_bytes} bytes used, {stats.file_bytes} on disk"
            + (f" ({per_point:.1f} bytes/point)" if per_point else ""),
            f"watermarks         {stats.watermarks}",
            f"next sequence      {stats.next_sequence}",
        ]
    )


async def _buffer_command(config: AgentConfig, command: str, as_json: bool) -> int:
    buffer = await open_buffer(config)
    try:
        if command == "stats":
            stats = await buffer.stats()
            print(json.dumps(stats.as_dict()) if as_json else _format_stats(stats))
        elif command == "check":
            report = await buffer.check()
            print(f"integrity: {report.integrity}")
            print(f"batches checked: {report.batches_checked}")
            if report.quarantined:
                print(f"damaged batches set aside in the dead letters: {report.quarantined}")
                return 1
        else:
            async for line in buffer.export():
                print(line)
    finally:
        await buffer.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_agent_config(args.config)
    except AgentConfigError as exc:
        print(f"welltegra-agent: configuration error:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(config.logging, [config.oauth.client_secret.get_secret_value()])
    try:
        if args.command == "check-config":
            print(config.summary())
            return 0
        if args.command == "test-connections":
            return 0 if asyncio.run(_test_connections(config)) else 1
        if args.command == "buffer":
            return asyncio.run(
                _buffer_command(config, args.buffer_command, getattr(args, "json", False))
            )
        asyncio.run(_run(config))
    except BufferError as exc:
        print(f"welltegra-agent: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
