"""Where `mk prep` reads labelled data from.

- Tables: CSV, TSV, JSON lines and Parquet files (optionally .gz / .bz2 / .xz
  compressed), scanned lazily with polars so that a file larger than memory
  streams through in chunks.
- Class folders: one sub-folder per class holding `.txt` files (one document
  per file) or images; a folder whose sub-folders are `train/`, `val/`, `test/`
  gives the splits explicitly.
- The embedded dataset by name (`tweets`).

Every table becomes a polars LazyFrame; column names are detected from common
names when the user does not give them. Nothing here tokenizes.
"""

from __future__ import annotations

import bz2
import codecs
import contextvars
import gzip
import hashlib
import json
import lzma
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mk.core.artifact import sha256_file
from mk.core.console import log
from mk.core.embedded import EMBEDDED_DATA, data_path
from mk.core.errors import BadInput, first_line

TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                 ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": "train", "training": "train",
               "val": "val", "valid": "val", "validation": "val", "dev": "val",
               "test": "test", "testing": "test", "eval": "test"}

# Common column names, best first (matched case-insensitively).
TEXT_NAMES = ("text", "sentence", "review", "review_text", "content", "document", "body", "comment",
              "tweet", "message", "sms", "utterance", "query", "question", "text_a", "sentence1", "premise")
PAIR_NAMES = {"sentence1": "sentence2", "premise": "hypothesis", "text_a": "text_b", "question1": "question2",
              "text": "text_pair", "question": "passage"}
LABEL_NAMES = ("label", "labels", "sentiment", "class", "category", "target", "y", "polarity", "emotion",
               "intent", "topic", "stars", "rating", "spam", "is_spam", "gold_label")
SPLIT_COLUMN_NAMES = ("split", "subset", "partition")


@dataclass
class Table:
    """One labelled table: a file (or the rows of a text folder) that polars scans."""

    name: str                 # how messages name it: the path as given, or `tweets`
    format: str               # csv, tsv, jsonl, parquet, text-folder
    split: str | None = None  # the split it provides when given by --val / --test
    path: Path | None = None  # the file polars reads (a decompressed copy for .gz/.bz2/.xz)
    encoding: str = "utf8"    # utf8, or utf8-lossy for the embedded tweets file
    separator: str = ","      # of a CSV: a comma, or `;` or a tab when the header has only those
    frame: object = None      # an in-memory polars DataFrame (text folders)
    embedded: str | None = None  # the name of an embedded dataset (its columns are known)
    files: list[dict] = field(default_factory=list)  # what the manifest lists as sources
    replaced: int = 0         # undecodable bytes replaced under --encoding-errors replace

    def scan(self):
        """The table as a polars LazyFrame (nothing read yet)."""
        import polars as pl

        if self.frame is not None:
            return self.frame.lazy()
        p = str(self.path)
        if self.format in ("csv", "tsv"):
            # every column as the text written: type inference would rewrite values
            # (labels 01 and 1 would become one class 1, true would become 1)
            return pl.scan_csv(p, separator="\t" if self.format == "tsv" else self.separator, encoding=self.encoding,
                               infer_schema=False, quote_char='"')
        if self.format == "jsonl":
            return pl.scan_ndjson(p, infer_schema_length=10000)
        return pl.scan_parquet(p)

    def columns(self) -> list[str]:
        import polars as pl

        try:
            return list(self.scan().collect_schema().names())
        except (OSError, pl.exceptions.PolarsError) as e:
            raise self.read_error(e) from None

    def read_error(self, e: Exception) -> BadInput:
        """The error for a file polars cannot read; for JSON lines it names the first bad line."""
        if self.format == "jsonl" and self.path is not None:
            with open(self.path, "rb") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        value = json.loads(line)
                    except ValueError as bad:
                        return BadInput(f"{self.name}: line {i} is not valid JSON ({bad})",
                                        hint="fix or drop that line")
                    if not isinstance(value, dict):
                        return BadInput(f"{self.name}: line {i} is not a JSON object")
        return BadInput(f"{self.name}: cannot read as {self.format.upper()} ({first_line(e)})")


@dataclass
class ImageFolder:
    """Images in class sub-folders: (file, label, split) for every image."""

    name: str
    items: list[tuple[Path, str, str | None]]
    files: list[dict] = field(default_factory=list)
    format: str = "image-folder"
    split: str | None = None  # the split it provides when given by --val / --test


