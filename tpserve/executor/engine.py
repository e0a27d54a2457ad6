"""Engine assembly on one rank: model shard, KV block pool sized for the device, scheduler, executor.

Every stage runs on every rank in lock-step (``stage``): if one rank fails, every rank raises the same
error, so the proxy hears one clear start-up failure instead of a hang in the next collective."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from mpi4py import MPI

CPU_MAX_POOL_TOKENS_PER_REQUEST = 4096  # the CPU default pool: max_batch_size requests of this many tokens
CPU_POOL_MEMORY_SHARE = 0.25  # ... but never more than this share of the memory available at start


class StartupFailed(Exception):
    def __init__(self, message: str, tb: str, rank: int) -> None:
        super().__init__(message)
        self.tb = tb
        self.rank = rank


def stage(comm: MPI.Comm, name: str, fn: Callable[[], Any], timings: dict[str, float] | None = None) -> Any:
    """Runs one start-up stage on every rank; if any rank failed, every rank raises the first error.
    ``timings`` gets the stage's seconds on this rank (the wait for the slowest rank included), so a slow
    start-up says where it went."""
    result, err = None, None
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported to the proxy with its traceback
        err = (f"{type(e).__name__}: {e}", traceback.format_exc())
    errors = comm.allgather(err)
    if timings is not None:
        timings[name] = round(time.perf_counter() - start, 3)
    for rank, e in enumerate(errors):
        if e is not None:
            raise StartupFailed(f"rank {rank} failed at {name}: {e[0]}", e[1], rank)
    return result


def process_age() -> float:
    """Seconds since this process started (start-up counts the imports too). From /proc, in the clock
    that the kernel stamps process starts with: wall-clock start times drift by up to a second."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):  # no /proc (not Linux): the wall clock
        import psutil

        return time.time() - psutil.Process().create_time()


GPU_MAX_BATCH_SIZE = 256  # vLLM's max_num_seqs: a GPU step of 256 decodes still costs about one of 1
CPU_MAX_BATCH_SIZE = 16


def default_max_batch_size(device_type: str, max_num_tokens: int | None = None) -> int:
    """Running requests at once unless the user says: on a GPU as many as vLLM runs (the pool may lower it
    once sized: ``fit_batch_to_pool``), on a CPU, where every row costs compute, 16; never more than a step's
    token budget when one is given (a step holds one token of every running request)."""
    size = GPU_MAX_BATCH_SIZE if device_type == "cuda" else CPU_MAX_BATCH_SIZE
    return min(size, max_num_tokens) if max_num_tokens else size


def fit_batch_to_pool(max_batch_size: int, num_blocks: int, given: bool) -> int:
    """A default batch no larger than the pool's usable blocks (each running request holds one at least);
    a batch the user gave is kept."""
    return max_batch_size if given else max(min(max_batch_size, num_blocks - 1), 1)


def default_max_num_tokens(device_type: str, max_batch_size: int) -> int:
    """The step's token budget: prompts longer than this are chunked over steps. At least one token for
    every running request."""
    return max(8192 if device_type == "cuda" else 2048, max_batch_size)


