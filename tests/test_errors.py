"""The one table from library exceptions to mk's errors: matched by class, never by text."""

from __future__ import annotations

from mk.core.errors import BAD_INPUT, RUNTIME_FAILURE, MkError, first_line, library_error


def test_library_errors_map_by_class_with_the_first_line_kept():
    from safetensors import SafetensorError

    e = library_error(SafetensorError("header too large\nsecond line"), "m/model.safetensors", "cannot load")
    assert e.code == BAD_INPUT and e.message == "m/model.safetensors: cannot load (header too large)"
    assert "truncated" in e.hint


def test_a_subclass_takes_its_base_row_and_text_decides_nothing():
    import polars as pl

    for text in ("invalid utf-8 sequence", "anything else"):
        e = library_error(pl.exceptions.ComputeError(text), "d.csv", "cannot read")
        assert e.code == BAD_INPUT and e.hint is None
    assert library_error(FileNotFoundError(2, "gone"), "x", "open").code == BAD_INPUT


def test_an_unnamed_class_is_named_and_takes_the_callers_code():
    e = library_error(RuntimeError(""), "x", "run", code=RUNTIME_FAILURE)
    assert e.code == RUNTIME_FAILURE and e.message == "x: run (RuntimeError: RuntimeError)"
    kept = MkError("already mk's")
    assert library_error(kept, "x", "run") is kept
    assert first_line(ValueError("a" * 400)) == "a" * 300
