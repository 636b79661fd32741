"""Peak activation memory of a ConvLSTM training step for short and long sequences, with and
without gradient checkpointing over time steps.

Memory is the peak of live tensor storage created by operators during forward + backward
(``PeakTensorMemory``), which is what the allocator must hold, on the CPU. On a GPU the same
comparison is ``torch.cuda.max_memory_allocated`` around the step.
"""

from __future__ import annotations

import torch

from benchmarks.common import save, table, timed
from nowcast.models.complexity import PeakTensorMemory
from nowcast.models.registry import build_model

SEQUENCES = {"6 frames (3+3)": (3, 3), "24 frames (12+12)": (12, 12)}


def peak_step_memory(n_input: int, n_target: int, checkpointing: bool, size: int = 128) -> dict:
    torch.manual_seed(0)
    model = build_model("convlstm", n_input, n_target, gradient_checkpointing=checkpointing)
    frames = torch.rand(2, n_input, 1, size, size)
    target = torch.rand(2, n_target, 1, size, size)

    def step():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(frames), target)
        loss.backward()

    step()  # warm-up: parameter gradients exist before measuring
    with PeakTensorMemory() as meter:
        seconds, _ = timed(step)
    return {"peak_mb": meter.peak_bytes / 2**20, "step_s": seconds}


def bench() -> dict:
    results = {}
    for label, (n_input, n_target) in SEQUENCES.items():
        for checkpointing in (False, True):
            key = f"{label}, {'checkpointing' if checkpointing else 'plain backprop'}"
            results[key] = peak_step_memory(n_input, n_target, checkpointing)
    plain = [results[f"{label}, plain backprop"]["peak_mb"] for label in SEQUENCES]
    ckpt = [results[f"{label}, checkpointing"]["peak_mb"] for label in SEQUENCES]
    results["growth_6_to_24_plain"] = plain[1] / plain[0]
    results["growth_6_to_24_checkpointing"] = ckpt[1] / ckpt[0]
    results["checkpointing_over_plain_at_24"] = ckpt[1] / plain[1]
    return results


def main() -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = bench()
    save("memory", results)
    rows = [
        (key, f"{value['peak_mb']:.0f} MB peak, {value['step_s']:.2f} s/step")
        for key, value in results.items()
        if isinstance(value, dict)
    ]
    rows += [
        ("growth 6 -> 24 frames, plain", f"{results['growth_6_to_24_plain']:.2f}x"),
        ("growth 6 -> 24 frames, checkpointing", f"{results['growth_6_to_24_checkpointing']:.2f}x"),
        ("checkpointing / plain at 24 frames", f"{results['checkpointing_over_plain_at_24']:.2f}"),
    ]
    print("ConvLSTM training step memory (batch 2, 128x128, default model):")
    print(table(rows))
    return results


if __name__ == "__main__":
    main()
