"""Answers from a transformers model (plain, LoRA or Unsloth) for {"images", "messages"} samples.

Generation batches several charts into one `generate` call with left padding, so every row's answer starts
right after its own prompt. Greedy unless a temperature is given.
"""

import time


def prepare_for_inference(model, backend: str):
    """Inference mode: Unsloth's fast generation path on its backend; dropout off everywhere."""
    if backend == "unsloth":
        from unsloth import FastVisionModel

        FastVisionModel.for_inference(model)
    model.eval()
    return model


def generate_answers(model, processor, samples: list[dict], system_prompt: str = "", max_new_tokens: int = 32,
                     batch_size: int = 8, temperature: float = 0.0, min_p: float = 0.0, streamer=None,
                     progress=None) -> tuple[list[str], float]:
    """(one answer per sample, seconds spent, image preprocessing included). `progress(n)` follows each batch."""
    import torch
    from transformers import GenerationConfig

    from kit.inputs.chat import generation_inputs

    tokenizer = processor.tokenizer
    # Every setting spelled out: generate() fills the ones left unset from the checkpoint's generation_config,
    # and Qwen2-VL-Instruct ships top_k=1 and a repetition penalty. Greedy is the plain argmax, as in llama.cpp;
    # sampling is temperature and min-p alone (top-k 0 and top-p 1 switch those filters off).
    sampling = dict(do_sample=True, temperature=temperature, min_p=min_p, top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=1.0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=model.generation_config.eos_token_id,
                              **sampling)
    answers, seconds = [], 0.0
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        started = time.time()
        inputs = generation_inputs(processor, batch, system_prompt).to(model.device)
        with torch.inference_mode():
            output = model.generate(**inputs, generation_config=config, streamer=streamer)
        seconds += time.time() - started
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        if progress:
            progress(len(batch))
    return answers, seconds
