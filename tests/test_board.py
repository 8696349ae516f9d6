"""The board in a real browser (headless Chromium from the OS packages, driven by Selenium through chromedriver):
the demo recipe through every tab, as a user clicks it. Needs `apt-get install chromium chromium-driver`
(`make browser` does it as root); elsewhere it skips with one line.

Set QWEN2VL_KIT_SCREENSHOTS=docs to refresh the README's screenshots (docs/board-*.png)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_jsonl

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium/chromedriver: run "
                                "`make browser` (apt-get install chromium chromium-driver) to run tests/test_board.py")
# Short: a step of the tiny model takes ~40 ms on two idle cores; Stop is clicked at the first progress line.
SETTINGS = {"max_steps": "40", "synthetic_num_train": "240", "synthetic_num_test": "40", "logging_steps": "5",
            "save_steps": "1000", "warmup_steps": "5"}
QUESTION = "How many bars are in the chart?"


@pytest.fixture
def board(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "board.log").open("w")
    process = subprocess.Popen([sys.executable, str(ROOT / "board.py"), "--runs", str(tmp_path / "runs"),
                                "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert process.poll() is None, (tmp_path / "board.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "the board did not start in 120 s"
            time.sleep(0.5)
    yield url, tmp_path / "runs"
    process.terminate()
    process.wait(timeout=30)
    for pid_dir in Path("/proc").glob("[0-9]*"):  # a training run this test started and did not finish
        try:
            if str(tmp_path) in (pid_dir / "cmdline").read_text():
                os.kill(int(pid_dir.name), 9)
        except OSError:
            pass


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # the OS driver: nothing downloaded
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


class Page:
    def __init__(self, driver, shots: Path):
        self.driver, self.shots = driver, shots

    def css(self, selector, many=False):
        from selenium.webdriver.common.by import By

        return (self.driver.find_elements if many else self.driver.find_element)(By.CSS_SELECTOR, selector)

    def wait(self, condition, what: str, timeout: float = 300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if condition():
                    return
            except Exception:  # an element being redrawn; look again
                pass
            time.sleep(0.5)
        self.driver.save_screenshot(str(self.shots / "failed.png"))
        raise AssertionError(f"timed out waiting for: {what}")

    def text(self, elem_id) -> str:
        box = self.css(f"#{elem_id} textarea, #{elem_id} input")
        return box.get_attribute("value") or ""

    def type(self, elem_id, value):
        from selenium.webdriver.common.keys import Keys

        box = self.css(f"#{elem_id} textarea, #{elem_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE, str(value))
        box.send_keys(Keys.TAB)  # gradio takes the value on change/blur

    def button(self, label):
        buttons = [b for b in self.css("button:not([role=tab])", many=True)
                   if b.text.strip() == label and b.is_displayed()]
        assert buttons, f"no button {label!r}"
        buttons[0].click()

    def tab(self, label):
        [tab] = [b for b in self.css("button[role=tab]", many=True) if b.text.strip() == label]
        tab.click()
        time.sleep(1)

    def choose(self, elem_id, option):
        """Pick `option` in a gradio dropdown: open it, click the entry."""
        self.css(f"#{elem_id} input").click()
        def entries():  # the chosen entry's text starts with a check mark line
            return [o for o in self.css("[role=option]", many=True) if o.text.splitlines()[-1].strip() == option]

        self.wait(entries, f"{option} in {elem_id}", timeout=20)
        [entry] = entries()
        entry.click()
        time.sleep(0.5)

    def shot(self, name, top_id=None):
        """A screenshot with element `top_id` (else the page's top) at the top of the window."""
        if top_id:
            self.driver.execute_script("arguments[0].scrollIntoView(true)", self.css(f"#{top_id}"))
        else:
            self.driver.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.5)
        path = self.shots / f"board-{name}.png"
        self.driver.save_screenshot(str(path))
        if os.environ.get("QWEN2VL_KIT_SCREENSHOTS"):
            from PIL import Image

            bottom = self.driver.execute_script("const f = document.querySelector('footer'); "
                                                "return f ? f.getBoundingClientRect().top : window.innerHeight")
            target = ROOT / os.environ["QWEN2VL_KIT_SCREENSHOTS"] / path.name
            target.parent.mkdir(exist_ok=True)
            image = Image.open(path).convert("RGB")
            image = image.crop((0, 0, image.width, min(image.height, int(bottom) + 8)))  # down to gradio's footer
            image.quantize(64).save(target, optimize=True)  # a small PNG for the README


