"""`torch.func.vmap` for the sweep on PyTorch: an evaluation, not an engine.

    python benchmarks/torch_vmap.py            # K=6, MLP 64-128-128-10
    python benchmarks/torch_vmap.py --width 512

One SGD step of K variants of a Keras MLP (torch backend, one thread, batch
32, per-variant L2 coefficients), two ways: K separate forward/backward
passes of `model.stateless_call` (the per-step work of K separate fits,
without `fit`'s own overhead), and one `torch.func.vmap` of
`torch.func.grad` of the same function over weights stacked on a K axis.
The two are checked equal after one step, then timed in interleaved rounds
(20 steps each); the median ratio vmap / separate is printed. See
`kerasreg/sweep/mapped.py` (`_TORCH_NOTE`) for what this does and does not
show about a torch engine.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ["KERAS_BACKEND"] = "torch"

import keras
import numpy as np
import torch
from keras import ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    k, width = args.k, args.width
    torch.set_num_threads(1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, "relu"),
            keras.layers.Dense(width, "relu"),
            keras.layers.Dense(10),
        ]
    )
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    weights = [v.value.detach() for v in model.trainable_variables]
    coefficients = torch.logspace(-4, -1, k)
    data_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(ws, c):
        out, _ = model.stateless_call(list(ws), [], x, training=True)
        return data_loss(y, out) + c * sum(ops.sum(ops.square(w)) for w in ws[::2])

    per_variant = [[w.clone().requires_grad_(True) for w in weights] for _ in range(k)]
    stacked = [torch.stack([w.clone() for _ in range(k)]) for w in weights]

    def separate():
        for i in range(k):
            grads = torch.autograd.grad(
                loss(per_variant[i], coefficients[i]), per_variant[i]
            )
            with torch.no_grad():
                for w, g in zip(per_variant[i], grads, strict=True):
                    w.sub_(0.01 * g)

    mapped_grad = torch.func.vmap(torch.func.grad(loss), in_dims=(0, 0))

    def vmapped():
        grads = mapped_grad(tuple(stacked), coefficients)
        for w, g in zip(stacked, grads, strict=True):
            w.sub_(0.01 * g)

    separate()
    vmapped()
    for i in range(k):
        for a, b in zip(per_variant[i], stacked, strict=True):
            np.testing.assert_allclose(
                a.detach().numpy(), b[i].numpy(), rtol=1e-5, atol=1e-6
            )
    ratios = []
    for r in range(args.rounds):
        order = [separate, vmapped] if r % 2 == 0 else [vmapped, separate]
        seconds = {}
        for step in order:
            start = time.perf_counter()
            for _ in range(20):
                step()
            seconds[step.__name__] = time.perf_counter() - start
        ratios.append(seconds["vmapped"] / seconds["separate"])
    print(
        f"K={k}, MLP 64-{width}-{width}-10, batch 32: vmap / K separate per step, "
        f"median {np.median(ratios):.3f} (min {min(ratios):.3f}, "
        f"max {max(ratios):.3f}, {args.rounds} rounds); equal after one step"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
