"""Model families: everything that differs between Qwen VL generations, one file per family.

A family file is `kit/families/<module>.py` (qwen2_vl.py, qwen2_5_vl.py, ...) that defines `FAMILY = Family(...)`.
Files whose name starts with "_" hold shared helpers and are not families. Adding a generation is one new file
(and its recipes, and its rows in tests/test_families.py): nothing here lists the families by name.

What every family provides (the fields of `Family` below):
- `name`: the family's name ("qwen2-vl", "qwen2.5-vl"), as run_config.json's "family" and in `tiny:NAME`;
- `model_types`: the config.json `model_type`s it serves (qwen2_vl; qwen2_5_vl; qwen3_vl, qwen3_vl_moe; ...);
- `processor_classes`: the processor classes it uses (how a processor alone finds its family, see of_processor);
- `markup`: its special tokens and chat markup (Markup: vision start/end, image/video pads, the turn tokens, the
  assistant header, a `<think>` block if it has one), and `chat_template_kwargs` passed to every
  apply_chat_template (e.g. {"enable_thinking": False} for short-answer data on a thinking model);
- `lora`: the module names LoRA targets (LoraNames: language and vision blocks, attention and MLP names, and the
  merger / deepstack projector modules);
- `shape(config) -> Shape`: the model's shape for the memory plan, from its config alone (Shape lists every
  Linear by part and name, so the plan's parts name the family's modules);
- `grid(processor) -> int`: pixels per merged vision-token side (patch x spatial merge), read from the processor,
  and `target_size(width, height, processor)`: an image's size after the processor's resize;
- `build_tiny(folder)`: writes the tiny real-architecture model + processor (random init, local tokenizer), and
  `tiny_version` (part of its cache folder's name: bump it when build_tiny changes);
- `random_shapes`: {"qwen2.5-vl-7b": ...} the true shapes behind `random:NAME`, and `build_random(shape, folder,
  weights)` that writes config + processor (+ random bf16 weights when `weights`);
- `keep_16bit`: the Linear layers that stay 16-bit under a 4-bit base (kit/model.py's BitsAndBytesConfig);
- `llama`: its llama.cpp names (LlamaNames: text arch, `clip.projector_type`); llama.cpp is prompted with the
  chat template the converter stored in the GGUF, rendered with the family's `chat_template_kwargs`
  (kit/export/llama.py).

How a family is found:
- from a model folder or hub id: `of_model(path)` reads its config.json (`of_model_type(config.model_type)`);
- from a built name: `tiny:qwen2.5-vl` and `random:qwen2.5-vl-7b` (`of_name`); plain `tiny` is `tiny:qwen2-vl`;
- from a run folder: run_config.json's "family" (`of_run(run_config)`), which train.py writes as `family.name`;
  a run_config.json without it is Qwen2-VL, the only family such runs could hold;
- from a processor: `of_processor(processor)` (the collator, the plan and image resizing get one without a model);
- from a GGUF pair: what merge.py wrote beside it (gguf_report.json "family"), else `of_llama_arch(arch)`.
A model_type or name no family serves is a UnknownFamily (a UserError) that names the families there are.
"""

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from kit.errors import UserError

DEFAULT_TINY = "qwen2-vl"  # what plain `tiny` builds: the demo's model since the kit began


class UnknownFamily(UserError):
    """A model, name or run whose family the kit does not have; the message names the families it has."""


