"""Build a tiny random-weight Llama and a locally trained byte-level BPE tokenizer.

No model can be downloaded on CI machines, so the real-vLLM test tier serves this one:
a 2-layer Llama (hidden 256, 4 heads) with random weights, in float32, and a byte-level
BPE tokenizer trained in a second on generated English-like text, with a chat template.
Outputs are random text; requests that need exact lengths pass ``ignore_eos``.

Runs inside the vLLM virtualenv (it needs torch, transformers and tokenizers):

    python scripts/build_tiny_model.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

VOCAB_SIZE = 2048
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = [
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by",
    "at", "from", "his", "her", "which", "an", "be", "this", "are", "or", "had", "not", "but",
    "have", "one", "all", "were", "they", "their", "there", "been", "has", "more", "if",
    "will", "would", "who", "so", "no", "she", "other", "its", "after", "first", "two", "may",
    "time", "people", "into", "than", "only", "new", "some", "could", "these", "can", "most",
    "like", "over", "when", "then", "out", "about", "what", "up", "also", "state", "year",
    "make", "story", "tell", "hello", "world", "request", "token", "model", "proxy", "server",
    "latency", "queue", "batch"
]


def corpus(lines: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences: enough for BPE to learn merges of common words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "."
            for _ in range(lines)]


def build_tokenizer(out: Path, max_positions: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(5000), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_positions)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path, vocab_size: int, max_positions: int, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_positions,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output directory (created)")
    parser.add_argument("--max-positions", type=int, default=2048,
                        help="context length the model supports")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(args.out, args.max_positions)
    vocab = json.loads((args.out / "tokenizer.json").read_text())["model"]["vocab"]
    build_model(args.out, vocab_size=max(VOCAB_SIZE, len(vocab) + 3),
                max_positions=args.max_positions)
    print(f"tiny model written to {args.out}")


if __name__ == "__main__":
    main()
