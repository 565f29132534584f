"""The Lua scripts (``dim/lua/*.lua``, package data), each headed by its contract.

Every read-then-write dim makes in Redis is one of these scripts, so it is atomic and
checks ownership (claim token, leader epoch) in the same step as the write. Time comes
from the server (``TIME``), never from a client clock. Each script names its keys and
arguments as locals at its top; the node scripts start with ``check.lua`` (the era
check, see :mod:`dim.era`), and most with ``prelude.lua`` (shared helpers).

Numbers: Redis Lua numbers are doubles, exact up to 2**53, and tokens are microseconds
since the epoch (about 2**51), so they are formatted with ``%.0f`` before they become
strings (``tostring`` would switch to exponent notation past 14 digits).
"""

from __future__ import annotations

from importlib import resources


def _read(name: str) -> str:
    lua = resources.files("dim").joinpath("lua")
    return lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _script(name: str, *, checked: bool = True, prelude: bool = True) -> str:
    parts = ([_read("prelude")] if prelude or checked else []) + (
        [_read("check")] if checked else []
    )
    return "".join(parts) + _read(name)


HEARTBEAT = _script("heartbeat")
CLAIM = _script("claim")
RETOKEN = _script("retoken")
SETTLE = _script("settle")
RELEASE = _script("release")
LEADER_WRITE = _script("leader_write")
READ_DESIRED = _script("read_desired")
LEADER_READ = _script("leader_read", checked=False)
REPORT_FAILURE = _script("report_failure", checked=False)
FORGET = _script("forget", checked=False)
LEAVE = _script("leave", checked=False, prelude=False)
REPAIR_READ = _script("repair_read", checked=False, prelude=False)
RESIGN = _script("resign", checked=False, prelude=False)
