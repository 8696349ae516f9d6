"""Merged 16-bit weights, GGUF through llama.cpp's own converter, and the proof that both still answer alike.

- merge: the base reloaded in 16-bit (never 4-bit) with plain transformers + peft, the adapter merged in,
  saved as safetensors with every processor file; then the adapter model and the reloaded merged model are
  compared on fixed prompts (largest logit difference, identical greedy answers).
- gguf: `convert_hf_to_gguf.py` writes the text model (arch qwen2vl) and, with --mmproj, the vision projector
  (clip.projector_type qwen2vl_merger); K-quants go through `llama-quantize` or llama-cpp-python's
  `llama_model_quantize`.
- proof: the GGUF pair runs in llama-cpp-python (libllama + libmtmd, as llama-mtmd-cli runs it) on the same
  chat text as the HF model, and the greedy tokens of both are compared.

The converter, its `conversion/` package and its matching `gguf-py` come from `--llama-cpp DIR` or
$LLAMA_CPP_DIR, else from `<cache>/llama.cpp-src/llama-cpp-python-<version>/`, else from the llama-cpp-python
source distribution on PyPI, whose vendor/llama.cpp is unpacked into that cache folder on first use.
"""

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

from kit.errors import UserError

LLAMA_CPP_PYTHON = "0.3.36"  # the version the Makefile builds: its vendored llama.cpp both writes and runs our files
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZER_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1",
                   "q5_k_s", "q5_k_m", "q6_k")  # need llama.cpp's quantizer, from an f16 conversion
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
FORCED_PRE_NOTE = ("pre-tokenizer hash unknown to the converter; tokenizer.json splits with Qwen2's regex: "
                   "written as 'qwen2'")

# Runs convert_hf_to_gguf.py (argv[1]) with the remaining arguments, with one fallback taught to it: a tokenizer
# whose pre-tokenizer hash it does not know is written as "qwen2". Only used for tokenizers whose tokenizer.json
# splits with Qwen2's regex (the tiny model's locally trained BPE), so "qwen2" is the truth, not a guess.
QWEN2_PRE_WRAPPER = f"""
import importlib, importlib.util, sys
from pathlib import Path
converter = Path(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path[:0] = [str(converter.parent / "gguf-py"), str(converter.parent)]
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
# TextModel lives in conversion/base.py since the converter was split up, in the script itself before that
text_model = getattr(module, "TextModel", None) or importlib.import_module("conversion.base").TextModel
known = text_model.get_vocab_base_pre
def qwen2_when_unknown(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print("note: {FORCED_PRE_NOTE}", flush=True)
        return "qwen2"
text_model.get_vocab_base_pre = qwen2_when_unknown
module.main()
"""
QUANTIZE_WITH_LLAMA_CPP_PYTHON = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


# --- merge ---------------------------------------------------------------------------------------------------

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
    from kit.model import cache_dir

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
                image.convert("RGB").save(path)
            sample = {**sample, "images": [str(path)]}
        chosen.append(sample)
        if len(chosen) == count:
            break
    return chosen


def synthetic_parity_samples(recipe: dict, count: int) -> list[dict]:
    """Fixed prompts drawn by the kit itself (offline), laid out as the run's recipe draws synthetic charts."""
    from data.synthetic import LEGACY_GRID, generate

    return generate("test", count, seed=recipe["synthetic_seed"], chart_types=recipe["synthetic_chart_types"],
                    question_types=recipe["synthetic_question_types"], layout=recipe["synthetic_layout"],
                    size=recipe["synthetic_size"], progress=False, grid=recipe.get("synthetic_grid") or LEGACY_GRID)


def without_image(sample: dict) -> dict:
    user = [{"role": "user", "content": [c for c in sample["messages"][0]["content"] if c["type"] == "text"]}]
    return {**sample, "images": [], "messages": user}


