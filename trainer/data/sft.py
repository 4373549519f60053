"""Supervised fine-tuning data: .jsonl examples -> tokens with a target mask -> packed rows.

Each line is {"prompt": ..., "completion": ...} or {"messages": [{"role", "content"}, ...]}.
Only completion tokens (for messages: the assistant turns, rendered with the tokenizer's chat
template) are trained; prompt tokens get the ignored label -100.

Packing: whole examples go into rows of seq_len + 1 tokens (best fit, longest first), the rest of
a row is padding. Every batch carries position_ids and document_ids, so attention never crosses
an example and positions restart at each: a packed row trains exactly like its examples run one
by one, without spending compute on a row per example. An example never straddles two rows, so
its completion always sees its whole prompt; one longer than a row is cut at seq_len + 1 tokens.
Rows are the loader's blocks: it shuffles, splits and resumes them exactly as text blocks.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch

from trainer.constants import IGNORE_INDEX

from .errors import DataError
from .readers import jsonl_lines
from .sources import resolve_corpus
from .split import ValSplit
from .tokenizer import HFTokenizer, Tokenizer

log = logging.getLogger("trainer.data")


@dataclass
class Example:
    tokens: np.ndarray  # int64
    targets: np.ndarray  # bool: the token is trained (predicted from the ones before it)


# ----------------------------------------------------------------------- reading and rendering


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(example id, object) for every line of the .jsonl files `path` names."""
    corpus = resolve_corpus(path)
    others = [s.name for s in corpus.sources if not s.is_jsonl]
    if others:
        raise DataError(
            f"data.format=sft reads .jsonl (.gz, .zst) files only, but {path!r} also holds {others[:3]}; "
            "point data.path at the .jsonl file(s)"
        )
    for source in corpus.sources:
        for lineno, line, _ in jsonl_lines(source):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(f"{source.path}, line {lineno}: not valid JSON ({reason})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{source.path}, line {lineno}: expected a JSON object")
            yield f"{source.name}:{lineno}", obj