@dataclass(frozen=True)
class TextEncoding:
    """How text files are decoded (`--encoding`, `--encoding-errors`): any codec
    Python knows; `replace` puts U+FFFD for undecodable bytes and counts them."""

    name: str = "utf-8"
    errors: str = "strict"

    def __post_init__(self):
        try:
            object.__setattr__(self, "name", codecs.lookup(self.name).name)
        except LookupError:
            raise BadInput(f"--encoding {self.name!r}: not a codec Python knows",
                           hint="e.g. utf-8, latin-1, cp1252, utf-16") from None
        if self.errors not in ("strict", "replace"):
            raise BadInput(f"--encoding-errors {self.errors!r}: expected strict or replace")

    @property
    def is_utf8_strict(self) -> bool:
        return self.name == "utf-8" and self.errors == "strict"


UTF8 = TextEncoding()

# Counts the bytes replaced while decoding under `--encoding-errors replace`: a
# codec error handler is looked up by name, so the count it adds to lives in a
# context variable set around each decode.
_replaced: contextvars.ContextVar[list[int]] = contextvars.ContextVar("mk_replaced")


def _replace_counted(e: UnicodeDecodeError):
    _replaced.get()[0] += e.end - e.start
    return "\ufffd", e.end


codecs.register_error("mk-replace-counted", _replace_counted)


def decode_counted(data: bytes, enc: TextEncoding) -> tuple[str, int]:
    """`data` decoded as `enc` says, and how many bytes were replaced."""
    box = [0]
    token = _replaced.set(box)
    try:
        return data.decode(enc.name, "mk-replace-counted" if enc.errors == "replace" else "strict"), box[0]
    finally:
        _replaced.reset(token)


def transcode_to_utf8(src: Path, dst: Path, enc: TextEncoding, chunk: int = 1 << 22) -> int:
    """Stream `src` in encoding `enc` into UTF-8 at `dst`; the count of replaced bytes.
    (polars reads UTF-8 alone; this pass is what lets it read any other codec.)"""
    box = [0]
    token = _replaced.set(box)
    decoder = codecs.getincrementaldecoder(enc.name)("mk-replace-counted" if enc.errors == "replace" else "strict")
    try:
        with open(src, "rb") as f, open(dst, "w", encoding="utf-8", newline="") as out:
            while True:
                block = f.read(chunk)
                out.write(decoder.decode(block, final=not block))
                if not block:
                    return box[0]
    finally:
        _replaced.reset(token)