def chat_text(processor, sample: dict, system_prompt: str) -> str:
    """The prompt exactly as kit.chat.generation_inputs formats it, for llama.cpp to see the same text."""
    from kit import chat

    messages = chat.with_system(chat.prompt_messages(sample["messages"]), system_prompt)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def probe(model, processor, sample: dict, system_prompt: str, max_new_tokens: int = 16) -> dict:
    """One prompt through the model: its token ids, its logits over the prompt and `max_new_tokens` greedy tokens.

    Generation goes on past the end of the answer, so that every comparison covers the same number of tokens.
    """
    import torch

    from kit import chat

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


def parity_report(samples, before: list[dict], after: list[dict], stop_ids: set[int], tokenizer) -> dict:
    rows = []
    for sample, a, b in zip(samples, before, after):
        rows.append({"id": sample["id"], "question": sample["messages"][0]["content"][-1]["text"],
                     "expected": sample["answers"][0],
                     "unmerged_answer": answer_text(a["answer_ids"], stop_ids, tokenizer),
                     "merged_answer": answer_text(b["answer_ids"], stop_ids, tokenizer),
                     "identical_answer": a["answer_ids"] == b["answer_ids"],
                     "max_abs_logit_diff": float((a["logits"] - b["logits"]).abs().max())})
    return {"samples": rows, "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
            "identical_answers": sum(r["identical_answer"] for r in rows), "num_samples": len(rows)}


# --- the converter -------------------------------------------------------------------------------------------

def converter_cache() -> Path:
    from kit.model import cache_dir

    return cache_dir() / "llama.cpp-src" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def sdist_download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(dest)]


def find_converter(llama_cpp_dir=None, fetch: bool = True) -> Path:
    """convert_hf_to_gguf.py: from --llama-cpp DIR or $LLAMA_CPP_DIR, the cache, or fetched from PyPI."""
    named = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if named:
        script = Path(named).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise UserError(f"{named} has no convert_hf_to_gguf.py: point --llama-cpp (or LLAMA_CPP_DIR) at a "
                            "llama.cpp checkout")
        return script
    cached = converter_cache() / "convert_hf_to_gguf.py"
    if cached.is_file():
        return cached
    why = "fetching was not allowed"
    if fetch:
        try:
            unpack_converter(download_sdist(), converter_cache())
            return cached
        except (OSError, tarfile.TarError) as error:
            why = str(error)
    raise UserError(
        "no llama.cpp converter (convert_hf_to_gguf.py) found; provide one of: --llama-cpp DIR or LLAMA_CPP_DIR=DIR "
        f"naming a llama.cpp checkout; {converter_cache()} holding convert_hf_to_gguf.py, conversion/ and gguf-py/ "
        f"from llama-cpp-python {LLAMA_CPP_PYTHON}'s vendor/llama.cpp; or network access to PyPI so the kit "
        f"fetches that source itself ({why})")


def download_sdist() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="llama-cpp-python-sdist-"))
    click.echo(f"fetching llama.cpp's converter: llama-cpp-python=={LLAMA_CPP_PYTHON} source (77 MB) from PyPI")
    result = subprocess.run(sdist_download_command(folder), capture_output=True, text=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        shutil.rmtree(folder, ignore_errors=True)
        last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise OSError(f"pip download failed: {last}")
    return found[0]


def unpack_converter(tarball: Path, target: Path):
    """Only the converter's parts of the sdist's vendor/llama.cpp (2 MB of the 77), renamed into place whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with tarfile.open(tarball) as archive:
            prefix = tarball.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
            members = []
            for member in archive.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and relative.startswith(CONVERTER_PARTS):
                    member.name = relative
                    members.append(member)
            archive.extractall(staging, members=members, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise OSError(f"{tarball.name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        if not target.exists():  # a concurrent fetch may have won; its copy is as good as ours
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tarball.parent, ignore_errors=True)
    click.echo(f"converter unpacked into {target}")


def check_gguf_tools(quants: list[str], verify: bool, llama_cpp_dir=None) -> str | None:
    """Fail before any slow work when a needed tool is missing; returns the quantizer for K-quants, if any."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None:
        raise UserError("convert_hf_to_gguf.py needs the sentencepiece package: pip install sentencepiece")
    if verify and importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"proving the GGUF files needs llama-cpp-python: make llama-cpp (or pip install "
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}), or pass --no-verify")
    if not any(q in QUANTIZER_TYPES for q in quants):
        return None
    quantizer = find_quantizer(llama_cpp_dir)
    if quantizer is None:
        raise UserError(f"--quant {','.join(q for q in quants if q in QUANTIZER_TYPES)} needs llama.cpp's quantizer: "
                        "put llama-quantize on PATH (build llama.cpp: cmake -B build && cmake --build build "
                        f"--target llama-quantize) or install llama-cpp-python (make llama-cpp); "
                        f"{', '.join(CONVERTER_TYPES)} need neither")
    return quantizer


