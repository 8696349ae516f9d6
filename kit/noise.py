"""Two warnings that every run printed and that ask nothing of the user; each is dropped by its exact opening
words on its own logger, so anything else those libraries say still shows.

- bitsandbytes, on a CPU with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from kernels-community ...
  pip install kernels": the optional `kernels` package is absent and bitsandbytes uses its own CPU kernel.
- transformers' Trainer: "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config ...":
  Qwen2-VL's config names a BOS token its tokenizer does not use; the trainer aligns them, as it should.
"""

import logging

KNOWN = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.trainer_utils": "The tokenizer has new PAD/BOS/EOS tokens",
}


class DropMessage(logging.Filter):
    def __init__(self, opening: str):
        super().__init__()
        self.opening = opening

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.opening)


def silence_known_noise():
    for name, opening in KNOWN.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.opening == opening for f in logger.filters):
            logger.addFilter(DropMessage(opening))
