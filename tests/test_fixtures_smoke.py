"""The shared fixtures make artifacts that mk itself accepts."""

from mk.core.artifact import open_artifact
from mk.core.dataset import load_split, open_dataset
from mk.core.evaluation import evaluate
from mk.core.runtime import load_runtime


def test_tiny_model_runs_on_tiny_dataset_through_the_runtime(tiny_model, tiny_dataset):
    data = open_dataset(tiny_dataset)
    test = load_split(data, "test")
    assert test["input_ids"].dtype.name == "int32" and test["attention_mask"].dtype.name == "int8"
    rt = load_runtime(open_artifact(tiny_model), device="cpu")
    metrics = evaluate(rt, test, num_labels=3, batch_size=8)
    assert metrics["n"] == 30 and 0.0 <= metrics["accuracy"] <= 1.0
