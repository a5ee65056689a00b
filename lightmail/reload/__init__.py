"""Reloading the configuration of a running server (SIGHUP, ``lightmail reload``).

- ``settle.py``: which settings a running server takes (limits, certificates,
  directory and login settings, DKIM keys, outbound routes) and which wait for a
  restart (endpoints, storage, workers...): the config a reload runs with.
- ``interfaces.py``: ``IReloadable``, a part that takes a new config live.
- ``parts.py``: the parts of a LightMail process (its services, a listener, the
  outbound side), chosen where the process is built (service.py, workers/worker.py).
- ``reloader.py``: ``Reloader``, the one owner of a process's running config: reads
  the file off the reactor, refuses what fails validation, switches every part at once.
- ``sighup.py``: under twistd, SIGHUP, the pid file and the status file that
  ``lightmail reload`` reads (``command.py``).
"""
