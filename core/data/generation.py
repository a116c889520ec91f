"""`mk prep --task generate`: examples for a causal LM, in the generation dataset
contract (docs: README, `mk prep`, "Generation datasets").

Three shapes of source become (prompt, completion) token pairs:

- `prompt`/`completion` columns (names overridable);
- a chat `messages` column: a list of {role, content}; the last turn, the
  assistant's, is the completion and the turns before it the prompt;
- any labelled source `mk prep` reads for classification, through the
  instruction recipe: the prompt asks for the class of the text, the completion
  is the label's name.

With a chat template the prompt is the templated conversation with the
assistant's turn opened (what `CausalLM.chat_ids` feeds at inference) and the
completion the rest of the whole templated conversation, end-of-turn included;
without one, the prompt's tokens, then the completion's after a space, then EOS.

The rows go through prep.py's own passes: `scan_rows`/`plan_rows` clean, sample,
split (stratified by answer for the recipe) and shuffle; `text_chunks` streams
the kept rows again. Between the two, one pass measures every kept example (its
prompt and whole length) to choose --max-length, drop the rows whose prompt does
not fit, and lay out --pack; the last pass tokenizes again straight into the
memory-mapped splits, so memory stays bounded by a chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from mk.core.console import log, progress
from mk.core.data import prep as base
from mk.core.data.sources import SPLIT_COLUMN_NAMES, Columns, Table
from mk.core.dataset import SPLITS, SplitWriter
from mk.core.embedded import EMBEDDED_DATA
from mk.core.errors import BadInput

PROMPT, COMPLETION, MESSAGES = "prompt", "completion", "messages"  # the column names looked for
CONVERSATION = "_mk_conversation"  # a chat row's messages as one JSON string (derived in the scan)
IGNORE = -100                      # the label of a token without loss (torch's cross-entropy default)
# The instruction recipe's prompt: short (this runs on CPUs), and of five wordings tried on 51 tweets the
# one the untuned SmolLM2-135M-Instruct follows best (18/51 exact; without "Answer with one word." it
# mostly answers "The sentiment of this tweet is …"). README: mk prep, "Generation datasets".
INSTRUCTION = "Classify the {aspect} of this {item} as {choices}. Answer with one word."


@dataclass
class Shape:
    """What the rows of a source are and which columns hold them."""

    kind: str                 # "pairs" (prompt/completion), "chat" (messages) or "recipe" (labelled)
    cols: Columns             # what scan_rows and text_chunks read
    names: dict = field(default_factory=dict)  # the manifest's *_column entries
    instruction: str | None = None  # the recipe's first line (choices filled in once labels are known)
    item: str = "text"        # the recipe's word for a row
    template: bool = True     # the tokenizer's chat template is applied


# ------------------------------------------------------------ which task, which columns

def wanted(main: Table, opts) -> bool:
    """Whether `mk prep` makes a generation dataset: --task generate, or --task auto
    with generation options or prompt/completion or messages columns (said on stderr)."""
    given = [flag for flag, v in (("--prompt-col", opts.prompt_col), ("--completion-col", opts.completion_col),
                                  ("--messages-col", opts.messages_col), ("--pack", opts.pack)) if v]
    if opts.task not in base.TASKS:
        raise BadInput(f"--task {opts.task!r}: expected one of {', '.join(base.TASKS)}")
    if opts.task == "classify":
        if given:
            raise BadInput(f"{given[0]} is an option of --task generate, not of --task classify")
        return False
    if opts.task == "generate":
        return True
    if given:
        log.info("task: generate (%s given)", given[0])
        return True
    if main.format == "text-folder":
        return False
    have = {c.lower() for c in main.columns()}
    found = [MESSAGES] if MESSAGES in have else [PROMPT, COMPLETION] if {PROMPT, COMPLETION} <= have else []
    if found:
        log.info("task: generate (the source has %s; pass --task classify to classify instead)",
                 " and ".join(f"a {c!r} column" for c in found))
    return bool(found)


def _column(columns: list[str], name: str | None, default: str, flag: str, where: str) -> str | None:
    """A named column (exit 2 listing the columns when it is not there) or the default's, if any."""
    if name is not None:
        if name not in columns:
            raise BadInput(f"{where}: no column {name!r} ({flag}); its columns are: " + ", ".join(map(repr, columns)))
        return name
    return {c.lower(): c for c in columns}.get(default)