def find_quantizer(llama_cpp_dir=None) -> str | None:
    """A llama-quantize binary (PATH, or a built checkout), else "llama-cpp-python" when it is installed."""
    import importlib.util

    named = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    built = Path(named).expanduser() / "build" / "bin" / "llama-quantize" if named else None
    binary = shutil.which("llama-quantize") or (str(built) if built and built.is_file() else None)
    if binary:
        return binary
    return "llama-cpp-python" if importlib.util.find_spec("llama_cpp") else None


def uses_qwen2_regex(model_dir: Path) -> bool:
    """Whether tokenizer.json pre-tokenizes with Qwen2's split regex (what llama.cpp's "qwen2" pre-tokenizer does)."""
    from kit.model import QWEN2_PRETOKENIZE_REGEX

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre_tokenizer = json.loads(path.read_text()).get("pre_tokenizer") or {}
    return any(step.get("type") == "Split" and step.get("pattern", {}).get("Regex") == QWEN2_PRETOKENIZE_REGEX
               for step in pre_tokenizer.get("pretokenizers", [pre_tokenizer]))


def run_logged(command: list[str], log: Path, what: str, env=None):
    """A converter/quantizer subprocess: full output to `log`, a tensor counter on screen, its tail on failure."""
    from tqdm import tqdm

    tensor_line = re.compile(r" --> |^\[\s*\d+/\s*\d+\]")
    # The counter shows only when a run is slow enough to need one (a 7B, not the tiny model's few seconds).
    with log.open("w") as handle, tqdm(desc=what, unit=" tensors", delay=5, mininterval=1, leave=False) as bar:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   errors="replace")
        for line in process.stdout:
            handle.write(line)
            if tensor_line.search(line):
                bar.update()
        process.wait()
    if process.returncode != 0:
        # the log sits in an output folder that is removed on failure: keep a copy where the user can read it
        kept = Path(tempfile.mkstemp(prefix=f"{log.stem}-", suffix=".log")[1])
        shutil.copy(log, kept)
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["no output"]
        raise UserError(f"{what} failed (exit {process.returncode}): {tail[0].strip()} -- full log: {kept}")


def gguf_metadata(name: str, base: str) -> dict:
    """general.* keys for the converter's --metadata: without them it names the model after the temporary folder
    it reads (".demo-merged.tmp-9qog0aeq")."""
    return {"general.name": name, "general.finetune": name, "general.basename": Path(base).name}


