"""The scorer (Flask). It stands on reccore only and installs without pyspark."""
