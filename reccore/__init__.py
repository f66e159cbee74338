"""Shared core of streamrec: event contract, id grammar and typed config.

Nothing here imports Spark or Flask, so the jobs and the scorer can both depend on it.
"""