def default_max_chunk_tokens(max_num_tokens: int) -> int:
    """One request's prompt chunk per step: a quarter of the step, so a long prompt leaves room for the
    prompts that arrive behind it."""
    return max(max_num_tokens // 4, 1)


def pool_blocks(args: Any, config: Any, tp_size: int, device: Any, dtype: Any, model: Any,
                max_seq_len: int, max_num_tokens: int, graphs: bool = False) -> int:
    """How many KV blocks (block 0 included) this rank can hold: ``kv_cache_tokens`` when given; on GPU,
    ``gpu_memory_utilization`` of the device memory less the weights and what serving allocates beside the
    pool, measured: the activations of the largest step (``profile_forward``), held twice with CUDA graphs
    (the graphs' private pool, and an eager step's), or the sampler's temporaries at ``max_batch_size`` rows
    with every logits processor on (``profile_sampling``), whichever is larger; on CPU, room for
    ``max_batch_size`` requests of up to 4096 tokens, within a quarter of the memory available."""
    import psutil
    import torch

    from tpserve.model import KVCache

    bs = args.block_size
    per_block = KVCache.bytes_per_block(config, tp_size, bs, dtype)
    if args.kv_cache_tokens is not None:
        return -(-args.kv_cache_tokens // bs) + 1
    if device.type == "cuda":
        weights = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        profile_forward(model, config, tp_size, bs, max_num_tokens, max_seq_len, device, dtype)
        activations = torch.cuda.max_memory_allocated(device) - weights
        torch.cuda.reset_peak_memory_stats(device)
        profile_sampling(config.vocab_size, args.max_batch_size, device)
        sampling = torch.cuda.max_memory_allocated(device) - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        others = total - free - torch.cuda.memory_reserved(device)  # CUDA context, NCCL, other processes
        logits_out = args.max_batch_size * config.vocab_size * 4  # the graphs' shared float32 logits
        beside = (activations + logits_out if graphs else 0) + max(activations, sampling)
        budget = total * args.gpu_memory_utilization - others - weights - beside
        return max(int(budget // per_block), 2)
    tokens = args.max_batch_size * min(max_seq_len, CPU_MAX_POOL_TOKENS_PER_REQUEST)
    by_memory = int(psutil.virtual_memory().available * CPU_POOL_MEMORY_SHARE // per_block)
    return max(min(-(-tokens // bs) + 1, by_memory), 2)


def profile_sampling(vocab_size: int, rows: int, device: Any) -> None:
    """One sampling launch over ``rows`` rows of float32 logits with temperature, top-k, top-p, min-p,
    penalties, a logit bias and log-probabilities on every row: the largest the sampler's temporaries get."""
    import torch

    from tpserve.executor.request import Request
    from tpserve.executor.sampler import Sampler
    from tpserve.sampling_params import SamplingParams

    sampler = Sampler(device, 0)
    params = SamplingParams(max_tokens=1, temperature=0.8, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                            frequency_penalty=0.5, presence_penalty=0.5, logit_bias={1: 1.0}, logprobs=20)
    requests = [Request(i, [1, 2, 3], params, False) for i in range(rows)]
    logits = torch.randn(rows, vocab_size, device=device)
    tokens = sampler.sample(logits, requests)
    plan = sampler.logprob_plan(requests, None)
    assert plan is not None
    sampler.pack(plan, logits, tokens, None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_forward(model: Any, config: Any, tp_size: int, block_size: int, num_tokens: int, max_seq_len: int,
                    device: Any, dtype: Any) -> None:
    """One forward of ``num_tokens`` prompt tokens (in sequences of at most ``max_seq_len``) on a throw-away
    pool, so the peak memory counts the activations of the largest step."""
    import torch

    from tpserve.model import AttentionMetadata, KVCache

    lens = [min(max_seq_len, num_tokens - start) for start in range(0, num_tokens, max_seq_len)]
    tables, next_block = [], 1
    for n in lens:
        need = -(-n // block_size)
        tables.append(list(range(next_block, next_block + need)))
        next_block += need
    kv = KVCache(config, tp_size, next_block, block_size, device, dtype)
    meta, positions = AttentionMetadata.build(tables, [0] * len(lens), lens, block_size, device,
                                              input_ids=[0] * num_tokens)
    model(meta.input_ids, positions, meta, kv)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del kv, meta, positions
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_kernels(model: Any, config: Any, tp_size: int, args: Any, max_num_tokens: int, max_seq_len: int,
                 graphs: Any, device: Any, dtype: Any) -> tuple[set, list[str]]:
    """Compiles (or loads from Triton's disk cache) every kernel variant a step can use: those of any eager
    step, and those of the graphs when there are graphs (a step that scores its prompt runs eagerly).
    Returns the variants and warnings for the user (``variants.warm_up``)."""
    from tpserve.kernels.policy import num_sms
    from tpserve.kernels.variants import KernelConfig, reachable_eager, reachable_graphed, warm_up

    cfg = KernelConfig(
        num_q_heads=config.num_heads // tp_size,
        num_kv_heads=config.num_kv_heads // tp_size,
        block_size=args.block_size,
        max_batch_size=args.max_batch_size,
        max_num_tokens=max_num_tokens,
        max_blocks_per_seq=-(-max_seq_len // args.block_size),
        num_sms=num_sms(device.index or 0),
    )
    variants = reachable_eager(cfg) | (reachable_graphed(cfg, graphs.keys) if graphs is not None else set())
    return variants, warm_up(model, cfg, variants, device, dtype)


def build_engine(args: Any, comm: MPI.Comm, publish: Callable[[list], None]) -> tuple[Any, dict[str, Any]]:
    """Loads this rank's shard and returns (executor, info for READY). ``args`` is the engine's options
    (``EngineArgs``)."""
    import torch

    from tpserve.executor.block_manager import BlockManager
    from tpserve.executor.cuda_graphs import CudaGraphs
    from tpserve.executor.dist import init_tensor_parallel, pick_device, pick_dtype
    from tpserve.executor.executor import Executor, ExecutorConfig
    from tpserve.executor.instrument import make_instruments
    from tpserve.executor.model_runner import ModelRunner
    from tpserve.executor.request_queue import RequestQueue
    from tpserve.executor.sampler import Sampler
    from tpserve.executor.scheduler import Scheduler
    from tpserve.model import KVCache, ModelConfig, TPContext, load_model
    from tpserve.model.default_model import default_model_path

    rank, size = comm.Get_rank(), comm.Get_size()
    timings: dict[str, float] = {}

    def timed_stage(name: str, fn: Callable[[], Any]) -> Any:
        return stage(comm, name, fn, timings)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))

    def resolve() -> str | None:
        if args.model is not None:
            return str(args.model)
        return str(default_model_path()) if rank == 0 else None

    model_dir = comm.bcast(timed_stage("resolve_model", resolve), root=0)
    config = timed_stage("read_config", lambda: ModelConfig.from_dir(model_dir))
    timed_stage("check_tp", lambda: config.check_tp(size))
    device = timed_stage("pick_device", lambda: pick_device(args.device))
    dtype = timed_stage("pick_dtype", lambda: pick_dtype(args.dtype, config.torch_dtype, device))
    max_seq_len = args.max_seq_len or config.max_position_embeddings
    given_batch = args.max_batch_size is not None
    args = dataclasses.replace(args, max_batch_size=args.max_batch_size or default_max_batch_size(
        device.type, args.max_num_tokens))
    max_num_tokens = args.max_num_tokens or default_max_num_tokens(device.type, args.max_batch_size)
    max_chunk_tokens = args.max_chunk_tokens or default_max_chunk_tokens(max_num_tokens)
    timed_stage("init_tensor_parallel", lambda: init_tensor_parallel(comm, device))
    tp = TPContext(rank, size)
    model, _ = timed_stage("load_model", lambda: load_model(model_dir, tp, device, dtype))
    fused = timed_stage("load_kernels", lambda: model.use_fused_kernels(max_seq_len))
    compiles = None
    if fused:  # counts from here: the profiling forward's compiles are start-up's too
        from tpserve.kernels.variants import CompileCounter

        compiles = CompileCounter()
        compiles.install()
    with_graphs = fused and not args.enforce_eager
    mine = timed_stage("size_kv_cache", lambda: pool_blocks(args, config, size, device, dtype, model, max_seq_len,
                                                            max_num_tokens, with_graphs))
    num_blocks = comm.allreduce(mine, op=MPI.MIN)  # every rank's BlockManager must be the same
    args = dataclasses.replace(args, max_batch_size=fit_batch_to_pool(args.max_batch_size, num_blocks, given_batch))
    kv = timed_stage("allocate_kv_cache", lambda: KVCache(config, size, num_blocks, args.block_size, device, dtype))
    capacity = (num_blocks - 1) * args.block_size
    warnings = []  # for the user: READY carries them and the proxy prints them to the user's stderr
    if capacity < max_seq_len:
        warnings.append(f"the KV cache pool holds {capacity} tokens, fewer than max_seq_len={max_seq_len}: "
                        "longer requests will end with an error")
    if rank == 0:
        for w in warnings:
            print(f"tpserve: warning: {w}", file=sys.stderr, flush=True)
    blocks = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching, max_seqs=args.max_batch_size,
                          max_blocks_per_seq=-(-max_seq_len // args.block_size))
    graphs = None
    capture_s = 0.0
    variants: set = set()
    if fused:
        if not args.enforce_eager:
            graphs = CudaGraphs(model, kv, blocks, args.max_batch_size, max_num_tokens, max_seq_len, device)
        variants, kernel_warnings = timed_stage("warm_kernels", lambda: warm_kernels(
            model, config, size, args, max_num_tokens, max_seq_len, graphs, device, dtype))
        warnings += kernel_warnings
        if rank == 0:
            for w in kernel_warnings:
                print(f"tpserve: warning: {w}", file=sys.stderr, flush=True)
    graph_memory = 0
    if graphs is not None:
        start = time.perf_counter()
        before = torch.cuda.memory_reserved(device)
        timed_stage("capture_cuda_graphs", graphs.capture)
        capture_s = time.perf_counter() - start
        graph_memory = torch.cuda.memory_reserved(device) - before
    ex_config = ExecutorConfig(
        vocab_size=config.vocab_size,
        max_seq_len=max_seq_len,
        eos_token_ids=tuple(config.eos_token_ids),
        stream_interval=args.stream_interval,
        enable_overlap=args.enable_overlap,
        early_first_token=args.early_first_token,
        recover_oom=size == 1,
    )
    executor = Executor(
        ex_config,
        RequestQueue(comm),
        Scheduler(blocks, args.max_batch_size, max_num_tokens, max_chunk_tokens),
        ModelRunner(model, kv, blocks, device, graphs),
        Sampler(device, args.seed),
        publish,
        device,
        make_instruments(comm),
    )
    executor.grammars = structured_outputs(model_dir, config, comm, device)
    if compiles is not None:
        compiles.mark_ready()
        executor.kernel_compiles = compiles.since_ready
    info = {
        "model_dir": model_dir,
        "arch": config.arch,
        "vocab_size": config.vocab_size,
        "eos_token_ids": list(config.eos_token_ids),
        "max_seq_len": max_seq_len,
        "max_batch_size": args.max_batch_size,
        "max_num_tokens": max_num_tokens,
        "max_chunk_tokens": max_chunk_tokens,
        "block_size": args.block_size,
        "num_kv_blocks": num_blocks,
        "kv_cache_tokens": capacity,
        "enable_prefix_caching": args.enable_prefix_caching,
        "fused_kernels": fused,
        "cuda_graphs": graphs.decode_buckets if graphs is not None else [],
        "prompt_graphs": graphs.prompt_buckets if graphs is not None else [],
        "graph_capture_s": round(capture_s, 3),
        "graph_memory_bytes": graph_memory,
        "kernel_variants": sorted(f"{k}:{c}" for k, c in variants),
        "triton_compiles_at_start": compiles.count if compiles is not None else 0,
        "tensor_parallel_size": size,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "kv_cache_bytes_per_rank": kv.nbytes(),
        "enable_overlap": args.enable_overlap,
        "early_first_token": args.early_first_token and args.enable_overlap,
        "pid": os.getpid(),
        "startup_stages_s": timings,
        "startup_s": round(process_age(), 3),
        "warnings": warnings,
        "structured_output": executor.grammars.backend is not None,
    }
    return executor, info


def structured_outputs(model_dir: str, config: Any, comm: MPI.Comm, device: Any) -> Any:
    """The structured-output state (issue 18): llguidance over the model's tokenizer, and its compile threads."""
    from tpserve.executor.structured import GrammarManager, backend_for

    backend, why = backend_for(model_dir, config.vocab_size, list(config.eos_token_ids))
    grammars = GrammarManager(backend, comm, device, why)
    grammars.start()
    return grammars
