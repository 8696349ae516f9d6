"""Every llama.cpp command the kit prints (merge.py's llama-mtmd-cli and llama-server lines, which the board
shows from export.json; and any in README.md or docs/) runs as printed in the program it names: each flag is
checked against that program's own argument table in the pinned llama.cpp source (common/arg.cpp of the
llama-cpp-python source distribution the converter comes from). Qwen3.5's llama-mtmd-cli line keeps thinking off
by a template given whole, since that program takes no --reasoning nor --chat-template-kwargs."""

import re
import shlex
from pathlib import Path

import pytest

from kit import families
from tests.conftest import ROOT

PROGRAMS = {"llama-mtmd-cli": "LLAMA_EXAMPLE_MTMD", "llama-server": "LLAMA_EXAMPLE_SERVER",
            "llama-cli": "LLAMA_EXAMPLE_CLI", "llama-completion": "LLAMA_EXAMPLE_COMPLETION"}


def _expression(text: str, start: int) -> str:
    """The text of the call opening at `start` (its parentheses balanced, string literals skipped)."""
    depth, index, quoted = 0, start, False
    while index < len(text):
        char = text[index]
        if quoted:
            if char == "\\":
                index += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return text[start:index + 1]
        index += 1
    raise ValueError("unbalanced call in arg.cpp")


def argument_table(arg_cpp: Path) -> dict[str, dict[str, bool]]:
    """{program: {flag: takes a value}} from every add_opt(common_arg(...)) of arg.cpp, as llama.cpp filters
    them per program (common_params_parser_init: its own examples, or COMMON, less its excludes)."""
    text = re.sub(r"^\s*//.*$", "", arg_cpp.read_text(), flags=re.MULTILINE)  # whole-line comments
    # named lists of programs (static ... mmproj_examples = {...}) that options take by name
    named = {m.group(1): m.group(2) for m in re.finditer(r"(\w+_examples)\s*=\s*\{([^}]*)\}", text)}
    options = []
    for match in re.finditer(r"add_opt\(common_arg\(", text):
        call = _expression(text, match.start() + len("add_opt"))
        lists = re.match(r'\(common_arg\(\s*\{([^}]*)\}\s*,\s*(?:\{([^}]*)\}\s*,)?', call)
        flags = re.findall(r'"([^"]+)"', lists.group(1)) + re.findall(r'"([^"]+)"', lists.group(2) or "")
        handler = re.search(r"\[\]\s*\(([^)]*)\)", call)
        # (params) is a switch, (params, bool value) one with a --no- form; any other (params, value) takes one
        takes_value = handler is not None and "," in handler.group(1) and "bool" not in handler.group(1)
        examples = re.search(r"\.set_examples\((?:\{([^}]*)\}|(\w+))\)", call)
        excludes = re.search(r"\.set_excludes\(\{([^}]*)\}\)", call)
        listed = (examples.group(1) or named[examples.group(2)]) if examples else "LLAMA_EXAMPLE_COMMON"
        options.append((flags, takes_value, set(re.findall(r"LLAMA_EXAMPLE_\w+", listed)),
                        set(re.findall(r"LLAMA_EXAMPLE_\w+", excludes.group(1))) if excludes else set()))
    table = {}
    for program, example in PROGRAMS.items():
        table[program] = {flag: takes_value for flags, takes_value, examples, excludes in options
                          if (example in examples or "LLAMA_EXAMPLE_COMMON" in examples) and example not in excludes
                          for flag in flags}
    return table


@pytest.fixture(scope="module")
def table():
    from kit.export.converter import llama_source

    return argument_table(llama_source("common/arg.cpp"))


def unknown_flags(command: list[str], table: dict) -> list[str]:
    """The flags of `command` that its program does not take, and flags left without their value."""
    accepted, wrong, index = table[command[0]], [], 1
    while index < len(command):
        flag = command[index]
        if not flag.startswith("-"):
            wrong.append(f"{flag} (a value without a flag)")
        elif flag not in accepted:
            wrong.append(flag)
        elif accepted[flag]:
            index += 1
            if index >= len(command):
                wrong.append(f"{flag} (no value)")
        index += 1
    return wrong