@pytest.mark.slow
@needs_chromium
def test_the_demo_through_every_tab(board, browser, tmp_path):
    from kit.board import runs as board_runs

    url, runs = board
    page = Page(browser, tmp_path)
    browser.get(url)
    page.wait(lambda: page.css("#field-max_steps"), "the Train tab's form", timeout=60)

    # --- Train: a config file fills the form; a wrong value is named next to its field, not run ---------------
    page.css("#config-upload input[type=file]").send_keys(str(ROOT / "configs/examples/demo.yaml"))
    page.wait(lambda: page.text("field-max_steps") == "300", "the example config in the form", 60)
    assert page.text("field-synthetic_num_train") == "1000" and page.text("run-name") == "demo"
    page.type("run-name", "board-demo")
    page.type("field-max_steps", "forty")
    page.button("Plan")
    page.wait(lambda: "whole number" in page.css("#field-max_steps").text, "the error next to max_steps", 30)
    assert not (runs / "board-demo").exists()
    for key, value in SETTINGS.items():
        page.type(f"field-{key}", value)
    page.button("Plan")
    plan_file = runs / "board-demo" / "plan.json"
    page.wait(lambda: plan_file.exists() and page.text("plan") == board_runs.plan_text(json.loads(
        plan_file.read_text())), "the plan, from plan.json", 180)
    assert json.loads(plan_file.read_text())["rows"] == 240 and "whole number" not in \
        page.css("#field-max_steps").text

    page.button("Save config")
    page.wait(lambda: "python train.py --config" in page.css("#train-status").text, "the saved config's command")
    saved = (runs / "board-demo.yaml").read_text()
    assert "recipe: demo" in saved and "max_steps: 40" in saved

    # --- Start: progress lines and the loss curve appear; Stop checkpoints; Resume finishes -----------------
    page.button("Start")
    metrics = runs / "board-demo" / "metrics.jsonl"
    page.wait(lambda: metrics.exists() and metrics.read_text().strip(), "the first progress line", 900)
    page.button("Stop")  # as soon as training runs, so that it stops before the end even on a fast machine
    page.wait(lambda: "stopped (checkpoint)" in page.css("#runs").text, "the run to stop with a checkpoint", 120)
    train_log = runs / "board-demo" / "train.log"
    page.wait(lambda: page.text("train-log") == board_runs.tail(train_log, 14), "train.log's tail on the page", 30)
    [checkpoint] = (runs / "board-demo" / "checkpoints").glob("checkpoint-*/complete.json")
    assert json.loads(checkpoint.read_text())["global_step"] < 40
    page.wait(lambda: page.css("#loss-plot img").get_attribute("src"), "the loss plot", 30)

    page.button("Resume")
    page.wait(lambda: "running" in page.css("#runs").text, "the resumed run", 60)
    browser.get("about:blank")  # the page closes; the run goes on
    time.sleep(3)
    browser.get(url)
    page.wait(lambda: page.css("#watched input").get_attribute("value") == "board-demo", "the run shown again", 60)
    page.wait(lambda: "done" in page.css("#runs").text, "the resumed run to finish", 1200)
    log = train_log.read_text()  # the board's log: each command it ran, then that command's output
    assert log.startswith("$ python train.py --recipe demo") and "\n$ python train.py --resume" in log
    assert (runs / "board-demo" / "model.safetensors").exists()
    steps = [row["step"] for row in read_jsonl(runs / "board-demo" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 40
    page.wait(lambda: f"-loss-{len(steps)}.png" in page.css("#loss-plot img").get_attribute("src"),
              "the loss plot redrawn to the last step", 30)
    page.shot("train", "train-buttons")
    page.choose("watched", "board-demo")  # picked by hand: its run_config.json replays into the form
    page.wait(lambda: page.text("field-max_steps") == "40", "the run's settings in the form", 30)
    assert page.text("run-name") == "board-demo-2" and page.text("field-synthetic_num_train") == "240"

    # --- Evaluate ---------------------------------------------------------------------------------------------
    page.tab("Evaluate")
    page.type("eval-limit", 20)
    page.button("Evaluate")
    page.wait(lambda: "relaxed acc" in page.css("#eval-report").text, "the evaluation report", 900)
    report = (runs / "board-demo" / "eval" / "report.md").read_text()
    assert "finetuned" in page.css("#eval-report").text and "| finetuned |" in report
    assert "20" in page.css("#eval-report").text
    first = read_jsonl(runs / "board-demo" / "eval" / "predictions.jsonl")[0]
    answers = page.css("#eval-answers").text
    assert first["question"] in answers and first["systems"]["finetuned"]["answer"] in answers
    page.shot("evaluate")

    # --- Export: GGUF, its parity with the merged model, llama.cpp's commands ----------------------------------
    page.tab("Export")
    page.button("Export")
    page.wait(lambda: "llama-mtmd-cli" in page.css("#export-commands").text, "llama.cpp's commands", 1200)
    export = json.loads((runs / "board-demo" / "export.json").read_text())
    parity = page.css("#export-parity").text
    assert f"identical greedy answers {export['parity']['identical_answers']}/4" in parity
    assert "llama.cpp board-demo-f16.gguf, image prompt: same" in parity
    gguf = runs / "board-demo-gguf"
    verification = json.loads((gguf / "gguf_report.json").read_text())["verification"]["f16"]
    assert verification == export["gguf"]["verification"]["f16"]
    assert verification["image"]["agree"] and verification["image"]["prompt_identical"]  # what the page said
    page.shot("export")

    # --- Chat: the GGUF pair answers a chart question, streamed; the same answer as infer.py gives ------------
    chart = read_jsonl(runs / "board-demo" / "eval" / "predictions.jsonl")[0]["image"]
    page.tab("Chat")
    page.choose("chat-target", str(gguf))
    page.css("#chat-image input[type=file]").send_keys(chart)
    page.wait(lambda: page.css("#chat-image img"), "the uploaded chart", 30)
    page.type("chat-question", QUESTION)
    page.button("Ask")
    page.wait(lambda: page.text("chat-answer").strip(), "the answer's first characters", 600)
    page.wait(lambda: "(finished)" in page.css("#chat-command").text, "the end of the answer", 600)
    expected = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(gguf), "--image", chart,
                               "--question", QUESTION], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert expected.returncode == 0, expected.stderr
    assert page.text("chat-answer").strip() == expected.stdout.strip()
    page.shot("chat")


# --- the run-folder helpers the board uses; no browser needed ------------------------------------------------
def test_a_run_is_found_by_its_folder_and_stopped_with_sigterm(tmp_path):
    from kit.board import runs as board_runs

    fake = tmp_path / "train.py"  # stands in for train.py: waits for SIGTERM, as a run between steps does
    fake.write_text("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
                    "print('step 1', flush=True)\ntime.sleep(120)\n")
    run = tmp_path / "runs" / "r1"
    pid = board_runs.start_training([sys.executable, "-u", str(fake), "--output", str(run)], run)
    waiting = tmp_path / "runs" / ".r1.train.log"
    deadline = time.time() + 30
    while "step 1" not in waiting.read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    assert board_runs.training_pid(run) == pid and board_runs.state(run) == "running"
    assert [row["run"] for row in board_runs.runs(tmp_path / "runs")] == ["r1"]

    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"recipe": {"max_steps": 9}}))
    assert board_runs.log_path(run) == run / "train.log" and not waiting.exists()  # moved in, still written to
    assert board_runs.stop_training(run)
    deadline = time.time() + 30
    while board_runs.training_pid(run):
        assert time.time() < deadline
        time.sleep(0.1)
    assert board_runs.state(run) == "failed"  # stopped before any checkpoint
    (run / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-4" / board_runs.CHECKPOINT_MARKER).write_text("{}")
    assert board_runs.state(run) == "stopped (checkpoint)"
    (run / "model.safetensors").write_text("")
    assert board_runs.state(run) == "done"
    assert board_runs.tail(run / "train.log").splitlines()[0].startswith("$ python train.py --output")


def test_the_checkpoint_marker_is_the_one_train_py_writes():
    from kit.board import runs as board_runs
    from kit.train import checkpoints

    assert board_runs.CHECKPOINT_MARKER == checkpoints.MARKER


# Every line the scripts print through click changes its wording (case swapped, a prefix): the board must not care.
REWORDED = """import click
_echo = click.echo
def echo(message=None, *args, **kwargs):
    return _echo("~ " + message.swapcase() if isinstance(message, str) else message, *args, **kwargs)
click.echo = echo
"""


@pytest.mark.slow
def test_the_board_reads_files_not_printed_words(full_run, tmp_path, monkeypatch):
    from kit.board import actions
    from kit.board import runs as board_runs
    from kit.board.form import start_recipe
    from recipes.base import BASE

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(REWORDED)  # imported at start-up by every script the board runs
    monkeypatch.setenv("PYTHONPATH", str(site))
    root = tmp_path / "runs"
    shutil.copytree(full_run, root / "run")

    # Plan: the form's values through train.py --plan, shown from plan.json
    form = {**start_recipe("demo"), "synthetic_num_train": 16}
    *_, status, shown = actions.plan_run(root, "demo", "planned", str(root / "planned.yaml"), *[form[k] for k in BASE])
    assert status.endswith("exit 0"), status
    plan = json.loads((root / "planned" / "plan.json").read_text())
    assert plan["rows"] == 16 and shown["value"] == board_runs.plan_text(plan)
    assert f"{plan['rows']} rows, {plan['steps_per_epoch']} steps per epoch" in shown["value"]

    # Export: merge.py's printed lines are reworded; what the board shows comes from export.json
    log, proven, commands = list(actions.export_run(root, "run", ["merged", "gguf"], ["f16"], False))[-1]
    assert "~ PARITY PROMPTS" in log and "parity prompts" not in log  # the rewording reached merge.py
    export = json.loads((root / "run" / "export.json").read_text())
    assert (proven, commands) == board_runs.export_view(export)
    parity = export["parity"]
    assert f"identical greedy answers {parity['identical_answers']}/{parity['num_samples']}" in proven
    image = export["gguf"]["verification"]["f16"]["image"]
    assert f"llama.cpp run-f16.gguf, image prompt: same {image['prompt_tokens']} prompt tokens" in proven
    assert commands.splitlines()[0].startswith(f"llama-mtmd-cli -m {root / 'run-gguf' / 'run-f16.gguf'}")
    assert (root / "run-gguf" / "run-f16.gguf").is_file()


def test_a_folder_holding_only_a_plan_is_no_run_yet(tmp_path):
    """Plan writes plan.json into the run folder; Start must still find it free (its log waits beside it)."""
    from kit.board import runs as board_runs

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "plan.json").write_text("{}")
    assert not board_runs.holds_run(run) and board_runs.log_path(run) == tmp_path / "runs" / ".r1.train.log"
    (run / "run_config.json").write_text("{}")
    assert board_runs.holds_run(run) and board_runs.log_path(run) == run / "train.log"


