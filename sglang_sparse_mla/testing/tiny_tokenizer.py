"""A small byte-level BPE tokenizer for the tiny test checkpoints, built offline.

Trained with the ``tokenizers`` library on :data:`CORPUS` (a fixed text kept
here, so the result is the same on every machine), saved as
``tokenizer.json`` + ``tokenizer_config.json`` with a plain chat template.
``transformers.AutoTokenizer`` and SGLang load the directory without any
network access. Byte-level pre-tokenization means every string encodes, also
text the corpus never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
SPECIAL_TOKENS = (BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")  # ids 0 .. 4
TARGET_VOCAB = 1000
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = """\
DeepSeek Sparse Attention keeps a small lightning indexer beside every attention layer.
For each query token the indexer scores all earlier tokens with a few cheap heads in
eight-bit floating point, keeps the top scoring positions, and the main attention then
reads only those positions from the latent key-value cache. The latent row of a token
holds five hundred and twelve compressed values, which serve as both key and value,
followed by sixty-four rotary values of the key. Multi-head latent attention absorbs the
up-projections into the query and the output, so every head shares one cached row.
A paged cache stores the rows in pages of sixty-four tokens; a request table maps each
logical position of a request to its physical slot. The radix cache lets a new request
reuse the pages of an earlier request that shares its prefix, so a long shared system
prompt is computed once and read many times. Decoding appends one token per request per
step; prefill processes a whole chunk of prompt tokens at once. CUDA graphs record the
decode step once per batch size and replay it without launching kernels from Python.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. The rain in Spain stays mainly in the plain. To be or not to be, that is the
question. All that glitters is not gold. Knowledge is power, and time is money.
Once upon a time there was a small model with four layers, sixteen heads and a handful of
experts. It knew nothing, for its weights were drawn at random, yet it answered every
question quickly and always in the same way, which is exactly what a test needs.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday,
Thursday, Friday, Saturday, Sunday. January, February, March, April, May, June, July,
August, September, October, November, December. Red, orange, yellow, green, blue, violet.
def attention(query, key, value): return softmax(query @ key.T * scale) @ value
for token in prompt: cache.append(token); logits = model(token); print(logits.argmax())
"""


def build_tokenizer():
    """The trained ``tokenizers.Tokenizer`` (deterministic: fixed corpus, fixed trainer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    return tokenizer


def write_tokenizer(out_dir: str | Path, model_max_length: int) -> int:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; return the vocab size."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer.get_vocab_size()
