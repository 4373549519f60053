"""Data pipeline: text files -> tokenizer -> cached flat token streams -> (input_ids, labels) blocks.

Typical use by the training loop:

    data = prepare_data("builtin:python-stdlib", tokenizer="bpe", vocab_size=4096)
    loader = BlockLoader(data.train, seq_len, micro_batch_size, grad_accum_steps, world_size, rank, seed)
    for micro_batch in loader.next_step(): ...
    for batch in eval_batches(data.val, seq_len, batch_size): ...
"""

from .blocks import document_positions, make_batch, num_blocks
from .errors import DataError
from .loader import BlockLoader, eval_batches
from .prepare import PreparedData, default_cache_dir, prepare_data, token_dtype
from .sources import BUILTIN_STDLIB, Corpus, resolve_corpus
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "BUILTIN_STDLIB",
    "BlockLoader",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "HFTokenizer",
    "PreparedData",
    "Tokenizer",
    "build_tokenizer",
    "default_cache_dir",
    "document_positions",
    "eval_batches",
    "load_tokenizer",
    "make_batch",
    "num_blocks",
    "prepare_data",
    "resolve_corpus",
    "token_dtype",
    "train_bpe",
]
