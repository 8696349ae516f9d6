"""What train.py learns before it trains: the processor, the samples (training, held out, evaluation), what the
preflight finds in them and what the run will cost; --plan prints it and writes plan.json."""

import click

from kit.errors import UserError
from kit.train import distributed


def survey(setup, options) -> dict:
    """The processor, the samples (training, held out, evaluation) and what the preflight found in them."""
    from transformers import AutoProcessor

    import data
    from kit import families
    from kit import model as models
    from kit.inputs import chat
    from kit.plan import estimate
    from kit.train import heldout

    recipe = setup.recipe
    with distributed.main_first():  # rank 0 fills the caches, then the others read them
        base_path = models.resolve(recipe["model_name_or_path"], weights=not options.plan_only)
        family, processor = families.of_model(base_path), AutoProcessor.from_pretrained(base_path)
        setup.recipe = recipe = estimate.with_model_grid(recipe, family, processor)  # aligned charts need the grid
        train_samples = data.load(recipe, recipe["dataset_split"],
                                  limit=options.plan_samples if options.plan_only else 0,
                                  progress=distributed.is_main())
        eval_split = data.load(recipe, recipe["eval_split"], progress=False) if recipe["eval_split"] else None
    train_samples, eval_samples, heldout_rows = heldout.hold_out(recipe, train_samples, eval_split)
    click.echo(f"data: {len(train_samples)} training samples from {recipe['dataset']}; model family {family.name}")
    chat.set_limits(processor, recipe)
    findings, counts = estimate.preflight(train_samples, processor, recipe)
    gpus, gpu = estimate.gpu_count(options.gpu)
    gpu_name, gpu_bytes = estimate.gpu_memory(gpu)
    planned = estimate.planning_precision(setup.precision, recipe["precision"], gpu)  # the card's, not this one's
    shape = estimate.model_shape(base_path)
    memory = estimate.estimate_memory(shape, recipe, max(i + t for i, t in counts or [(0, 0)]),
                                      max((i for i, _ in counts), default=0), planned, setup.backend)
    return dict(base_path=base_path, family=family, processor=processor, train_samples=train_samples,
                eval_samples=eval_samples, heldout_rows=heldout_rows, findings=findings, counts=counts, gpus=gpus,
                gpu=gpu, gpu_name=gpu_name, gpu_bytes=gpu_bytes, planned=planned, shape=shape, memory=memory)


def write_plan(setup, loaded: dict):
    """--plan: the plan printed and written to plan.json; nothing trains."""
    from kit.plan import estimate, plan_json

    recipe, samples, memory, planned = setup.recipe, loaded["train_samples"], loaded["memory"], loaded["planned"]
    gpus, gpu_name, gpu_bytes, shape = loaded["gpus"], loaded["gpu_name"], loaded["gpu_bytes"], loaded["shape"]
    click.echo(f"memory planned in {planned}" + (f" for --gpu {loaded['gpu']}" if loaded["gpu"] else ""))
    estimate.print_plan(samples, loaded["counts"], loaded["findings"], memory, gpu_name, gpu_bytes, recipe,
                        loaded["processor"], shape, planned, setup.backend)
    per_gpu = estimate.per_gpu_memory(shape, recipe, memory, gpus, planned) if gpus > 1 else None
    if per_gpu:
        estimate.print_multi_gpu(len(samples), recipe, per_gpu, gpus, gpu_name, gpu_bytes)
    if distributed.is_main():
        plan_json.write(setup.run_dir / "plan.json", plan_json.record(
            samples, loaded["counts"], loaded["findings"], memory, gpu_name, gpu_bytes, recipe, loaded["processor"],
            planned, gpus, per_gpu))
        click.echo(f"plan: {setup.run_dir / 'plan.json'}")


def check_fits(loaded: dict, force: bool):
    """A run the plan says will not fit the GPU present is refused before the model loads, unless forced."""
    import torch

    from kit.plan import estimate

    total, gpu_bytes, gpu_name = loaded["memory"]["total"], loaded["gpu_bytes"], loaded["gpu_name"]
    if gpu_bytes and torch.cuda.is_available() and total > gpu_bytes and not force:
        raise UserError(f"the plan estimates {estimate.gb(total)} peak on {gpu_name} "
                        f"({estimate.gb(gpu_bytes)}); run with --plan to see the parts and what to change, "
                        "or --force to try anyway")
