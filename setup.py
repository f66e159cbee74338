"""Packaging for streamrec: a real-time recommendation job suite on Spark, Kafka, Delta and Redis.

The distribution holds three layers. ``reccore`` has no Spark and no Flask and is shared by both
sides. ``jobs`` is the Spark side and ``serving`` the scorer. ``devstack`` starts the local services,
and ``demo`` runs the whole loop on MovieLens (``make demo``).
Extras keep the sides apart: ``pip install .[serving]`` never pulls pyspark.
"""

from setuptools import find_packages, setup

# Top-level pins. constraints.txt pins the whole tree that was tested with them.
CORE = [
    "PyYAML==6.0.3",
]

JOBS = [
    "pyspark==4.2.0",
    "delta-spark==4.4.0",
    "pyarrow==25.0.1",
    "pandas==2.3.3",
    "numpy==2.4.6",
    "orjson==3.13.0",
    "confluent-kafka==2.16.1",
    "prometheus-client==0.26.0",
    "tqdm==4.70.1",
    "redis==8.1.0",
    "hiredis==3.5.0",
    "lightgbm==4.7.0",
    "mlflow==3.17.2",
    "matplotlib==3.11.2",
    "scikit-learn==1.9.1",
    "great-expectations==1.24.1",
]

SERVING = [
    "flask==3.1.3",
    "gunicorn==23.0.0",
    "redis==8.1.0",
    "hiredis==3.5.0",
    "lightgbm==4.7.0",
    # The compiled predictor. lleaves 1.3.0 calls llvmlite.binding.PassManagerBuilder, which newer
    # llvmlite lines no longer have (0.50.0 raises AttributeError): keep llvmlite at 0.43.x.
    "lleaves==1.3.0",
    "llvmlite==0.43.0",
    "mlflow==3.17.2",
    "numpy==2.4.6",
    "prometheus-client==0.26.0",
    "confluent-kafka==2.16.1",
]

TEST = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    # The scorer's contract test (tests/integration/test_serving_schema.py) runs its CLI.
    "schemathesis==4.32.5",
]

setup(
    name="streamrec",
    version="0.1.0",
    description="Real-time recommendations: Spark Structured Streaming, Kafka, Delta Lake, Redis, MLflow",
    python_requires=">=3.9",
    packages=find_packages(include=["reccore", "reccore.*", "jobs", "jobs.*", "serving", "serving.*",
                                    "devstack", "devstack.*", "demo", "demo.*"]),
    package_data={"devstack": ["templates/*"]},
    install_requires=CORE,
    extras_require={
        "jobs": JOBS,
        "serving": SERVING,
        "test": TEST,
        "dev": sorted(set(JOBS + SERVING + TEST)),
    },
    entry_points={
        "console_scripts": [
            "streamrec-stack=devstack.cli:main",
            "streamrec-replay=jobs.replay:main",
        ],
    },
)