@dataclass(frozen=True)
class Markup:
    """A family's special tokens as text, as its chat template writes them."""
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"
    image_pad: str = "<|image_pad|>"  # the processor repeats it once per merged image token
    video_pad: str = "<|video_pad|>"
    vision_pad: str = "<|vision_pad|>"
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"  # closes every turn; the answer's own keeps its label so the model learns to stop
    end_of_text: str = "<|endoftext|>"
    assistant_header: str = "assistant\n"  # what follows im_start where an answer begins
    # ("<think>", "</think>") for families whose template writes a thinking block; None for none. Such a block
    # stays out of the loss unless the data's answer has one (kit/inputs/chat.py's answer spans skip `empty_think`).
    think: tuple[str, str] | None = None

    @property
    def empty_think(self) -> str:
        """The block Qwen3 / Qwen3.5 templates write after the assistant header when an answer has no thinking
        (and a thinking-off generation prompt ends with): prompt, not answer; "" for families without one."""
        return f"{self.think[0]}\n\n{self.think[1]}\n\n" if self.think else ""

    @property
    def image_slot(self) -> str:
        """What the chat template writes where an image goes (before the processor expands the pad)."""
        return self.vision_start + self.image_pad + self.vision_end

    @property
    def vision_tokens(self) -> tuple[str, ...]:
        """Tokens that never carry loss: they stand for pixels, not for text the model should write."""
        return (self.vision_start, self.vision_end, self.vision_pad, self.image_pad, self.video_pad)

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Tokens a row's text must not hold: the processor would read them as image slots or turn boundaries."""
        return (*self.vision_tokens, self.im_start, self.im_end, self.end_of_text)


@dataclass(frozen=True)
class LoraNames:
    """Module names LoRA targets (the Linear layers' last name, under their blocks' paths, as regexes)."""
    language_blocks: str = r"model\.language_model\.layers\.\d+"
    language_attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    language_mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    vision_blocks: str = r"model\.visual\.blocks\.\d+"
    vision_attention: tuple[str, ...] = ("qkv", "proj")
    vision_mlp: tuple[str, ...] = ("fc1", "fc2")
    # full paths of the Linear layers that project vision features into the text model (the merger; Qwen3-VL's
    # deepstack mergers too): they are neither block attention nor MLP
    merger: tuple[str, ...] = (r"model\.visual\.merger\.mlp\.\d+",)
    # MoE routed experts: fused 3-D parameters, not Linear modules, so peft reaches them only as target_parameters
    # (the recipe key finetune_experts, off by default); () for dense families
    experts: tuple[str, ...] = ()

    def regex(self, vision: bool, language: bool, attention: bool, mlp: bool) -> str:
        """peft's target_modules regex for Unsloth's finetune_* switches (the merger is not adapted: it is small
        and Unsloth leaves it alone too)."""
        parts = []
        for wanted, blocks, attention_names, mlp_names in (
                (language, self.language_blocks, self.language_attention, self.language_mlp),
                (vision, self.vision_blocks, self.vision_attention, self.vision_mlp)):
            names = (attention_names if attention else ()) + (mlp_names if mlp else ())
            if wanted and names:
                parts.append(rf"{blocks}\.(?:\w+\.)+({'|'.join(names)})")
        if not parts:
            raise UserError("no layers selected for LoRA: enable finetune_language_layers or finetune_vision_layers, "
                            "and finetune_attention_modules or finetune_mlp_modules")
        return rf".*({'|'.join(parts)})$"


@dataclass(frozen=True)
class Linear:
    """`count` Linear layers of `d_in` x `d_out` (one per block), by part and module name, for the memory plan."""
    part: str  # "language" | "vision" | "merger"
    kind: str  # "attention" | "mlp" | "merger": which finetune_* switch adapts it
    name: str  # the module's name, as in LoraNames ("q_proj", "fc1", "mlp.0")
    count: int
    d_in: int
    d_out: int

    @property
    def parameters(self) -> int:
        return self.count * self.d_in * self.d_out


@dataclass(frozen=True)
class Shape:
    """What the memory plan needs of a model, from its config alone (no weights loaded)."""
    hidden: int  # text hidden size
    layers: int  # text decoder layers
    inter: int  # text MLP width (per token activations)
    kv: int  # text key/value width (heads x head dim)
    vocab: int
    embed: int  # embedding parameters, the output head counted when untied
    vision_hidden: int  # vision tower width
    vision_depth: int
    linears: tuple[Linear, ...] = field(default=())


