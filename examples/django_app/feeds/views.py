"""``/dim/``: the pid, node and feeds of the worker that answers."""

import os

from django.http import HttpRequest, JsonResponse

import dim.contrib.django


def where(request: HttpRequest) -> JsonResponse:
    manager = dim.contrib.django.manager()
    return JsonResponse(
        {
            "pid": os.getpid(),
            "node": manager.node_id,
            "leader": manager.is_leader,
            "instances": sorted(manager.instances),
        }
    )