def example_shape(tables: list[Table], opts) -> Shape:
    """Prompt/completion, chat messages, or (neither) a labelled source for the recipe."""
    main = tables[0]
    columns = [] if main.format == "text-folder" else main.columns()
    messages = _column(columns, opts.messages_col, MESSAGES, "--messages-col", main.name)
    prompt = _column(columns, opts.prompt_col, PROMPT, "--prompt-col", main.name)
    completion = _column(columns, opts.completion_col, COMPLETION, "--completion-col", main.name)
    split = _column(columns, opts.split_col, "", "--split-col", main.name) or (
        next((c for c in columns if c.lower() in SPLIT_COLUMN_NAMES), None) if len(tables) == 1 else None)
    if messages and not (opts.prompt_col or opts.completion_col):
        for i, t in enumerate(tables):
            tables[i] = ConversationTable.of(t, messages)
        return Shape("chat", Columns(text=CONVERSATION, label=None, split=split), {"messages_column": messages})
    if prompt and completion:
        cols = Columns(text=prompt, pair=completion, label=None, split=split)
        base.check_columns(tables[1:], cols)
        return Shape("pairs", cols, {"prompt_column": prompt, "completion_column": completion})
    if prompt or completion or opts.prompt_col or opts.completion_col:
        have, lack = (PROMPT, COMPLETION) if prompt else (COMPLETION, PROMPT)
        raise BadInput(f"{main.name}: a {have!r} column but no {lack!r} column; its columns are: "
                       + ", ".join(map(repr, columns)), hint=f"name it with --{lack}-col")
    cols = base.labelled_columns(tables, opts)
    return _recipe_shape(main, cols)


def _recipe_shape(main: Table, cols: Columns) -> Shape:
    embedded = EMBEDDED_DATA.get(main.embedded) if main.embedded else None
    item = embedded.item if embedded else _words(cols.text)
    instruction = INSTRUCTION.format(aspect=_words(cols.label), item=item, choices="{choices}")
    log.info("recipe: each %s becomes an instruction (\"%s\") answered by its %s", item,
             instruction.replace("{choices}", "…"), _words(cols.label))
    return Shape("recipe", cols, {"prompt_column": cols.text, "completion_column": cols.label}, instruction, item)


def _words(column: str) -> str:
    return column.strip().replace("_", " ").lower()


@dataclass
class ConversationTable(Table):
    """A table whose messages column (a list of {role, content}, or JSON text in a
    CSV) is also read as one JSON string per row: a text that scan_rows can hash and
    clean (an empty list is an empty text) and text_chunks can stream."""

    messages: str = MESSAGES

    @classmethod
    def of(cls, table: Table, messages: str) -> "ConversationTable":
        return cls(**{f.name: getattr(table, f.name) for f in fields(Table)}, messages=messages)

    def scan(self):
        import polars as pl

        lf = super().scan()
        schema = lf.collect_schema()
        if self.messages not in schema:
            raise BadInput(f"{self.name}: no column {self.messages!r}; its columns are: "
                           + ", ".join(map(repr, schema.names())))
        dtype = schema[self.messages]
        col = pl.col(self.messages)
        if dtype == pl.String:
            as_json = col
        elif isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct):
            turns = col.list.eval(pl.element().struct.json_encode()).list.join(",")
            as_json = pl.when(col.list.len() > 0).then(pl.concat_str([pl.lit("["), turns, pl.lit("]")]))
        else:
            raise BadInput(f"{self.name}: column {self.messages!r} holds {dtype}, not chat messages "
                           "(a list of {role, content})")
        return lf.with_columns(as_json.alias(CONVERSATION))