@dataclass(frozen=True)
class LlamaNames:
    """What llama.cpp calls this family: the GGUF text arch and the mmproj's clip.projector_type; its pre-tokenizer
    (the name llama.cpp gives the split regex the family's tokenizer.json uses, for tokenizers whose hash the
    converter does not know, as the tiny models' locally trained ones); and what the converter must be told."""
    text_arch: str
    projector: str
    pre_tokenizer: str = "qwen2"
    pre_tokenizer_regex: str | None = None  # None: Qwen2's (kit.families._tiny.QWEN2_PRETOKENIZE_REGEX)
    converter_args: tuple[str, ...] = ()  # extra convert_hf_to_gguf.py arguments for the text model
    # parameters transformers holds (and saves) as (experts, out, in) where the checkpoints, and so llama.cpp's
    # converter, have (experts, in, out): transposed back for the converter (Qwen3-VL-MoE's fused experts)
    transposed_experts: tuple[str, ...] = ()


def patch_merge_grid(processor) -> int:
    """Pixels per merged vision-token side: the image processor's patch size x its spatial merge."""
    image_processor = processor.image_processor
    return image_processor.patch_size * image_processor.merge_size


def qwen_target_size(width: int, height: int, processor) -> tuple[int, int]:
    """(width, height) after Qwen's resize: sides multiples of the grid, area within the processor's bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    h, w = smart_resize(height, width, factor=patch_merge_grid(processor),
                        min_pixels=image_processor.size["shortest_edge"],
                        max_pixels=image_processor.size["longest_edge"])
    return w, h


@dataclass(frozen=True)
class Family:
    """One generation of the Qwen VL family: see the module docstring for what each field is used for."""
    name: str
    model_types: tuple[str, ...]
    processor_classes: tuple[str, ...]
    shape: Callable  # (transformers config) -> Shape
    build_tiny: Callable  # (folder: Path) -> None
    tiny_version: str
    random_shapes: dict  # "qwen2-vl-7b" -> whatever build_random needs
    build_random: Callable  # (shape name, folder: Path, weights: bool) -> None
    llama: LlamaNames
    markup: Markup = Markup()
    lora: LoraNames = LoraNames()
    chat_template_kwargs: dict = field(default_factory=dict)
    grid: Callable = patch_merge_grid  # (processor) -> int
    target_size: Callable = qwen_target_size  # (width, height, processor) -> (width, height)
    # (processor) -> bool, for families that share a processor class (Qwen3-VL and Qwen3.5): True when the
    # processor is this family's. None: the class name decides.
    claims_processor: Callable | None = None
    # Whether samples packed into one row stay apart (packing=true): attention is kept per sample by the packed
    # position_ids, but a layer that carries state along the row (Qwen3.5's Gated DeltaNet) would let one sample
    # see the one before it. Such a family refuses packing rather than train on what it never sees at inference.
    packs: bool = True
    # Whether the processor writes each video frame group's time ("<1.5 seconds>", then the group's own vision
    # start / pads / end) where the template put the one video pad (Qwen3-VL's processor, Qwen3.5's too)
    video_timestamps: bool = False
    # (frames, width, height, processor) -> a video frame's (width, height) after the video processor's resize;
    # None: each frame is sized as an image is (target_size). Qwen3-VL's bounds the pixels of all frames together.
    video_size: Callable | None = None
    # Linear layers (last names, as BitsAndBytesConfig's llm_int8_skip_modules matches them) that stay 16-bit when
    # the base loads in 4-bit: layers a few outputs wide, where NF4 saves nothing and bitsandbytes' CPU kernels
    # (blocks of 32 outputs) cannot run them. () quantizes every Linear but the output head.
    keep_16bit: tuple[str, ...] = ()

    def video_frame_size(self, frames: int, width: int, height: int, processor) -> tuple[int, int]:
        if self.video_size is None:
            return self.target_size(width, height, processor)
        return self.video_size(frames, width, height, processor)

    def video_placeholder(self, seconds: list[float]) -> str:
        """What the processor writes for one video's pad (one pad standing for each frame group's tokens), given
        the time of each frame group: the plan counts a video row's text tokens from it."""
        if not self.video_timestamps:
            return self.markup.video_pad
        m = self.markup
        return "".join(f"<{t:.1f} seconds>{m.vision_start}{m.video_pad}{m.vision_end}" for t in seconds)

    def chat_text(self, processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as this family's chat template writes it (with its chat_template_kwargs)."""
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **self.chat_template_kwargs)


