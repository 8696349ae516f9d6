"""GGUF files from a merged model: `convert_hf_to_gguf.py` writes the text model (the family's llama.cpp arch, e.g.
qwen2vl) and, with --mmproj, the vision projector (its clip.projector_type, e.g. qwen2vl_merger, qwen2.5vl_merger:
kit/families/); K-quants go through `llama-quantize` or
llama-cpp-python's `llama_model_quantize` (kit/export/llama_quantize.py). Both run in subprocesses, logged to files.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kit.errors import UserError
from kit.export.converter import LLAMA_CPP_PYTHON
from kit.export.converter_patch import FORCED_PRE_NOTE, forced_pre_note  # noqa: F401  (merge.py shows it)

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZER_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_0", "q5_1",
                   "q5_k_s", "q5_k_m", "q6_k")  # need llama.cpp's quantizer, from an f16 conversion
# Scripts run by path in a logged subprocess (llama.cpp prints to the C-level stdout), with -P: their folder kit/
# must not go on sys.path, where kit/export/gguf.py would stand in for the gguf package.
CONVERTER_PATCH = Path(__file__).with_name("converter_patch.py")
LLAMA_QUANTIZE = Path(__file__).with_name("llama_quantize.py")


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


def uses_regex(model_dir: Path, regex: str) -> bool:
    """Whether tokenizer.json pre-tokenizes with `regex` (the split a llama.cpp pre-tokenizer name stands for)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre_tokenizer = json.loads(path.read_text()).get("pre_tokenizer") or {}
    return any(step.get("type") == "Split" and step.get("pattern", {}).get("Regex") == regex
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
    """One converter run in a subprocess; returns whether the pre-tokenizer had to be named for the converter (the
    family's: "qwen2", Qwen3.5's "qwen35"). The family also says what else the converter must be told (Qwen3.5:
    --no-mtp)."""
    from kit import families
    from kit.families._tiny import QWEN2_PRETOKENIZE_REGEX

    names = families.of_model(str(model_dir)).llama
    forced = not mmproj and uses_regex(model_dir, names.pre_tokenizer_regex or QWEN2_PRETOKENIZE_REGEX)
    script = ["-P", str(CONVERTER_PATCH), "--pre", names.pre_tokenizer, str(converter)] if forced else [str(converter)]
    # The converter's own gguf-py first: the pip gguf may lag behind the converter that uses it.
    paths = [str(converter.parent / "gguf-py"), str(converter.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with converter_input(model_dir, () if mmproj else names.transposed_experts, outfile.parent) as source:
        command = [sys.executable, "-u", *script, str(source), "--outfile", str(outfile), "--outtype", outtype,
                   "--model-name", name, *(["--metadata", str(metadata)] if metadata else []),
                   *(["--mmproj"] if mmproj else names.converter_args)]
        run_logged(command, log, f"convert {outfile.name}", env)
    return forced and forced_pre_note(names.pre_tokenizer) in log.read_text()


@contextlib.contextmanager
def converter_input(model_dir: Path, transposed: tuple[str, ...], beside: Path):
    """The merged folder as the converter reads it: itself, or (for parameters transformers keeps transposed
    relative to the checkpoints, `transposed`) a temporary copy beside the output with those swapped back, every
    other file linked."""
    if not transposed:
        yield model_dir
        return
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory(prefix=".converter-input-", dir=beside) as folder:
        for path in Path(model_dir).iterdir():
            if path.suffix != ".safetensors":
                (Path(folder) / path.name).symlink_to(path.resolve())
                continue
            tensors = load_file(path)
            for key in [k for k in tensors if k.endswith(transposed)]:
                tensors[key] = tensors[key].transpose(1, 2).contiguous()
            save_file(tensors, Path(folder) / path.name, metadata={"format": "pt"})
        yield Path(folder)


def quantize(quantizer: str, source: Path, target: Path, quant: str, log: Path):
    if quantizer == "llama-cpp-python":
        command = [sys.executable, "-P", str(LLAMA_QUANTIZE), str(source), str(target), quant]
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


def template_with(source: str, kwargs: dict) -> str:
    """The chat template with `kwargs` (the family's chat_template_kwargs) set at its top. The pinned llama.cpp's
    llama-mtmd-cli reads no template kwargs (neither --reasoning nor --chat-template-kwargs is in its argument
    table, and it renders with enable_thinking=true), but it takes a whole template with --chat-template after
    --jinja; a top-level {% set %} there overrides what llama.cpp passes in (common/jinja's set_statement)."""
    sets = "".join(f"{{%- set {key} = {json.dumps(value)} %}}" for key, value in kwargs.items())
    return sets + source


def llama_cli_command(model: Path, mmproj: Path, limits: dict, image: str, question: str,
                      system_prompt: str, extra: tuple[str, ...] = ()) -> list[str]:
    """llama-mtmd-cli asked what the proof asked: --jinja formats the chat with the model's own template (the one
    in the GGUF, with Qwen's default system turn), as the merged model and the proof do; llama.cpp builds whose
    default is their built-in template would drop that turn."""
    system = ["-sys", system_prompt] if system_prompt else []
    return ["llama-mtmd-cli", "-m", str(model), "--mmproj", str(mmproj), "--jinja",
            "--image-min-tokens", str(limits["image_min_tokens"]),
            "--image-max-tokens", str(limits["image_max_tokens"]),
            "--image", str(image), "-p", question, *system, "--temp", "0", *extra]
