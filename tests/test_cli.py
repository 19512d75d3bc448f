"""The command line a new user meets first: `rddtensor info` and `rddtensor demo`."""
import pytest

from rddtensor.cli import main


def test_info_reports_versions_and_java(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "rddtensor" in out and "pyspark" in out and "java" in out
    assert "GPUs visible" in out


@pytest.mark.slow
def test_demo_trains_distributed_and_prints_accuracy(spark, tmp_path, capsys):
    # reuses the test session (the demo only stops a session it started itself)
    code = main(["demo", "--epochs", "6", "--batch-size", "128", "--save", str(tmp_path / "m")])
    out = capsys.readouterr().out
    assert "test accuracy:" in out
    acc = float(out.split("test accuracy:")[1].split()[0])
    assert acc >= 0.9 and code == 0
    assert (tmp_path / "m" / "model.json").exists()
    assert not spark.sparkContext._jsc.sc().isStopped()
