"""Merged 16-bit weights and the proof that they answer as the run's model does.

The base is reloaded in 16-bit (never 4-bit) with plain transformers + peft, the adapter merged in, saved as
safetensors with every processor file; then the adapter model and the reloaded merged model are compared on fixed
prompts (largest logit difference, identical greedy answers). compare_runs holds a llama.cpp run
(kit/export/llama.py) up against the merged model's the same way.
"""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import click

from kit import families, paths
from kit.errors import UserError


def plan_merge(model_path: str, dtype_name: str):
    """(device, dtype, dtype name) for merging: the GPU when the weights fit in its free memory with room to run,
    else the CPU. auto dtype: bf16/fp16 as the GPU supports; without a GPU fp32 for small models (exact; the tiny
    model is fp32) and bf16 from a billion parameters up (a 7B in fp32 would need 33 GB of RAM)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from kit import backend

    config = AutoConfig.from_pretrained(model_path)
    if getattr(config, "quantization_config", None):
        raise UserError(f"the base {model_path} is a pre-quantized checkpoint: merging needs its 16-bit original "
                        "(e.g. Qwen/Qwen2-VL-7B-Instruct); set model_name_or_path in the run's run_config.json")
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    if dtype_name == "auto":
        dtype_name = backend.precision() if torch.cuda.is_available() else ("fp32" if parameters < 1e9 else "bf16")
    dtype = backend.torch_dtype(dtype_name)
    size = parameters * dtype.itemsize
    device = "cpu"
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        device = "cuda" if free > 1.3 * size else "cpu"
        if device == "cpu":
            click.echo(f"the GPU has {free / 1e9:.1f} GB free, too little for {size / 1e9:.1f} GB of weights: "
                       "merging on the CPU")
    return device, dtype, dtype_name


def load_unmerged(run_dir: Path, recipe: dict, device: str, dtype):
    """The run's model with its adapter still separate, through plain transformers + peft: merging needs the
    base's real 16-bit weights (never the 4-bit ones it was trained on) and a device of our choosing."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from kit.model import resolve

    is_adapter = (run_dir / "adapter_config.json").exists()
    source = resolve(recipe["model_name_or_path"]) if is_adapter else str(run_dir)
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, device_map=device)
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run_dir))
    return model.eval(), AutoProcessor.from_pretrained(run_dir)


def merge_and_save(model, processor, folder: Path):
    """Adapter folded into the weights (a full fine-tune is already merged) and saved with the processor."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def load_merged(folder: Path, device: str, dtype):
    """The merged folder through the ordinary loaders, which is what proves it complete."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device_map=device)
    return model.eval(), AutoProcessor.from_pretrained(folder)


def parity_samples(recipe: dict, count: int = 4) -> tuple[list[dict], str]:
    """(fixed prompts, where they come from): the first usable rows of the run's own data, so a model trained on
    the user's charts is checked on such charts; the kit's synthetic charts for a synthetic run, or when the run's
    data cannot be read here (moved files, no network), which is then said."""
    if recipe["dataset"] != "synthetic":
        try:
            samples = own_samples(recipe, count)
            if samples:
                return samples, f"the first {len(samples)} usable rows of {recipe['dataset']}"
            why = "none of its first rows is one image + a question"
        except Exception as error:  # any failure to read the run's data: the synthetic charts still prove parity
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
        click.echo(f"note: the parity check uses the kit's synthetic charts: the run's data "
                   f"{recipe['dataset']} could not be used here ({why})")
    return synthetic_parity_samples(recipe, count), f"{count} synthetic charts"


def own_samples(recipe: dict, count: int) -> list[dict]:
    """The run's first rows with one image and a text question, images as files (llama.cpp reads files)."""
    import hashlib

    import data
    from data.lint import sample_problems
    from kit.paths import cache_dir, write_with

    chosen = []
    for sample in data.load({**recipe, "limit": 8 * count}, recipe["dataset_split"], progress=False):
        messages = sample.get("messages") or []
        first = messages[0] if messages else {}
        if (len(sample.get("images") or []) != 1 or first.get("role") != "user" or sample_problems(sample)
                or not isinstance(first.get("content"), list) or first["content"][-1].get("type") != "text"):
            continue
        image = sample["images"][0]
        if not isinstance(image, (str, Path)):  # a decoded hub image: saved once so llama.cpp can read it
            path = cache_dir() / "parity-charts" / f"{hashlib.sha1(str(sample['id']).encode()).hexdigest()[:12]}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_with(path, image.convert("RGB").save)
            sample = {**sample, "images": [str(path)]}
        chosen.append(sample)
        if len(chosen) == count:
            break
    return chosen


def synthetic_parity_samples(recipe: dict, count: int) -> list[dict]:
    """Fixed prompts drawn by the kit itself (offline), laid out as the run's recipe draws synthetic charts."""
    from data.synthetic import generate

    return generate("test", count, seed=recipe["synthetic_seed"], chart_types=recipe["synthetic_chart_types"],
                    question_types=recipe["synthetic_question_types"], layout=recipe["synthetic_layout"],
                    size=recipe["synthetic_size"], grid=recipe.get("synthetic_grid", 0), progress=False)


