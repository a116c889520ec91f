"""Data: reading labelled sources (CSV, JSONL, Parquet, class folders) and `mk prep`."""
