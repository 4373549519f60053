"""Data pipeline: files -> tokenizer -> cached token shards -> (input_ids, labels) blocks.

Typical use by the training loop:

    data = prepare_data("builtin:python-stdlib", tokenizer="bpe", vocab_size=4096, num_workers=0)
    loader = BlockLoader(data.train, seq_len, micro_batch_size, grad_accum_steps, world_size, rank, seed)
    for micro_batch in loader.next_step(): ...
    for batch in eval_batches(data.val, seq_len, batch_size): ...

With weights ("0.7,0.3", one per comma-separated entry of the path) data.train is a TokenMixture and
loader.tokens_by_source() counts what each source has given. docs/data.md has the whole story.
"""

from .blocks import document_positions, make_batch, num_blocks
from .cache import default_cache_dir
from .errors import DataError
from .loader import BlockLoader, eval_batches
from .mixture import TokenMixture, parse_weights
from .prepare import PreparedData, prepare_data, token_dtype
from .shards import TokenShards
from .sources import BUILTIN_STDLIB, Corpus, resolve_corpus, split_path
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, build_tokenizer, load_tokenizer, train_bpe

__all__ = [
    "BUILTIN_STDLIB",
    "BlockLoader",
    "ByteTokenizer",
    "Corpus",
    "DataError",
    "HFTokenizer",
    "PreparedData",
    "TokenMixture",
    "TokenShards",
    "Tokenizer",
    "build_tokenizer",
    "default_cache_dir",
    "document_positions",
    "eval_batches",
    "load_tokenizer",
    "make_batch",
    "num_blocks",
    "parse_weights",
    "prepare_data",
    "resolve_corpus",
    "split_path",
    "token_dtype",
    "train_bpe",
]
