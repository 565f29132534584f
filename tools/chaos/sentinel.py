"""Redis Sentinels for the chaos run's Sentinel failover, and small Redis helpers."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import redis

from dim.testing import find_redis_server, free_port

__all__ = ["SENTINEL_MASTER", "SentinelProcess", "redis_command", "redis_info", "sentinel_pairs"]


SENTINEL_MASTER = "dimmaster"


class SentinelProcess:
    """One Redis Sentinel (``redis-sentinel``, else ``redis-server --sentinel``) on a free
    loopback port, watching the master at ``master_port`` (quorum 2)."""

    def __init__(self, directory: Path, master_port: int, down_after_ms: int = 1000) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "sentinel.conf"  # Sentinel rewrites it: it must be writable
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "daemonize no\n"
            f"dir {directory}\n"
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {down_after_ms}\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
            f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
        )
        binary = shutil.which("redis-sentinel")
        args = [binary, str(conf)] if binary else [find_redis_server(), str(conf), "--sentinel"]
        self.log = directory / "sentinel.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        self.client = redis.Redis(
            port=self.port, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready(self, others: int) -> bool:
        """It knows a replica that is up and ``others`` other Sentinels."""
        try:
            master = redis_command(self.client, "SENTINEL", "MASTER", SENTINEL_MASTER)
            replicas = redis_command(self.client, "SENTINEL", "REPLICAS", SENTINEL_MASTER)
        except redis.RedisError:
            return False
        info = sentinel_pairs(master)
        if int(info.get("num-other-sentinels", 0)) < others:
            return False
        for replica in replicas or []:
            flags = str(sentinel_pairs(replica).get("flags", ""))
            if "disconnected" not in flags and "s_down" not in flags:
                return True
        return False

    def master_port(self) -> Optional[int]:
        try:
            addr = redis_command(
                self.client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER
            )
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def sentinel_pairs(reply: Any) -> dict[str, Any]:
    """A Sentinel reply (a flat list of names and values, or a dict) as a dict."""
    if isinstance(reply, dict):
        return {str(k): v for k, v in reply.items()}
    items = list(reply or [])
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def redis_command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def redis_info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))
