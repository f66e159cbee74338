"""The scorer (Flask). It depends on reccore only and installs without pyspark."""
