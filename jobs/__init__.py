"""The Spark side of streamrec: shared helpers and one thin entry module per job."""
