"""The leader's configs: ``get_config`` and the placement rules, off the leader's thread.

:class:`ConfigSource` owns every call into the user's config code. ``get_config`` (with
``key`` and the placement rules) runs on a thread of its own, one call at a time, with
``config_timeout``: the leader goes on balancing with the last good config meanwhile,
and never holds its lock across user code. Bad items are reported and keep their last
good version.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from dim.configs import Config, KeyFunc, Parsed, decode, parse
from dim.constraints import Rules
from dim.errors import CallTimeout, ConfigError
from dim.events import Event, EventType
from dim.logs import NodeLog
from dim.settings import Settings
from dim.usercode import Call, Runners

log = logging.getLogger("dim.leader")


class ConfigSource:
    """The last good configs and what each requires; one writer: the leader's thread."""

    def __init__(
        self,
        node_id: str,
        settings: Settings,
        clock: Callable[[], float],
        emit: Callable[[Event], None],
        get_config: Callable[[], Any],
        key: Optional[KeyFunc],
        rules: Optional[Rules] = None,
        wake: Optional[Callable[[], None]] = None,
    ) -> None:
        self._node_id = node_id
        # the leader's loop: a finished call is taken at once, not at the next heartbeat
        self._wake = wake
        self._log = NodeLog(log, node_id)
        self._settings = settings
        self._clock = clock
        self._emit = emit
        self._get_config = get_config
        self._key = key
        self._rules = rules or Rules(None, None)
        self._runners = Runners(f"dim-config-{node_id}", keep=1)
        self._rules_for: Optional[dict[str, Config]] = None  # configs the rules were read for
        self.required: dict[str, frozenset[str]] = {}  # config -> tags it requires
        self.priority: dict[str, int] = {}  # config -> priority (when not 0)
        # rules over the stored configs: (the configs, started, the call)
        self._rules_call: Optional[tuple[dict[str, Config], float, Call]] = None
        self.final = False  # in final_rebalance: wait for no user code
        self._stored: tuple[Optional[dict[str, str]], dict[str, Config]] = (None, {})
        self._loading: Optional[tuple[float, Call]] = None  # (started, the call) in flight
        self._overdue = False  # the call in flight overran config_timeout (reported)
        self._refresh = True
        self.good: Optional[dict[str, Config]] = None  # last good get_config result

    @property
    def loading(self) -> bool:
        """A get_config call is in flight."""
        return self._loading is not None

    def request_refresh(self) -> None:
        """Call get_config at the next :meth:`collect`."""
        self._refresh = True

    def needs_rules(self, configs: dict[str, Config]) -> bool:
        """Rules are configured and were not read for these configs (read from Redis)."""
        return self._rules.active and configs is not self._rules_for

    def close(self) -> None:
        """Let the config thread go (a get_config still running is abandoned)."""
        loading, self._loading = self._loading, None
        if loading is not None:
            loading[1].abandon()
        self._runners.close()

    def collect(self, written: dict[str, str]) -> None:
        """Start ``get_config`` when asked and none runs; take its result once it is done.

        One call at a time: a call that overruns ``config_timeout`` is reported and
        abandoned (the last good config stays), and no other starts until it returns,
        so a hanging ``get_config`` costs one thread, not one per interval.
        """
        loading = self._loading
        if loading is None:
            if self._refresh:
                self._refresh = False
                self._loading = (
                    self._clock(),
                    self._runners.start(self._load, None, on_done=self._wake),
                )
            return
        started, call = loading
        if call.done.is_set():
            self._loading = None
            if self._overdue:
                self._overdue = False
                self._log.warning(
                    "get_config returned after %.1fs, over config_timeout: its result is not used",
                    self._clock() - started,
                )
                return
            self._apply_config(call, written)
        elif self._clock() - started > self._settings.config_timeout and not self._overdue:
            self._overdue = True
            call.abandon()
            self._config_error(
                CallTimeout(
                    f"get_config did not return within {self._settings.config_timeout:g} s"
                ),
                self.known(written),
            )

    def _load(
        self, _: object
    ) -> tuple[Parsed, dict[str, frozenset[str]], dict[str, int], dict[str, ConfigError]]:
        """On the config thread: every piece of user code that reads the configs."""
        parsed = parse(self._get_config(), self._key)
        required, priority, errors = self._rules.evaluate_each(parsed.configs)
        return parsed, required, priority, errors

    def known(self, written: dict[str, str]) -> dict[str, Config]:
        """The last good configs: from get_config, else as stored in Redis (decoded once
        per read, so the placement rules run once per change)."""
        if self.good is not None:
            return self.good
        stored_for, configs = self._stored
        if written is not stored_for:
            configs = {}
            for ckey, text in written.items():
                config = decode(ckey, text)
                if config is not None:
                    configs[ckey] = config
            self._stored = (written, configs)
        return configs

    def stored_rules(self, configs: dict[str, Config]) -> None:
        """Evaluate the placement rules (user code) over configs read back from Redis.

        Like get_config, the rules run on the config thread, one call at a time, and the
        leader does not wait for them: it waits at most a heartbeat (nothing on a
        graceful stop), then goes on with the rules known so far and picks the result
        up on a later tick. A call past ``config_timeout`` is reported; a rule that
        fails for one config leaves that config without rules, not the others."""
        pending = self._rules_call
        if pending is None or (pending[2].done.is_set() and pending[0] is not configs):
            call = self._runners.start(self._rules.evaluate_each, configs, on_done=self._wake)
            pending = self._rules_call = (configs, self._clock(), call)
        for_configs, started, call = pending
        if not call.done.is_set() and not self.final:
            call.done.wait(min(self._settings.heartbeat_interval, self._settings.config_timeout))
        if not call.done.is_set():
            overdue = self._clock() - started > self._settings.config_timeout
            if overdue and not call.abandoned and call.abandon():
                self._log.error(
                    "placement rules over the stored configs did not return within %gs: "
                    "placing without them until they do",
                    self._settings.config_timeout,
                )
            return
        if for_configs is not configs:
            return  # the next tick starts the call for these
        try:
            required, priority, errors = call.outcome("placement rules")
        except Exception as exc:
            self._log.error("placement rules failed on the stored configs: %s", exc)
            required, priority, errors = {}, {}, {}
        for error in errors.values():
            self._log.error("placement rule failed on a stored config: %s", error)
        self.required, self.priority = required, priority
        self._rules_for = configs

    def _config_error(self, error: Exception, kept: dict[str, Config]) -> None:
        if not isinstance(error, ConfigError):
            wrapped = ConfigError(f"get_config failed: {error!r}", error)
            wrapped.__cause__ = error
            error = wrapped
        self._log.error(
            "node %s: %s; keeping the last good config (%d configs)",
            self._node_id,
            error,
            len(kept),
        )
        self._emit(Event(EventType.CONFIG_ERROR, self._node_id, error=error))

    def _apply_config(self, call: Call, written: dict[str, str]) -> None:
        """Take a finished get_config call: good items apply, each bad item is reported
        and keeps its last good version (if it had one)."""
        previous = self.known(written)
        try:
            parsed, required, priority, rule_errors = call.outcome("get_config")
        except Exception as exc:
            self._config_error(exc, previous)
            return
        bad = set(parsed.bad_ids) | set(rule_errors)
        configs: dict[str, Config] = {}
        for ckey, config in parsed.configs.items():
            if ckey not in bad:
                configs[ckey] = config
        kept = [c for c in sorted(bad) if c in previous]
        for ckey in kept:
            configs[ckey] = previous[ckey]
            if ckey in self.required:
                required[ckey] = self.required[ckey]
            if ckey in self.priority:
                priority[ckey] = self.priority[ckey]
        errors = [*parsed.errors, *rule_errors.values()]
        for error in errors[:20]:
            self._log.error("node %s: %s", self._node_id, error)
            self._emit(
                Event(
                    EventType.CONFIG_ERROR,
                    self._node_id,
                    config_id=error.value if not isinstance(error.value, (dict, list)) else None,
                    error=error,
                )
            )
        if len(errors) > 20:
            self._log.error("node %s: %d more bad configs", self._node_id, len(errors) - 20)
        if errors:
            self._log.warning(
                "%d bad configs left out (%d keep their last good version)", len(errors), len(kept)
            )
        if self.good is not None and list(configs) != list(self.good):
            self._log.info("config changed: %d configs (was %d)", len(configs), len(self.good))
        self.good = configs
        self._rules_for, self.required, self.priority = configs, required, priority
