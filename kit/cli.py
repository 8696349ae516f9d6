"""--help with the examples: a script's module docstring (its commands and notes) under the one-line summary,
laid out as written (click would otherwise re-flow the example commands into one paragraph)."""


def help_with_examples(summary: str, module_doc: str) -> str:
    paragraphs = [p.strip("\n") for p in (module_doc or "").strip().split("\n\n")[1:] if p.strip()]
    return "\n\n".join([summary.strip(), *("\b\n" + p for p in paragraphs)])
