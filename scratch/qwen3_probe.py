"""Phase-1 probe (scratch, to become kit/families/qwen3_vl.py and kit/families/qwen3_5.py): tiny real-architecture
Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 / Qwen3.5-MoE models, built locally, then checked end to end.

    python scratch/qwen3_probe.py build FAMILY         # -> <cache>/probe-FAMILY (FAMILY: qwen3_vl, qwen3_vl_moe, ...)
    python scratch/qwen3_probe.py train FAMILY         # forward + backward on the CPU, one chart
    python scratch/qwen3_probe.py gguf FAMILY          # llama.cpp's converter: text + mmproj
    python scratch/qwen3_probe.py pair FAMILY          # HF vs llama-cpp-python: prompt tokens and greedy tokens
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kit.model import _save_atomically, _tokenizer_corpus, cache_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5's tokenizer adds combining marks (\p{M}) to letters; llama.cpp calls this pre-tokenizer "qwen35".
QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen3's added tokens after the vision ones: not special (they survive skip_special_tokens, as in the real
# tokenizers), so a <think> block the model writes stays visible to eval.py, which strips and counts it.
PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

FAMILIES = {
    "qwen3_vl": dict(regex=QWEN2_REGEX, template="../kit/families/templates/qwen3_vl.jinja"),
    "qwen3_vl_moe": dict(regex=QWEN2_REGEX, template="../kit/families/templates/qwen3_vl.jinja"),
    "qwen3_5": dict(regex=QWEN35_REGEX, template="../kit/families/templates/qwen3_5.jinja"),
    "qwen3_5_moe": dict(regex=QWEN35_REGEX, template="../kit/families/templates/qwen3_5.jinja"),
}


def build_tokenizer(family):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    spec = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["regex"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    if family.startswith("qwen3_5"):
        from transformers import Qwen3_5Tokenizer as cls
    else:
        from transformers import Qwen2Tokenizer as cls
    tokenizer = cls(vocab=state["vocab"], merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                    pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED])
    tokenizer.chat_template = (HERE / spec["template"]).read_text()
    tokenizer.model_max_length = 32768
    return tokenizer


def build_processor(tokenizer, template):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # Qwen3-VL / 3.5 preprocessor_config.json: patch 16, merge 2, temporal 2, mean = std = 0.5.
    pixels = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Qwen2VLImageProcessor(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 1280, **pixels)
    video = Qwen3VLVideoProcessor(**pixels)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=template)


def ids(tokenizer):
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def tiny_config(family, tokenizer):
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3, num_position_embeddings=2304, initializer_range=0.05)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
                bos_token_id=pad, eos_token_id=eos, pad_token_id=pad, initializer_range=0.05,
                tie_word_embeddings=False)
    if family.startswith("qwen3_vl"):
        vision["deepstack_visual_indexes"] = [0, 1]
        # head 16: rotary half 8 split (t, h, w) interleaved, t largest as in the real [24, 20, 20] of 64
        text.update(num_hidden_layers=3, head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True})
        if family == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeConfig as cls
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        else:
            from transformers import Qwen3VLConfig as cls
    else:
        # 3 Gated DeltaNet layers then one gated full-attention layer (full_attention_interval 4, as the real ones)
        text.update(num_hidden_layers=4, head_dim=32, layer_types=["linear_attention"] * 3 + ["full_attention"],
                    linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                    linear_num_key_heads=2, linear_num_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                     "mrope_section": [2, 1, 1], "mrope_interleaved": True})
        if family == "qwen3_5_moe":
            from transformers import Qwen3_5MoeConfig as cls
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
            text.pop("intermediate_size")
        else:
            from transformers import Qwen3_5Config as cls
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids(tokenizer))


def model_dir(family) -> Path:
    target = cache_dir() / f"probe-{family}"
    if (target / "config.json").exists():
        return target

    def build(path):
        from transformers import AutoModelForImageTextToText

        tokenizer = build_tokenizer(family)
        config = tiny_config(family, tokenizer)
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config).to(torch.float32)
        eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = eos[1]
        model.save_pretrained(path)
        build_processor(tokenizer, tokenizer.chat_template).save_pretrained(path)

    return _save_atomically(build, target)


def chart(side=140):
    from data.synthetic import generate

    return generate("train", 1, seed=1, chart_types=["bar"], question_types=["count"], layout="aligned",
                    size=side, progress=False)[0]


def load(family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = model_dir(family)
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32), AutoProcessor.from_pretrained(path)


def train(family):
    model, processor = load(family)
    sample = chart()
    text = processor.apply_chat_template(sample["messages"], tokenize=False, enable_thinking=False)
    print(repr(text))
    batch = processor(text=[text], images=[[sample["images"][0]]], return_tensors="pt")
    print({k: tuple(v.shape) for k, v in batch.items()}, "grid", batch["image_grid_thw"].tolist())
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.abs().sum().item() for n, p in model.named_parameters() if p.grad is not None}
    print("loss", out.loss.item(), "params", sum(p.numel() for p in model.parameters()),
          "with grad", len(grads), "of", len(list(model.parameters())))
    zero = [n for n, g in grads.items() if g == 0]
    print("zero-grad params:", zero[:10])
    linear = sorted({n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                     for n in [n + ".x"]})
    print("Linear modules:", "\n  ".join(linear))


VERBS = {"build": lambda f: print(model_dir(f)), "train": train}


# The kit's wrapper (kit/export.QWEN2_PRE_WRAPPER) with the pre-tokenizer name as a parameter: the tiny model's
# locally trained BPE has a hash the converter does not know; its regex is the family's, so the name is the truth.
PRE_WRAPPER = """
import importlib, importlib.util, sys
from pathlib import Path
pre = sys.argv[1]
converter = Path(sys.argv[2])
sys.argv = sys.argv[2:]
sys.path[:0] = [str(converter.parent / "gguf-py"), str(converter.parent)]
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
text_model = getattr(module, "TextModel", None) or importlib.import_module("conversion.base").TextModel
known = text_model.get_vocab_base_pre
def named_when_unknown(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print("note: pre-tokenizer written as", pre, flush=True)
        return pre
text_model.get_vocab_base_pre = named_when_unknown
module.main()
"""


def gguf(family, source=None):
    import os
    import subprocess

    from kit.export import find_converter

    source = Path(source or model_dir(family))
    out = cache_dir() / f"probe-{family}-gguf"
    out.mkdir(exist_ok=True)
    converter = find_converter()
    pre = "qwen35" if family.startswith("qwen3_5") else "qwen2"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter.parent / "gguf-py"), str(converter.parent)])}
    # Qwen3.5 configs name an MTP head (mtp_num_hidden_layers) whose weights transformers does not load or save:
    # without --no-mtp the converter counts a block it has no tensors for.
    extra = ["--no-mtp"] if family.startswith("qwen3_5") else []
    for mmproj in (False, True):
        name = ("mmproj-" if mmproj else "") + f"{family}-f32.gguf"
        script = [str(converter)] if mmproj else ["-c", PRE_WRAPPER, pre, str(converter)]
        command = [sys.executable, "-u", *script, str(source), "--outfile", str(out / name), "--outtype", "f32",
                   *(["--mmproj"] if mmproj else extra)]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        print(name, "exit", result.returncode)
        tail = (result.stdout + result.stderr).strip().splitlines()
        print("\n".join(line for line in tail if "note:" in line or "ERROR" in line or "rror" in line)[-3000:])
        if result.returncode:
            print("\n".join(tail[-15:]))
    return out


VERBS["gguf"] = gguf


if __name__ == "__main__":
    VERBS[sys.argv[1]](*sys.argv[2:])
