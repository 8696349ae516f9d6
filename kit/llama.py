"""A GGUF pair (text model + mmproj) in llama-cpp-python: infer.py's and eval.py's answers (the model family's
llama-cpp-python chat handler, libmtmd reads the image, every generation setting spelled out: greedy unless a
temperature is given) and merge.py's proof (LlamaCppPair: libmtmd driven token by token, logits at every position).
Charts are cut into the recipe's token grid (min/max_pixels) in both.

The family of a pair is what merge.py recorded beside it (gguf_report.json, run_config.json), else the one whose
llama.cpp text arch the GGUF names.
"""

import base64
import functools
import io
import os
import sys
import time
from pathlib import Path

from kit import families
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


def image_token_limits(recipe: dict, grid: int) -> dict:
    """The recipe's pixel limits as llama.cpp's --image-min-tokens/--image-max-tokens (one token per grid x grid
    pixels, the model's patch x merge), so that llama.cpp cuts an image into the same grid the model was trained on."""
    return {"image_min_tokens": max(recipe["min_pixels"] // (grid * grid), 1),
            "image_max_tokens": recipe["max_pixels"] // (grid * grid)}


def saved_beside(model_file: Path) -> dict:
    """What merge.py wrote beside a GGUF pair: gguf_report.json (family, image token limits) over run_config.json
    (family); {} for a pair made elsewhere."""
    import json

    found = {}
    for name in ("run_config.json", "gguf_report.json"):
        path = Path(model_file).parent / name
        if path.is_file():
            saved = json.loads(path.read_text())
            found.update({key: saved[key] for key in ("family", "image_min_tokens", "image_max_tokens")
                          if saved.get(key)})
    return found


def pair_family(model_file: Path, arch: str | None) -> families.Family:
    """The pair's family: as recorded beside it, else by the GGUF's text arch (`arch`; None: not read yet)."""
    saved = saved_beside(model_file).get("family")
    if saved:
        return families.by_name(saved)
    return families.of_llama_arch(arch or "unknown", str(model_file))



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

    def __init__(self, model_path: Path, mmproj_path: Path, image_min_tokens: int, image_max_tokens: int,
                 family: families.Family | None = None):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.llama_cpp, self.mtmd_cpp = llama_cpp, mtmd_cpp
        self.llama = llama_cpp.Llama(str(model_path), n_ctx=4096, n_gpu_layers=-1, n_threads=os.cpu_count(),
                                     verbose=False,
                                     # an f16 cache would round every key and value: keep f32 to compare weights
                                     type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        self.family = family or pair_family(model_path, self.llama.metadata.get("general.architecture"))
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
        positions), and `max_new_tokens` greedy tokens, for chat `text` that holds the family's image slot
        (<|vision_start|><|image_pad|><|vision_end|>) where the image goes."""
        import ctypes

        import numpy as np

        mtmd_cpp = self.mtmd_cpp
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self.llama.ctx), True)
        # libmtmd writes the vision start and end tokens around the image itself
        marker = mtmd_cpp.mtmd_default_marker().decode()
        encoded = text.replace(self.family.markup.image_slot, marker).encode()
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


def data_uri(image) -> str:
    """A path, PIL image or {"bytes", "path"} dict as a PNG data: URI (read by the chat handler without a fetch)."""
    from kit.chat import load_image

    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def open_pair(model_file: Path, mmproj: Path, recipe: dict | None):
    """A llama_cpp.Llama with the family's chat handler; images cut as in training when the recipe is known (the
    image token limits merge.py computed from it are in gguf_report.json)."""
    try:
        from llama_cpp import Llama, mtmd_cpp
    except ImportError:
        raise UserError("a GGUF TARGET needs llama-cpp-python: make llama-cpp, or pip install llama-cpp-python")
    quiet_mtmd()
    llm = Llama(model_path=str(model_file), n_ctx=8192, n_gpu_layers=-1, verbose=False)
    # the handler is chosen once the GGUF's arch is known; create_chat_completion reads it from the Llama
    handler = llm.chat_handler = pair_family(model_file, llm.metadata.get("general.architecture")).llama_handler(
        str(mmproj))
    limits = saved_beside(model_file)
    if recipe and "image_max_tokens" in limits:
        # The recipe's min/max_pixels rather than llama.cpp's own limits (up to 4,096 image tokens). The handler
        # only builds its libmtmd context when it has none, so this one is used.
        params = mtmd_cpp.mtmd_context_params_default()
        params.n_threads, params.print_timings = llm.n_threads, False
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
