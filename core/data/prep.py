"""`mk prep`: raw labelled data in, a tokenized, split dataset artifact out.

Two passes over the data keep memory bounded whatever the input's size:

1. polars scans every source lazily and keeps, per row, only what the
   decisions need: the row number, a 64-bit hash of the stripped text (and
   pair), the label and the given split. Cleaning (strip, empty texts, rows
   without a label, duplicates within and across splits), the stratified
   sample, the stratified split and each row's shuffled position in its split
   are decided on these small arrays.
2. The texts stream through again in chunks; each chunk is tokenized with the
   model's fast tokenizer (`encode_batch`, multi-threaded in Rust) and written
   straight into its rows of memory-mapped safetensors files.

Images take the same decisions, with the hash of the file's bytes as the key,
and go through the model's image processor in batches.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mk.core.artifact import write_manifest
from mk.core.outputs import atomic_output, check_output
from mk.core.console import log, progress
from mk.core.dataset import SPLITS, SplitWriter
from mk.core.embedded import DEFAULT_LLM, DEFAULT_MODEL, EMBEDDED_DATA, resolve_model
from mk.core.errors import BadInput, library_error
from mk.core.data.sources import SPLIT_NAMES, Columns, ImageFolder, Table, TextEncoding, detect_columns, open_source

LENGTH_SAMPLE = 20_000   # texts tokenized to choose --max-length
LENGTH_PERCENTILE = 95
CHUNK_ROWS = 4_096       # rows read, tokenized and written at a time: the shuffled rows of one chunk
                         # touch most pages of the memory-mapped output, so this bounds its resident pages
ENCODE_BATCH = 4_096     # rows per call of the Rust tokenizer
# Texts are cut to this many characters per token kept before tokenizing: the
# tokenizer encodes a whole text before truncating it (a 10 MB field peaked at
# 1.5 GB), and no token is longer than this (WordPiece maps a word over 100
# characters to one [UNK]), so nothing within --max-length is lost.
CHARS_PER_TOKEN = 128
UNLIMITED_TOKENS = 8_192  # the cut of a tokenizer without a model_max_length
IMAGE_BATCH = 64
POOL = -1                # a row whose split is still to be carved out by --split


TASKS = ("auto", "classify", "generate")


@dataclass
class PrepOptions:
    tokenizer: str | None = None       # the task's default: minilm to classify, smollm2 to generate
    text_col: str | None = None
    text_pair_col: str | None = None
    label_col: str | None = None
    split_col: str | None = None
    val: str | None = None
    test: str | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    max_length: int | None = None
    sample: int | None = None
    skip_bad: bool = False
    encoding: str = "utf-8"            # of text files: any codec Python knows
    encoding_errors: str = "strict"    # or "replace": U+FFFD for bad bytes, counted
    force: bool = False
    task: str = "auto"                 # classify, generate, or auto: generate when the source has
                                       # prompt/completion or messages columns
    prompt_col: str | None = None      # --task generate: the columns of the examples
    completion_col: str | None = None
    messages_col: str | None = None
    pack: bool = False                 # --task generate: pack short train examples into --max-length rows

    def tokenizer_for(self, generate: bool) -> str:
        return self.tokenizer or (DEFAULT_LLM if generate else DEFAULT_MODEL)


def parse_split(text: str) -> tuple[float, float, float]:
    """`0.8,0.1,0.1` → fractions of train, val and test (each > 0, summing to 1)."""
    try:
        parts = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise BadInput(f"--split {text!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(parts) != 3 or any(not 0 < p < 1 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise BadInput(f"--split {text!r}: expected three fractions for train, val and test, each above 0, "
                       "summing to 1 (like 0.8,0.1,0.1)")
    return parts  # type: ignore[return-value]


# ------------------------------------------------------------------ tokenizer

def load_tokenizer(ref: str | Path):
    """The fast tokenizer of an embedded model name, a model folder or an artifact."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    path = resolve_model(ref)
    if not path.exists():
        raise BadInput(f"--tokenizer {ref}: no such model, folder or artifact",
                       hint=f"pass a model folder, an artifact, or {DEFAULT_MODEL!r}")
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                    "vocab.txt")):
        raise BadInput(f"--tokenizer {ref}: {path} holds no tokenizer files (tokenizer.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise library_error(e, f"--tokenizer {ref}", "cannot load its tokenizer") from None
    if not getattr(tok, "is_fast", False):
        raise BadInput(f"--tokenizer {ref}: {type(tok).__name__} is not a fast tokenizer",
                       hint="mk prep needs a tokenizer.json (a 🤗 fast tokenizer)")
    return tok


def tokenizer_identity(tok) -> dict:
    """What identifies a tokenizer, so a later step can refuse a mismatched model:
    vocabulary size and digest, special tokens and their ids, class and origin."""
    vocab = tok.get_vocab()
    digest = hashlib.sha256()
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        digest.update(f"{i}\t{token}\n".encode())
    special = {role: str(t) for role, t in (getattr(tok, "special_tokens_map", None) or {}).items()
               if isinstance(t, str)}
    return {
        "class": type(tok).__name__,
        "name_or_path": str(tok.name_or_path),
        "vocab_size": len(tok),
        "vocab_sha256": digest.hexdigest(),
        "special_tokens": special,
        "special_token_ids": {role: tok.convert_tokens_to_ids(t) for role, t in special.items()},
        "model_max_length": model_limit(tok),
    }


def model_limit(tok) -> int | None:
    """The longest input the model takes: the tokenizer's model_max_length when set,
    else the config's max_position_embeddings beside it."""
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    import json
    cfg = Path(str(tok.name_or_path)) / "config.json"
    try:
        return int(json.loads(cfg.read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class TextEncoder:
    """The model's fast tokenizer, configured once: truncation at `max_length`,
    batches through `encode_batch_fast` (Rust, one thread per core), padding
    and arrays built in numpy."""

    def __init__(self, tok, max_length: int | None):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: the saved files stay as they are
        self.backend.no_padding()
        if max_length:
            self.backend.enable_truncation(max_length, strategy="longest_first")
        else:
            self.backend.no_truncation()
        self.max_length = max_length
        self.max_chars = CHARS_PER_TOKEN * (max_length or model_limit(tok) or UNLIMITED_TOKENS)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.left = getattr(tok, "padding_side", "right") == "left"

    def _encode(self, texts: list[str], pairs: list[str] | None):
        """Encodings in batches of ENCODE_BATCH: long enough to keep every core busy,
        short enough that the Encoding objects (tens of bytes a token) stay small."""
        cut = self.max_chars
        for i in range(0, len(texts), ENCODE_BATCH):
            part = [t[:cut] for t in texts[i:i + ENCODE_BATCH]]
            inputs = part if pairs is None else list(zip(part, (t[:cut] for t in pairs[i:i + ENCODE_BATCH])))
            yield i, self.backend.encode_batch_fast(inputs, add_special_tokens=True)

    def lengths(self, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
        return np.concatenate([np.fromiter((len(e) for e in encs), np.int64, count=len(encs))
                               for _, encs in self._encode(texts, pairs)])

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(input_ids, attention_mask[, token_type_ids]) padded to max_length, and
        which rows were truncated."""
        n, width = len(texts), self.max_length
        out = {"input_ids": np.full((n, width), self.pad_id, np.int32), "attention_mask": np.zeros((n, width), np.int8)}
        if pairs is not None:
            out["token_type_ids"] = np.zeros((n, width), np.int8)
        truncated = np.zeros(n, bool)
        for start, encs in self._encode(texts, pairs):
            rows = slice(start, start + len(encs))
            truncated[rows] = self._fill({k: v[rows] for k, v in out.items()}, encs)
        return out, truncated

    def _fill(self, out: dict[str, np.ndarray], encs) -> np.ndarray:
        n, width = len(encs), self.max_length
        lens = np.fromiter((len(e) for e in encs), np.int64, count=n)
        cols = np.arange(width)
        mask = cols >= (width - lens)[:, None] if self.left else cols < lens[:, None]
        total = int(lens.sum())
        out["input_ids"][mask] = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), np.int32, count=total)
        out["attention_mask"][mask] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][mask] = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encs),
                                                      np.int8, count=total)
        return np.fromiter((bool(e.overflowing) for e in encs), bool, count=n)


# --------------------------------------------------------------- pass 1: rows

@dataclass
class Plan:
    """Every decision of pass 1, on small per-row arrays (one entry per kept row)."""

    names: list[str]
    src: np.ndarray       # which source the row is in
    row: np.ndarray       # its 1-based row number there
    label: np.ndarray     # label id
    split: np.ndarray     # 0 train, 1 val, 2 test
    pos: np.ndarray       # its row in its split's file (a seeded shuffle)
    cleaning: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {s: int(np.sum(self.split == i)) for i, s in enumerate(SPLITS)}

    def label_counts(self) -> dict[str, dict[str, int]]:
        return {s: {name: int(np.sum((self.split == i) & (self.label == j))) for j, name in enumerate(self.names)}
                for i, s in enumerate(SPLITS)}

    def keep(self, mask: np.ndarray) -> "Plan":
        """The plan without the rows `mask` leaves out; each split keeps its shuffled
        order (positions close up), so the same seed still gives the same files."""
        pos = np.zeros(int(mask.sum()), np.int64)
        split = self.split[mask]
        for i in range(len(SPLITS)):
            members = np.flatnonzero(split == i)
            pos[members] = np.argsort(np.argsort(self.pos[mask][members], kind="stable"), kind="stable")
        return Plan(names=self.names, src=self.src[mask], row=self.row[mask], label=self.label[mask], split=split,
                    pos=pos, cleaning=dict(self.cleaning, rows_kept=int(mask.sum())))


def _split_code(value) -> int | None:
    return SPLITS.index(SPLIT_NAMES[value.strip().lower()]) if isinstance(value, str) and \
        value.strip().lower() in SPLIT_NAMES else None


INTEGER = r"^[+-]?[0-9]+$"  # a label written as an integer: its classes sort numerically


def _label_expr(column: str, dtype):
    """A label as the text written (booleans `true`/`false`, integers as they are);
    empty or NaN (pandas' missing value) is no label."""
    import polars as pl

    col = pl.col(column).fill_nan(None) if dtype.is_float() else pl.col(column)
    lab = col.cast(pl.String).str.strip_chars()
    return pl.when((lab == "") | (lab.str.to_lowercase() == "nan")).then(None).otherwise(lab)


def _whole_number_labels(df, table: Table, column: str):
    """Labels that are all numbers, some written with a fraction (a float column, or
    `1.0` as pandas writes integers beside a missing value), as integers; a number
    with a fraction is refused. Labels written as integers stay as written (`01` and
    `1` are two classes); any label that is not a number leaves them all as text."""
    import polars as pl

    lab = pl.col("_label")
    num, written_int = lab.cast(pl.Float64, strict=False), lab.str.contains(INTEGER)
    whole = num.is_finite() & (num == num.round(0)) & (num.abs() < 2 ** 53)  # exact in a float
    seen = df.select(not_number=(num.is_null() & lab.is_not_null()).any(), all_int=written_int.fill_null(True).all(),
                     all_whole=(written_int | whole).fill_null(True).all()).row(0, named=True)
    if seen["not_number"] or seen["all_int"]:
        return df
    if not seen["all_whole"]:
        raise BadInput(f"{table.name}: label column {column!r} holds non-integer numbers; "
                       "mk prep makes classification datasets")
    return df.with_columns(pl.when(written_int).then(lab)
                           .otherwise(num.cast(pl.Int64, strict=False).cast(pl.String)).alias("_label"))


def scan_rows(tables: list[Table], cols: Columns) -> tuple[object, dict, bool]:
    """Pass 1 over the tables: one small row per input row, and the cleaning
    counts of the steps that need no comparison between rows. Without a label
    column (prompt/completion data) every row has the label "" and the key hashes
    text and pair together."""
    import polars as pl

    frames, numeric = [], True
    counts = {"rows_read": 0, "whitespace_stripped": 0, "empty_text": 0, "no_label": 0}
    for i, table in enumerate(tables):
        lf = table.scan()
        schema = lf.collect_schema()
        missing = [c for c in (cols.text, cols.pair, cols.label) if c and c not in schema]
        if missing:
            raise BadInput(f"{table.name}: no column {', '.join(map(repr, missing))}; its columns are: "
                           + ", ".join(map(repr, schema.names())))
        nested = [c for c in (cols.text, cols.pair, cols.label) if c and schema[c].is_nested()]
        if nested:
            raise BadInput(f"{table.name}: column {nested[0]!r} holds nested values ({schema[nested[0]]}), "
                           "not plain text or labels", hint="flatten it first, or name another column")
        ldt = schema[cols.label] if cols.label else pl.String
        raw = [pl.col(c).cast(pl.String) for c in (cols.text, cols.pair) if c]
        stripped = [r.str.strip_chars() for r in raw]
        empty = pl.any_horizontal([s.is_null() | (s == "") for s in stripped])
        changed = pl.any_horizontal([(r != s).fill_null(False) for r, s in zip(raw, stripped)])
        key = stripped[0].hash() if len(stripped) == 1 else pl.struct(*[s.alias(f"_{j}") for j, s in
                                                                        enumerate(stripped)]).hash()
        exprs = [pl.lit(i, pl.Int16).alias("_src"), pl.col("_row"), key.alias("_key"),
                 (_label_expr(cols.label, ldt) if cols.label else pl.lit("", pl.String)).alias("_label"), empty.alias("_empty"),
                 changed.alias("_changed")]
        if table.split is not None:
            exprs.append(pl.lit(SPLITS.index(table.split), pl.Int8).alias("_split"))
        elif cols.split and cols.split in schema:
            exprs.append(pl.col(cols.split).cast(pl.String).alias("_split_name"))
        try:
            df = lf.with_row_index("_row", offset=1).select(exprs).collect(engine="streaming")
        except pl.exceptions.PolarsError as e:
            raise table.read_error(e) from None
        if "_split_name" in df.columns:
            values = df["_split_name"].unique().to_list()
            bad = sorted((v for v in values if _split_code(v) is None), key=lambda v: (v is not None, v or ""))
            if bad:
                hit = pl.col("_split_name").is_in([v for v in bad if v is not None])
                if None in bad:
                    hit = hit | pl.col("_split_name").is_null()
                first = df.filter(hit)["_row"].min()
                raise BadInput(f"{table.name}: split column {cols.split!r} has values that are not a split "
                               f"(first at row {first}): "
                               f"{', '.join('(empty)' if v is None or not v.strip() else repr(v) for v in bad[:5])}",
                               hint="use train, val (or validation/dev), test")
            df = df.with_columns(pl.col("_split_name").replace_strict(
                values, [_split_code(v) for v in values], return_dtype=pl.Int8).alias("_split")).drop("_split_name")
        elif "_split" not in df.columns:
            df = df.with_columns(pl.lit(POOL, pl.Int8).alias("_split"))
        if cols.label and (ldt.is_float() or table.format in ("csv", "tsv")):  # a CSV's labels are untyped text
            df = _whole_number_labels(df, table, cols.label)
        numeric &= cols.label is not None and bool(df["_label"].drop_nulls().str.contains(INTEGER).all())
        counts["rows_read"] += df.height
        counts["whitespace_stripped"] += int(df["_changed"].sum())
        counts["empty_text"] += int(df["_empty"].sum())
        counts["no_label"] += int((df["_label"].is_null() & ~df["_empty"]).sum())
        frames.append(df.filter(~pl.col("_empty") & pl.col("_label").is_not_null())
                      .select("_src", "_row", "_key", "_label", "_split"))
    return pl.concat(frames), counts, numeric


def plan_rows(frame, counts: dict, numeric: bool, opts: PrepOptions, what: str,
              sources: list[str] | None = None, labelled: bool = True) -> Plan:
    """Deduplicate, name labels, sample, carve the splits and shuffle, all seeded.
    `sources` names the tables by their `_src` index, for messages about one row.
    Unlabelled rows (all labelled "") are one class: a plain seeded split."""
    import polars as pl

    rng = np.random.default_rng(opts.seed)
    if frame.height == 0:
        raise BadInput(f"{what}: no rows left after cleaning ({_describe(counts)})",
                       hint="check --text-col and --label-col")
    # The splits given by --val/--test or a split column stay given, even when cleaning empties them.
    given = {int(s) for s in np.unique(frame["_split"].to_numpy()) if s > 0}
    given |= {SPLITS.index(s) for s, ref in (("val", opts.val), ("test", opts.test)) if ref}
    frame = _dedupe(frame, counts)
    # Labels: the classes of the training rows, sorted (numbers numerically), in id order.
    split = frame["_split"].to_numpy().astype(np.int8)
    train_labels = frame.filter(pl.col("_split") <= 0)["_label"].unique().to_list()
    names = sorted(train_labels, key=(lambda v: (int(v), v)) if numeric else (lambda v: (v,)))
    if not names:
        raise BadInput(f"{what}: no training rows left after cleaning ({_describe(counts)})")
    label = frame["_label"].replace_strict(names, list(range(len(names))), default=-1,
                                           return_dtype=pl.Int64).to_numpy()
    if np.any(label < 0):
        unseen = frame.filter(pl.Series(label < 0))
        name = unseen["_label"][0]
        sp = SPLITS[int(unseen["_split"][0])]
        where = sources[int(unseen["_src"][0])] if sources else what
        raise BadInput(f"{where}: {sp} label {name!r} ({int((unseen['_label'] == name).sum())} rows) never appears "
                       "in training", hint="a model cannot predict a class it never saw; fix the labels or the split")
    if labelled and len(names) < 2:
        raise BadInput(f"{what}: only one class ({names[0]!r}) after cleaning; classification needs two or more",
                       hint="check --label-col")
    src, row = frame["_src"].to_numpy(), frame["_row"].to_numpy()
    # --sample N: a stratified sample of the rows (by split and label), before carving.
    if opts.sample is not None and opts.sample < len(label):
        groups = split.astype(np.int64) * len(names) + label
        take = _stratified_take(groups, opts.sample, rng)
        counts["sampled_out"] = int(len(label) - take.size)
        src, row, label, split = src[take], row[take], label[take], split[take]
    elif opts.sample is not None:
        log.warning("--sample %d: %s holds %d rows after cleaning; keeping them all", opts.sample, what, len(label))
    # Carve the splits not given from the training pool, stratified by label.
    targets = [0] + [s for s in (1, 2) if s not in given]
    pool = np.flatnonzero(split <= 0)
    if len(targets) > 1:
        fractions = np.array([opts.split[t] for t in targets])
        fractions = fractions / fractions.sum()
        for j, name in enumerate(names):
            members = pool[label[pool] == j]
            members = members[rng.permutation(len(members))]
            sizes = allocate(len(members), fractions)
            if min(sizes) == 0:
                sampled = counts.get("sampled_out")
                raise BadInput(f"{what}: {f'class {name!r} has ' if labelled else ''}{len(members)} example(s) after "
                               f"{f'--sample {opts.sample}' if sampled else 'cleaning'}, too few to "
                               f"put one in each of {', '.join(SPLITS[t] for t in targets)}",
                               hint="raise --sample" if sampled else
                               "add examples of it, drop or merge the class, or give the splits explicitly")
            for t, part in zip(targets, np.split(members, np.cumsum(sizes)[:-1])):
                split[part] = t
    split[split < 0] = 0
    for i, s in enumerate(SPLITS):
        if not np.any(split == i):
            ref = {"val": opts.val, "test": opts.test}.get(s)
            raise BadInput(f"{ref or what}: the {s} split is empty after cleaning ({_describe(counts)})",
                           hint="a row that repeats a row of an earlier split is dropped (cross split duplicates)"
                           if counts.get("cross_split_duplicates") else None)
    pos = np.zeros(len(split), np.int64)
    for i in range(len(SPLITS)):
        members = np.flatnonzero(split == i)
        pos[members] = rng.permutation(len(members))
    counts["rows_kept"] = int(len(split))
    return Plan(names=[str(n) for n in names], src=src, row=row, label=label, split=split, pos=pos, cleaning=counts)


def _dedupe(frame, counts: dict):
    """Drop repeated texts, counting them: the first copy wins, in the order train
    (and rows still to be split), val, test; a copy in a later split than its first
    is a cross-split duplicate (it would inflate test accuracy)."""
    group = np.asarray(frame["_split"].to_numpy(), np.int8)
    group = np.where(group == POOL, 0, group)
    order = np.lexsort((np.arange(len(group)), group))
    keys = frame["_key"].to_numpy()[order]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    keep_sorted = np.zeros(len(keys), bool)
    keep_sorted[first] = True
    first_of = first[inverse.ravel()]  # for each row (sorted order) the index of its first copy
    dup = ~keep_sorted
    labels_sorted = frame["_label"].to_numpy()[order]
    cross = dup & (group[order] != group[order][first_of])
    same_label = labels_sorted == labels_sorted[first_of]
    counts["duplicates"] = int(np.sum(dup & ~cross & same_label))
    counts["conflicting_duplicates"] = int(np.sum(dup & ~cross & ~same_label))
    counts["cross_split_duplicates"] = int(np.sum(cross))
    kept = np.sort(order[keep_sorted])
    return frame[kept]


def allocate(n: int, fractions) -> list[int]:
    """Split n items by fractions, each part within one item of its exact share
    (largest remainder), parts that would be empty served first."""
    exact = [n * f for f in fractions]
    base = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (not (base[i] == 0 and exact[i] > 0), base[i] - exact[i], i))
    for i in order[: n - sum(base)]:
        base[i] += 1
    return base


def _stratified_take(groups: np.ndarray, n: int, rng) -> np.ndarray:
    """Indices of a seeded sample of n rows, each group within one row of its share."""
    uniq, counts = np.unique(groups, return_counts=True)
    sizes = allocate(n, counts / counts.sum())
    take = [rng.choice(np.flatnonzero(groups == g), size=min(k, c), replace=False)
            for g, k, c in zip(uniq, sizes, counts)]
    return np.sort(np.concatenate(take))


def _describe(counts: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items() if v)


# ---------------------------------------------------------------- text pass 2

def planned_chunks(tables, cols: Columns, plan: Plan):
    """(table, source rows, plan indices, texts, pairs) of every planned row, table by
    table, a chunk at a time, in source order (the order the files are read in)."""
    for t, table in enumerate(tables):
        mine = np.flatnonzero(plan.src == t)
        if not mine.size:
            continue
        lookup = np.full(int(plan.row[mine].max()) + 1, -1, np.int64)
        lookup[plan.row[mine]] = mine
        for rows, texts, pairs in text_chunks(table, cols, np.sort(plan.row[mine])):
            yield table, rows, lookup[rows], texts, pairs


def text_chunks(table: Table, cols: Columns, rows: np.ndarray, chunk: int = CHUNK_ROWS):
    """Stream (row numbers, texts, pairs) of the wanted rows of a table, in order."""
    import polars as pl

    wanted = np.zeros(0, bool)
    if len(rows):
        wanted = np.zeros(int(rows.max()) + 1, bool)
        wanted[rows] = True
    exprs = [pl.col("_row")] + [pl.col(c).cast(pl.String).str.strip_chars().alias(f"_{j}")
                                for j, c in enumerate((cols.text, cols.pair)) if c]
    lf = table.scan().with_row_index("_row", offset=1)
    if len(rows) < 4 * chunk:  # a few rows: let polars filter them
        lf = lf.filter(pl.col("_row").cast(pl.Int64).is_in(pl.Series(rows, dtype=pl.Int64).implode()))
    for batch in lf.select(exprs).collect_batches(chunk_size=chunk):
        r = batch["_row"].to_numpy().astype(np.int64)
        r = r[r < len(wanted)]
        sel = wanted[r]
        if not sel.any():
            continue
        batch = batch[: len(sel)].filter(pl.Series(sel))
        yield (batch["_row"].to_numpy().astype(np.int64), batch["_0"].to_list(),
               batch["_1"].to_list() if cols.pair else None)


def choose_max_length(tables, cols, plan: Plan, encoder: TextEncoder, limit: int | None, seed: int) -> tuple[int, str]:
    """The 95th percentile of token lengths over (a sample of) the training texts,
    rounded up to a multiple of 8, capped by the model's limit."""
    rng = np.random.default_rng(seed + 1)
    train = np.flatnonzero(plan.split == 0)
    pick = np.sort(rng.choice(train, size=min(LENGTH_SAMPLE, len(train)), replace=False))
    lengths = []
    for i, table in enumerate(tables):
        rows = plan.row[pick[plan.src[pick] == i]]
        if not rows.size:
            continue
        for _, texts, pairs in text_chunks(table, cols, np.sort(rows)):
            lengths.append(encoder.lengths(texts, pairs))
    return length_from(np.concatenate(lengths), limit, "training texts")


def length_from(lengths: np.ndarray, limit: int | None, what: str) -> tuple[int, str]:
    """The 95th percentile of `lengths`, rounded up to a multiple of 8, capped by
    the model's limit; and how it was chosen, in words."""
    p = float(np.percentile(lengths, LENGTH_PERCENTILE))
    chosen = max(8, int(math.ceil(p / 8) * 8))
    capped = limit is not None and chosen > limit
    chosen = min(chosen, limit) if limit else chosen
    how = (f"{LENGTH_PERCENTILE}th percentile of the token lengths of {len(lengths):,} {what} "
           f"({p:.0f}), rounded up to a multiple of 8" + (f", capped by the model's limit {limit}" if capped else ""))
    return chosen, how


def check_max_length(max_length: int, limit: int | None) -> None:
    if limit is not None and max_length > limit:
        raise BadInput(f"--max-length {max_length} exceeds the model's limit of {limit} tokens")


def write_text_splits(root: Path, tables, cols: Columns, plan: Plan, encoder: TextEncoder) -> dict[str, float]:
    """Pass 2: tokenize every kept row in chunks, straight into its place in its split."""
    width = encoder.max_length
    tails = {"input_ids": (width,), "attention_mask": (width,), "labels": ()}
    if cols.pair:
        tails["token_type_ids"] = (width,)
    counts = plan.counts()
    writers = {s: SplitWriter(root, s, counts[s], tails) for s in SPLITS}
    truncated = np.zeros(len(SPLITS), np.int64)
    try:
        for i, s in enumerate(SPLITS):  # labels are known already
            members = plan.split == i
            labels = np.empty(counts[s], np.int64)
            labels[plan.pos[members]] = plan.label[members]
            writers[s].write(np.arange(counts[s]), {"labels": labels})
        with progress("tokenizing", total=len(plan.split)) as bar:
            for _, rows, idx, texts, pairs in planned_chunks(tables, cols, plan):
                arrays, cut = encoder.encode(texts, pairs)
                for i, s in enumerate(SPLITS):
                    m = plan.split[idx] == i
                    if m.any():
                        writers[s].write(plan.pos[idx[m]], {k: v[m] for k, v in arrays.items()})
                        truncated[i] += int(cut[m].sum())
                bar.advance(len(rows))
    finally:
        for w in writers.values():
            w.close()
    return {s: float(truncated[i] / max(counts[s], 1)) for i, s in enumerate(SPLITS)} | {
        "all": float(truncated.sum() / len(plan.split))}


# -------------------------------------------------------------------- images

def scan_images(folders: list[ImageFolder], skip_bad: bool):
    """Pass 1 over image folders: check that every image decodes, hash its bytes."""
    import io

    import polars as pl
    from PIL import Image

    records, counts, paths = [], {"rows_read": 0, "undecodable_skipped": 0}, []
    with progress("checking images", total=sum(len(f.items) for f in folders)) as bar:
        for f in folders:
            for path, label, split in f.items:
                counts["rows_read"] += 1
                data = path.read_bytes()
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                except Exception as e:  # PIL raises many types for a broken file
                    if not skip_bad:
                        raise BadInput(f"{path}: image will not decode ({type(e).__name__}: {e})",
                                       hint="remove it, or pass --skip-bad to skip and count such files") from None
                    counts["undecodable_skipped"] += 1
                    bar.advance(1)
                    continue
                key = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
                paths.append(path)
                records.append((0, len(paths), key, label, SPLITS.index(split) if split else POOL))
                bar.advance(1)
    frame = pl.DataFrame(records, schema={"_src": pl.Int16, "_row": pl.Int64, "_key": pl.UInt64,
                                          "_label": pl.String, "_split": pl.Int8}, orient="row")
    return frame, counts, paths


def load_image_processor(ref: str | Path):
    import transformers
    from transformers import AutoImageProcessor

    transformers.logging.set_verbosity_error()  # e.g. "torchvision missing, using the PIL processor"
    path = resolve_model(ref)
    if not (path / "preprocessor_config.json").is_file():
        raise BadInput(f"--tokenizer {ref}: {path} has no image processor (preprocessor_config.json)",
                       hint="image folders need an image model, e.g. a ViT folder")
    try:
        return AutoImageProcessor.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise library_error(e, f"--tokenizer {ref}", "cannot load its image processor") from None


def write_image_splits(root: Path, paths: list[Path], plan: Plan, processor) -> tuple[int, ...]:
    """Pass 2 for images: the image processor in batches, into each image's place."""
    from PIL import Image

    def pixels(batch_paths):
        images = []
        for p in batch_paths:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)

    tail = pixels(paths[:1]).shape[1:]
    counts = plan.counts()
    writers = {s: SplitWriter(root, s, counts[s], {"pixel_values": tail, "labels": ()}) for s in SPLITS}
    try:
        with progress("processing images", total=len(plan.split)) as bar:
            for i, s in enumerate(SPLITS):
                members = np.flatnonzero(plan.split == i)
                labels = np.empty(counts[s], np.int64)
                labels[plan.pos[members]] = plan.label[members]
                writers[s].write(np.arange(counts[s]), {"labels": labels})
                for start in range(0, len(members), IMAGE_BATCH):
                    part = members[start:start + IMAGE_BATCH]
                    writers[s].write(plan.pos[part], {"pixel_values": pixels([paths[r - 1] for r in plan.row[part]])})
                    bar.advance(len(part))
    finally:
        for w in writers.values():
            w.close()
    return tail


# --------------------------------------------------------------------- prep

def prep(source: str | Path, out: str | Path, opts: PrepOptions | None = None) -> dict:
    """Read, clean, split and tokenize `source` into a dataset artifact at `out`."""
    opts = opts or PrepOptions()
    t0 = time.perf_counter()
    out = Path(out)
    if not 0 <= opts.seed < 2 ** 32:
        raise BadInput(f"--seed {opts.seed}: must be between 0 and {2 ** 32 - 1}")
    encoding = TextEncoding(opts.encoding, opts.encoding_errors)
    check_output(out, opts.force, inputs=[source, opts.val, opts.test, opts.tokenizer])
    with tempfile.TemporaryDirectory(prefix="mk-prep-") as scratch, atomic_output(out, opts.force) as tmp:
        scratch = Path(scratch)
        main = open_source(source, scratch, encoding=encoding)
        extra = [open_source(ref, scratch, split=s, encoding=encoding)
                 for s, ref in (("val", opts.val), ("test", opts.test)) if ref]
        sources = [main, *extra]
        what = str(source)
        if isinstance(main, ImageFolder):
            if any(not isinstance(s, ImageFolder) for s in extra):
                raise BadInput(f"{what}: an image folder's --val/--test must be image folders too")
            if opts.task == "generate":
                raise BadInput(f"{what}: an image folder; --task generate takes text (prompt/completion, "
                               "messages or labelled text)")
            result = _prep_images(tmp, sources, opts, what)
        else:
            if any(isinstance(s, ImageFolder) for s in extra):
                raise BadInput(f"{what}: holds text, but --val/--test name an image folder")
            from mk.core.data import generation  # it builds on this module's passes
            if generation.wanted(main, opts):
                result = generation.prep_generation(tmp, sources, opts, what)
            else:
                result = _prep_text(tmp, sources, opts, what)
        result["sources"] = [dict(f, role=s.split or "main") for s in sources for f in s.files]
        write_manifest(tmp, kind="dataset", format="safetensors", task=result["task"], labels=result["labels"],
                       **{k: v for k, v in result.items() if k not in ("labels", "task")})
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["path"] = str(out)
    return result


def _prep_text(tmp: Path, tables: list[Table], opts: PrepOptions, what: str) -> dict:
    tok = load_tokenizer(opts.tokenizer_for(generate=False))  # a wrong --tokenizer fails before the data is read
    cols = labelled_columns(tables, opts)
    frame, counts, numeric = scan_rows(tables, cols)
    if opts.encoding_errors == "replace":
        counts["bytes_replaced"] = sum(t.replaced for t in tables)
    plan = plan_rows(frame, counts, numeric, opts, what, [t.name for t in tables])
    limit = model_limit(tok)
    encoder = TextEncoder(tok, None)
    if opts.max_length is not None:
        check_max_length(opts.max_length, limit)
        max_length, how = opts.max_length, "--max-length"
    else:
        max_length, how = choose_max_length(tables, cols, plan, encoder, limit, opts.seed)
    log.info("max length %d: %s", max_length, how)
    encoder = TextEncoder(tok, max_length)
    truncation = write_text_splits(tmp, tables, cols, plan, encoder)
    tok.save_pretrained(str(tmp))
    return {
        "task": "text-classification",
        **plan_fields(plan, opts),
        **length_fields(max_length, how, truncation),
        "columns": {"text": cols.text, "text_pair": cols.pair, "label": cols.label, "split": cols.split},
        "tokenizer": tokenizer_identity(tok),
    }


def labelled_columns(tables: list[Table], opts: PrepOptions) -> Columns:
    """The text (and pair), label and split columns: named, known for the embedded
    data, or detected (and said); the --val/--test tables must hold them too."""
    main = tables[0]
    embedded = EMBEDDED_DATA.get(main.embedded) if main.embedded else None
    columns = main.columns()
    if main.format == "text-folder":
        cols = Columns(text="text", label="label", split="split" if "split" in columns else None)
    else:
        cols = detect_columns(main.name, columns,
                              text=opts.text_col or (embedded.text_col if embedded else None),
                              pair=opts.text_pair_col,
                              label=opts.label_col or (embedded.label_col if embedded else None),
                              split=opts.split_col, split_default=len(tables) == 1)
        if cols.detected:
            log.info("columns: %s (detected; name them with --text-col/--text-pair-col/--label-col/--split-col)",
                     ", ".join(cols.detected))
    check_columns(tables[1:], cols)
    return cols


def check_columns(tables: list[Table], cols: Columns) -> None:
    """The --val/--test tables hold the main table's columns."""
    for extra in tables:
        if extra.format != "text-folder":
            names = extra.columns()
            missing = [c for c in (cols.text, cols.pair, cols.label) if c and c not in names]
            if missing:
                raise BadInput(f"{extra.name}: no column {', '.join(map(repr, missing))}; its columns are: "
                               + ", ".join(map(repr, names)))


def plan_fields(plan, opts: PrepOptions) -> dict:
    """What the manifest says of labels, splits and cleaning, for text and images alike."""
    return {"labels": plan.names, "splits": plan.counts(), "label_counts": plan.label_counts(),
            "cleaning": plan.cleaning, "split_fractions": list(opts.split), "seed": opts.seed,
            # the rows the sample holds, which is fewer than asked when the data is smaller
            "sample": None if opts.sample is None else sum(plan.counts().values()),
            "sample_requested": opts.sample}


def length_fields(max_length: int, how: str, truncation: dict[str, float]) -> dict:
    """The manifest's length fields: the length, why it was chosen, and the share of
    rows (per split and in all) that it cut."""
    return {"max_length": max_length, "max_length_from": how,
            "truncation_rate": round(truncation["all"], 6),
            "truncation_by_split": {k: round(v, 6) for k, v in truncation.items() if k != "all"}}


def _prep_images(tmp: Path, folders: list[ImageFolder], opts: PrepOptions, what: str) -> dict:
    processor = load_image_processor(opts.tokenizer_for(generate=False))
    frame, counts, paths = scan_images(folders, opts.skip_bad)
    plan = plan_rows(frame, counts, False, opts, what)
    shape = write_image_splits(tmp, paths, plan, processor)
    processor.save_pretrained(str(tmp))
    return {
        "task": "image-classification",
        **plan_fields(plan, opts),
        "image_size": list(shape),
        "image_processor": {"class": type(processor).__name__},
    }