def convert(converter: Path, model_dir: Path, outfile: Path, outtype: str, name: str, mmproj: bool,
            log: Path, metadata: Path | None = None) -> bool:
    """One converter run in a subprocess; returns whether the pre-tokenizer had to be written as "qwen2"."""
    force_qwen2 = not mmproj and uses_qwen2_regex(model_dir)
    script = ["-c", QWEN2_PRE_WRAPPER, str(converter)] if force_qwen2 else [str(converter)]
    command = [sys.executable, "-u", *script, str(model_dir), "--outfile", str(outfile), "--outtype", outtype,
               "--model-name", name, *(["--metadata", str(metadata)] if metadata else []),
               *(["--mmproj"] if mmproj else [])]
    # The converter's own gguf-py first: the pip gguf may lag behind the converter that uses it.
    paths = [str(converter.parent / "gguf-py"), str(converter.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    run_logged(command, log, f"convert {outfile.name}", env)
    return force_qwen2 and FORCED_PRE_NOTE in log.read_text()


def quantize(quantizer: str, source: Path, target: Path, quant: str, log: Path):
    if quantizer == "llama-cpp-python":
        command = [sys.executable, "-c", QUANTIZE_WITH_LLAMA_CPP_PYTHON, str(source), str(target), quant]
    else:
        command = [quantizer, str(source), str(target), quant.upper()]
    run_logged(command, log, f"quantize {target.name}")


def tensor_types(path: Path) -> dict:
    """{ggml type: count} over the file's tensors, and how many weight matrices missed a K-quant type."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    counts = {}
    for tensor in tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    matrices = [t for t in tensors if len(t.shape) >= 2]
    not_k = [t for t in matrices if not t.tensor_type.name.endswith("_K")]
    return {"types": counts, "weight_matrices": len(matrices), "not_k_quant": len(not_k),
            "narrowest_row": min((int(t.shape[0]) for t in not_k), default=None)}


def k_quant_note(quant: str, types: dict) -> str | None:
    """The honest line for a K-quant file whose rows were too short for K-quants (the tiny model's are 64)."""
    if "_k" not in quant or not types["not_k_quant"]:
        return None
    fallback = ", ".join(sorted(t for t in types["types"] if not t.endswith("_K") and t not in ("F32", "F16")))
    all_fell_back = types["not_k_quant"] == types["weight_matrices"]
    verdict = f"the file is valid but is not a true {quant.upper()}" if all_fell_back else "the others are K-quants"
    return (f"{quant}: llama.cpp's quantizer fell back to {fallback or 'other types'} for {types['not_k_quant']} of "
            f"{types['weight_matrices']} weight matrices (rows of {types['narrowest_row']} values; K-quants need "
            f"multiples of 256): {verdict}")


def image_token_limits(recipe: dict) -> dict:
    """The recipe's pixel limits as llama.cpp's --image-min-tokens/--image-max-tokens (one token per 28x28 pixels),
    so that llama.cpp cuts an image into the same grid the model was trained on."""
    return {"image_min_tokens": max(recipe["min_pixels"] // (28 * 28), 1),
            "image_max_tokens": recipe["max_pixels"] // (28 * 28)}


# --- proof in llama.cpp --------------------------------------------------------------------------------------

@functools.cache
def _errors_only_log():
    """Made once and kept: libmtmd holds on to the pointer for as long as the process runs."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def errors_only(level, text, user_data):
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode(errors="replace"))

    return errors_only


def quiet_mtmd():
    """libmtmd logs every image preprocessing step at info level: let through only its errors."""
    from llama_cpp import mtmd_cpp

    mtmd_cpp.mtmd_log_set(_errors_only_log(), None)
    mtmd_cpp.mtmd_helper_log_set(_errors_only_log(), None)


class LlamaCppPair:
    """A GGUF text model + mmproj in llama-cpp-python, driven through libmtmd the way llama-mtmd-cli drives it."""

    def __init__(self, model_path: Path, mmproj_path: Path, image_min_tokens: int, image_max_tokens: int):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.llama_cpp, self.mtmd_cpp = llama_cpp, mtmd_cpp
        self.llama = llama_cpp.Llama(str(model_path), n_ctx=4096, n_gpu_layers=-1, n_threads=os.cpu_count(),
                                     verbose=False,
                                     # an f16 cache would round every key and value: keep f32 to compare weights
                                     type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        quiet_mtmd()
        params = mtmd_cpp.mtmd_context_params_default()
        params.n_threads, params.print_timings, params.warmup = self.llama.n_threads, False, False
        params.image_min_tokens, params.image_max_tokens = image_min_tokens, image_max_tokens
        self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llama.model, params)
        if not self.mtmd:
            self.llama.close()
            raise UserError(f"llama.cpp could not load {mmproj_path} as the vision projector of {model_path}")
        self.n_vocab = self.llama.n_vocab()
        self.batch = llama_cpp.llama_batch_init(self.llama.n_batch, 0, 1)

    def run(self, text: str, image: str | None, max_new_tokens: int = 16) -> dict:
        """Prompt ids (-1 for each image embedding), logits at every text position of the prompt (NaN at image
        positions), and `max_new_tokens` greedy tokens, for chat `text` that holds Qwen2-VL's
        <|vision_start|><|image_pad|><|vision_end|> where the image goes."""
        import ctypes

        import numpy as np

        mtmd_cpp = self.mtmd_cpp
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self.llama.ctx), True)
        # libmtmd writes <|vision_start|> and <|vision_end|> around the image itself
        marker = mtmd_cpp.mtmd_default_marker().decode()
        encoded = text.replace("<|vision_start|><|image_pad|><|vision_end|>", marker).encode()
        bitmaps = [mtmd_cpp.mtmd_helper_bitmap_init_from_file(self.mtmd, image.encode(), False)] if image else []
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        prompt_ids, logits, position = [], [], 0
        try:
            prompt = mtmd_cpp.mtmd_input_text(text=encoded, text_len=len(encoded), add_special=True,
                                              parse_special=True)
            bitmap_array = (mtmd_cpp.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(prompt), bitmap_array, len(bitmaps)) != 0:
                raise UserError(f"llama.cpp could not tokenize the prompt with image {image}")
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    ids = [tokens[j] for j in range(count.value)]
                    logits += self._decode(ids, position)
                    prompt_ids += ids
                    position += len(ids)
                else:
                    n_tokens, new_position = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk), self.llama_cpp.llama_pos(0)
                    if mtmd_cpp.mtmd_helper_eval_chunk_single(self.mtmd, self.llama.ctx, chunk, position, 0,
                                                              self.llama.n_batch, False,
                                                              ctypes.byref(new_position)) != 0:
                        raise UserError(f"llama.cpp failed to encode image {image}")
                    prompt_ids += [-1] * n_tokens
                    logits += [np.full(self.n_vocab, np.nan, dtype=np.float32)] * n_tokens
                    # M-RoPE: an image spans fewer positions than tokens, and text goes on after its last one
                    position = new_position.value
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
        answer = [int(np.argmax(logits[-1]))]
        while len(answer) < max_new_tokens:
            answer.append(int(np.argmax(self._decode(answer[-1:], position)[0])))
            position += 1
        return {"prompt_ids": prompt_ids, "logits": np.stack(logits), "answer_ids": answer}

    def _decode(self, ids: list[int], position: int) -> list:
        """Text tokens at consecutive positions, in n_batch pieces; the logits of every one of them."""
        import numpy as np

        llama_cpp, batch, rows = self.llama_cpp, self.batch, []
        for start in range(0, len(ids), self.llama.n_batch):
            piece = ids[start:start + self.llama.n_batch]
            batch.n_tokens = len(piece)
            for j, token in enumerate(piece):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = \
                    token, position + start + j, 1, 0, True
            if llama_cpp.llama_decode(self.llama.ctx, batch) != 0:
                raise UserError("llama.cpp failed to decode the prompt")
            rows += [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama.ctx, j),
                                           shape=(self.n_vocab,)).copy() for j in range(len(piece))]
        return rows

    def close(self):
        self.llama_cpp.llama_batch_free(self.batch)
        self.mtmd_cpp.mtmd_free(self.mtmd)
        self.llama.close()


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


def llama_cli_command(model: Path, mmproj: Path, limits: dict, image: str, question: str,
                      system_prompt: str) -> list[str]:
    """llama-mtmd-cli asked what the proof asked: --jinja formats the chat with the model's own template (the one
    in the GGUF, with Qwen's default system turn), as the merged model and the proof do; llama.cpp builds whose
    default is their built-in template would drop that turn."""
    system = ["-sys", system_prompt] if system_prompt else []
    return ["llama-mtmd-cli", "-m", str(model), "--mmproj", str(mmproj), "--jinja",
            "--image-min-tokens", str(limits["image_min_tokens"]),
            "--image-max-tokens", str(limits["image_max_tokens"]),
            "--image", str(image), "-p", question, *system, "--temp", "0"]


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
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")
