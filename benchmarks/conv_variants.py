"""How to convolve K variants' own inputs with their own kernels (CPU).

    python benchmarks/conv_variants.py [--rounds 5] [--steps 200]

The second `Conv2D` of a swept CNN gets each variant's own input: the
sweep's batched kernels convolve them one variant at a time, the `jax.vmap`
engine lets JAX batch the convolution. This times one compiled step
(forward and backward, the digits CNN's second layer: K=6 variants, batch
32, 6x6x16 inputs, 3x3 kernels, 16 filters) three ways, after checking each
against the per-variant loop:

- loop: K convolutions (`tf.nn.conv2d`, `jax.lax.conv_general_dilated`);
- vmap (JAX): `jax.vmap` of one variant's gradient, as the `jax.vmap`
  engine maps each variant's step (XLA's batched convolution);
- vmap, K convolutions (JAX): the same, with a `custom_vmap` rule that
  convolves each variant on its own (and a `custom_vjp` whose backward pass
  does the same);
- im2col: the patches of all K*B images at once, then one batched matmul
  (K, B*H*W, 3*3*C) @ (K, 3*3*C, F) (the TensorFlow batched kernel).

Median over rounds of the time per step, in ms, and the first call's time
(tracing and compiling), in s (TensorFlow, and JAX when it is installed). A
measurement to choose a kernel by, not a sweep's cost.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

K, B, H, C, F = 6, 32, 6, 16, 16


def timed(step, args, rounds: int, steps: int, block=lambda out: out) -> tuple:
    """`(median ms per step, s of the first call)`."""
    start = time.perf_counter()
    block(step(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            out = step(*args)
        block(out)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return float(np.median(times)), first


def tensorflow_rows(x, w, rounds, steps) -> dict:
    import tensorflow as tf

    def loop(x, w):
        return tf.stack([tf.nn.conv2d(x[i], w[i], 1, "VALID") for i in range(K)])

    def im2col(x, w):
        patches = tf.image.extract_patches(
            tf.reshape(x, (K * B, H, H, C)), [1, 3, 3, 1], [1] * 4, [1] * 4, "VALID"
        )
        side = patches.shape[1]
        patches = tf.reshape(patches, (K, B * side * side, 9 * C))
        out = tf.matmul(patches, tf.reshape(w, (K, 9 * C, F)))
        return tf.reshape(out, (K, B, side, side, F))

    x, w = tf.constant(x), tf.constant(w)
    reference = loop(x, w).numpy()
    rows = {}
    for name, conv in (("loop", loop), ("im2col", im2col)):
        np.testing.assert_allclose(conv(x, w).numpy(), reference, rtol=1e-4, atol=1e-3)

        @tf.function
        def step(x, w, conv=conv):
            with tf.GradientTape() as tape:
                tape.watch([x, w])
                value = tf.reduce_sum(conv(x, w) ** 2)
            return tape.gradient(value, [x, w])

        rows[name] = timed(step, (x, w), rounds, steps)
    return rows


def jax_rows(x, w, rounds, steps) -> dict:
    import jax
    import jax.numpy as jnp

    numbers = ("NHWC", "HWIO", "NHWC")

    def one(xi, wi):
        return jax.lax.conv_general_dilated(
            xi, wi, (1, 1), "VALID", dimension_numbers=numbers
        )

    def loop(x, w):
        return jnp.stack([one(x[i], w[i]) for i in range(K)])

    def one_by_one(f):
        """`f` whose `jax.vmap` over all its arguments runs f once per row."""
        mapped = jax.custom_batching.custom_vmap(f)

        @mapped.def_vmap
        def rule(size, batched, *args):
            if not all(batched):
                axes = [0 if b else None for b in batched]
                out = jax.vmap(f, in_axes=axes)(*args)
            else:
                rows = [f(*(a[i] for a in args)) for i in range(size)]
                out = jax.tree.map(lambda *r: jnp.stack(r), *rows)
            return out, jax.tree.map(lambda _: True, out)

        return mapped

    forward = one_by_one(one)
    backward = one_by_one(lambda xi, wi, g: jax.vjp(one, xi, wi)[1](g))

    @jax.custom_vjp
    def own(xi, wi):
        return forward(xi, wi)

    own.defvjp(lambda xi, wi: (forward(xi, wi), (xi, wi)), lambda r, g: backward(*r, g))

    def mapped_step(conv):
        def variant(xi, wi):
            return jnp.sum(conv(xi, wi) ** 2)

        return jax.jit(jax.vmap(jax.grad(variant, argnums=(0, 1))))

    def vmap(x, w):
        return jax.vmap(one)(x, w)

    def vmap_own(x, w):
        return jax.vmap(own)(x, w)

    def im2col(x, w):
        patches = jax.lax.conv_general_dilated_patches(
            x.reshape(K * B, H, H, C),
            (3, 3),
            (1, 1),
            "VALID",
            dimension_numbers=numbers,
        )
        side = patches.shape[1]  # the patches' channels are (C, kh, kw)
        patches = patches.reshape(K, B * side * side, C, 9)
        out = jnp.einsum("kncp,kpcf->knf", patches, w.reshape(K, 9, C, F))
        return out.reshape(K, B, side, side, F)

    x, w = jnp.asarray(x), jnp.asarray(w)
    reference = np.asarray(loop(x, w))
    rows = {}
    ways = (
        ("loop", loop, None),
        ("vmap", vmap, one),
        ("vmap, K convolutions", vmap_own, own),
        ("im2col", im2col, None),
    )
    gradients = None
    for name, conv, per_variant in ways:
        np.testing.assert_allclose(
            np.asarray(conv(x, w)), reference, rtol=1e-4, atol=1e-3
        )
        if per_variant is None:
            step = jax.jit(
                jax.grad(lambda x, w, c=conv: jnp.sum(c(x, w) ** 2), argnums=(0, 1))
            )
        else:
            step = mapped_step(per_variant)
        rows[name] = timed(step, (x, w), rounds, steps, jax.block_until_ready)
        got = [np.asarray(g) for g in step(x, w)]  # each way's gradients agree
        if gradients is None:
            gradients = got
        for mine, theirs in zip(got, gradients, strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-2)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.random((K, B, H, H, C)).astype("float32")
    w = rng.random((K, 3, 3, C, F)).astype("float32")
    print("| backend | way | ms per step (forward + backward) | first call (s) |")
    print("|---|---|---|---|")
    for backend, rows in (("TensorFlow", tensorflow_rows), ("JAX", jax_rows)):
        try:
            measured = rows(x, w, args.rounds, args.steps)
        except ImportError:
            continue
        for name, (ms, first) in measured.items():
            print(f"| {backend} | {name} | {ms:.2f} | {first:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