def _chat(text: str, where: str) -> list[dict]:
    """One row's messages, checked: {role, content} strings, ending with the assistant's turn."""
    try:
        turns = json.loads(text)
    except ValueError as e:
        raise BadInput(f"{where}: messages are not JSON ({e})") from None
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
            for t in turns):
        raise BadInput(f"{where}: messages must be a list of {{\"role\": …, \"content\": …}} with text in both")
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise BadInput(f"{where}: the last message must be the assistant's (the completion), after at least "
                       "one other", hint="drop conversations that do not end with an answer")
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def conversations(shape: Shape, table: Table, rows, texts, pairs, answers) -> list[list[dict]]:
    """Each row as messages: the prompt's turns, then the assistant's completion."""
    if shape.kind == "chat":
        return [_chat(t, f"{table.name}: row {r}") for r, t in zip(rows, texts)]
    if shape.kind == "pairs":
        prompts = texts
    else:
        tail = "" if shape.template else "\nAnswer:"  # a plain LM needs the cue a chat turn gives
        prompts = [f"{shape.instruction}\n{shape.item.capitalize()}: {t}" +
                   (f"\n{_words(shape.cols.pair).capitalize()}: {p}" if pairs else "") + tail
                   for t, p in zip(texts, pairs or texts)]
        pairs = answers
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in zip(prompts, pairs)]


# ------------------------------------------------------------------ tokens

class ExampleEncoder:
    """Conversations to (prompt ids, completion ids) with the model's tokenizer:
    templates rendered by transformers (`apply_chat_template`, as at inference),
    the texts tokenized in batches by the Rust tokenizer."""

    def __init__(self, tok, template: bool, limit: int | None):
        from tokenizers import Tokenizer

        self.tok, self.template, self.eos = tok, template, tok.eos_token_id
        self.backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: the saved files stay as they are
        self.backend.no_padding()
        self.backend.no_truncation()
        # a text this long is longer than the model takes whatever its tokens (see prep.CHARS_PER_TOKEN)
        self.cut = base.CHARS_PER_TOKEN * (limit or base.UNLIMITED_TOKENS)

    def _ids(self, texts: list[str], special: bool) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]

    def encode(self, convs: list[list[dict]]) -> tuple[list[list[int]], list[list[int]]]:
        convs = [[dict(t, content=t["content"][:self.cut]) for t in c] for c in convs]
        if not self.template:  # the prompt as `CausalLM.text_ids` encodes it, the completion after a space, EOS
            completions = self._ids([" " + c[-1]["content"] for c in convs], special=False)
            return self._ids([c[0]["content"] for c in convs], special=True), [ids + [self.eos] for ids in completions]
        render = self.tok.apply_chat_template
        prompts = [render(c[:-1], add_generation_prompt=True, tokenize=False) for c in convs]
        fulls = [render(c, tokenize=False) for c in convs]
        if any(not f.startswith(p) for p, f in zip(prompts, fulls)):
            raise BadInput("the tokenizer's chat template renders a conversation differently from its prompt "
                           "followed by the answer, so the completion cannot be told apart",
                           hint="use prompt/completion columns with a tokenizer without a chat template")
        # the chat template writes the special tokens as text: no others are added (as apply_chat_template does)
        return self._ids(prompts, special=False), self._ids([f[len(p):] for p, f in zip(prompts, fulls)], special=False)


def _chunks(tables, shape: Shape, plan, enc: ExampleEncoder):
    """(plan indices, prompt ids, completion ids) of every kept row, a chunk at a time."""
    for table, rows, idx, texts, pairs in base.planned_chunks(tables, shape.cols, plan):
        answers = [plan.names[j] for j in plan.label[idx]] if shape.kind == "recipe" else None
        yield (idx, *enc.encode(conversations(shape, table, rows, texts, pairs, answers)))


def measure(tables, shape: Shape, plan, enc: ExampleEncoder) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each kept row's prompt, and of its whole example."""
    prompt, total = np.zeros(len(plan.split), np.int64), np.zeros(len(plan.split), np.int64)
    with progress("measuring", total=len(plan.split)) as bar:
        for idx, p, c in _chunks(tables, shape, plan, enc):
            prompt[idx] = [len(x) for x in p]
            total[idx] = prompt[idx] + [len(x) for x in c]
            bar.advance(len(idx))
    return prompt, total


