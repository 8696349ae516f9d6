"""train.py killed with SIGKILL at one phase of a checkpoint save; tests/test_resume.py runs it in a subprocess:

    python tests/kill_during_save.py PHASE STEP [train.py's arguments...]

PHASE (at checkpoint-STEP):
  writing   transformers is writing the checkpoint (killed as it starts on optimizer.pt)
  marking   the checkpoint is written, its complete marker not yet
  rotating  the marker is written, older checkpoints beyond save_total_limit not yet removed
  saved     the whole save is done
  final     the run's final weights are written into its temporary folder, not yet moved into place (STEP unused)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
PHASES = ("writing", "marking", "rotating", "saved", "final")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main(phase: str, step: int, args: list[str]):
    import torch

    # kit.train.checkpoints imports transformers: early, which is fine for the hf backend this runs on the CPU
    from kit.train import checkpoints, distributed

    saving, marking, rotating, final_save = torch.save, checkpoints.mark_complete, checkpoints.rotate, \
        distributed.save_model

    def save(value, path, *rest, **options):
        if phase == "writing" and Path(path).name == "optimizer.pt" and Path(path).parent.name == f"checkpoint-{step}":
            die()
        return saving(value, path, *rest, **options)

    def mark_complete(checkpoint, global_step, max_steps):
        if phase == "marking" and global_step == step:
            die()
        marking(checkpoint, global_step, max_steps)

    def rotate(folder, keep, best):
        at_step = checkpoints.step_of(checkpoints.last_complete(folder)) == step
        if phase == "rotating" and at_step:
            die()
        rotating(folder, keep, best)
        if phase == "saved" and at_step:
            die()

    def save_model(trainer, folder):
        final_save(trainer, folder)
        if phase == "final":
            die()

    torch.save, checkpoints.mark_complete, checkpoints.rotate, distributed.save_model = \
        save, mark_complete, rotate, save_model
    import train

    sys.argv = [str(Path(train.__file__)), *args]
    train.main()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in PHASES:
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
