"""Which implementation runs, and with which launch shape: pure functions of static facts, testable on CPU.

Every choice here depends only on a tensor's device, on shapes (the number of new tokens T, of sequences S,
the block-table width) and on the machine, never on the contents of a device tensor. So the same choice is
made on every rank and at every replay of a captured CUDA graph, and nothing needs a host sync.
"""

from __future__ import annotations

import functools
import os

import torch

DISABLE_ENV = "TPSERVE_DISABLE_TRITON"
"""Set to 1 to run the torch references on CUDA too (to compare or to bisect a suspected kernel bug)."""

TORCH_SAMPLER_ENV = "TPSERVE_TORCH_SAMPLER"
"""Set to 1 to sample with the torch reference on CUDA while every other kernel stays Triton (to compare,
or to serve on should the sampling kernel misbehave on a device)."""


def sampler_backend(x: torch.Tensor) -> str:
    """The sampler's backend: ``backend_for``, unless TPSERVE_TORCH_SAMPLER=1 says torch."""
    return "torch" if os.environ.get(TORCH_SAMPLER_ENV, "0") == "1" else backend_for(x)


def use_torch_sampler(reason: str) -> str:
    """From now on this process samples with the torch reference (the same math and noise: the same tokens);
    returns the warning for the user. For a sampling kernel that does not compile on this device."""
    os.environ[TORCH_SAMPLER_ENV] = "1"
    return f"the sampling kernel did not compile on this device ({reason}): sampling runs the torch reference"


DECODE_BLOCK_N = 64
"""Keys per tile in the decode kernel; also the unit the split-KV work is divided in."""

MAX_KV_SPLITS = 32


def select_backend(device_type: str, triton_importable: bool, disabled: bool) -> str:
    """"triton" on CUDA when triton imports and is not disabled, else "torch" (the references)."""
    return "triton" if device_type == "cuda" and triton_importable and not disabled else "torch"


@functools.cache
def triton_importable() -> bool:
    """Imports triton at most once per process, and only when a CUDA tensor asks for it."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(x: torch.Tensor) -> str:
    """The backend for an op whose inputs live where x lives (read once per call: a dict lookup)."""
    if x.device.type != "cuda":
        return "torch"
    return select_backend("cuda", triton_importable(), os.environ.get(DISABLE_ENV, "0") == "1")


def attention_path(num_tokens: int, num_seqs: int) -> str:
    """"decode" when every sequence brings exactly one query (T == S, each query length being >= 1):
    the split-KV kernel; else "varlen", the causal kernel over concatenated queries."""
    return "decode" if num_tokens == num_seqs else "varlen"


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits of each sequence's context in the decode kernel, a power of two in 1..MAX_KV_SPLITS.

    Enough (sequence, kv head, split) programs to give every multiprocessor about two, no more splits than
    key tiles in the longest context the block table can describe (max_context = its width * block_size).
    """
    return max(1, min(kv_splits_wanted(num_seqs, num_kv_heads, num_sms), kv_tiles(max_context), MAX_KV_SPLITS))


def kv_splits_wanted(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    return next_power_of_2(-(-2 * num_sms // max(num_seqs * num_kv_heads, 1)))


def kv_tiles(max_context: int) -> int:
    return next_power_of_2(-(-max_context // DECODE_BLOCK_N))


def varlen_block_m(num_tokens: int, num_seqs: int, group_pad: int) -> int:
    """Query rows (tokens x heads of one GQA group) per program of the varlen kernel: small tiles when most
    sequences bring few queries (mixed steps dominated by decodes), larger ones for prefill chunks."""
    block_m = 16 if num_tokens <= 4 * num_seqs else 64
    return max(block_m, group_pad)


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
