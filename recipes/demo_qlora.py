"""QLoRA on a laptop: the `demo` run's model, loaded in 4-bit (NF4), learns a question it was never trained on
through a LoRA adapter; the base stays frozen, as in every GPU recipe.

    python train.py --recipe demo --output runs/demo                    # the base: reads "how many bars", "highest"
    python train.py --recipe demo_qlora --output runs/demo-qlora        # 4-bit base + adapter: "the last bar"
    python eval.py runs/demo-qlora --compare base,finetuned --question-types last   # 200 new questions, paired
    python eval.py runs/demo-qlora --compare base,finetuned --question-types count,max --out runs/demo-qlora/eval-old
    make demo-qlora                                                      # all of the above

The new question, "What is the label of the last bar?", is a position question: a model that counts the bars
knows the answer without reading their heights, so the adapter only has to route what the base already sees
to a new answer. BENCHMARKS.md ("Demo QLoRA") has what was tried before settling on it.
"""

from recipes.demo import RECIPE as DEMO

RECIPE = {
    **DEMO,
    "model_name_or_path": "runs/demo",  # where `python train.py --recipe demo` and `make demo` leave the base
    "load_in_4bit": True,  # the frozen base in NF4 through bitsandbytes' CPU kernels, as QLoRA on a GPU
    "finetune": "lora",
    "lora_r": 16,
    "lora_alpha": 16,
    # "last" was never in the demo's training data; the demo's own two stay in the mix (a third each): trained on
    # "last" alone, the adapter answered "how many bars" with a label too (count 100 % -> 49 %, BENCHMARKS.md)
    "synthetic_question_types": ["count", "max", "last"],
    "synthetic_num_train": 1000,  # charts drawn once (~30 s) and cached
    "learning_rate": 2e-3,
    "max_steps": 400,
    "warmup_steps": 20,
    "save_steps": 100,
}
