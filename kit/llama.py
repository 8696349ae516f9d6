"""Answers from a GGUF pair (text model + mmproj) through llama-cpp-python: the one way infer.py and eval.py
drive llama.cpp. llama-cpp-python's Qwen2-VL chat handler (libmtmd reads the image), charts cut into the
recipe's token grid (min/max_pixels), every generation setting spelled out (greedy unless a temperature is given).
"""

import base64
import io
import time
from pathlib import Path

from kit.errors import UserError


def find_pair(path: Path, mmproj: Path | None = None) -> tuple[Path, Path]:
    """(model .gguf, projector .gguf): the one model file in a folder, and the mmproj-* file beside it."""
    if path.is_file():
        if path.name.startswith("mmproj-"):
            raise UserError(f"{path} is the vision projector; give the model .gguf (or its folder) as TARGET")
        model_file = path
    else:
        models = sorted(p for p in path.glob("*.gguf") if not p.name.startswith("mmproj-"))
        if len(models) != 1:
            raise UserError(f"{path} holds {'no model .gguf' if not models else 'several models'}"
                            f"{' (' + ', '.join(p.name for p in models) + ')' if models else ''}; name one as TARGET")
        model_file = models[0]
    if mmproj is None:
        found = sorted(model_file.parent.glob("mmproj-*.gguf"))
        if len(found) != 1:
            raise UserError(f"{'no' if not found else 'more than one'} mmproj-*.gguf file beside {model_file}; "
                            "give the vision projector with --mmproj")
        mmproj = found[0]
    elif not mmproj.is_file():
        raise UserError(f"--mmproj {mmproj}: no such file")
    return model_file, mmproj


def data_uri(image) -> str:
    """A path, PIL image or {"bytes", "path"} dict as a PNG data: URI (read by the chat handler without a fetch)."""
    from kit.chat import load_image

    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def open_pair(model_file: Path, mmproj: Path, recipe: dict | None):
    """A llama_cpp.Llama with Qwen2-VL's chat handler; images cut as in training when the recipe is known."""
    from kit import export

    try:
        from llama_cpp import Llama, mtmd_cpp
        from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    except ImportError:
        raise UserError("a GGUF TARGET needs llama-cpp-python: make llama-cpp, or pip install llama-cpp-python")
    export.quiet_mtmd()
    # The 2.5 handler drives libmtmd, which reads the projector type (qwen2vl_merger) from the mmproj file.
    handler = Qwen25VLChatHandler(clip_model_path=str(mmproj), verbose=False)
    # Jinja drops a template's final newline, so the handler's prompt would end "<|im_start|>assistant" where
    # Qwen2-VL's template ends "<|im_start|>assistant\n"; an empty expression after it keeps the newline.
    handler.CHAT_FORMAT = Qwen25VLChatHandler.CHAT_FORMAT + "{{ '' }}"
    llm = Llama(model_path=str(model_file), chat_handler=handler, n_ctx=8192, n_gpu_layers=-1, verbose=False)
    if recipe:
        # The recipe's min/max_pixels rather than llama.cpp's own Qwen2-VL limits (up to 4,096 image tokens). The
        # handler only builds its libmtmd context when it has none, so this one is used.
        params = mtmd_cpp.mtmd_context_params_default()
        params.n_threads, params.print_timings = llm.n_threads, False
        limits = export.image_token_limits(recipe)
        params.image_min_tokens, params.image_max_tokens = limits["image_min_tokens"], limits["image_max_tokens"]
        context = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
        if not context:
            raise UserError(f"llama.cpp could not load {mmproj} as the vision projector of {model_file}")
        handler.mtmd_ctx = context
        llm._stack.callback(mtmd_cpp.mtmd_free, context)
    return llm


def chat_messages(sample: dict, system: str) -> list[dict]:
    """The prompt of a sample ({"images", "messages"}; a final assistant answer is left out) in llama-cpp-python's
    (OpenAI's) form: each {"type": "image"} becomes the next image as a data URI; a turn of text only is a plain
    string, as the chat template expects for system turns."""
    from kit.chat import prompt_messages

    images = iter(sample["images"])
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [m for m in prompt_messages(sample["messages"]) if not (system and m.get("role") == "system")]
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list) and any(part.get("type") == "image" for part in content):
            content = [{"type": "image_url", "image_url": {"url": data_uri(next(images))}}
                       if part.get("type") == "image" else {"type": "text", "text": part.get("text", "")}
                       for part in content]
        elif isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        converted.append({"role": message["role"], "content": content})
    return converted


def answers(llm, samples, system: str, max_new_tokens: int, temperature: float = 0.0, min_p: float = 0.0,
            on_piece=None, progress=None) -> tuple[list[str], float]:
    """(one answer per sample, seconds spent). `on_piece(text)` streams each piece as it comes."""
    # temperature 0 is llama.cpp's greedy sampler; top-k/top-p off so sampling matches transformers'.
    options = dict(max_tokens=max_new_tokens, temperature=temperature, min_p=min_p, top_k=0, top_p=1.0,
                   repeat_penalty=1.0, stream=on_piece is not None)
    found, seconds = [], 0.0
    for sample in samples:
        started = time.time()
        reply = llm.create_chat_completion(messages=chat_messages(sample, system), **options)
        if on_piece is not None:
            pieces = []
            for chunk in reply:
                pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                on_piece(pieces[-1])
            found.append("".join(pieces).strip())
        else:
            found.append((reply["choices"][0]["message"]["content"] or "").strip())
        seconds += time.time() - started
        if progress:
            progress(1)
    return found, seconds


def gguf_answers(path: Path, recipe: dict, samples, system_prompt: str, max_new_tokens: int, progress=None):
    """(one greedy answer per sample, seconds spent) from the GGUF pair at `path`, for scoring in eval.py."""
    llm = open_pair(*find_pair(path), recipe)
    try:
        return answers(llm, samples, system_prompt, max_new_tokens, progress=progress)
    finally:
        llm.close()