def fit(plan, prompt: np.ndarray, total: np.ndarray, opts, limit: int | None, what: str, whole: bool):
    """--max-length (given, or the 95th percentile of the training examples' lengths),
    and the plan without the rows whose prompt leaves no room for an answer (or, when
    `whole`, as for the recipe's label words, whose answer would be cut: no answer)."""
    if opts.max_length is not None:
        base.check_max_length(opts.max_length, limit)
        length, how = opts.max_length, "--max-length"
    else:
        length, how = base.length_from(total[plan.split == 0], limit, "training examples (prompt and completion)")
    keep = (total if whole else prompt + 1) <= length
    if not keep.all():
        empty = [s for i, s in enumerate(SPLITS) if not np.any(keep & (plan.split == i))]
        if empty:
            raise BadInput(f"{what}: the {empty[0]} split is empty once the rows whose prompt does not fit in "
                           f"{length} tokens are dropped", hint="raise --max-length, or shorten the prompts")
        over = int((prompt >= limit).sum()) if limit else 0
        plan.cleaning["prompt_too_long"] = int((~keep).sum())
        if over:
            plan.cleaning["prompt_over_context"] = over
        log.warning("dropped %d row(s) whose prompt %s --max-length %d%s; --max-length %d keeps them all",
                    (~keep).sum(), "and answer do not fit in" if whole else "alone fills", length, f" ({over} fill the model's whole context of {limit})" if over else "",
                    min(int(np.ceil(total.max() / 8) * 8), limit or 1 << 30))
        plan = plan.keep(keep)
    return plan, prompt[keep], total[keep], length, how


# ------------------------------------------------------------------ rows

