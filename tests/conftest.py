"""Test configuration: MLflow telemetry off before anything imports MLflow, and CPU threads."""

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the test models are tiny, and two threads per process oversubscribe 2 cores
# whenever a test starts a second process (MLflow, the CLI).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
