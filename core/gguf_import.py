"""GGUF files in, ordinary model artifacts out.

A GGUF file (llama.cpp's format) is read by transformers through the `gguf`
package and dequantized to float32; mk converts it once into a safetensors
model artifact in its cache (keyed by the file's sha256, so a changed file is
converted anew) with the file's path and sha256 in the manifest as its source.
Every later step then reads a plain Hugging Face folder.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

from mk.core.artifact import MANIFEST, open_artifact, sha256_file, write_manifest
from mk.core.errors import BadInput, first_line, library_error


@functools.lru_cache(maxsize=8)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:  # size, mtime: the cache key
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(path.resolve(), st.st_size, st.st_mtime_ns)


def converted(name: str) -> Path:
    """The artifact folder of the embedded GGUF model `name`, converting it on first use."""
    from mk.core.embedded import gguf_path

    return convert_cached(gguf_path(name), label=name)


def convert_cached(gguf: Path, label: str | None = None) -> Path:
    """The cached conversion of `gguf`, made now if missing (a concurrent conversion
    of the same file is waited for by the output lock and then reused)."""
    from mk.core.embedded import cache_dir

    gguf = Path(gguf)
    if not gguf.is_file():
        raise BadInput(f"{gguf}: no such GGUF file")
    digest = file_sha256(gguf)
    out = cache_dir() / "models" / f"{label or gguf.stem}-{digest[:12]}"
    if not (out / MANIFEST).is_file():
        from mk.core.console import log
        log.info("converting %s to a safetensors model in %s (once)", gguf.name, out)
        try:
            convert(gguf, out, digest)
        except BadInput:
            if not (out / MANIFEST).is_file():  # not a conversion that raced with ours
                raise
    return out


def convert(gguf: Path, out: Path, digest: str | None = None, force: bool = False) -> dict:
    """Dequantize `gguf` into a model artifact at `out` (config, safetensors weights,
    tokenizer with its chat template)."""
    import torch
    import transformers

    from mk.core.outputs import atomic_output

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    folder, name = str(gguf.parent), gguf.name
    # transformers 5 may keep GGUF blocks packed (not serializable); ask for a dense model
    dense = ({"quantization_config": transformers.GgufConfig(dequantize=True)}
             if hasattr(transformers, "GgufConfig") else {})
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                  dtype=torch.float32, **dense)
    except ImportError as e:  # the gguf package is missing
        raise BadInput(f"{gguf}: reading GGUF needs the `gguf` package ({e})",
                       hint="pip install gguf") from None
    except struct.error as e:  # the header or a tensor runs past the end of the file
        raise BadInput(f"{gguf}: truncated GGUF file ({first_line(e)})",
                       hint="an interrupted download or copy: fetch the file again") from None
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # an architecture transformers cannot map
        raise library_error(e, gguf, "cannot load this GGUF file as a causal LM") from None
    with atomic_output(out, force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, kind="model", format="safetensors", labels=[], task="text-generation",
                       source={"gguf": str(gguf.resolve()), "sha256": digest or file_sha256(gguf),
                               "bytes": gguf.stat().st_size},
                       metrics={"parameters": sum(p.numel() for p in model.parameters())})
    return open_artifact(out).manifest
