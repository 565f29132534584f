"""Settings of a minimal Django project that runs feeds through dim.

Everything dim needs is ``"dim.contrib.django"`` in ``INSTALLED_APPS`` and the ``DIM``
dict below (``manage.py check`` reports any mistake in it). Environment: ``DIM_REDIS_URL`` (default
``redis://localhost:6379/0``), ``DIM_SERVICE`` (default ``django-feeds``),
``DIM_SETTINGS`` (JSON of dim.Settings fields), ``FEEDS`` and ``FEEDS_LEDGER`` (see
``feeds/instances.py``).
"""

import json
import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "urls"
WSGI_APPLICATION = "wsgi.application"
USE_TZ = True

INSTALLED_APPS = [
    "dim.contrib.django",  # before the apps that use it in their ready()
    "feeds",
]
MIDDLEWARE: list = []
DATABASES: dict = {}

DIM = {
    "REDIS_URL": os.environ.get("DIM_REDIS_URL", "redis://localhost:6379/0"),
    "SERVICE": os.environ.get("DIM_SERVICE", "django-feeds"),
    "GET_CONFIG": "feeds.instances.get_config",
    "CREATE": "feeds.instances.create",
    "HEALTHCHECK": "feeds.instances.healthcheck",
    "DISCONNECT": "feeds.instances.disconnect",
    "SETTINGS": json.loads(os.environ.get("DIM_SETTINGS", "{}")),
    # None (the default): start when the process serves (gunicorn: at worker boot with
    # the hooks in gunicorn.conf.py); management commands never start it.
    "AUTOSTART": None,
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "dim": {"handlers": ["console"], "level": "WARNING"},
        "feeds": {"handlers": ["console"], "level": "INFO"},
    },
}
