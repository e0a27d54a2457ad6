"""Every Triton kernel variant a configuration can reach, the start-up pass that compiles each one, and a
counter of the compiles that still happen after start-up.

Triton compiles one binary per combination of a kernel's constexprs (and of the integer and alignment facts
it specializes on, which the kernels keep out of their step-varying arguments: attention.py). A variant
first met while serving costs its step a compile of 0.5-2.5 s; that is what made a fresh server's first
requests slow. The launchers' choices are pure functions of shapes (policy.py), so the set of choices over
every step a configuration allows is enumerable: ``reachable`` lists it, ``warm_up`` launches each variant
once on tiny inputs before the engine reports ready (Triton's on-disk cache makes a second start cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpserve.kernels.policy import (
    MAX_KV_SPLITS,
    kv_splits_wanted,
    kv_tiles,
    next_power_of_2,
    num_kv_splits,
    sampler_backend,
    use_torch_sampler,
    varlen_block_m,
)

Variant = tuple[str, int]
"""(kernel, the one launch choice that varies within a configuration: block_m for "varlen", the split count
for "decode" and "reduce", 0 for the kernels that have a single variant per model). A "mixed_" kernel is the
same kernel in a prompt graph, which reads its decode count from the device (another constexpr)."""

SINGLE = (("qk_norm_rope_store", 0), ("rms_norm", 0), ("add_rmsnorm", 0), ("silu_and_mul", 0), ("sample", 0))


@dataclass(frozen=True)
class KernelConfig:
    """What the launchers' choices depend on, for one rank of one engine."""

    num_q_heads: int  # this rank's
    num_kv_heads: int  # this rank's
    block_size: int
    max_batch_size: int
    max_num_tokens: int
    max_blocks_per_seq: int  # the widest block table: max_seq_len / block_size, rounded up
    num_sms: int

    @property
    def group_pad(self) -> int:
        return next_power_of_2(self.num_q_heads // self.num_kv_heads)

    def decode_splits(self, num_seqs: int, blocks_per_seq: int) -> int:
        return num_kv_splits(num_seqs, self.num_kv_heads, blocks_per_seq * self.block_size, self.num_sms)


def decode_variants(splits: int, prefix: str = "") -> set[Variant]:
    return {(prefix + "decode", splits)} | ({(prefix + "reduce", splits)} if splits > 1 else set())


def reachable_graphed(cfg: KernelConfig, keys: list) -> set[Variant]:
    """The variants of the captured graphs (``cuda_graphs.GraphKey``s): with graphs, every step is one."""
    variants = set(SINGLE)
    for key in keys:
        if key.decode:
            variants |= decode_variants(cfg.decode_splits(key.seqs, cfg.max_blocks_per_seq))
        else:
            variants.add(("mixed_varlen", varlen_block_m(key.tokens, key.seqs, cfg.group_pad)))
            variants |= decode_variants(cfg.decode_splits(key.seqs, cfg.max_blocks_per_seq), "mixed_")
    return variants


def reachable_eager(cfg: KernelConfig) -> set[Variant]:
    """The variants of eager steps: any S decodes (alone, or first in a mixed step) over a block table of any
    width up to the widest, and any prompt step of T > S tokens (or its part after the decodes)."""
    variants = set(SINGLE)
    wanted = {kv_splits_wanted(s, cfg.num_kv_heads, cfg.num_sms) for s in range(1, cfg.max_batch_size + 1)}
    tiles = {kv_tiles(w * cfg.block_size) for w in range(1, cfg.max_blocks_per_seq + 1)}
    for a in wanted:
        for b in tiles:
            variants |= decode_variants(max(1, min(a, b, MAX_KV_SPLITS)))
    # varlen_block_m is monotone in T for a given S: the smallest and largest T > S give every choice.
    for s in range(1, min(cfg.max_batch_size, cfg.max_num_tokens - 1) + 1):
        for t in (s + 1, cfg.max_num_tokens):
            variants.add(("varlen", varlen_block_m(t, s, cfg.group_pad)))
    return variants


def warm_up(model: torch.nn.Module, cfg: KernelConfig, variants: set[Variant], device: torch.device,
            dtype: torch.dtype) -> list[str]:
    """Launches every variant once on inputs shaped like the model's own (the same strides, so the same
    specialization), over a throw-away two-block cache. Only on the Triton path. Returns warnings for the
    user: a sampling kernel that does not compile here leaves sampling to the torch reference, the only kernel
    with such a fallback (its tokens are the reference's; the other kernels have no second path worth serving
    on)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    from tpserve.kernels import attention, fused, sampling
    from tpserve.kernels.reference import SAMPLE_PARAMS

    layer = model.model.layers[0]
    attn = layer.self_attn
    hidden = torch.zeros(1, model.config.hidden_size, device=device, dtype=dtype)
    q, k, v = attn._qkv(hidden)
    shape = (2, cfg.block_size, cfg.num_kv_heads, attn.head_dim)
    k_cache = torch.zeros(shape, device=device, dtype=dtype)
    v_cache = torch.zeros(shape, device=device, dtype=dtype)
    one = torch.ones(1, dtype=torch.int32, device=device)
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=device)
    q_rot = torch.zeros(1, cfg.num_q_heads, attn.head_dim, device=device, dtype=dtype)  # as the store returns it
    warnings: list[str] = []
    for kernel, choice in sorted(variants):
        if kernel == "qk_norm_rope_store":
            q_norm = attn.q_norm.weight if attn.q_norm is not None else None
            k_norm = attn.k_norm.weight if attn.k_norm is not None else None
            fused.qk_norm_rope_store(q, k, v, zero, model.cos_sin, q_norm, k_norm, 1e-6, k_cache, v_cache,
                                             zero)
        elif kernel == "rms_norm":
            fused.rms_norm(hidden, layer.input_layernorm.weight, 1e-6)
        elif kernel == "add_rmsnorm":
            fused.add_rmsnorm(hidden, hidden, layer.input_layernorm.weight, 1e-6)
        elif kernel == "silu_and_mul":
            fused.silu_and_mul(layer.mlp.gate_up_proj(hidden))
        elif kernel == "sample" and sampler_backend(hidden) == "triton":  # float32 logits, and the model's dtype
            params = torch.zeros(1, SAMPLE_PARAMS, dtype=torch.int32, device=device)
            try:
                for logits_dtype in {torch.float32, dtype}:
                    sampling.sample(torch.zeros(1, model.config.vocab_size, device=device, dtype=logits_dtype),
                                    params)
            except (CompilationError, OutOfResources, PTXASError) as e:  # before any launch: the device is unharmed
                warnings.append(use_torch_sampler(f"{type(e).__name__}: {str(e)[:200]}"))
        elif kernel in ("varlen", "mixed_varlen"):
            decodes = zero if kernel == "mixed_varlen" else None
            attention.varlen_attention(q_rot, k_cache, v_cache, qsl, one, tables, attn.attn.scale, block_m=choice,
                                       num_decodes=decodes)
        elif kernel in ("decode", "reduce", "mixed_decode", "mixed_reduce"):  # splits > 1 launch the reduce too
            decodes = one if kernel.startswith("mixed_") else None
            attention.decode_attention(q_rot, k_cache, v_cache, one, tables, attn.attn.scale, num_splits=choice,
                                       num_decodes=decodes)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return warnings


class CompileCounter:
    """Counts Triton's compiles (a variant loaded into this process, from its disk cache or built) through
    Triton's post-compile hook; ``since_ready`` is what the engine reports as ``triton_compiles``."""

    def __init__(self) -> None:
        self.count = 0
        self.at_ready = 0
        self.kernels: list[str] = []  # the kernel of every compile, in order: what a miss was

    def install(self) -> None:
        import triton

        triton.knobs.runtime.jit_post_compile_hook = self._hook

    def _hook(self, *, fn: object, **_: object) -> None:
        self.count += 1
        self.kernels.append(getattr(fn, "name", "?"))

    def mark_ready(self) -> None:
        self.at_ready = self.count

    def since_ready(self) -> int:
        return self.count - self.at_ready
