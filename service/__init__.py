"""The slimconv service: REST API, job queue with worker processes, storage, dashboard.

Calls ``search`` for everything that touches a model; ``search`` never imports from here.
"""
