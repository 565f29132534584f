"""WSGI entry point: ``gunicorn -c gunicorn.conf.py`` serves ``wsgi:application``.

Nothing dim-specific here: ``DimConfig.ready()`` (run by ``get_wsgi_application``) sets
the manager up, and gunicorn's ``post_fork`` hook starts it in each worker.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")

application = get_wsgi_application()
