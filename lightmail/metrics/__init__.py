"""Metrics: what LightMail counts and measures, for Prometheus.

Each LightMail process has its own :class:`~lightmail.metrics.registry.Metrics` (its
own prometheus-client registry, never the library's global one, so that tests and
embedding applications stay apart).  It is made once, where the process is wired
(lightmail.wiring), and handed down: protocol factories, storage, the queue runner
and the outbound resolver record through the :class:`~.interfaces.IMetrics` and
:class:`~.interfaces.IProtocolMeters` they were given, with label children bound in
advance so that a command costs one dictionary lookup and one increment.

The main process serves ``/metrics`` (lightmail.admin.http); what the worker
processes and the writer process counted reaches it at scrape time
(lightmail.metrics.federation).
"""