def open_source(ref: str | Path, tmpdir: Path, split: str | None = None, encoding: TextEncoding = UTF8):
    """A Table or an ImageFolder for a path or an embedded name; exit 2 when it is
    missing or of an unknown format. Compressed files are decompressed into `tmpdir`,
    and text in another encoding than UTF-8 is transcoded there; what polars reads
    is valid UTF-8 (the embedded tweets, with their mojibake, are read lossily)."""
    ref_s = str(ref)
    p = Path(ref_s)
    if not p.exists() and ref_s in EMBEDDED_DATA:
        src = EMBEDDED_DATA[ref_s]
        path = data_path(ref_s)
        if not path.is_file():
            raise BadInput(f"the embedded dataset {ref_s!r} is missing from its package ({path})")
        return Table(name=ref_s, format="csv", split=split, path=path, encoding=src.encoding,
                     embedded=ref_s, files=[_file_entry(path, ref_s)])
    if not p.exists():
        hint = f"embedded datasets: {', '.join(EMBEDDED_DATA)}" if split is None else None
        raise BadInput(f"{ref_s}: no such file or directory", hint=hint)
    if p.is_dir():
        return open_folder(p, split, encoding)
    suffixes = [s.lower() for s in p.suffixes]
    opener = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    fmt_suffix = suffixes[-2] if opener and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    fmt = TABLE_FORMATS.get(fmt_suffix)
    if fmt is None:
        raise BadInput(f"{ref_s}: unknown format {fmt_suffix or '(no extension)'!r}",
                       hint="mk prep reads .csv, .tsv, .jsonl, .parquet (optionally .gz/.bz2/.xz), "
                            "or a folder with one sub-folder per class")
    read_path = p
    if opener is not None:
        read_path = tmpdir / f"{len(list(tmpdir.iterdir()))}{fmt_suffix}"
        try:
            with opener(p, "rb") as src, open(read_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise BadInput(f"{ref_s}: cannot decompress ({first_line(e)})") from None
    replaced = 0
    if fmt != "parquet" and not encoding.is_utf8_strict:
        utf8_path = tmpdir / f"{len(list(tmpdir.iterdir()))}{fmt_suffix}"
        try:
            replaced = transcode_to_utf8(read_path, utf8_path, encoding)
        except UnicodeDecodeError as e:
            raise BadInput(f"{ref_s}: not valid {encoding.name} ({first_line(e)})",
                           hint="name the file's encoding with --encoding, or pass --encoding-errors replace") \
                from None
        read_path = utf8_path
    if fmt == "jsonl":
        with open(read_path, "rb") as f:
            head = f.read(4096)
            if head.startswith(codecs.BOM_UTF8):  # as Windows tools write it; polars reads no BOM in JSON
                f.seek(len(codecs.BOM_UTF8))
                unbommed = tmpdir / f"{len(list(tmpdir.iterdir()))}{fmt_suffix}"
                with open(unbommed, "wb") as dst:
                    shutil.copyfileobj(f, dst, 1 << 22)
                read_path, head = unbommed, head[len(codecs.BOM_UTF8):]
        if head.lstrip().startswith(b"["):
            raise BadInput(f"{ref_s}: a JSON array; mk prep reads JSON lines (one object per line)",
                           hint="convert it, e.g. `jq -c '.[]' in.json > out.jsonl`")
    separator = _sniff_separator(read_path) if fmt == "csv" else ","
    table = Table(name=ref_s, format=fmt, split=split, path=read_path, separator=separator,
                  files=[_file_entry(p, ref_s)], replaced=replaced)
    if encoding.is_utf8_strict:
        check_utf8(table)
    return table


def _sniff_separator(path: Path) -> str:
    """`;` (as spreadsheets in many locales write them) or a tab for a .csv file whose
    header line holds those and no commas, else `,`."""
    with open(path, "rb") as f:
        header = f.readline(1 << 16)
    if b"," in header:
        return ","
    return "\t" if b"\t" in header else ";" if b";" in header else ","


def _file_entry(path: Path, name: str) -> dict:
    return {"path": name if name in EMBEDDED_DATA else str(Path(path).resolve()),
            "bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def open_folder(root: Path, split: str | None = None, encoding: TextEncoding = UTF8):
    """A folder of class sub-folders (or of train/val/test folders of class sub-folders)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and _visible(d))
    if not subdirs:
        raise BadInput(f"{root}: a folder source needs one sub-folder per class")
    split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_NAMES]
    if split is None and split_dirs and len(split_dirs) == len(subdirs):
        layout = [(d, SPLIT_NAMES[d.name.lower()]) for d in subdirs]
    else:
        layout = [(root, split)]
    entries: list[tuple[Path, str, str | None]] = []
    for base, sp in layout:
        classes = sorted(d for d in base.iterdir() if d.is_dir() and _visible(d))
        if not classes:
            raise BadInput(f"{base}: no class sub-folders")
        for cls in classes:
            before = len(entries)
            for f in sorted(cls.rglob("*")):
                if f.is_file() and _visible(f):
                    entries.append((f, cls.name, sp))
            if len(entries) == before:
                log.warning("%s: empty class folder, skipped (its class is not in the dataset)", cls)
    texts = [e for e in entries if e[0].suffix.lower() == ".txt"]
    images = [e for e in entries if e[0].suffix.lower() in IMAGE_SUFFIXES]
    if texts and images:
        raise BadInput(f"{root}: holds both .txt files ({len(texts)}) and images ({len(images)})",
                       hint="keep one kind of document per source")
    if not texts and not images:
        raise BadInput(f"{root}: no .txt files or images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    chosen = texts or images
    digest = hashlib.sha256()
    for f, _, _ in chosen:
        digest.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    files = [{"path": str(root.resolve()), "files": len(chosen), "bytes": sum(f.stat().st_size for f, _, _ in chosen),
              "sha256": digest.hexdigest(), "note": "sha256 over (relative path, file sha256) lines, sorted"}]
    if images:
        return ImageFolder(name=str(root), items=images, files=files, split=split)
    frame, replaced = _read_text_folder(root, texts, encoding)
    return Table(name=str(root), format="text-folder", split=split, frame=frame, files=files, replaced=replaced)


def _read_text_folder(root: Path, entries, encoding: TextEncoding):
    import polars as pl

    docs, labels, splits, names = [], [], [], []
    replaced = 0
    for f, label, sp in entries:
        try:
            text, n = decode_counted(f.read_bytes(), encoding)
        except UnicodeDecodeError as e:
            raise BadInput(f"{f}: not valid {encoding.name} (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                           hint="name the files' encoding with --encoding (e.g. latin-1), "
                                "or pass --encoding-errors replace") from None
        docs.append(text)
        replaced += n
        labels.append(label)
        splits.append(sp)
        names.append(f.relative_to(root).as_posix())
    frame = {"text": docs, "label": labels, "file": names}
    if any(s is not None for s in splits):
        frame["split"] = splits
    return pl.DataFrame(frame), replaced


# ---------------------------------------------------------------- UTF-8 checks

def check_utf8(table: Table, chunk: int = 1 << 22) -> None:
    """Exit 2 naming the row when a CSV/TSV/JSONL file is not valid UTF-8 (one
    streaming pass when the source is opened, so that no later read meets bad bytes;
    the embedded tweets file is read lossily by design)."""
    if table.path is None or table.encoding != "utf8" or table.format == "parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(table.path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise bad_utf8(table, offset + e.start, bytes(e.object[e.start:e.start + 1])) from None
            if not block:
                return
            offset += len(block)


def bad_utf8(table: Table, offset: int, byte: bytes) -> BadInput:
    """The error for a file that is not UTF-8, naming the first bad row (and line)."""
    with open(table.path, "rb") as f:
        head = f.read(offset)
    line = head.count(b"\n") + 1
    row = _bad_row(table)
    where = f"row {row} (line {line})" if row is not None else f"line {line}"
    return BadInput(f"{table.name}: {where} is not valid UTF-8 (byte 0x{byte.hex()} "
                    f"at offset {offset})", hint="name the file's encoding with --encoding (e.g. latin-1, "
                    "cp1252), or pass --encoding-errors replace")


def _bad_row(table: Table) -> int | None:
    """The first data row (1-based) holding a replacement character when read lossily."""
    import polars as pl

    if table.format not in ("csv", "tsv"):
        with open(table.path, "rb") as f:  # JSON lines: a row is a line
            for i, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return i
        return None
    try:
        lf = pl.scan_csv(str(table.path), separator="\t" if table.format == "tsv" else table.separator,
                         encoding="utf8-lossy", infer_schema=False).with_row_index("_row", offset=1)
        cols = [c for c in lf.collect_schema().names() if c != "_row"]
        hit = (lf.filter(pl.any_horizontal(pl.col(c).str.contains("\ufffd", literal=True) for c in cols))
                 .select("_row").head(1).collect())
        return int(hit["_row"][0]) if hit.height else None
    except pl.exceptions.PolarsError:
        return None


# ------------------------------------------------------------ column detection

@dataclass
class Columns:
    text: str
    label: str | None  # None: unlabelled examples (prompt/completion)
    pair: str | None = None
    split: str | None = None
    detected: list[str] = field(default_factory=list)  # which were chosen by name


def detect_columns(table_name: str, columns: list[str], text: str | None = None, pair: str | None = None,
                   label: str | None = None, split: str | None = None, split_default: bool = True) -> Columns:
    """The columns to use: those named, else detected from common names. A named
    column that does not exist lists the columns that do."""
    have = {c.strip().lower(): c for c in columns}
    missing = [f"{opt} {name!r}" for opt, name in (("--text-col", text), ("--text-pair-col", pair),
                                                     ("--label-col", label), ("--split-col", split))
               if name is not None and name not in columns]
    if missing:
        raise BadInput(f"{table_name}: no column {', '.join(missing)}; its columns are: "
                       + ", ".join(map(repr, columns)))
    detected = []
    if text is None:
        text = next((have[n] for n in TEXT_NAMES if n in have), None)
        if text is None:
            raise BadInput(f"{table_name}: no text column found among: {', '.join(map(repr, columns))}",
                           hint="a generation source needs a 'completion' column beside its 'prompt'"
                           if "prompt" in have else "name it with --text-col")
        detected.append(f"text={text!r}")
        if pair is None:
            partner = PAIR_NAMES.get(text.strip().lower())
            if partner and partner in have:
                pair = have[partner]
                detected.append(f"text pair={pair!r}")
    if label is None:
        label = next((have[n] for n in LABEL_NAMES if n in have and have[n] not in (text, pair)), None)
        if label is None:
            raise BadInput(f"{table_name}: no label column found among: {', '.join(map(repr, columns))}",
                           hint="name it with --label-col")
        detected.append(f"label={label!r}")
    if split is None and split_default:
        split = next((have[n] for n in SPLIT_COLUMN_NAMES if n in have and have[n] not in (text, pair, label)), None)
        if split is not None:
            detected.append(f"split={split!r}")
    used = [c for c in (text, pair, label, split) if c is not None]
    if len(set(used)) != len(used):
        raise BadInput(f"{table_name}: the same column is used twice ({', '.join(used)})")
    return Columns(text=text, pair=pair, label=label, split=split, detected=detected)
