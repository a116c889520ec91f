"""Measurement: evaluation on a dataset, `mk bench` offline and over HTTP, its report and gate."""