def render_chat(template: str, messages: list[dict], tokenizer: HFTokenizer, add_generation_prompt: bool) -> str:
    """Renders `messages` with a Hugging Face chat template, in the Jinja environment transformers uses."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' version: Jinja's own escapes <, > and & for HTML, which templates do not want.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    specials = {name: tokenizer.special_token(name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        **{k: v for k, v in specials.items() if v is not None},
    )


def _text_field(obj: dict, key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} holds a value of type {type(value).__name__}, expected a string")
    return value


def encode_example(obj: dict, tokenizer: Tokenizer, where: str) -> Example:
    """Tokens and target mask of one example; `where` names it in errors."""
    if "messages" in obj:
        pieces = _chat_pieces(obj["messages"], tokenizer, where)
    elif "prompt" in obj and "completion" in obj:
        # The prompt gets the tokenizer's BOS as at generation time; EOS ends the completion so
        # the model learns to stop.
        prompt = tokenizer.encode_markup(_text_field(obj, "prompt", where), add_special_tokens=True)
        completion = tokenizer.encode_markup(_text_field(obj, "completion", where)) + [tokenizer.eos_id]
        pieces = [(prompt, False), (completion, True)]
    else:
        raise DataError(
            f"{where}: an SFT example needs 'prompt' and 'completion', or 'messages'; found {sorted(obj)[:10]}"
        )
    tokens = np.array([t for ids, _ in pieces for t in ids], dtype=np.int64)
    targets = np.array([trained for ids, trained in pieces for _ in ids], dtype=bool)
    if len(targets):
        targets[0] = False  # nothing comes before the first token to predict it from
    return Example(tokens, targets)


def _chat_pieces(messages, tokenizer: Tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """The conversation as (token ids, trained) pieces: assistant turns trained, the rest not.

    Rendering the conversation up to each assistant turn, with and without it, splits the text
    at the turn's edges; each piece is encoded on its own, as generation would see the prompt.
    """
    template = tokenizer.chat_template if isinstance(tokenizer, HFTokenizer) else None
    if template is None:
        raise DataError(
            f"{where}: 'messages' needs a chat template, and the tokenizer's folder has none "
            "(tokenizer_config.json 'chat_template' or chat_template.jinja); use 'prompt' and "
            "'completion' fields, or a tokenizer folder that has a template"
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message to train on")
    from jinja2 import TemplateError

    pieces, done = [], ""
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render_chat(template, messages[:i], tokenizer, add_generation_prompt=True)
            after = render_chat(template, messages[: i + 1], tokenizer, add_generation_prompt=False)
            if not (before.startswith(done) and after.startswith(before)):
                raise DataError(
                    f"{where}: the chat template does not render a conversation's beginning as a "
                    "prefix of the whole, so assistant turns cannot be located; use 'prompt' and "
                    "'completion' fields instead"
                )
            pieces += [(before[len(done) :], False), (after[len(before) :], True)]
            done = after
        full = render_chat(template, messages, tokenizer, add_generation_prompt=False)
    except TemplateError as e:
        raise DataError(f"{where}: the chat template failed: {e}") from None
    pieces.append((full[len(done) :], False))
    return [(tokenizer.encode_markup(text), trained) for text, trained in pieces if text]


# ----------------------------------------------------------------------- packing


class PackedExamples:
    """Examples packed into rows of seq_len + 1 tokens; `batch(rows)` gives the model's inputs.

    Stores the examples' tokens once, flat, and each row as a list of example indices.
    """

    def __init__(self, examples: list[Example], seq_len: int, pad_id: int):
        self.seq_len, self.eos_id = seq_len, pad_id
        lengths = np.array([len(e.tokens) for e in examples], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.tokens = np.concatenate([e.tokens for e in examples]) if examples else np.zeros(0, np.int64)
        self.targets = np.concatenate([e.targets for e in examples]) if examples else np.zeros(0, bool)
        self.rows = _best_fit(lengths, seq_len + 1)
        self.n_blocks = len(self.rows)

    def __len__(self) -> int:
        return len(self.tokens)  # tokens in examples, padding not counted

    def batch(self, row_indices) -> dict[str, torch.Tensor]:
        """input_ids, labels, position_ids, document_ids (int64, (B, seq_len)) of these rows."""
        width = self.seq_len + 1
        n = len(row_indices)
        tokens = np.full((n, width), self.eos_id, dtype=np.int64)
        targets = np.zeros((n, width), dtype=bool)
        positions = np.zeros((n, width), dtype=np.int64)
        documents = np.zeros((n, width), dtype=np.int64)
        for r, row in enumerate(row_indices):
            col = 0
            for doc, example in enumerate(self.rows[row]):
                start, end = self.offsets[example], self.offsets[example + 1]
                length = end - start
                tokens[r, col : col + length] = self.tokens[start:end]
                targets[r, col : col + length] = self.targets[start:end]
                positions[r, col : col + length] = np.arange(length)
                documents[r, col : col + length] = doc
                col += length
            positions[r, col:] = np.arange(width - col)  # the padding is one more document, never trained
            documents[r, col:] = len(self.rows[row])
        labels = np.where(targets, tokens, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
            "labels": torch.from_numpy(labels[:, 1:].copy()),
            "position_ids": torch.from_numpy(positions[:, :-1].copy()),
            "document_ids": torch.from_numpy(documents[:, :-1].copy()),
        }


def _best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of example indices: longest first, each into the fullest row it fits (best-fit
    decreasing: few rows, little padding, deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free slots, row), sorted
    for i in order:
        at = bisect.bisect_left(free, (int(lengths[i]), -1))
        if at == len(free):
            rows.append([i])
            row, left = len(rows) - 1, capacity - int(lengths[i])
        else:
            left, row = free.pop(at)
            rows[row].append(i)
            left -= int(lengths[i])
        if left > 0:
            bisect.insort(free, (left, row))
    for row in rows:
        row.sort()  # file order inside a row
    return rows


# ----------------------------------------------------------------------- preparing


@dataclass
class SFTData:
    tokenizer: Tokenizer
    train: PackedExamples
    val: PackedExamples | None
    n_examples: int  # read from the file
    n_cut: int  # longer than a row: cut to train.seq_len + 1 tokens
    n_dropped: int  # left no completion token after the cut: not trained on
    n_train: int
    n_val: int

    def describe(self) -> str:
        """What the data became, for the run's start line: examples, then rows (the training unit)."""
        cut = f", {self.n_cut:,} cut to train.seq_len" if self.n_cut else ""
        dropped = f", {self.n_dropped:,} dropped (no completion left)" if self.n_dropped else ""
        val = f" + {self.n_val:,} validation" if self.val is not None else ""
        return (
            f"{self.n_examples:,} examples read{cut}{dropped}; {self.n_train:,} training{val} examples "
            f"packed into {self.train.n_blocks:,} training rows of {self.train.seq_len + 1} tokens"
        )


def prepare_sft(path: str, tokenizer: Tokenizer, seq_len: int, val_fraction: float = 0.01) -> SFTData:
    """Reads, encodes and packs the examples of `path` (tokenized in memory on every start: SFT sets
    are small next to pretraining corpora). The split and the packing are deterministic, so a
    resumed run sees the same rows."""
    examples = list(read_jsonl(path))
    if not examples:
        raise DataError(f"data path {path!r} holds no SFT examples")
    split = ValSplit((doc_id for doc_id, _ in examples), val_fraction)
    parts: dict[str, list[Example]] = {"train": [], "val": []}
    cut = dropped = 0
    for doc_id, obj in examples:
        example = encode_example(obj, tokenizer, doc_id)
        if len(example.tokens) > seq_len + 1:
            example = Example(example.tokens[: seq_len + 1], example.targets[: seq_len + 1])
            cut += 1
        if not example.targets.any():
            dropped += 1  # nothing left to learn from (the prompt fills the row)
            continue
        parts["val" if split.is_val(doc_id) else "train"].append(example)
    if cut:
        log.warning(
            "%d of %d SFT examples are longer than train.seq_len + 1 = %d tokens and were cut "
            "(%d kept no completion and were left out); raise train.seq_len to keep them whole",
            cut,
            len(examples),
            seq_len + 1,
            dropped,
        )
    if not parts["train"]:
        raise DataError(
            f"no SFT example of {path!r} has a completion token to train on within train.seq_len="
            f"{seq_len}; raise train.seq_len or check the examples"
        )
    train = PackedExamples(parts["train"], seq_len, tokenizer.eos_id)
    val = PackedExamples(parts["val"], seq_len, tokenizer.eos_id) if parts["val"] else None
    data = SFTData(tokenizer, train, val, len(examples), cut, dropped, len(parts["train"]), len(parts["val"]))
    log.info("SFT data %r: %s", path, data.describe())
    return data
