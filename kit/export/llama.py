"""A GGUF pair (text model + mmproj) in llama-cpp-python, driven through libllama + libmtmd the way llama-mtmd-cli
drives them: the one llama.cpp driver for merge.py's proof (logits at every prompt position, greedy tokens) and for
infer.py's and eval.py's answers (the chat template stored in the GGUF, rendered with the family's template flags;
llama.cpp's own samplers: greedy unless a temperature is given). Images are cut into the recipe's token grid
(min/max_pixels) in both.

The family of a pair is what merge.py recorded beside it (gguf_report.json, run_config.json), else the one whose
llama.cpp text arch the GGUF names.
"""

import codecs
import ctypes
import functools
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
            try:
                saved = json.loads(path.read_text())
            except ValueError as error:
                raise UserError(f"{path}: damaged ({error}); write the pair again with merge.py") from None
            found.update({key: saved[key] for key in ("family", "image_min_tokens", "image_max_tokens")
                          if saved.get(key)})
    return found


def pair_family(model_file: Path, arch: str | None) -> families.Family:
    """The pair's family: as recorded beside it, else by the GGUF's text arch (`arch`; None: not read yet)."""
    saved = saved_beside(model_file).get("family")
    if not saved:
        return families.of_llama_arch(arch or "unknown", str(model_file))
    family = families.by_name(saved)
    if arch and arch != family.llama.text_arch:  # the recorded family is checked against the weights, as for a run
        raise UserError(f"{model_file}: its llama.cpp arch is {arch}, not {family.name}'s ({family.llama.text_arch}) "
                        f"as recorded beside it; write the pair again with merge.py from the run it came from")
    return family


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
    """A GGUF text model + mmproj in llama-cpp-python, driven through libmtmd the way llama-mtmd-cli drives it.

    exact=True (the proof) keeps the KV cache in f32, so that the logits compare weights and not cache rounding;
    answering keeps llama.cpp's default f16 cache."""

    def __init__(self, model_path: Path, mmproj_path: Path, image_min_tokens: int | None = None,
                 image_max_tokens: int | None = None, n_ctx: int = 4096, exact: bool = True,
                 family: families.Family | None = None):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.llama_cpp, self.mtmd_cpp = llama_cpp, mtmd_cpp
        cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if exact else {}
        self.llama = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_gpu_layers=-1, n_threads=os.cpu_count(),
                                     verbose=False, **cache)
        self.family = family or pair_family(model_path, self.llama.metadata.get("general.architecture"))
        quiet_mtmd()
        params = mtmd_cpp.mtmd_context_params_default()
        params.n_threads, params.print_timings, params.warmup = self.llama.n_threads, False, False
        if image_min_tokens is not None:  # else llama.cpp's own limits for the model (up to 4,096 for Qwen2-VL)
            params.image_min_tokens, params.image_max_tokens = image_min_tokens, image_max_tokens
        self.mtmd = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.llama.model, params)
        if not self.mtmd:
            self.llama.close()
            raise UserError(f"llama.cpp could not load {mmproj_path} as the vision projector of {model_path}")
        self.n_vocab = self.llama.n_vocab()
        self.vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self.batch = llama_cpp.llama_batch_init(self.llama.n_batch, 0, 1)

    def run(self, text: str, image: str | None, max_new_tokens: int = 16) -> dict:
        """Prompt ids (-1 for each image embedding), logits at every text position of the prompt (NaN at image
        positions), and `max_new_tokens` greedy tokens, for chat `text` that holds the family's image slot
        (markup.image_slot) where the image goes."""
        import numpy as np

        prompt_ids, logits, position = self._prompt(text, [image] if image else [], every_logit=True)
        answer = [int(np.argmax(logits[-1]))]
        while len(answer) < max_new_tokens:
            answer.append(int(np.argmax(self._decode(answer[-1:], position, every_logit=True)[0])))
            position += 1
        return {"prompt_ids": prompt_ids, "logits": np.stack(logits), "answer_ids": answer}

    def answer(self, text: str, images: list, max_new_tokens: int, temperature: float = 0.0, min_p: float = 0.0,
               seed: int = 0, on_piece=None) -> str:
        """The reply to chat `text` (the model's template, the family's image slot per image, ending in the
        assistant's turn), sampled by llama.cpp until an end-of-generation token: greedy at temperature 0, else
        min-p then temperature. `on_piece(text)` gets each piece of it as it comes."""
        llama_cpp = self.llama_cpp
        _, _, position = self._prompt(text, images, every_logit=False)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature > 0:
            for sampler in (llama_cpp.llama_sampler_init_min_p(min_p, 1),
                            llama_cpp.llama_sampler_init_temp(temperature), llama_cpp.llama_sampler_init_dist(seed)):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        decoder, pieces = codecs.getincrementaldecoder("utf-8")(errors="replace"), []
        try:
            for _ in range(max_new_tokens):
                token = llama_cpp.llama_sampler_sample(chain, self.llama.ctx, -1)  # the last decoded position
                if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                    break
                piece = decoder.decode(self.llama.detokenize([token]))
                pieces.append(piece)
                if on_piece is not None and piece:
                    on_piece(piece)
                self._decode([token], position, every_logit=False)
                position += 1
        finally:
            llama_cpp.llama_sampler_free(chain)
        return "".join(pieces).strip()

    def _prompt(self, text: str, images: list, every_logit: bool):
        """The chat text and its images through libmtmd into a fresh context: (prompt ids, -1 per image embedding;
        logits per position, NaN rows at images, or only the last text chunk's when not every_logit; the next
        position)."""
        import numpy as np

        mtmd_cpp = self.mtmd_cpp
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self.llama.ctx), True)
        # libmtmd writes the vision start and end tokens around the image itself
        marker = mtmd_cpp.mtmd_default_marker().decode()
        encoded = text.replace(self.family.markup.image_slot, marker).encode()
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        prompt_ids, logits, position = [], [], 0
        try:
            prompt = mtmd_cpp.mtmd_input_text(text=encoded, text_len=len(encoded), add_special=True,
                                              parse_special=True)
            bitmap_array = (mtmd_cpp.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd_cpp.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(prompt), bitmap_array, len(bitmaps)) != 0:
                raise UserError(f"llama.cpp could not tokenize the prompt with its {len(images)} image(s)")
            for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
                if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    ids = [tokens[j] for j in range(count.value)]
                    logits += self._decode(ids, position, every_logit)
                    prompt_ids += ids
                    position += len(ids)
                else:
                    n_tokens, new_position = mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk), self.llama_cpp.llama_pos(0)
                    if mtmd_cpp.mtmd_helper_eval_chunk_single(self.mtmd, self.llama.ctx, chunk, position, 0,
                                                              self.llama.n_batch, False,
                                                              ctypes.byref(new_position)) != 0:
                        raise UserError("llama.cpp failed to encode an image of the prompt")
                    prompt_ids += [-1] * n_tokens
                    if every_logit:
                        logits += [np.full(self.n_vocab, np.nan, dtype=np.float32)] * n_tokens
                    # M-RoPE: an image spans fewer positions than tokens, and text goes on after its last one
                    position = new_position.value
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
        return prompt_ids, logits, position

    def _bitmap(self, image):
        """A file read by libmtmd itself (as llama-mtmd-cli reads it); a decoded image handed over as RGB."""
        mtmd_cpp = self.mtmd_cpp
        if isinstance(image, (str, Path)):
            bitmap = mtmd_cpp.mtmd_helper_bitmap_init_from_file(self.mtmd, str(image).encode(), False)
        else:
            from kit.inputs.chat import load_image

            rgb = load_image(image).convert("RGB")
            data = rgb.tobytes()
            pixels = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            bitmap = mtmd_cpp.mtmd_bitmap_init(rgb.width, rgb.height, pixels)
        if not bitmap:
            raise UserError(f"llama.cpp could not read the image {image if isinstance(image, (str, Path)) else ''}")
        return bitmap

    def _decode(self, ids: list[int], position: int, every_logit: bool) -> list:
        """Text tokens at consecutive positions, in n_batch pieces; the logits of every one of them, or none (the
        last token's stay in the context for a sampler)."""
        import numpy as np

        llama_cpp, batch, rows = self.llama_cpp, self.batch, []
        for start in range(0, len(ids), self.llama.n_batch):
            piece = ids[start:start + self.llama.n_batch]
            batch.n_tokens = len(piece)
            for j, token in enumerate(piece):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0], batch.logits[j] = \
                    token, position + start + j, 1, 0, every_logit or start + j == len(ids) - 1
            if llama_cpp.llama_decode(self.llama.ctx, batch) != 0:
                raise UserError("llama.cpp failed to decode the prompt")
            if every_logit:
                rows += [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llama.ctx, j),
                                               shape=(self.n_vocab,)).copy() for j in range(len(piece))]
        return rows

    def close(self):
        self.llama_cpp.llama_batch_free(self.batch)
        self.mtmd_cpp.mtmd_free(self.mtmd)
        self.llama.close()


