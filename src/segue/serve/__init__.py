"""``segue serve``: a job service for segue with a REST API, a persistent queue and workers that survive crashes.

- ``app``: the HTTP API (FastAPI) and the page in ``static/``; ``submit``: a submission checked whole;
- ``jobs``: a job's states, row, public JSON and files; ``queue`` (+ ``queue_sqlite``, ``queue_pg``): the queue;
- ``worker``: a process that loads the model once and renders jobs; ``render``: one job and its outputs;
- ``supervisor``: starts workers and replaces dead ones; ``webhooks``: signed, retried deliveries;
- ``metrics``: Prometheus text; ``modelinfo``: the model's config without torch; ``command``: the commands.

docs/serve.md is the reference. Nothing here is imported by ``segue --help``.
"""
