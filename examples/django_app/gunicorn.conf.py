"""gunicorn settings for the Django example: ``gunicorn -c gunicorn.conf.py``.

``post_fork`` marks each new process as a worker (so the manager starts when the app
loads in it, or right here with ``preload_app``); ``worker_exit`` stops it gracefully
when the worker exits. See ``examples/flask_app/gunicorn.conf.py`` for the details.
"""

from dim.contrib import post_fork, worker_exit

__all__ = ["post_fork", "worker_exit"]  # gunicorn looks the hooks up by name

wsgi_app = "wsgi:application"
bind = "127.0.0.1:8000"
workers = 2
graceful_timeout = 20  # longer than dim's disconnect_timeout (10 s by default)
