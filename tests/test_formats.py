"""Data as people already have it: files written exactly in each tool's documented shape (LLaMA-Factory's
sharegpt and alpaca multimodal files and dataset_info.json, LLaVA's conversations, TRL's chat rows, ours) are
linted, trained on and evaluated through the real scripts; every refusal is one line naming file:line."""

import json
import shutil

import pytest
from click.testing import CliRunner

from data.lint import lint
from data.synthetic import generate
from tests.conftest import train_cli


@pytest.fixture()
def charts(tmp_path):
    """(image file relative to tmp_path, question, answer) for four small synthetic charts."""
    drawn = generate("train", 4, seed=5, question_types=["count"], cache=tmp_path / "cache", progress=False,
                     layout="aligned", size=140, grid=28, chart_types=["bar"])
    (tmp_path / "img").mkdir()
    found = []
    for index, sample in enumerate(drawn):
        name = f"img/{index}.png"
        shutil.copy(sample["images"][0], tmp_path / name)
        found.append((name, sample["messages"][0]["content"][1]["text"], sample["answers"][0]))
    return found


# Each writer makes rows in one tool's own documented shape, from (image, question, answer).
def llamafactory_sharegpt(image, question, answer):  # LLaMA-Factory data/mllm_demo.json
    return {"messages": [{"role": "user", "content": f"<image>{question}"},
                         {"role": "assistant", "content": answer}], "images": [image]}


def llamafactory_alpaca(image, question, answer):  # LLaMA-Factory data/README.md, "Multimodal Dataset"
    return {"instruction": f"<image>{question}", "input": "", "output": answer, "images": [image]}


