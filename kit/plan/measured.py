"""bench.py --memory: train.py --plan's memory model set against host memory measured over a few LoRA steps on
the CPU (kit/plan/host_memory.py), part by part, for the same model, samples, batch and precision.
"""

from kit.plan import estimate

GIB = 1024**3

# The parts the memory table sets side by side, in the order printed; plan.estimate_memory's names.
PARTS = ("base weights", "adapter + grads + optimizer", "activations + logits")


def measured_parts(model, baseline, loaded, at_step, peak) -> dict:
    """Measured bytes by part: the base = resident after loading (LoRA attached) less the adapter's own fp32
    weights (counted, not measured); adapter + grads + optimizer = resident at the optimizer step less that;
    activations + logits = the peak of the steps above the optimizer step's resident set."""
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    weights = loaded - baseline - adapter
    state = at_step - baseline - weights
    return dict(zip(PARTS, (weights, state, peak - at_step)), total=peak - baseline, process_baseline=baseline)


def planned_parts(path, recipe, samples, processor, backend) -> dict:
    """train.py --plan's parts in bf16 for the same samples, without its CUDA overhead and fragmentation margin
    (neither exists in host memory)."""
    _, counts = estimate.preflight(samples, processor, recipe)  # (image, text) tokens, as the collator makes them
    memory = estimate.estimate_memory(estimate.model_shape(path), recipe, max(i + t for i, t in counts),
                                      max(i for i, _ in counts), "bf16", backend)
    parts = (memory["base weights"], memory["LoRA/trained weights + grads + optimizer"],
             memory["activations (largest sample)"] + memory["logits"])
    return dict(zip(PARTS, parts), total=sum(parts), tokens=max(i + t for i, t in counts))


def table(results, recipe, overrides, steps, warmup, backend) -> str:
    """--memory: plan against measured by part for each base, then the two goals' figures."""
    command = f"python bench.py --recipe {recipe} --backends {backend} --memory --steps {steps} --warmup {warmup}" + \
              "".join(f" --set {o}" for o in overrides)
    lines = [f"Command: `{command}`", "", "| base | part | plan GB | measured GB | measured / plan |",
             "|---|---|---|---|---|"]
    ok = {r["backend"]: r for r in results if "error" not in r}
    for r in results:
        if r["backend"] not in ok:
            lines.append(f"| {r['backend']} | failed: {r['error'].splitlines()[-1][:80] if r['error'] else '?'} "
                         "| | | |")
            continue
        for part in (*PARTS, "total"):
            planned, measured = r["plan"][part] / GIB, r["host"][part] / GIB
            lines.append(f"| {r['backend']} | {part} | {planned:.2f} | {measured:.2f} | "
                         f"{measured / planned:.2f} |")
    notes = []  # paragraphs under the table
    if ok:
        first = next(iter(ok.values()))
        notes.append(f"{first['model']}, batch {first['batch']}, {first['plan']['tokens']} tokens a sample, "
                     f"{first['device']}, {first['date']}; measured: resident host memory (VmRSS/VmHWM) above "
                     f"the process before loading ({first['host']['process_baseline'] / GIB:.2f} GB).")
    if len(ok) == 2:
        ratio = ok["4-bit"]["host"][PARTS[0]] / ok["16-bit"]["host"][PARTS[0]]
        notes.append(f"4-bit / 16-bit base weights, measured: {ratio:.3f}x")
    for label, r in ok.items():
        error = (r["plan"][PARTS[0]] + r["plan"][PARTS[1]]) / (r["host"][PARTS[0]] + r["host"][PARTS[1]]) - 1
        notes.append(f"{label}: plan's weights + adapter + optimizer {error:+.1%} against measured")
    return "\n".join(lines + [line for note in notes for line in ("", note)])
