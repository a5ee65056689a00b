"""Administration: the ``lightmail`` command (later the admin API and manhole)."""