def llava(image, question, answer):  # LLaVA's llava_instruct_*.json
    return {"id": image.split("/")[-1].split(".")[0], "image": image,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def trl_chat(image, question, answer):  # TRL's vision SFT rows (HuggingFaceH4/llava-instruct-mix-vsft's shape)
    return {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "images": [image]}


def ours(image, question, answer):
    return {"image": image, "question": question, "answer": answer}


WRITERS = {"llamafactory-sharegpt": llamafactory_sharegpt, "llamafactory-alpaca": llamafactory_alpaca,
           "llava": llava, "trl-chat": trl_chat, "ours": ours}


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return path


def write_jsonl(path, rows, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def train_on(spec, out, *extra):
    args = ["--recipe", "demo", "--output", str(out), "--set", f"dataset={spec}", "--set", "max_steps=2",
            "--set", "logging_steps=1", "--set", "per_device_train_batch_size=2", *extra]
    return train_cli(args)


def lint_cli(spec):
    from data.lint import main

    return CliRunner().invoke(main, [spec, "--recipe", "demo"])


def eval_cli(run, spec, out):
    import eval as evaluate

    return CliRunner().invoke(evaluate.main, [str(run), "--data", spec, "--compare", "finetuned", "--out", str(out)],
                              catch_exceptions=False)


@pytest.mark.parametrize("tool", WRITERS)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_each_format_reads_to_the_same_samples(tmp_path, charts, tool, suffix):
    rows = [WRITERS[tool](*chart) for chart in charts]
    path = tmp_path / f"data{suffix}"
    (write_json if suffix == ".json" else write_jsonl)(path, rows)
    import data

    samples = data.load({"dataset": f"jsonl:{path}", "dataset_split": "train", "limit": 0}, progress=False)
    assert lint(samples) == []
    for sample, (image, question, answer) in zip(samples, charts):
        user, assistant = sample["messages"]
        assert sample["images"] == [str(tmp_path / image)]
        assert user["content"] == [{"type": "image"}, {"type": "text", "text": question}]
        assert assistant["content"][0]["text"] == answer and sample["answers"] == [answer]
    assert len({s["source"] for s in samples}) == len(rows)  # every row has its own file:line


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["llamafactory-sharegpt", "llamafactory-alpaca", "llava", "trl-chat"])
def test_each_format_lints_trains_and_evaluates(tmp_path, charts, tool):
    rows = [WRITERS[tool](*chart) for chart in charts]
    train_file = write_json(tmp_path / "train.json", rows)
    test_file = write_jsonl(tmp_path / "test.jsonl", rows[:2])
    linted = lint_cli(f"jsonl:{train_file}")
    assert linted.exit_code == 0 and "4 rows checked, 0 problem(s)" in linted.output, linted.output
    result = train_on(f"jsonl:{train_file}", tmp_path / "run")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
    scored = eval_cli(tmp_path / "run", f"jsonl:{test_file}", tmp_path / "eval")
    assert scored.exit_code == 0, scored.output
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in predictions] == [[answer] for _, _, answer in charts[:2]]
    assert [p["question"] for p in predictions] == [question for _, question, _ in charts[:2]]
    import infer  # infer.py --batch reads the same shapes and keeps each row as written

    answered = CliRunner().invoke(infer.main, [str(tmp_path / "run"), "--batch", str(test_file), "--max-new-tokens",
                                               "4"], catch_exceptions=False)
    assert answered.exit_code == 0, answered.output
    written = [json.loads(x) for x in (tmp_path / "test.answers.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "prediction"} for row in written] == rows[:2]
    assert all(isinstance(row["prediction"], str) for row in written)


@pytest.mark.slow
def test_jsonl_with_byte_order_mark_trains(tmp_path, charts):
    path = write_jsonl(tmp_path / "bom.jsonl", [ours(*chart) for chart in charts], bom=True)
    result = train_on(f"jsonl:{path}", tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_object_of_rows_keeps_keys_as_ids(tmp_path, charts):
    import data

    rows = {f"chart-{i}": llava(*chart) for i, chart in enumerate(charts)}
    del rows["chart-3"]["id"]
    path = write_json(tmp_path / "rows.json", rows)
    samples = data.load({"dataset": f"jsonl:{path}", "dataset_split": "train", "limit": 0})
    assert [s["id"] for s in samples] == ["0", "1", "2", "chart-3"]  # LLaVA's own "id" first, else the key
    lines = path.read_text().splitlines()
    starts = [lines.index("  " + json.dumps(key) + ": {") + 1 for key in rows]
    assert [s["source"] for s in samples] == [f"{path}:{line}" for line in starts]
    assert lint(samples) == []


def llamafactory_folder(tmp_path, charts, entry, rows, file_name="mllm_demo.json"):
    folder = tmp_path / "lf"
    (folder / "mllm_demo_data").mkdir(parents=True)
    for image, _, _ in charts:
        shutil.copy(tmp_path / image, folder / "mllm_demo_data" / image.split("/")[-1])
    write_json(folder / file_name, rows)
    write_json(folder / "dataset_info.json", {"other": {"file_name": "x.json"}, "mllm_demo": entry})
    return folder


def demo_rows(charts, **tags):
    """LLaMA-Factory's mllm_demo.json, with the role/content keys and role names of `tags`."""
    role, content = tags.get("role_tag", "role"), tags.get("content_tag", "content")
    user, assistant = tags.get("user_tag", "user"), tags.get("assistant_tag", "assistant")
    return [{"messages": [{role: user, content: f"<image>{question}"}, {role: assistant, content: answer}],
             "images": [f"mllm_demo_data/{image.split('/')[-1]}"]} for image, question, answer in charts]


def test_llamafactory_folder_by_dataset_info(tmp_path, charts):
    # dataset_info.json's own mllm_demo entry: sharegpt, columns messages + images, OpenAI-style tags
    entry = {"file_name": "mllm_demo.json", "formatting": "sharegpt",
             "columns": {"messages": "messages", "images": "images"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}
    folder = llamafactory_folder(tmp_path, charts, entry, demo_rows(charts))
    linted = lint_cli(f"llamafactory:{folder}#mllm_demo")
    assert linted.exit_code == 0 and "4 rows checked, 0 problem(s)" in linted.output, linted.output
    result = train_on(f"llamafactory:{folder / 'dataset_info.json'}#mllm_demo", tmp_path / "run",
                      "--set", "eval_fraction=0.5")
    assert result.exit_code == 0, result.output
    scored = CliRunner().invoke(__import__("eval").main, [str(tmp_path / "run"), "--compare", "finetuned"],
                                catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    assert len((tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()) == 2


def test_llamafactory_tags_and_columns_are_followed(tmp_path, charts):
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "person", "assistant_tag": "bot"}
    rows = [dict(r, chat=r.pop("messages"), pics=r.pop("images")) for r in demo_rows(charts, **tags)]
    entry = {"file_name": "chats.jsonl", "formatting": "sharegpt", "columns": {"messages": "chat", "images": "pics"},
             "tags": tags}
    folder = llamafactory_folder(tmp_path, charts, entry, [], file_name="unused.json")
    write_jsonl(folder / "chats.jsonl", rows)
    import data

    samples = data.load({"dataset": f"llamafactory:{folder}#mllm_demo", "dataset_split": "train", "limit": 0})
    assert lint(samples) == []
    assert [s["messages"][1]["content"][0]["text"] for s in samples] == [a for _, _, a in charts]


@pytest.mark.parametrize("spec, words", [
    ("#nope", "no data set 'nope' (data sets: mllm_demo, other)"),
    ("", "name the data set after '#'"),
    ("#other", "file_name 'x.json' not found"),
])
def test_llamafactory_mistakes_are_one_line(tmp_path, charts, spec, words):
    folder = llamafactory_folder(tmp_path, charts, {"file_name": "mllm_demo.json", "formatting": "sharegpt"},
                                 demo_rows(charts))
    result = train_on(f"llamafactory:{folder}{spec}", tmp_path / "run")
    assert result.exit_code == 2
    line = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and words in line[0] and str(folder / "dataset_info.json") in line[0], result.output


def test_placeholder_mismatch_is_a_finding_with_file_and_line(tmp_path, charts):
    rows = [llamafactory_sharegpt(*chart) for chart in charts]
    rows[2]["messages"][0]["content"] = "<image><image>" + charts[2][1]  # two slots, one image
    rows[3]["messages"][0]["content"] = charts[3][1]  # no slot, one image
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    result = lint_cli(f"jsonl:{path}")
    assert result.exit_code == 1
    assert f"{path}:3: 2 image placeholder(s) in the messages but 1 image(s)" in result.output
    assert f"{path}:4: 0 image placeholder(s) in the messages but 1 image(s)" in result.output
    trained = train_on(f"jsonl:{path}", tmp_path / "run")
    assert trained.exit_code == 2 and f"{path}:3" in trained.output and not (tmp_path / "run").exists()


def test_image_tag_inside_our_parts_stays_refused(tmp_path, charts):
    row = trl_chat(*charts[0])
    row["messages"][0]["content"][1]["text"] = "<image>" + charts[0][1]
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    result = lint_cli(f"jsonl:{path}")
    assert result.exit_code == 1 and f"{path}:1: user text holds a LLaVA-style \"<image>\"" in result.output


@pytest.mark.parametrize("name, body, words", [
    ("empty.jsonl", b"", "is empty"),
    ("blank.jsonl", b"\n  \n\n", "holds only blank lines"),
    ("empty.json", b"[]", "holds an empty JSON array"),
    ("bom-only.jsonl", b"\xef\xbb\xbf\n", "holds only blank lines"),
])
def test_empty_file_is_one_line(tmp_path, name, body, words):
    path = tmp_path / name
    path.write_bytes(body)
    result = train_on(f"jsonl:{path}", tmp_path / "run")
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and words in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_broken_json_array_names_its_line(tmp_path, charts):
    path = tmp_path / "data.json"
    lines = json.dumps([ours(*chart) for chart in charts], indent=2).splitlines()
    second = [i for i, line in enumerate(lines) if '"answer"' in line][1]
    lines[second] = '    "answer": '  # the value is missing: the parser stops at the next line's "}"
    path.write_text("\n".join(lines))
    result = lint_cli(f"jsonl:{path}")
    assert result.exit_code == 2
    assert f"error: {path}:{second + 2}: not valid JSON" in result.output, result.output


def conversation_rows(charts):
    """LLaMA-Factory sharegpt rows of two turns and two charts each: one <image> in each user turn."""
    rows = []
    for (first, question, answer), (second, _, other) in zip(charts, charts[1:] + charts[:1]):
        rows.append({"messages": [
            {"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "And this one? <image>"}, {"role": "assistant", "content": other}],
            "images": [first, second]})
    return rows


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    from kit.inputs.chat import set_pixels
    from kit.model import tiny_model_dir

    processor = AutoProcessor.from_pretrained(tiny_model_dir())
    set_pixels(processor, 3136, 19600)
    return processor


def test_every_turn_and_image_of_a_conversation_reaches_the_batch(tmp_path, charts, processor):
    import data
    from kit.inputs.chat import IGNORE, VisionCollator
    from kit.plan import estimate

    path = write_json(tmp_path / "chats.json", conversation_rows(charts))
    samples = data.load({"dataset": f"jsonl:{path}", "dataset_split": "train", "limit": 0})
    assert lint(samples) == []
    assert [s["answers"] for s in samples] == [[other] for _, _, other in charts[1:] + charts[:1]]  # the last turn
    batch = VisionCollator(processor, max_length=512)(samples)
    tokenizer = processor.tokenizer
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    findings, counts = estimate.preflight(samples, processor, {"system_prompt": "", "max_length": 512})
    assert findings == []
    for row, (sample, (image_tokens, text_tokens)) in enumerate(zip(samples, counts)):
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        assert int((ids == pad).sum()) == image_tokens == 2 * (140 // 28) ** 2  # both charts, 25 tokens each
        assert len(ids) == image_tokens + text_tokens  # the plan counts what the collator makes
        kept = batch["labels"][row][batch["labels"][row] != IGNORE]
        answers = [m["content"][0]["text"] for m in sample["messages"] if m["role"] == "assistant"]
        assert tokenizer.decode(kept) == "".join(a + "<|im_end|>" for a in answers)  # every assistant turn
    assert int(batch["image_grid_thw"].shape[0]) == 2 * len(samples)  # images in row order, none dropped


@pytest.mark.slow
def test_conversations_train_lint_and_evaluate_on_their_last_turn(tmp_path, charts):
    rows = conversation_rows(charts)
    train_file = write_json(tmp_path / "chats.json", rows)
    test_file = write_jsonl(tmp_path / "test.jsonl", rows[:2])
    assert lint_cli(f"jsonl:{train_file}").exit_code == 0
    result = train_on(f"jsonl:{train_file}", tmp_path / "run", "--set", "max_length=512")
    assert result.exit_code == 0, result.output
    scored = eval_cli(tmp_path / "run", f"jsonl:{test_file}", tmp_path / "eval")
    assert scored.exit_code == 0, scored.output
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in predictions] == [[charts[1][2]], [charts[2][2]]]
    assert [p["question"] for p in predictions] == ["And this one?", "And this one?"]


@pytest.mark.slow
def test_hf_messages_and_images_columns_are_read_lazily_and_train(tmp_path, charts):
    import datasets
    from PIL import Image

    import data
    from data.hf import LazySamples

    def rows(picked):
        return {"messages": [trl_chat(*chart)["messages"] for chart in picked],
                "images": [[Image.open(tmp_path / chart[0]).convert("RGB")] for chart in picked]}

    folder = tmp_path / "trl"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows(charts)),
                          "test": datasets.Dataset.from_dict(rows(charts[:2]))}).save_to_disk(str(folder))
    samples = data.load({"dataset": f"hf:{folder}", "dataset_split": "train", "limit": 0,
                         "dataset_columns": []}, progress=False)
    assert isinstance(samples, LazySamples) and len(samples) == 4
    first = samples[0]
    assert isinstance(first["images"][0], dict) and first["images"][0]["bytes"]  # still encoded: decoded per batch
    assert first["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": charts[0][1]}]
    assert first["answers"] == [charts[0][2]]
    assert samples.without_images()[0]["images"] == [None]  # the text pass knows there is one image
    assert lint(samples) == []
    assert lint_cli(f"hf:{folder}").exit_code == 0
    result = train_on(f"hf:{folder}", tmp_path / "run")
    assert result.exit_code == 0, result.output
    scored = CliRunner().invoke(__import__("eval").main, [str(tmp_path / "run"), "--data", f"hf:{folder}", "--split",
                                                          "test", "--compare", "finetuned", "--out",
                                                          str(tmp_path / "eval")], catch_exceptions=False)
    assert scored.exit_code == 0, scored.output
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["references"] for p in predictions] == [[charts[0][2]], [charts[1][2]]]


def test_folders_of_no_rows_are_one_line(tmp_path, charts):
    import datasets

    empty = tmp_path / "empty-hf"
    datasets.Dataset.from_dict({"messages": [], "images": []}).save_to_disk(str(empty))
    folder = llamafactory_folder(tmp_path, charts, {"file_name": "parts", "formatting": "sharegpt"}, [])
    (folder / "parts").mkdir()
    (folder / "parts" / "a.jsonl").write_text("")
    (folder / "parts" / "b.json").write_text("[]")
    for spec, words in ((f"hf:{empty}", "holds a data set of no rows"),
                        (f"llamafactory:{folder}#mllm_demo", "names 'parts', which holds no rows")):
        result = train_on(spec, tmp_path / "run")
        errors = [x for x in result.output.splitlines() if x.startswith("error: ")]
        assert result.exit_code == 2 and len(errors) == 1 and words in errors[0], result.output


def test_a_row_of_no_known_shape_is_a_finding_with_its_line(tmp_path, charts):
    path = write_jsonl(tmp_path / "data.jsonl", [ours(*charts[0]), {"picture": "img/0.png", "text": "hi"}])
    result = lint_cli(f"jsonl:{path}")
    assert result.exit_code == 1
    assert f'{path}:2: no row shape known by its keys ("picture", "text")' in result.output, result.output
