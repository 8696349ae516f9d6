"""Ask a chart a question: a run folder, a merged / local / hub model, or a GGUF file through llama.cpp.

    python infer.py runs/demo --image chart.png --question "How many bars are in the chart?"
    python infer.py runs/chartqa-merged --image chart.png --question "What is the highest value?" --stream
    python infer.py runs/chartqa-gguf --image chart.png --question "..."   # uses the mmproj-*.gguf beside it
    python infer.py Qwen/Qwen2-VL-2B-Instruct --batch questions.jsonl --batch-size 8
    python infer.py runs/demo --video clip.mp4 --question "What moves?"     # a video file, or a folder of frames

TARGET is a run folder made by train.py (base + adapter, or the whole model), a model folder or hub id
(`tiny` too), or a .gguf file or a folder holding one. --batch reads rows {"image": path relative to the
file, "question": ...} or training's rows in any shape it reads (ours, LLaMA-Factory, LLaVA, TRL; the
answer turn is left out of the prompt) and writes each row as it was plus "prediction" to <FILE>.answers.jsonl
beside it; a row's reference ("answer", "answers" or the answer turn) stays, so `python eval.py --score
FILE.answers.jsonl` scores it.
Greedy unless --temperature is above 0.
"""

import json
import re
from pathlib import Path

import click

from kit.cli import help_with_examples, jsonl_rows, user_errors
from kit.errors import UserError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("target")
@click.option("--image", type=click.Path(path_type=Path), help="The chart to ask about.")
@click.option("--video", type=click.Path(path_type=Path),
              help="A video to ask about: a file, or a folder of its frames (image files, in name order); sampled at "
                   "the run's fps up to its max_frames.")
@click.option("--question", help="The question to ask.")
@click.option("--batch", "batch_file", type=click.Path(path_type=Path),
              help="A JSONL file of {\"image\", \"question\"} (or training's {\"images\", \"messages\"}) rows instead "
                   "of --image/--question, e.g. --batch charts/questions.jsonl.")
@click.option("--system", help="System prompt. Default: the run's recipe system_prompt when TARGET is a run "
                               "(or has its run_config.json beside it), else the chat template's default.")
@click.option("--max-new-tokens", default=64, help="Longest answer, in tokens.")
@click.option("--temperature", default=0.0, help="Above 0: sample at this temperature instead of greedy decoding.")
@click.option("--min-p", default=0.0, help="With --temperature: drop tokens below this share of the top one.")
@click.option("--stream", is_flag=True, help="Print the answer token by token as it is generated.")
@click.option("--batch-size", default=8, help="With --batch on a transformers model: questions generated together.")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]),
              help="For transformers models. Default: the run's recipe backend, else auto.")
@click.option("--mmproj", type=click.Path(path_type=Path),
              help="Vision projector for a GGUF TARGET. Default: the mmproj-*.gguf file beside it.")
@click.option("--force", is_flag=True, help="With --batch: replace an existing answers file.")
def main(target, image, video, question, batch_file, system, max_new_tokens, temperature, min_p, stream, batch_size,
         backend, mmproj, force):
    """Answer a question about a chart (or a video) with TARGET."""
    with user_errors():
        run(target, image, question, batch_file, system, max_new_tokens, temperature, min_p, stream, batch_size,
            backend, mmproj, force, video)


