"""The feeds app: logs where its feeds start and stop."""

import logging

from django.apps import AppConfig

import dim.contrib.django
from dim import Event, EventType

log = logging.getLogger("feeds")


def log_event(event: Event) -> None:
    log.info("%s %s on %s", event.type.value, event.config_id, event.node_id)


class FeedsConfig(AppConfig):
    name = "feeds"

    def ready(self) -> None:
        # DimConfig comes first in INSTALLED_APPS, so its ready() has built the manager
        dim.contrib.django.add_listener(
            log_event, EventType.INSTANCE_CREATED, EventType.INSTANCE_DISCONNECTED
        )