def all_families() -> list[Family]:
    """Every family file's FAMILY (or FAMILIES, for a file that serves a dense and a MoE variant), in file-name
    order."""
    found = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        loaded = importlib.import_module(f"{__name__}.{module}")
        found += getattr(loaded, "FAMILIES", None) or [loaded.FAMILY]
    return found


def names() -> list[str]:
    return [family.name for family in all_families()]


def by_name(name: str) -> Family:
    """The family called `name` ("qwen2.5-vl"), as run_config.json's "family" holds it."""
    for family in all_families():
        if family.name == name:
            return family
    raise UnknownFamily(f"no model family {name!r}; the kit has: {', '.join(names())}")


def of_model_type(model_type: str, where: str = "the model") -> Family:
    for family in all_families():
        if model_type in family.model_types:
            return family
    served = ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in all_families())
    raise UnknownFamily(f"{where} is a {model_type!r} model; the kit serves these families (model_type): {served}")


def of_model(path: str) -> Family:
    """The family of a model folder or hub id, from its config.json's model_type (no weights read)."""
    from transformers import AutoConfig

    return of_model_type(AutoConfig.from_pretrained(path).model_type, str(path))


def built_names() -> list[str]:
    """Every name the kit builds without a download: tiny, tiny:FAMILY, random:SHAPE."""
    found = ["tiny"]
    for family in all_families():
        found.append(f"tiny:{family.name}")
        found += [f"random:{shape}" for shape in family.random_shapes]
    return found


def of_name(name: str) -> tuple[Family, str | None] | None:
    """(family, random shape or None for the tiny model) of a built name; None when `name` is not `tiny...` or
    `random:...` (a folder or hub id); a `tiny:`/`random:` name no family builds is UnknownFamily naming them."""
    if name == "tiny":
        return by_name(DEFAULT_TINY), None
    kind, _, rest = name.partition(":")
    if kind not in ("tiny", "random") or not rest:
        return None
    for family in all_families():
        if kind == "tiny" and rest == family.name:
            return family, None
        if kind == "random" and rest in family.random_shapes:
            return family, rest
    raise UnknownFamily(f"model {name}: the kit builds {', '.join(n for n in built_names() if n.startswith(kind))}")


def of_run(run_config: dict) -> Family:
    """The family a run trained (run_config.json's "family"; runs from before it was written are Qwen2-VL)."""
    return by_name(run_config.get("family") or "qwen2-vl")


def of_llama_arch(arch: str, where: str = "the GGUF") -> Family:
    """The first family whose llama.cpp text arch is `arch`, for a GGUF pair with nothing recorded beside it
    (families that share an arch, Qwen2-VL and Qwen2.5-VL, are prompted alike)."""
    for family in all_families():
        if family.llama.text_arch == arch:
            return family
    raise UnknownFamily(f"{where} has the llama.cpp arch {arch!r}; the kit's families have: "
                        + ", ".join(f"{f.name} ({f.llama.text_arch})" for f in all_families()))


def of_processor(processor) -> Family:
    """The family of a loaded processor: its class, or (for a shared class) the family that claims it."""
    kind = type(processor).__name__
    matches = [f for f in all_families() if kind in f.processor_classes]
    if len(matches) > 1:
        matches = [f for f in matches if f.claims_processor and f.claims_processor(processor)] or matches[:1]
    if not matches:
        raise UnknownFamily(f"no model family uses a {kind}; the kit has: {', '.join(names())}")
    return matches[0]