def pack_layout(plan, total: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each training example goes when packed: its row and first column. Examples
    fill rows in the split's shuffled order, a new row when the next does not fit."""
    row_of, start_of = np.full(len(total), -1, np.int64), np.zeros(len(total), np.int64)
    train = np.flatnonzero(plan.split == 0)
    row, fill = 0, 0
    for i in train[np.argsort(plan.pos[train])]:
        n = min(int(total[i]), length)
        if fill + n > length:
            row, fill = row + 1, 0
        row_of[i], start_of[i] = row, fill
        fill += n
    return row_of, start_of, row + 1


def _rows(prompts, completions, length: int, pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One right-padded row per example, loss on the completion only; and which
    examples lost the end of their completion to `length`."""
    n = len(prompts)
    out = {"input_ids": np.full((n, length), pad_id, np.int32), "attention_mask": np.zeros((n, length), np.int8),
           "labels": np.full((n, length), IGNORE, np.int64),
           "prompt_lengths": np.fromiter(map(len, prompts), np.int32, count=n)}
    cut = np.zeros(n, bool)
    for j, (p, c) in enumerate(zip(prompts, completions)):
        seq = (p + c)[:length]
        out["input_ids"][j, :len(seq)] = seq
        out["attention_mask"][j, :len(seq)] = 1
        out["labels"][j, len(p):len(seq)] = seq[len(p):]
        cut[j] = len(p) + len(c) > length
    return out, cut


def _place(writer: SplitWriter, layout, idx: np.ndarray, part: dict[str, np.ndarray]) -> None:
    """Packed: each example's tokens into its span of its row (prompt_lengths stay 0)."""
    row_of, start_of, _ = layout
    for j, i in enumerate(idx):
        r, s, n = row_of[i], start_of[i], int(part["attention_mask"][j].sum())
        for k in ("input_ids", "attention_mask", "labels"):
            writer.arrays[k][r, s:s + n] = part[k][j, :n]
    writer.flush()


def _blank(writer: SplitWriter, rows: int, length: int, pad_id: int) -> None:
    """A packed split starts as padding (what rows keep after their last example)."""
    for start in range(0, rows, base.CHUNK_ROWS):
        pos = np.arange(start, min(rows, start + base.CHUNK_ROWS))
        writer.write(pos, {"input_ids": np.full((len(pos), length), pad_id, np.int32),
                           "labels": np.full((len(pos), length), IGNORE, np.int64)})


def write_splits(root: Path, tables, shape: Shape, plan, enc: ExampleEncoder, length: int, pad_id: int,
                 layout) -> dict[str, float]:
    """The last pass: tokenize every kept row again, straight into its place (or its
    packed span); the share of each split's examples whose completion was cut."""
    rows = plan.counts() | ({"train": layout[2]} if layout else {})
    tails = {"input_ids": (length,), "attention_mask": (length,), "labels": (length,), "prompt_lengths": ()}
    writers = {s: SplitWriter(root, s, rows[s], tails) for s in SPLITS}
    cut = np.zeros(len(SPLITS), np.int64)
    try:
        if layout:
            _blank(writers["train"], rows["train"], length, pad_id)
        with progress("tokenizing", total=len(plan.split)) as bar:
            for idx, p, c in _chunks(tables, shape, plan, enc):
                arrays, truncated = _rows(p, c, length, pad_id)
                for i, s in enumerate(SPLITS):
                    m = plan.split[idx] == i
                    if not m.any():
                        continue
                    cut[i] += int(truncated[m].sum())
                    part = {k: v[m] for k, v in arrays.items()}
                    if layout and s == "train":
                        _place(writers[s], layout, idx[m], part)
                    else:
                        writers[s].write(plan.pos[idx[m]], part)
                bar.advance(len(idx))
    finally:
        for w in writers.values():
            w.close()
    counts = plan.counts()
    return {s: float(cut[i] / max(counts[s], 1)) for i, s in enumerate(SPLITS)} | {
        "all": float(cut.sum() / len(plan.split))}


# ------------------------------------------------------------------ the step

def load_tokenizer(opts):
    """The model's tokenizer; it must have an end-of-sequence token to end completions.
    An encoder's tokenizer with one is accepted: the dataset is only tokens, and
    `mk tune` refuses a model that does not generate."""
    ref = opts.tokenizer_for(generate=True)
    tok = base.load_tokenizer(ref)
    if tok.eos_token_id is None:
        raise BadInput(f"--tokenizer {ref}: {type(tok).__name__} has no end-of-sequence token, so a completion "
                       "could not end; --task generate needs a causal LM's tokenizer",
                       hint="e.g. --tokenizer smollm2, or a model folder with a *ForCausalLM")
    return tok


def _planned(tables, shape: Shape, opts, what: str, ref: str):
    """Pass 1 (prep.py's): clean, sample, split; the recipe's instruction gets its choices."""
    if shape.kind == "chat" and not shape.template:
        raise BadInput(f"--tokenizer {ref}: has no chat template, and {what} holds chat messages "
                       f"({shape.names['messages_column']!r})",
                       hint="give a chat model's tokenizer, or prompt/completion columns")
    frame, counts, numeric = base.scan_rows(tables, shape.cols)
    if opts.encoding_errors == "replace":
        counts["bytes_replaced"] = sum(t.replaced for t in tables)
    if shape.kind != "recipe":
        counts.pop("no_label")
    plan = base.plan_rows(frame, counts, numeric, opts, what, [t.name for t in tables],
                          labelled=shape.kind == "recipe")
    if shape.kind == "recipe":
        names = plan.names
        choices = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        shape.instruction = shape.instruction.format(choices=choices)
    return plan


def prep_generation(tmp: Path, tables: list[Table], opts, what: str) -> dict:
    """A generation dataset artifact's splits and tokenizer in `tmp`; the manifest's fields."""
    tok = load_tokenizer(opts)  # a wrong --tokenizer fails before the data is read
    shape = example_shape(tables, opts)
    shape.template = bool(getattr(tok, "chat_template", None))
    plan = _planned(tables, shape, opts, what, opts.tokenizer_for(generate=True))
    limit = base.model_limit(tok)
    enc = ExampleEncoder(tok, shape.template, limit)
    prompt, total = measure(tables, shape, plan, enc)
    plan, prompt, total, length, how = fit(plan, prompt, total, opts, limit, what, whole=shape.kind == "recipe")
    log.info("max length %d: %s", length, how)
    layout = pack_layout(plan, total, length) if opts.pack else None
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    truncation = write_splits(tmp, tables, shape, plan, enc, length, pad_id, layout)
    tok.save_pretrained(str(tmp))
    fields_ = base.plan_fields(plan, opts)
    if shape.kind != "recipe":  # no answers to count: the manifest's labels are empty
        fields_ |= {"labels": [], "label_counts": {s: {} for s in SPLITS}}
    return {
        "task": "text-generation",
        **fields_,
        **base.length_fields(length, how, truncation),
        "generation": {"chat_template": shape.template, "packed": bool(opts.pack), "max_length": length,
                       "recipe": "classify" if shape.kind == "recipe" else None,
                       "instruction": shape.instruction,
                       "prompt_column": None, "completion_column": None, "messages_column": None, **shape.names,
                       "train_rows": layout[2] if layout else plan.counts()["train"]},
        "columns": {"split": shape.cols.split} | ({"text_pair": shape.cols.pair} if shape.kind == "recipe" else {}),
        "tokenizer": base.tokenizer_identity(tok),
    }
