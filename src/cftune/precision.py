"""`dtype: auto`: the faster of fp32 and bf16 on this machine, measured once and cached.

Why measure: bf16 is not always faster on a CPU. On an AMD EPYC, bf16 weights sampled 1.5x faster
than fp32; on an Intel Xeon with AVX512-BF16 but no AMX, a 2048² bf16 matmul ran at 167 GFLOP/s
against 316 in fp32 and `dtype: bf16` made training slower. So `auto` times one matrix product
of a transformer layer's shape in both precisions (well under a second) and keeps the faster,
cached per CPU model, torch version and thread count. GPUs need no measurement: bf16 where the
GPU supports it, else fp16. Only speed is chosen here: log-likelihood metrics stay fp32 whatever
`auto` picks (their `score_dtype` has no `auto`).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from cftune.models import AUTO

CACHE_FILE = "precision.json"
SHAPE = (512, 2048, 2048)  # tokens × hidden → hidden: a layer's matmul, ~4 GFLOP a product


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the measurement depends on: CPU model, torch version, threads."""
    return f"{_cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of one [m, k] × [k, n] product in `dtype` on the CPU."""
    m, k, n = SHAPE
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def measure_cpu() -> dict[str, Any]:
    """Both precisions' GFLOP/s and the faster one (bf16 only if at least 10% faster: a tie
    keeps the exact precision)."""
    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16)
    return {"dtype": "bf16" if bf16 > 1.1 * fp32 else "fp32", "fp32_gflops": round(fp32, 1),
            "bf16_gflops": round(bf16, 1), "machine": machine_key()}


def cpu_choice(cache: Path | None = None) -> dict[str, Any]:
    """This machine's measured choice, from the cache (`$CFTUNE_CACHE/precision.json`) or a
    fresh measurement written there."""
    from cftune.io import atomic_write_json
    from cftune.models import cache_dir

    path = cache or cache_dir() / CACHE_FILE
    key = machine_key()
    known: dict[str, Any] = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}  # a damaged cache is measured again, not an error
    if key not in known:
        known[key] = measure_cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, known)
    return known[key]


def resolve(dtype: str, device: torch.device) -> tuple[str, dict[str, Any]]:
    """(concrete dtype, how it was chosen) for a setting that may be `auto`."""
    if dtype != AUTO:
        return dtype, {"dtype": dtype, "chosen": "as set"}
    if device.type == "cuda":
        chosen = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return chosen, {"dtype": chosen, "chosen": "auto: GPU"}
    if device.type == "mps":
        return "fp32", {"dtype": "fp32", "chosen": "auto: mps (no measurement)"}
    choice = cpu_choice()
    return choice["dtype"], {**choice, "chosen": "auto: faster measured matmul"}
