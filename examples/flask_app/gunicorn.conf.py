"""gunicorn settings for the Flask example: ``gunicorn -c gunicorn.conf.py``.

The two dim hooks are all a dim app needs under gunicorn:

* ``post_fork`` marks the new process as a worker and starts the managers that waited
  for one. With ``preload_app`` the app was imported in the master, where dim does not
  start (threads do not survive ``fork()``, and the master must not run instances); each
  worker starts its own manager here. Without ``preload_app`` the app is imported after
  this hook, in the worker, and its manager starts at once.
* ``worker_exit`` stops the worker's manager gracefully (disconnect every instance,
  release the claims, leave the cluster) when the worker exits: SIGTERM or SIGINT to the
  master, ``max_requests``, a reload with SIGHUP. A worker killed with SIGKILL runs no
  hook: its instances move to the other workers once its lease expires (``node_ttl``).

If your config file already defines these hooks, call ``dim.contrib.post_fork(server,
worker)`` and ``dim.contrib.worker_exit(server, worker)`` from yours.
"""

from dim.contrib import post_fork, worker_exit

__all__ = ["post_fork", "worker_exit"]  # gunicorn looks the hooks up by name

wsgi_app = "app:app"
bind = "127.0.0.1:8000"
workers = 3
preload_app = True  # fine with dim: see post_fork above
graceful_timeout = 20  # longer than dim's disconnect_timeout (10 s by default)