def test_the_table_is_the_programs_own(table):
    """The parse itself, on what is known of the pinned llama.cpp: the flags that broke Qwen3.5's printed line."""
    assert table["llama-server"]["--reasoning"] and table["llama-server"]["--chat-template-kwargs"]
    assert "--reasoning" not in table["llama-mtmd-cli"] and "--chat-template-kwargs" not in table["llama-mtmd-cli"]
    assert table["llama-mtmd-cli"]["--chat-template"] and table["llama-mtmd-cli"]["--image"]
    assert table["llama-mtmd-cli"]["-m"] and table["llama-mtmd-cli"]["--jinja"] is False


def printed_commands(name: str, tmp_path) -> dict[str, list[str]]:
    import merge
    from kit import model as models

    template = (Path(models.resolve(f"tiny:{name}")) / "chat_template.jinja").read_text()
    report = {"models": {"f16": "run-f16.gguf"}, "mmproj": "mmproj-run-f16.gguf", "image_min_tokens": 4,
              "image_max_tokens": 400, "family": name}
    sample = {"images": [str(tmp_path / "chart.png")], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many bars?"}]}]}
    return merge.llama_commands(tmp_path, report, sample, "Answer briefly.", template)


@pytest.mark.parametrize("name", families.names())
def test_merges_printed_commands_run_in_the_programs_they_name(table, tmp_path, name):
    for program, command in printed_commands(name, tmp_path).items():
        assert command[0] == program
        assert unknown_flags(command, table) == [], (program, unknown_flags(command, table))
        # what the user copies: the printed line splits back into the same arguments
        assert shlex.split(shlex.join(command)) == command


@pytest.mark.parametrize("name", families.names())
def test_the_cli_line_renders_the_prompt_the_run_was_trained_on(tmp_path, name):
    """llama-mtmd-cli renders its template with enable_thinking=true; the template it is given sets the family's
    own kwargs first, so the generation prompt is the one the merged model was proven with."""
    from kit.export.llama import _template

    command = printed_commands(name, tmp_path)["llama-mtmd-cli"]
    family = families.by_name(name)
    messages = [{"role": "user", "content": [{"type": "text", "text": "How many bars?"}]}]
    if not family.chat_template_kwargs:
        assert "--chat-template" not in command  # the GGUF's own template, unchanged
        return
    given = command[command.index("--chat-template") + 1]
    assert command.index("--jinja") < command.index("--chat-template")  # a whole template needs --jinja first
    as_llama_cpp_renders = _template(given).render(messages=messages, add_generation_prompt=True,
                                                   enable_thinking=True)
    assert as_llama_cpp_renders.endswith("<|im_start|>assistant\n" + family.markup.empty_think)
    # the control: the template as it was opens a think block under llama-mtmd-cli
    original = given[given.index("%}") + 2:]
    assert _template(original).render(messages=messages, add_generation_prompt=True,
                                      enable_thinking=True).endswith("<think>\n")


def documented_commands() -> list[tuple[str, list[str]]]:
    """Commands for a llama.cpp program in README.md and docs/: code-block lines and `inline code` alike ("..."
    stands for arguments left out)."""
    programs = "|".join(map(re.escape, PROGRAMS))
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        spans = re.findall(rf"`((?:{programs}) [^`]*)`", text)
        spans += re.findall(rf"^\s*((?:{programs}) .*)$", text, flags=re.MULTILINE)
        found += [(f"{path.name}: {span}", shlex.split(span.replace("...", ""))) for span in spans]
    return found


def test_commands_in_the_docs_run_as_written(table):
    for where, command in documented_commands():
        wrong = [flag for flag in unknown_flags(command, table) if "(a value without a flag)" not in flag]
        assert wrong == [], (where, wrong)
