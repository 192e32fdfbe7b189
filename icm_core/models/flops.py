"""Model FLOPs of a decoder-only causal LM (Llama family: SmolLM2, Llama, Mistral, Qwen), by formula.

Used to state a stage's speed against the machine (model-FLOPs utilisation): FLOPs counted here, divided by the
stage's wall time, divided by the fp32 matmul peak measured at the same shapes (``scripts/bench_stages.py``).
One multiply-add is 2 FLOPs. With hidden size ``h``, MLP size ``i``, ``n_q`` / ``n_kv`` heads of size ``d``,
vocabulary ``V`` and ``T`` tokens per block, per token:

- a decoder layer's forward: ``2 * P + 4 * T * h`` with ``P = h*(n_q*d) + 2*h*(n_kv*d) + (n_q*d)*h + 3*h*i`` the
  matmul weights (q, k, v, o, gate, up, down) and ``4*T*h`` the two attention products (QK^T and AV over the full
  ``T x T`` square, as ``torch.utils.flop_counter`` counts scaled-dot-product attention);
- the (tied) LM head: ``2 * h * V``;
- a LoRA adapter of rank ``r`` on a ``k -> n`` linear: ``2 * r * (k + n)``.

SmolLM2-135M (h 576, i 1536, 9 / 3 heads of 64, V 49,152, 30 layers): P = 3.54M, so at T = 128 the forward is
2 * (30 * (3.54M + 0.074M) + 28.3M) = 0.273 GFLOP per token.

Backward (training), counted only where autograd runs it:

- the head: its input gradient only (``2*h*V``; the tied embedding is frozen, no weight gradient);
- every layer from the lowest adapted one up: the frozen linears' input gradients (``2 * P``, one forward's worth),
  the attention products twice (``8 * T * h``), the adapters' weight and input gradients (twice their forward);
  in the lowest adapted layer the input gradients of q, k, v and of the adapters' A are not needed (its input
  carries no gradient);
- nothing below the lowest adapted layer: frozen weights need no weight gradient and nothing below needs an input
  gradient. That is why adapting only the last layers makes training cheap.

Element-wise work (norms, softmax, activation, cross-entropy, the optimizer) is not counted, as is usual for MFU.
The test ``tests/core/models/test_flops.py`` checks the formula against ``torch.utils.flop_counter`` on a small
Llama.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each matmul in one decoder layer."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def layer_matmul_params(config: Any) -> int:
    """P: multiply-adds per token of one decoder layer's linears."""
    return sum(k * n for k, n in _linear_shapes(config).values())


def causal_lm_flops_per_token(
    config: Any,
    seq_len: int,
    first_layer: int = 0,
    train_from: int | None = None,
    lora_rank: int = 0,
    lora_targets: Sequence[str] = (),
    head: bool = True,
    attention: bool = True,
) -> float:
    """Model FLOPs per token of one pass, by the formula in this module's docstring.

    Args:
        config: The model's config (``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``num_hidden_layers``, ``vocab_size``, optional ``head_dim``).
        seq_len: Tokens per block (T; sets the attention products).
        first_layer: Decoder layers below this are not run (their output states are reused from a cache).
        train_from: ``None`` for a forward only; else the lowest adapted layer: LoRA adapters sit in layers
            ``train_from..`` and the backward pass is counted down to it.
        lora_rank: LoRA rank r (with ``train_from``).
        lora_targets: The adapted linears' names, e.g. ``("q_proj", "v_proj")``.
        head: Whether the LM head runs (scoring and training: yes; a hidden-state task vector: no).
        attention: Count the attention products. ``False`` gives what ``torch.utils.flop_counter`` counts on CPU,
            which does not see the fused CPU attention kernel (the cross-check's figure).
    """
    h, n_layers = config.hidden_size, config.num_hidden_layers
    shapes = _linear_shapes(config)
    p = layer_matmul_params(config)
    attention = 4 * seq_len * h if attention else 0
    targets = [shapes[name] for name in lora_targets if name in shapes]
    lora = sum(2 * lora_rank * (k + n) for k, n in targets)
    flops = 0.0
    for layer in range(first_layer, n_layers):
        adapted = train_from is not None and layer >= train_from
        flops += 2 * p + attention + (lora if adapted else 0)
        if adapted:
            skip = 0
            if layer == train_from:  # no input gradient into the lowest adapted layer's q, k, v and adapters' A
                skip = sum(2 * k * n for name, (k, n) in shapes.items() if name[0] in "qkv")
                skip += sum(2 * lora_rank * k for k, _ in targets)
            flops += 2 * p - skip + 2 * attention + 2 * lora
    if head:
        flops += 2 * h * config.vocab_size * (2 if train_from is not None else 1)
    return flops


def matmul_shapes(
    config: Any, rows: int, first_layer: int = 0, train_from: int | None = None, head: bool = True
) -> list[tuple[int, int, int, int]]:
    """The (M, K, N, count) fp32 matmuls of one pass over ``rows`` = batch x tokens: the shapes at which a stage's
    matmul peak is measured. Backward input gradients appear as (M, N, K)."""
    shapes = _linear_shapes(config)
    n_layers = config.num_hidden_layers
    run = n_layers - first_layer
    out: list[tuple[int, int, int, int]] = [(rows, k, n, run) for k, n in shapes.values()]
    if train_from is not None:
        out += [(rows, n, k, n_layers - train_from) for k, n in shapes.values()]
    if head:
        out.append((rows, config.hidden_size, config.vocab_size, 1))
        if train_from is not None:
            out.append((rows, config.vocab_size, config.hidden_size, 1))
    return out
