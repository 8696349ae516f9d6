"""What the families' tiny models share: a byte-level BPE tokenizer trained here, in seconds, on Qwen2's
pre-tokenizer regex (so llama.cpp's "qwen2" pre-tokenizer splits text the same way), and the Qwen-VL chat template.
Not a family (the leading "_"): family files build their tiny models with it."""

import json

QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Same order as Qwen2-VL's (and Qwen2.5-VL's) added tokens, so the ids keep their relative layout.
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen2-VL-Instruct's chat template (the one its processor ships; Qwen2.5-VL-Instruct ships the same), reproduced
# so the tiny models format conversations exactly as the real ones do.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Chart questions and labels the tokenizer should hold whole words for: those the synthetic charts ask (kept
# here, not imported, so the kit's models do not depend on a data source).
CHART_TEXT = ("A", "B", "C", "D", "E", "F", "G", "H", "How many bars are in the chart?",
              "Which label has the highest value?", "Which label has the lowest value?", "What is the value of A?")
WORDS = ("the a of in and to is what which how many value highest lowest largest smallest bar line "  # noqa: SIM905
         "chart year percent total average difference between sum number answer question image picture "
         "shows label axis title red blue green orange purple you are helpful assistant system user "
         "latex formula equation write read this reply with word only").split()


def corpus():
    """Enough varied text that the BPE merges cover chart questions, labels, numbers and chat words."""
    yield from CHART_TEXT
    for i in range(400):
        yield " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12))
        yield f"{i} {i * 3 % 101}.{i % 10} {i * 17 % 1000}% {1990 + i % 35}"


def train_bpe(regex: str = QWEN2_PRETOKENIZE_REGEX, vocab_size: int = 640) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained on corpus(), splitting with a family's pre-tokenizer regex."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    return state["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]


def build_tokenizer(special_tokens=QWEN2_VL_SPECIAL_TOKENS, chat_template: str = QWEN2_VL_CHAT_TEMPLATE,
                    eos: str = "<|im_end|>", pad: str = "<|endoftext|>", vocab_size: int = 640):
    """A Qwen2Tokenizer with a BPE vocabulary trained on corpus(), the family's special tokens and template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(vocab_size=vocab_size)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace",
                               unk_token=None, bos_token=None, eos_token=eos, pad_token=pad)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = chat_template
    tokenizer.model_max_length = 32768
    return tokenizer


def vision_token_ids(tokenizer, markup) -> dict:
    """The config's token-id fields for a family's markup."""
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", markup.image_pad), ("video_token_id", markup.video_pad),
        ("vision_start_token_id", markup.vision_start), ("vision_end_token_id", markup.vision_end)]}


def text_token_ids(tokenizer, markup) -> dict:
    """bos/eos/pad ids for a text config: Qwen's configs name <|endoftext|> as bos, the turn end as eos."""
    return dict(bos_token_id=tokenizer.convert_tokens_to_ids(markup.end_of_text),
                eos_token_id=tokenizer.convert_tokens_to_ids(markup.im_end),
                pad_token_id=tokenizer.convert_tokens_to_ids(markup.end_of_text))


def save_random_model(model_class, config, folder, processor, weights: bool = True, bf16: bool = False):
    """Instantiate `model_class(config)` with a fixed seed (in bf16 on the GPU when there is one: 7B on the CPU
    takes minutes) and save it with its processor and generation ids as an ordinary model folder; without
    `weights`, config and processor only (enough to plan a run)."""
    import torch

    if not weights:
        config.save_pretrained(folder)
        processor.save_pretrained(folder)
        return
    torch.manual_seed(0)
    with torch.device("cuda" if bf16 and torch.cuda.is_available() else "cpu"):
        model = model_class(config).to(torch.bfloat16 if bf16 else torch.float32)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
