"""Observers: what watches the pool without steering it.

Prometheus metrics, structured logs, the job journal and checkpoints. Each subscribes to the
runtime's event bus (or is called by a job), never blocks the event loop, and is never
imported by the runtime below it: observers sit above the runtime and below the faces.
"""
