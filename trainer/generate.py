"""Sampling from a checkpoint: greedy decoding, or temperature sampling with top-p (nucleus) filtering.

Each new token runs the model over the whole sequence again (the model keeps no key/value cache):
simple and exact, and quick enough to look at what a run learned.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from trainer.errors import CheckpointError, ConfigError
from trainer.files import require_folder


def load_for_generation(path: str | Path, device: torch.device):
    """(model, tokenizer) of a run's final/checkpoint-<step> folder (a LoRA run's adapter folder
    too) or a Hugging Face folder with tokenizer.json."""
    from trainer.data import load_tokenizer
    from trainer.lora import is_adapter_folder, load_adapter_model
    from trainer.models import load_hf

    path = require_folder(path, "generate:", "a run's final or checkpoint-<step> folder, or a Hugging Face folder")
    adapter = is_adapter_folder(path)
    if not adapter and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{str(path)!r} is not a model folder (no config.json); pass a run's final or "
            "checkpoint-<step> folder, or a Hugging Face folder"
        )
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no tokenizer.json to encode the prompt with")
    if adapter:
        quantize, fsdp = "none", False
        if (path / "run_config.toml").is_file():  # a QLoRA run's base is rebuilt in 4-bit, as it trained
            from trainer.config import load_config

            run = load_config(path / "run_config.toml")
            quantize, fsdp = run.lora.quantize, run.parallel.strategy == "fsdp"
        return load_adapter_model(path, quantize=quantize, device=device, fsdp=fsdp), load_tokenizer(str(path))
    return load_hf(path).to(device).eval(), load_tokenizer(str(path))


def context_limit(model) -> int:
    """The longest sequence the model accepts (its positions, and Mistral's sliding window)."""
    return min(model.args.max_seq_len, model.args.sliding_window or model.args.max_seq_len)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from (vocab,) logits: the argmax when temperature is 0, else a draw from the
    tempered distribution cut to the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # A token stays when the tokens ranked above it hold less than top_p (so the first always stays).
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(
    model,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The new token ids after `prompt_ids`, ending at EOS (left out), max_new_tokens, or the context limit."""
    limit = context_limit(model)
    if not prompt_ids:
        raise ConfigError("the prompt encodes to no tokens; give a non-empty --prompt")
    if len(prompt_ids) >= limit:
        raise ConfigError(
            f"the prompt is {len(prompt_ids)} tokens; the model takes at most {limit}, "
            "including what it generates: shorten the prompt"
        )
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    new: list[int] = []
    while len(new) < max_new_tokens and ids.shape[1] < limit:
        token = sample_next(model(ids)[0, -1], temperature, top_p, generator)
        if token == eos_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr through the CLI's error path, no usage dump
        raise ConfigError(f"generate: {message}; see `python -m trainer generate --help`")


def generate_command(argv: list[str]) -> int:
    """`python -m trainer generate CHECKPOINT_DIR --prompt TEXT [options]`: prints the completion."""
    parser = _ArgumentParser(
        prog="python -m trainer generate",
        description="Continue a prompt with a checkpoint: a run's final or checkpoint-<step> "
        "folder, or a Hugging Face folder with tokenizer.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a run's final/ or checkpoint-<step>/ folder, or a Hugging Face folder")
    parser.add_argument("--prompt", required=True, default=argparse.SUPPRESS, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="sampling keeps the most likely tokens up to this probability mass"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if present")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("generate: --max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("generate: --device cuda but no CUDA device is available")
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    model, tokenizer = load_for_generation(args.checkpoint, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    # The prompt is text for the model: special-token strings count, and BOS is added as in training.
    prompt_ids = tokenizer.encode_markup(args.prompt, add_special_tokens=True)
    new = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id, generator)
    print(tokenizer.decode(new))
    return 0