def heldout_prompts(run_dir: Path, recipe: dict, count: int) -> tuple[list[dict], str]:
    """(up to `count` rows the run never trained on, where they come from): its heldout.jsonl rows, else the
    synthetic test charts, else its dataset's eval_split or test split; the parity prompts, said to be training
    rows, only when none of those can be read here."""
    from data.lint import sample_problems

    try:
        if (run_dir / "heldout.jsonl").exists():
            from kit.evaluate.questions import heldout_samples

            rows, source = heldout_samples(recipe, run_dir, 4 * count), "held-out rows of the run (heldout.jsonl)"
        elif recipe["dataset"] == "synthetic":
            rows, source = synthetic_parity_samples(recipe, count), "synthetic test charts"
        else:
            import data

            split = recipe.get("eval_split") or "test"
            rows = data.load({**recipe, "limit": 4 * count}, split, progress=False)
            source = f"rows of {recipe['dataset']}'s {split} split"
        usable = [row for row in rows if not sample_problems(row)][:count]
        if usable:
            return usable, f"the first {len(usable)} usable {source}"
        why = "no usable row"
    except Exception as error:  # any failure to read held-out rows: the parity prompts still compare the two
        why = str(error).splitlines()[0] if str(error) else type(error).__name__
    samples, source = parity_samples(recipe, count)
    return samples, f"{source} (no held-out rows could be read here: {why})"


def without_image(sample: dict) -> dict:
    user = [{"role": "user", "content": [c for c in sample["messages"][0]["content"] if c["type"] == "text"]}]
    return {**sample, "images": [], "messages": user}


def chat_text(processor, sample: dict, system_prompt: str) -> str:
    """The prompt exactly as kit.inputs.chat.generation_inputs formats it, for llama.cpp to see the same text."""
    from kit.inputs import chat

    messages = chat.with_system(chat.prompt_messages(sample["messages"]), system_prompt)
    return families.of_processor(processor).chat_text(processor, messages, add_generation_prompt=True)


def probe(model, processor, sample: dict, system_prompt: str, max_new_tokens: int = 16) -> dict:
    """One prompt through the model: its token ids, its logits over the prompt and `max_new_tokens` greedy tokens.

    Generation goes on past the end of the answer, so that every comparison covers the same number of tokens.
    """
    import torch

    from kit.inputs import chat

    inputs = chat.generation_inputs(processor, [sample], system_prompt).to(model.device)
    with torch.no_grad():
        logits = model(**inputs).logits[0].float().cpu()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return {"prompt_ids": inputs["input_ids"][0].tolist(), "logits": logits,
            "answer_ids": output[0, inputs["input_ids"].shape[1]:].tolist()}


def stop_ids(model) -> set[int]:
    """The ids that end an answer (generation_config's eos), for showing answers as a chat would."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def parity_report(samples, before: list[dict], after: list[dict], stop_ids: set[int], tokenizer,
                  before_name: str = "unmerged") -> dict:
    """Per prompt: both greedy answers (as `<before_name>_answer` and merged_answer), whether their tokens are
    identical and the largest logit difference over the prompt; and those figures over all prompts."""
    rows = []
    for sample, a, b in zip(samples, before, after):
        rows.append({"id": sample["id"], "question": sample["messages"][0]["content"][-1]["text"],
                     "expected": sample["answers"][0],
                     f"{before_name}_answer": answer_text(a["answer_ids"], stop_ids, tokenizer),
                     "merged_answer": answer_text(b["answer_ids"], stop_ids, tokenizer),
                     "identical_answer": a["answer_ids"] == b["answer_ids"],
                     "max_abs_logit_diff": float((a["logits"] - b["logits"]).abs().max())})
    return {"samples": rows, "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
            "identical_answers": sum(r["identical_answer"] for r in rows), "num_samples": len(rows)}


def compare_runs(hf: dict, llama: dict, image_token_id: int, stop_ids: set[int], tokenizer) -> dict:
    """HF vs llama.cpp on one prompt: identical prompt tokens, the largest logit difference over the prompt's
    text positions, and where the greedy tokens first part (None when all agree)."""
    import numpy as np

    hf_prompt = [-1 if t == image_token_id else t for t in hf["prompt_ids"]]
    same_prompt = hf_prompt == llama["prompt_ids"]
    text_rows = [i for i, t in enumerate(hf_prompt) if t != -1]
    logit_diff = float(np.abs(hf["logits"].numpy()[text_rows] - llama["logits"][text_rows]).max()) \
        if same_prompt else None
    divergence = next((i for i, (a, b) in enumerate(zip(hf["answer_ids"], llama["answer_ids"])) if a != b), None)
    return {"prompt_identical": same_prompt, "prompt_tokens": len(hf_prompt), "max_abs_logit_diff": logit_diff,
            "agree": divergence is None, "first_divergence": divergence,
            "hf_answer": answer_text(hf["answer_ids"], stop_ids, tokenizer),
            "llama_cpp_answer": answer_text(llama["answer_ids"], stop_ids, tokenizer),
            "hf_tokens": hf["answer_ids"], "llama_cpp_tokens": llama["answer_ids"]}


def answer_text(ids: list[int], stop_ids: set[int], tokenizer) -> str:
    """What a chat would show: the greedy tokens up to the first end-of-turn."""
    end = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True)


def release_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def staged(folders: dict[str, Path]):
    """A temporary folder beside each output, renamed onto it (replacing what is there) only when the whole
    block completes; removed if anything fails, so an output folder is either complete or absent."""
    temporary, umask = {}, os.umask(0)
    os.umask(umask)
    try:
        for key, folder in folders.items():
            folder.parent.mkdir(parents=True, exist_ok=True)
            temporary[key] = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
            temporary[key].chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        yield dict(temporary)
        for key, folder in folders.items():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            if folder.exists():
                folder.rename(old)
            temporary.pop(key).rename(folder)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        for path in temporary.values():
            shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, value: dict):
    paths.write_json(path, value, indent=2)
