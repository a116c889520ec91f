"""The causal-LM ground: the embedded GGUF model converted once into an ordinary
artifact, task detection, and generation through `CausalLM`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import run_mk


@pytest.mark.slow  # the real 135 M model: a 40 s conversion, run by `make check` and CI
def test_smollm2_converts_once_into_a_loadable_artifact_that_answers(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from mk.core.artifact import open_artifact
    from mk.core.embedded import gguf_path
    from mk.core.gguf_import import file_sha256
    from mk.core.runtime.causal_runtime import CausalLM, Sampling

    art = open_artifact("smollm2")
    assert art.path == smollm2_dir and art.task == "text-generation" and art.format == "safetensors"
    assert art.manifest["source"]["sha256"] == file_sha256(gguf_path("smollm2"))
    assert art.manifest["metrics"]["parameters"] == 134_515_008
    # a plain from_pretrained reads it, as every later step does
    assert type(AutoModelForCausalLM.from_pretrained(str(smollm2_dir))).__name__ == "LlamaForCausalLM"
    lm = CausalLM.load(art, threads=2)
    ids = lm.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    out = lm.generate([ids], Sampling(max_new_tokens=16))
    assert "Paris" in out.texts[0] and out.finish_reasons == ["stop"]
    assert out.first_token_s > 0 and len(out.step_s) == len(out.tokens[0])  # EOS step timed, not kept


def test_generation_batches_left_padded_rows_like_single_ones(tiny_llm):
    from mk.core.artifact import open_artifact
    from mk.core.runtime.causal_runtime import CausalLM, Sampling

    lm = CausalLM.load(open_artifact(tiny_llm))
    assert open_artifact(tiny_llm).task == "text-generation"
    a, b = lm.text_ids("a short prompt"), lm.text_ids("a much longer prompt with many more words in it")
    greedy = Sampling(max_new_tokens=6, ignore_eos=True)
    together = lm.generate([a, b], greedy)
    assert together.tokens == [lm.generate([a], greedy).tokens[0], lm.generate([b], greedy).tokens[0]]
    assert all(len(t) == 6 for t in together.tokens) and together.finish_reasons == ["length"] * 2
    seen = []
    lm.generate([a, b], greedy, on_tokens=seen.append)
    assert [list(col) for col in zip(*seen)] == together.tokens  # streamed in step order
    sampled = Sampling(max_new_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    assert lm.generate([a], sampled).tokens == lm.generate([a], sampled).tokens  # a seed repeats


def test_prompts_beyond_the_context_and_chat_without_a_template_are_refused(tiny_llm, tmp_path):
    import shutil

    from mk.core.artifact import open_artifact
    from mk.core.errors import BadInput
    from mk.core.runtime.causal_runtime import CausalLM, Sampling

    lm = CausalLM.load(open_artifact(tiny_llm))
    with pytest.raises(BadInput, match="context of 256 tokens"):
        lm.generate([[1] * 250], Sampling(max_new_tokens=10))
    plain = shutil.copytree(tiny_llm, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="no chat template"):
        CausalLM.load(open_artifact(plain)).chat_ids([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("what", ["not gguf", "truncated"])
def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path, what):
    from mk.core.embedded import gguf_path

    bad = tmp_path / "model.gguf"
    # an interrupted download: the real file's first kilobyte (its magic bytes and part of its header)
    with open(gguf_path("smollm2"), "rb") as f:
        bad.write_bytes(b"not a gguf file at all" if what == "not gguf" else f.read(1000))
    proc = run_mk("info", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(bad) in proc.stderr and len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert what != "truncated" or "truncated GGUF file" in proc.stderr
    assert not list((Path(os.environ["MK_CACHE"]) / "models").glob("model-*"))  # nothing half-made
