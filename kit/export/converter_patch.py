"""llama.cpp's convert_hf_to_gguf.py with one fallback taught to it, run as a script in the converter's subprocess:

    python kit/export/converter_patch.py [--pre NAME] CONVERTER [the converter's own arguments...]

A tokenizer whose pre-tokenizer hash the converter does not know is written as NAME ("qwen2" unless given).
kit/export/gguf.py uses this only for tokenizers whose tokenizer.json splits with the regex llama.cpp calls NAME (the
tiny models' locally trained BPEs: Qwen2's regex for "qwen2", Qwen3.5's for "qwen35"), so NAME is the truth, not a
guess. Run by path, it imports nothing from the kit: only the converter's own modules.
"""

import importlib
import importlib.util
import sys
from pathlib import Path


def forced_pre_note(pre: str) -> str:
    return (f"pre-tokenizer hash unknown to the converter; tokenizer.json splits with the regex llama.cpp calls "
            f"{pre!r}: written as {pre!r}")


FORCED_PRE_NOTE = forced_pre_note("qwen2")


def text_model_class(module):
    """TextModel, which holds get_vocab_base_pre: in conversion/base.py since llama.cpp split its converter up
    (llama-cpp-python 0.3.36's vendor/llama.cpp), in the script itself before that."""
    found = getattr(module, "TextModel", None)
    return found if found is not None else importlib.import_module("conversion.base").TextModel


def named_when_unknown(known, pre: str):
    """get_vocab_base_pre as the converter has it, answering `pre` where it would refuse the hash."""
    def get_vocab_base_pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:  # what the converter raises for a pre-tokenizer hash it has no name for
            print(f"note: {forced_pre_note(pre)}", flush=True)
            return pre

    return get_vocab_base_pre


def main(argv: list[str]):
    pre = "qwen2"
    if argv[1] == "--pre":
        pre, argv = argv[2], argv[:1] + argv[3:]
    converter = Path(argv[1])
    sys.argv = argv[1:]  # the converter parses its own arguments, with its own path as argv[0]
    sys.path[:0] = [str(converter.parent / "gguf-py"), str(converter.parent)]
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text_model = text_model_class(module)
    text_model.get_vocab_base_pre = named_when_unknown(text_model.get_vocab_base_pre, pre)
    module.main()


if __name__ == "__main__":
    main(sys.argv)