def run(target, image, question, batch_file, system, max_new_tokens, temperature, min_p, stream, batch_size,
        backend_name, mmproj, force, video=None):
    from kit.noise import silence_known_noise

    silence_known_noise()  # two library warnings that ask nothing of the user (kit/noise.py)

    # --- options: the questions, what TARGET is, the system prompt ----------------------------------
    questions, answers_file = gather_questions(batch_file, image, video, question, stream, force)
    if max_new_tokens < 1 or batch_size < 1 or temperature < 0 or not 0 <= min_p <= 1:
        raise UserError("--max-new-tokens and --batch-size are at least 1, --temperature at least 0, "
                        "--min-p between 0 and 1")
    kind, path = classify(target)
    recipe = saved_recipe(path if path.is_dir() else path.parent) if path else None
    system = system_prompt(system, recipe)

    # --- load and run --------------------------------------------------------------------------------
    show_progress = None
    if batch_file:
        from tqdm import tqdm

        show_progress = tqdm(total=len(questions), desc="answering", mininterval=2)
    if kind == "gguf" and any(q.get("videos") for q in questions):
        raise UserError(f"{target}: a GGUF pair answers about images only here; ask the run folder or its merged "
                        "model about a video")
    if kind == "gguf":
        answers = answer_gguf(path, mmproj, recipe, questions, system, max_new_tokens, temperature, min_p, stream,
                              show_progress)
    else:
        answers = answer_hf(kind, target, path, recipe, backend_name, questions, system, max_new_tokens,
                            temperature, min_p, stream, batch_size, show_progress)

    # --- save ----------------------------------------------------------------------------------------
    if not batch_file:
        if not stream:
            click.echo(answers[0])
        if not answers[0]:
            click.echo("note: the answer is empty: the model stopped at once or wrote only special tokens", err=True)
        return
    show_progress.close()
    write_answers(answers_file, questions, answers)


def gather_questions(batch_file, image, video, question, stream, force) -> tuple[list[dict], Path | None]:
    """(the questions, the answers file of --batch or None): --batch's rows, or the one --image/--video question."""
    if batch_file:
        if stream:
            raise UserError("--stream prints one answer as it comes; leave it out with --batch")
        answers_file = batch_file.with_suffix(".answers.jsonl")
        questions = read_batch(batch_file)
        if answers_file.exists() and not force:
            raise UserError(f"{answers_file} exists; use --force to replace it")
        return questions, answers_file
    if not ((image or video) and question):
        raise UserError("give --image PATH (or --video PATH) and --question TEXT, or --batch FILE.jsonl")
    videos = [video_frames(video)] if video else []
    questions = [{"images": [str(image)] if image else [], "videos": videos, "messages": [
        {"role": "user", "content": [{"type": "image"}] * bool(image) + [{"type": "video"}] * bool(video) + [
            {"type": "text", "text": question}]}]}]
    if image:
        check_image(image, "--image")
    if video:
        check_video(videos[0], "--video")
    return questions, None


def system_prompt(given: str | None, recipe: dict | None) -> str:
    """--system when given (a note when it replaces the run's), else the run's system_prompt, else none."""
    saved = recipe["system_prompt"] if recipe else ""
    if given is not None and saved and given != saved:
        click.echo("note: --system replaces the run's system_prompt", err=True)
    return saved if given is None else given


def write_answers(answers_file: Path, questions: list[dict], answers: list[str]):
    """Each --batch row as written with its "prediction", renamed into place whole."""
    tmp = answers_file.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for row, answer in zip(questions, answers):
            handle.write(json.dumps({**row["row"], "prediction": answer}) + "\n")
    tmp.replace(answers_file)
    click.echo(f"wrote {len(answers)} answers to {answers_file}")


def read_batch(path: Path) -> list[dict]:
    """[{"images": absolute paths, "messages": the prompt, "row": the row as written}]; every image checked up
    front. Rows are read as training reads them (data/jsonl.py); an answer turn is not part of the prompt."""
    from data.formats import placeholder_count
    from data.jsonl import to_sample
    from kit.inputs.chat import prompt_messages

    questions = []
    for line, where, row in jsonl_rows(path, "--batch"):
        sample = to_sample(row, line, path)  # any row shape training reads; an unknown one is a one-line error
        messages = prompt_messages(sample["messages"])
        images, videos = sample["images"], sample.get("videos") or []
        placeholders = placeholder_count(messages)
        if not all(isinstance(image, str) for image in images) or not all(
                isinstance(v, (str, list)) for v in videos):
            raise UserError(f"{where}: images and videos are paths relative to the file")
        if not any(m.get("role") == "user" for m in messages) or placeholders != len(images) \
                or placeholder_count(messages, "video") != len(videos) or not images + videos:
            raise UserError(f"{where}: the prompt needs a user turn and one {{\"type\": \"image\"}} per image "
                            f"({placeholders} placeholders for {len(images)} images) and per video")
        for image in images:
            check_image(Path(image), where)
        for video in videos:
            check_video(video, where)
        questions.append({"images": images, "videos": videos, "messages": messages, "row": row})
    if not questions:
        raise UserError(f"--batch {path}: no rows")
    return questions