def open_pair(model_file: Path, mmproj: Path, recipe: dict | None) -> LlamaCppPair:
    """The pair for answering; images cut as in training when the recipe is known (the image token limits merge.py
    computed from it and the model's grid are in gguf_report.json)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("a GGUF TARGET needs llama-cpp-python: make llama-cpp, or pip install llama-cpp-python"
                        ) from None
    saved = saved_beside(model_file)
    limits = {key: saved[key] for key in ("image_min_tokens", "image_max_tokens")} \
        if recipe and "image_max_tokens" in saved else {}
    return LlamaCppPair(model_file, mmproj, **limits, n_ctx=8192, exact=False)


@functools.cache
def _template(source: str):
    """A chat template compiled as transformers compiles one (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]).from_string(
        source)


def chat_text(pair: LlamaCppPair, sample: dict, system: str) -> str:
    """The prompt of a sample ({"images", "messages"}; a final assistant answer is left out) in the chat template
    stored in the GGUF, as transformers renders the same template for the merged model."""
    from kit.inputs.chat import prompt_messages, with_system

    source = pair.llama.metadata.get("tokenizer.chat_template")
    if not source:
        raise UserError("the GGUF file has no chat template (tokenizer.chat_template): write it again with merge.py")
    return _template(source).render(messages=with_system(prompt_messages(sample["messages"]), system),
                                    add_generation_prompt=True, **pair.family.chat_template_kwargs)


def answers(pair: LlamaCppPair, samples, system: str, max_new_tokens: int, temperature: float = 0.0,
            min_p: float = 0.0, on_piece=None, progress=None) -> tuple[list[str], float]:
    """(one answer per sample, seconds spent). `on_piece(text)` streams each piece as it comes."""
    found, seconds = [], 0.0
    for sample in samples:
        started = time.time()
        found.append(pair.answer(chat_text(pair, sample, system), list(sample["images"]), max_new_tokens,
                                 temperature, min_p, on_piece=on_piece))
        seconds += time.time() - started
        if progress:
            progress(1)
    return found, seconds


def gguf_answers(path: Path, recipe: dict, samples, system_prompt: str, max_new_tokens: int, progress=None):
    """(one greedy answer per sample, seconds spent) from the GGUF pair at `path`, for scoring in eval.py."""
    pair = open_pair(*find_pair(path), recipe)
    try:
        return answers(pair, samples, system_prompt, max_new_tokens, progress=progress)
    finally:
        pair.close()
