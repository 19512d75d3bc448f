import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test run (Spark takes ~5 s to start)."""
    from rddtensor.session import get_spark
    s = get_spark("local[2]", app_name="rddtensor-tests",
                  conf={"spark.default.parallelism": "2", "spark.sql.shuffle.partitions": "2"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def sc(spark):
    return spark.sparkContext