def video_frames(path: Path):
    """--video as the rows give it: a file, or a folder's image files in name order (one video of frames)."""
    if path.is_dir():
        from data.formats import FRAME_SUFFIXES

        frames = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not frames:
            raise UserError(f"--video {path}: the folder holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        return frames
    return str(path)


def check_video(video, where: str):
    from data.lint import video_problem

    problem = video_problem(video)
    if problem:
        raise UserError(f"{where}: {problem}")


def check_image(path: Path, where: str):
    from data.lint import image_problem

    problem = image_problem(path)
    if problem:
        raise UserError(f"{where}: {problem}")


def classify(target: str) -> tuple[str, Path | None]:
    """("gguf" | "run" | "hf", local path or None for a hub id / `tiny`)."""
    path = Path(target)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{target}: a file TARGET must be a .gguf model; otherwise give a model folder")
        return "gguf", path
    if path.is_dir():
        if any(not p.name.startswith("mmproj-") for p in path.glob("*.gguf")):
            return "gguf", path
        if (path / "run_config.json").exists():
            return "run", path
        if (path / "config.json").exists():
            return "hf", path
        raise UserError(f"{target} holds no model: no run_config.json, config.json or .gguf file")
    # "runs/demo" when runs/ exists is a missing run, not a hub id to spend a minute of retries on
    looks_local = path.suffix == ".gguf" or path.parent.is_dir() and path.parent != Path(".")
    if target == "tiny" or target.startswith("random:") or (HUB_ID.fullmatch(target) and not looks_local):
        return "hf", None
    raise UserError(f"{target}: no such file or folder")


def saved_recipe(folder: Path) -> dict | None:
    """The recipe of the run in `folder` (a run, or a merged/GGUF folder given its run_config.json), if any."""
    from kit.run_checks import read_run_config

    return read_run_config(folder)["recipe"] if (folder / "run_config.json").exists() else None


def answer_hf(kind, target, path, recipe, backend_name, questions, system, max_new_tokens, temperature, min_p,
              stream, batch_size, show_progress) -> list[str]:
    from kit import backend as backends

    backend, reason = backends.select(backend_name or (recipe["backend"] if recipe else "auto"))
    click.echo(f"backend {backend} ({reason})", err=True)
    from kit import model as models
    from kit.evaluate.generate import generate_answers, prepare_for_inference
    from kit.inputs import chat

    dtype = backends.torch_dtype(backends.precision())
    if kind == "run":
        model, processor, _ = models.load_run(path, backend, dtype)
    else:
        try:
            model, processor = models.load_base(models.resolve(target), backend, False, dtype,
                                                gradient_checkpointing=False)
        except OSError as error:
            raise UserError(f"{target}: not a local model folder, and loading it from the hub failed: "
                            f"{str(error).splitlines()[0]}") from None
    if recipe:
        chat.set_pixels(processor, recipe["min_pixels"], recipe["max_pixels"])
    from kit.inputs import video

    video.set_sampling(processor, (recipe or {}).get("fps"), (recipe or {}).get("max_frames"))
    prepare_for_inference(model, backend)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    samples = [{"id": str(i), "images": q["images"], "videos": q.get("videos") or [], "messages": q["messages"]}
               for i, q in enumerate(questions)]
    answers, _ = generate_answers(model, processor, samples, system, max_new_tokens, batch_size, temperature, min_p,
                                  streamer, show_progress.update if show_progress else None)
    return answers


def answer_gguf(path, mmproj, recipe, questions, system, max_new_tokens, temperature, min_p, stream,
                show_progress) -> list[str]:
    """One question at a time through llama.cpp (kit/export/llama.py: the driver eval.py scores GGUF pairs with)."""
    from kit.export import llama

    llm = llama.open_pair(*llama.find_pair(path, mmproj), recipe)
    on_piece = (lambda piece: click.echo(piece, nl=False)) if stream else None
    answers, _ = llama.answers(llm, questions, system, max_new_tokens, temperature, min_p, on_piece,
                               show_progress.update if show_progress else None)
    if stream:
        click.echo()
    return answers


main.help = help_with_examples(main.help, __doc__)  # --help shows the examples above

if __name__ == "__main__":
    main()