def test_export_tab_shows_the_run_as_trained_against_what_was_exported():
    """A 4-bit run's export: export.json's as-trained comparison, and eval.py's scores of the merged model and the
    GGUF files against the run as trained (report.json of eval.py --compare finetuned,merged,gguf)."""
    from kit.board import runs as board_runs

    comparison = {"num_samples": 4, "identical_answers": 4, "max_abs_logit_diff": 1e-6, "prompts": "4 charts"}
    export = {"finetune": "lora", "outputs": {"merged": "runs/q-merged"}, "llama_cpp_commands": {},
              "parity": comparison,
              "as_trained": {**comparison, "identical_answers": 14, "num_samples": 16, "max_abs_logit_diff": 0.25,
                             "prompts": "the first 16 usable synthetic test charts"}}
    systems = {name: {"relaxed": {"accuracy": accuracy}} for name, accuracy in
               (("finetuned", 0.5), ("merged", 0.45), ("gguf:q4_k_m", 0.4))}
    pairs = [{"baseline": "finetuned", "candidate": name, "fixed": 1, "broken": broken, "mcnemar_p": 0.5}
             for name, broken in (("merged", 2), ("gguf:q4_k_m", 3))]
    proven, _ = board_runs.export_view(export, {"samples": 20, "systems": systems, "pairs": pairs})
    assert ("as trained (4-bit base + adapter) vs the merged 16-bit model on the first 16 usable synthetic test "
            "charts: identical greedy answers 14/16; max |logit difference| 2.50e-01") in proven
    assert "eval.py on 20 questions: as trained (finetuned) 50.0 %" in proven
    assert "merged 45.0 %: fixed 1, broken 2 against as trained" in proven
    assert "gguf:q4_k_m 40.0 %: fixed 1, broken 3 against as trained" in proven
    plain, _ = board_runs.export_view({**export, "as_trained": None}, {"samples": 20, "systems": systems, "pairs": []})
    assert "as trained (4-bit" not in plain
    assert board_runs.export_view(export, {"systems": {"finetuned": systems["finetuned"]}, "pairs": []}) == \
        board_runs.export_view(export)  # an evaluation without exported systems adds nothing
