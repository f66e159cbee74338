"""The end-to-end demo: the whole loop on MovieLens in one command (``make demo``, ``python -m demo``).

It starts the local stack and the streaming jobs, loads the first part of the ratings and backfills
the features, trains and promotes a model, starts the scorer, replays the rest of the ratings while
the streams run and requests recommendations, then reports freshness and online accuracy. The
batch steps and the three streaming queries share one Spark session; the scorer runs under gunicorn.
"""
