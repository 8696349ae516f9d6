"""Greedy answers from a GGUF pair (text model + mmproj) through llama-cpp-python, for scoring in eval.py.

The same driving as infer.py's GGUF path: llama-cpp-python's Qwen2-VL chat handler (libmtmd reads the image),
charts cut into the recipe's token grid (min/max_pixels), greedy sampling with every filter off.
"""

import base64
import io
from pathlib import Path

from kit.errors import UserError


def find_pair(path: Path) -> tuple[Path, Path]:
    """(model .gguf, mmproj-*.gguf beside it) for a .gguf file or a folder holding one model file."""
    models = [path] if path.is_file() else sorted(p for p in path.glob("*.gguf") if not p.name.startswith("mmproj-"))
    if len(models) != 1 or models[0].name.startswith("mmproj-"):
        raise UserError(f"{path}: give one model .gguf file (or a folder holding exactly one) with its "
                        "mmproj-*.gguf beside it")
    projectors = sorted(models[0].parent.glob("mmproj-*.gguf"))
    if len(projectors) != 1:
        raise UserError(f"{'no' if not projectors else 'more than one'} mmproj-*.gguf file beside {models[0]}")
    return models[0], projectors[0]


def data_uri(image) -> str:
    """A path, PIL image or {"bytes", "path"} dict as a PNG data: URI (read by the chat handler without a fetch)."""
    from kit.chat import load_image

    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def gguf_answers(path: Path, recipe: dict, samples, system_prompt: str, max_new_tokens: int, progress=None):
    """(one greedy answer per sample, seconds spent)."""
    import time

    from kit import export

    model_file, mmproj = find_pair(path)
    try:
        from llama_cpp import Llama, mtmd_cpp
        from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    except ImportError:
        raise UserError("a GGUF TARGET needs llama-cpp-python: make llama-cpp, or pip install llama-cpp-python")
    export.quiet_mtmd()
    handler = Qwen25VLChatHandler(clip_model_path=str(mmproj), verbose=False)
    # Jinja drops the template's final newline; Qwen2-VL's prompt ends "<|im_start|>assistant\n"
    handler.CHAT_FORMAT = Qwen25VLChatHandler.CHAT_FORMAT + "{{ '' }}"
    llm = Llama(model_path=str(model_file), chat_handler=handler, n_ctx=8192, n_gpu_layers=-1, verbose=False)
    params = mtmd_cpp.mtmd_context_params_default()
    params.n_threads, params.print_timings = llm.n_threads, False
    limits = export.image_token_limits(recipe)  # the chart cut as in training
    params.image_min_tokens, params.image_max_tokens = limits["image_min_tokens"], limits["image_max_tokens"]
    context = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    if not context:
        raise UserError(f"llama.cpp could not load {mmproj} as the vision projector of {model_file}")
    handler.mtmd_ctx = context
    llm._stack.callback(mtmd_cpp.mtmd_free, context)
    answers, seconds = [], 0.0
    for sample in samples:
        user = [m for m in sample["messages"] if m["role"] == "user"][-1]
        question = " ".join(p["text"] for p in user["content"] if p.get("type") == "text")
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_uri(image)}}
                                           for image in sample["images"]), {"type": "text", "text": question}]}]
        started = time.time()
        reply = llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0, top_k=0,
                                           top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        seconds += time.time() - started
        answers.append((reply["choices"][0]["message"]["content"] or "").strip())
        if progress:
            progress(1)
    llm.close()
    return answers, seconds
