"""A chaos harness for dim: real node processes, a real Redis, real faults, and a checker.

Not installed with dim: run it from the repository root (``python -m tools.chaos run``
or ``python -m tools.chaos node``). The pieces, each usable on its own (the test suite
and the benchmarks use them too):

* **Ledgers** (:mod:`tools.chaos.ledger`). Every node process appends one JSON line per
  lifecycle event to a ledger file (:class:`~tools.chaos.ledger.LedgerFile`, one
  ``os.write`` per line on an ``O_APPEND`` descriptor)::

      {"t": <time.monotonic()>, "pid": ..., "node": <node id>, "id": <config id>,
       "ev": "create" | "disconnect", "token": <fencing token>, "inst": <serial>}

  plus ``ready``/``stopped`` lines, ``event`` lines for the dim events that explain
  faults (``fenced``, ``disconnect_timeout``, ``redis_reset``...), ``disconnecting``
  lines when a slowed or raising ``disconnect`` is called, and ``get_config`` lines
  while the control file asks for them. ``time.monotonic()`` is system-wide on Linux,
  so times of different processes compare. In-process clusters of the tests write the
  same records to a :class:`~tools.chaos.ledger.MemoryLedger`. The harness keeps a
  ledger of its own (``harness.jsonl``) with what it did: the run's settings, each
  fault (start, end, when the cluster had settled again), processes killed, paused or
  exited, and what Redis held at the end.
* **The node** (``python -m tools.chaos node ...``, :mod:`tools.chaos.node`): real
  :class:`dim.Manager` s whose ``create`` and ``disconnect`` write the ledger; the one
  node program of the chaos run, the process tests and the benchmarks. A small JSON
  *control file* (:mod:`tools.chaos.control`), re-read whenever it changes, makes
  ``get_config`` fail or hang, ``create`` fail for some configs, any callback raise a
  ``BaseException``, ``healthcheck`` report some instances unhealthy or hang,
  ``create``/``disconnect`` slow, the config count change, or the process's wall clock
  step. It reaches Redis by URL or through Sentinel (``--sentinel``).
* **The proxy** (:class:`tools.chaos.proxy.ChaosProxy`): a TCP proxy between one node
  (or all) and Redis that can add latency, stall all traffic, drop every connection,
  hold back the heartbeats of one node, or be re-pointed at another server (a
  failover). The run gives each node a proxy of its own, so one node can be cut off.
* **The processes** (:class:`tools.chaos.processes.NodeProcs`): start, kill -9,
  SIGSTOP/SIGCONT, SIGTERM node processes, and follow their ledgers
  (:class:`~tools.chaos.ledger.LedgerView`) to tell when every config runs exactly
  once again.
* **The run** (:class:`tools.chaos.runner.ChaosRun`, ``python -m tools.chaos run``): a
  private ``redis-server``, N nodes behind their proxies, and a seeded schedule of
  faults (the kinds are in :data:`tools.chaos.model.FAULTS`, injected by the
  ``faults_*`` modules); after each fault it waits for the cluster to settle and
  measures the recovery.
* **The checker** (:func:`tools.chaos.checker.check`): a pure function over ledger
  records that reports overlaps, fencing tokens that did not grow, coverage gaps longer
  than the settings allow (:class:`tools.chaos.model.Bounds`), recovery times per fault
  type, and a dirty shutdown.

This package imports nothing itself, so :mod:`tools.chaos.ledger` (standard library
only) also serves processes that have no dim installed (the tooz node of the
benchmarks). ``benchmarks/chaos.py`` is the command line for people.
"""
