"""Administration: the ``lightmail`` command, the admin HTTP listener (metrics and
health: ``http.py``, ``health.py``; later the admin API) and the manhole
(``manhole.py``)."""
