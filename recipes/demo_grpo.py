"""GRPO after the laptop demo: the tiny model, fine-tuned by `--recipe demo`, keeps training on the same synthetic
charts with TRL's GRPOTrainer, rewarded by ChartQA's relaxed accuracy (what eval.py reports); CPU, slow (see max_steps).

    python train.py --recipe demo --output runs/demo                  # the SFT run it starts from (make demo)
    python train.py --recipe demo_grpo --output runs/demo-grpo        # init_from=runs/demo
    python eval.py runs/demo-grpo --compare finetuned                 # the same 200 test questions as runs/demo

The model keys (tiny, full fine-tuning, pixel limits, system prompt) come from the init_from run. The data keys
are the demo's, so eval.py scores both runs on the same test charts. Counting is already right after SFT: its
groups all score 1, have no spread and so no advantage; the learning signal is in "which label is highest".
"""

from recipes.demo import RECIPE as DEMO

RECIPE = {
    **DEMO,
    "method": "grpo",
    "init_from": "runs/demo",  # where `python train.py --recipe demo` and `make demo` leave the SFT run
    "num_generations": 8,  # the answer is one of 2-5 labels: 8 samples nearly always hold the right one
    "per_device_train_batch_size": 32,  # completions: 4 questions a step
    "max_completion_length": 8,  # the SFT model answers "A" or "3" and stops; 8 leaves room to ramble
    "learning_rate": 1e-3,  # a third of the SFT rate: the policy gradient is noisier than the SFT loss
    "beta": 0.04,  # KL to the SFT model, so counting is not forgotten while "highest" moves
    # Measured on two cores shared with five other jobs: 30-70 s a step (TRL's log-prob kernel runs in Triton's
    # interpreter on a CPU), so 400 steps are hours there; BENCHMARKS.md has what 65 steps did
    "max_steps": 400,
    "warmup_steps": 10,
    "lr_scheduler_type": "constant_with_warmup",  # a short run: no decay to waste its last steps
    "logging_steps": 10,
    "save_steps": 25,  # GRPO steps are slow on the CPU (Triton interpreter): lose little to a stop
}
