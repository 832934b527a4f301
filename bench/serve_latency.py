"""Serving latency and throughput over HTTP with Redis, next to the bare model and to token-by-token decoding.

    python bench/serve_latency.py --checkpoint runs/quickstart/checkpoint [--redis-url redis://127.0.0.1:6379/0]
    python bench/serve_latency.py --checkpoint ... --quick        # a short check that everything runs

1. Starts `cllm4rec serve` on the checkpoint (a separate process, Redis history store under a key
   prefix of its own, seeded from the checkpoint and deleted at the end).
2. For each concurrency (1, 8, 32): --requests POST /recommend calls for known users, that many
   in flight at once (one keep-alive connection each, a minimal client); p50/p95/p99 latency,
   requests/s, and the server's mean batch size. Then the batched phase: POST /recommend/batch with
   --batch-users users a request, --batch-concurrency in flight, recommendations/s.
3. In this process, with the model loaded as the server loads it (same device and precision) and
   the same prompts (the users' stored histories): the server's scoring alone (ServedModel.score:
   the forward pass, masking and top-k) at batch sizes 1, 8 and 32. At batch 1 it is also timed
   beside the concurrency-1 requests, a block of 16 of each in turn: overhead_ratio (HTTP + Redis +
   batching) divides the two p50s measured side by side.
4. An autoregressive baseline with the same model: the same K items generated one at a time
   (greedy, KV cache, the item head at every step, seen and generated items masked), the way an LLM
   recommender that decodes item tokens would; its latency as a ratio to the one-pass forward (in
   PyTorch both, also where another engine serves the one pass).
5. The floor: the prompts' FLOPs (2 x the backbone layers' weights per prompt token, plus the item
   head's 2 x (width + readout width) x items once) divided by the matrix-multiply FLOP/s this run
   measures on this machine (best of several, in the backbone's number format for the backbone and
   float32 for the head), plus reading the head's tables once at the read bandwidth it measures (a
   large matrix-vector product): what one request cannot go below, as the serving-speed issue defines it.
6. With --minimal, bench/minimal_server.py (uvicorn, one Redis read and the same scoring, nothing else)
   at concurrency 1 beside the same bare passes: its overhead ratio is what this machine leaves to any
   Python server around this pass (docs/benchmarks.md, "The floor under the overhead goal").

--json prints one JSON object instead of the tables (floor_ms, forward_p50_ms, http by concurrency,
overhead_ratio, floor_ratio, autoregressive_ratio, device, precision, ...), with breakdown_c1_mean_ms:
where a request's time went at concurrency 1, means per request from the server's own histograms
(in the server, queued, in the forward pass, in Redis, the rest of the server) and the client's.

The server and this client share the machine's CPUs: run it with nothing else busy (docs/benchmarks.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server does (service/__init__.py), before torch

import argparse  # noqa: E402  (the imports below come after the environment is set)
import asyncio
import json
import inspect
import platform
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from model.checkpoint import Recommender
from model.cllm4rec import COLLAB, inference_autocast
from service.served_model import ScoreJob, ServedModel
from service.settings import Settings
from serve_process import MINIMAL_SERVER_ENTRY, serving

MS = 1000.0


# --- the floor -------------------------------------------------------------------------------------

def peak_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` size^3 matrix products on this device, in this dtype."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def read_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s read by a matrix-vector product over a large float32 matrix (best of `repeats`): how fast the
    head's GEMV can read its tables. (A copy, read and written, understated it: the cpu recipe's readout
    head then ran below its "floor".)"""
    matrix = torch.ones(megabytes * 2**20 // 4 // 4096, 4096, dtype=torch.float32, device=device)
    vector = torch.ones(4096, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        matrix @ vector
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return matrix.numel() * 4 / best


def matmul_dtype(recommender: Recommender) -> torch.dtype:
    """The number format of a batch-1 pass's matrix products: float32 where ONNX Runtime runs it (on a CPU,
    also beside a bfloat16 format for the large batches), else that of most of the blocks' weights
    (bfloat16-linear keeps the norms, and the embeddings, float32), bfloat16 for float32 weights under CUDA's
    autocast."""
    if recommender.device.type == "cpu" and recommender.model.inference_runner(1) is not None:
        return torch.float32
    numel: dict[torch.dtype, int] = {}
    for p in recommender.model.backbone.base_model.layers.parameters():
        numel[p.dtype] = numel.get(p.dtype, 0) + p.numel()
    dtype = max(numel, key=numel.get)
    return torch.bfloat16 if recommender.device.type == "cuda" and dtype == torch.float32 else dtype


def floor_ms(recommender: Recommender, prompt_tokens: float, backbone_flops_per_s: float, head_flops_per_s: float,
             bytes_per_s: float) -> tuple:
    """(floor in ms, FLOPs of one prompt): the backbone layers' matrix work per token at the backbone's
    measured peak, and the head once (the item vectors and, with a readout, its table) at float32's, plus
    reading the head's tables once."""
    model = recommender.model
    layer_weights = sum(p.numel() for layer in model.backbone.base_model.layers for p in layer.parameters())
    head = [model.output_vectors(), model.head_readout]
    head_numel = sum(table.numel() for table in head)
    backbone_flops, head_flops = 2 * layer_weights * prompt_tokens, 2 * head_numel
    seconds = backbone_flops / backbone_flops_per_s + head_flops / head_flops_per_s \
        + sum(table.numel() * table.element_size() for table in head) / bytes_per_s
    return seconds * MS, backbone_flops + head_flops


# --- the server ------------------------------------------------------------------------------------

# What the breakdown of a request reads from the server's own histograms: (metric, label filter).
SERVER_TIMES = {
    "server_ms": ("cllm4rec_http_request_duration_seconds", {"endpoint": "/recommend"}),  # first byte in, last out
    "queue_wait_ms": ("cllm4rec_batch_queue_wait_seconds", {}),
    "forward_ms": ("cllm4rec_model_forward_duration_seconds", {}),  # forward pass, masking and top-k
    "redis_ms": ("cllm4rec_redis_operation_duration_seconds", {}),  # summed over the request's Redis calls
}  # (the history and the catalogue's version are read side by side, so redis_ms can exceed their wall time)


def server_sums(url: str) -> dict[str, float]:
    """The server's histogram sums that SERVER_TIMES names (seconds), and its batch size's sum and count."""
    wanted = {name + "_sum": (key, labels) for key, (name, labels) in SERVER_TIMES.items()}
    sums = dict.fromkeys([*SERVER_TIMES, "batch_sum", "batch_count"], 0.0)
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                key, labels = wanted[sample.name]
                if all(sample.labels.get(label) == value for label, value in labels.items()):
                    sums[key] += sample.value
            elif sample.name == "cllm4rec_batch_size_sum":
                sums["batch_sum"] = sample.value
            elif sample.name == "cllm4rec_batch_size_count":
                sums["batch_count"] = sample.value
    return sums


class Connection:
    """One keep-alive HTTP/1.1 connection for the load: a socket write and a read per request. The load
    generator shares the server's CPUs, so its own cost lands in every latency it measures: with httpx
    the client and the transport took 1.85 ms of a 4-layer request's 11.2 ms at concurrency 1, with this
    0.2-0.3 ms (docs/benchmarks.md, "Overhead at 4 layers")."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host.encode()

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, host)

    async def post_json(self, path: str, body: dict) -> tuple[int, bytes]:
        """(status, body) of a POST with a JSON body; the server answers with a Content-Length."""
        payload = json.dumps(body).encode()
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host, len(payload), payload))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(url: str, bodies: list[dict], concurrency: int, path: str = "/recommend") -> tuple[list[float], float]:
    """Latencies (s) of every request, and the wall time, with `concurrency` requests in flight."""
    todo = iter(bodies)
    latencies: list[float] = []

    async def worker(connection: Connection):
        for body in todo:
            started = time.perf_counter()
            status, answer = await connection.post_json(path, body)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"{status}: {answer.decode()}")

    connections = [await Connection.open(url) for _ in range(concurrency)]
    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker(connection) for connection in connections))
        return latencies, time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()


async def load_beside_bare(url: str, bodies: list[dict], served: ServedModel, jobs: list[ScoreJob],
                           block: int = 16) -> tuple[list[float], float, list[float]]:
    """Concurrency 1 in blocks of `block` requests, each block followed by the bare scoring of the same
    prompts in this process: (HTTP latencies, wall time, bare latencies). The overhead ratio compares the
    two measured side by side: this VM's speed drifts by up to a fifth within a minute, more than the
    overhead it measures at 4 layers."""
    latencies, wall, bare = [], 0.0, []
    for start in range(0, len(bodies), block):
        block_latencies, block_wall = await load(url, bodies[start : start + block], 1)
        latencies += block_latencies
        wall += block_wall
        bare += bare_forward(served, jobs[start : start + block], 1)[0]
    return latencies, wall, bare


# --- the model alone -----------------------------------------------------------------------------

def bare_forward(model: ServedModel, jobs: list[ScoreJob], batch_size: int) -> tuple[list[float], float]:
    """Per-batch latencies (s) and the total time of the server's scoring (ServedModel.score: one
    forward pass, masking, top-k) over all jobs."""
    latencies = []
    started = time.perf_counter()
    for start in range(0, len(jobs), batch_size):
        t = time.perf_counter()
        model.score(jobs[start : start + batch_size])
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - started


@torch.no_grad()
def generate_items(recommender: Recommender, prompt: list[int], seen: list[int], k: int) -> list[int]:
    """K items decoded one at a time: prompt pass, then one cached step per item fed back, in the
    precision of the one-pass scoring."""
    model, space = recommender.model, recommender.space
    device = recommender.device
    banned = torch.zeros(space.n_items, dtype=torch.bool, device=device)
    banned[seen] = True
    base = model.backbone.base_model
    # The KV cache's name: `cache` in recent transformers, `past_key_values` before.
    cache = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    items: list[int] = []
    with inference_autocast(model):
        out = base(inputs_embeds=model.embed(torch.tensor([prompt], device=device), COLLAB), use_cache=True)
        while True:
            logits = model.item_logits(out.last_hidden_state[:, -1])[0].masked_fill(banned, -torch.inf)
            item = int(logits.argmax())
            items.append(item)
            banned[item] = True
            if len(items) == k:
                return items
            token = torch.tensor([[space.item_token(item)]], device=device)
            out = base(inputs_embeds=model.embed(token, COLLAB), use_cache=True, **{cache: getattr(out, cache)})


# --- report ----------------------------------------------------------------------------------------

def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(np.asarray(latencies) * MS, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0",
                        help="'' : the server's in-process history store (a machine without Redis, e.g. a lent GPU)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=256, help="requests per concurrency level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-users", type=int, default=32,
                        help="users per POST /recommend/batch in the batched phase (0: no batched phase)")
    parser.add_argument("--batch-concurrency", type=int, default=4, help="batch requests in flight at once")
    parser.add_argument("--ar-users", type=int, default=32, help="users for the autoregressive baseline")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (server and bare model)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--dtype", default="auto", help="CLLM4REC_DTYPE of the server and of this process's model "
                        "(float32: PyTorch's passes as they are, no format chosen)")
    parser.add_argument("--minimal", action="store_true",
                        help="then bench/minimal_server.py at concurrency 1 beside the same bare passes: the overhead "
                             "ratio of a server with nothing but the model, uvicorn and one Redis read on this "
                             "machine (minimal_server in the JSON)")
    parser.add_argument("--quick", action="store_true", help="a few requests at concurrency 1 and 8: checks it runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args()
    if args.minimal and not args.redis_url:
        parser.error("--minimal reads histories from Redis: give --redis-url")
    out = (lambda *a, **k: None) if args.json else print
    if args.quick:
        args.concurrency, args.requests, args.ar_users = [1, 8], 16, 4
    torch.set_num_threads(args.threads)

    # The model as the server loads it (CLLM4REC_DEVICE at its default, CLLM4REC_DTYPE --dtype): the same
    # device and format, so the in-process figures compare with the HTTP ones.
    served = ServedModel.load(args.checkpoint, Settings(checkpoint=args.checkpoint, device="auto", dtype=args.dtype,
                                                        max_batch_size=args.max_batch_size))
    recommender = served.recommender
    meta = recommender.checkpoint.meta
    split = recommender.checkpoint.split
    users = [u for u, items in enumerate(split.train) if len(items)]
    rng = np.random.default_rng(0)
    chosen = rng.choice(users, args.requests, replace=len(users) < args.requests).tolist()
    histories = [split.train[u].tolist() for u in chosen]
    jobs = [served.job(u, h, h, args.k) for u, h in zip(chosen, histories)]
    prompts = [job.prompt for job in jobs]
    bodies = [{"user_id": recommender.checkpoint.user_ids[u], "k": args.k} for u in chosen]
    out(f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
          f"torch {torch.__version__}, {args.threads} threads; model on {recommender.device} "
          f"({recommender.model.collab_items.weight.dtype})")
    out(f"checkpoint {args.checkpoint}: {meta['backbone']['name']} with {meta['backbone']['layers']} layers, "
          f"{meta['n_users']} users, {meta['n_items']} items; prompts {np.mean([len(p) for p in prompts]):.1f} tokens "
          f"on average; k={args.k}; server max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms")

    port = args.port
    rows, breakdown, bare_beside, batched = [], {}, [], None
    # The server's settings, the minimal server's too: the same threads, and the format this process chose at load,
    # pinned: where two formats time close, each process's own choice could differ (the 4-layer model on an
    # AVX-512 BF16 CPU: bfloat16 here, ONNX Runtime's float32 in the server), and the ratios compare the server
    # with the bare pass in this process.
    server_env = {"CLLM4REC_TORCH_THREADS": str(args.threads), "CLLM4REC_DTYPE": args.dtype,
                  "CLLM4REC_MAX_BATCH_SIZE": str(args.max_batch_size), "CLLM4REC_MAX_WAIT_MS": str(args.max_wait_ms),
                  "CLLM4REC_QUEUE_SIZE": "1024"}
    if args.dtype == "auto":
        server_env["CLLM4REC_BACKBONE_FORMAT"] = served.precision.precision
    with serving(args.checkpoint, port, server_env, args.redis_url):
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, bodies[: min(16, len(bodies))], 1))  # warm the connections and caches
        bare_forward(served, jobs[:4], 1)  # warm-up
        for concurrency in args.concurrency:
            before = server_sums(url)
            if concurrency == 1:
                latencies, wall, bare_beside = asyncio.run(load_beside_bare(url, bodies, served, jobs))
            else:
                latencies, wall = asyncio.run(load(url, bodies, concurrency))
            after = server_sums(url)
            batches = max(after["batch_count"] - before["batch_count"], 1)
            mean_batch = (after["batch_sum"] - before["batch_sum"]) / batches
            rows.append((concurrency, *percentiles(latencies), len(latencies) / wall, mean_batch))
            if concurrency == 1:  # where a lone request's time goes, means per request (ms)
                breakdown = {key: MS * (after[key] - before[key]) / len(latencies) for key in SERVER_TIMES}
                breakdown["client_ms"] = MS * float(np.mean(latencies))
                breakdown["in_server_outside_model_ms"] = breakdown["server_ms"] - breakdown["forward_ms"] \
                    - breakdown["queue_wait_ms"] - breakdown["redis_ms"]
                breakdown["client_and_transport_ms"] = breakdown["client_ms"] - breakdown["server_ms"]
        if args.batch_users:  # 4 x --requests recommendations, --batch-users to a request
            users = [bodies[i % len(bodies)] for i in range(4 * args.requests)]
            batch_bodies = [{"requests": users[start : start + args.batch_users]}
                            for start in range(0, len(users), args.batch_users)]
            latencies, wall = asyncio.run(load(url, batch_bodies, args.batch_concurrency, "/recommend/batch"))
            batched = {"users_per_request": args.batch_users, "concurrency": args.batch_concurrency,
                       "p50_ms": round(percentiles(latencies)[0], 2),
                       "recommendations_per_s": round(len(users) / wall, 1)}
    minimal = None
    if args.minimal:
        with serving(args.checkpoint, port, server_env, args.redis_url, entry=MINIMAL_SERVER_ENTRY):
            asyncio.run(load(url, bodies[: min(16, len(bodies))], 1))
            latencies, _, bare_minimal = asyncio.run(load_beside_bare(url, bodies, served, jobs))
        p50, bare_p50 = percentiles(latencies)[0], percentiles(bare_minimal)[0]
        minimal = {"p50_ms": round(p50, 2), "forward_beside_c1_p50_ms": round(bare_p50, 3),
                   "overhead_ratio": round(p50 / bare_p50, 3)}

    out("\nover HTTP (POST /recommend, history from Redis, micro-batched):")
    out(f"{'concurrency':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'req/s':>8} {'mean batch':>11}")
    for concurrency, p50, p95, p99, rps, mean_batch in rows:
        out(f"{concurrency:>11} {p50:>8.1f} {p95:>8.1f} {p99:>8.1f} {rps:>8.1f} {mean_batch:>11.1f}")
    if batched:
        out(f"POST /recommend/batch, {batched['users_per_request']} users a request, {batched['concurrency']} in "
            f"flight: p50 {batched['p50_ms']:.1f} ms, {batched['recommendations_per_s']:.1f} recommendations/s")

    out("\nbare forward in this process (the same prompts; the server's scoring: forward pass, mask, top-k):")
    out(f"{'batch':>11} {'p50 ms':>8} {'prompts/s':>10}")
    bare = {}
    bare_forward(served, jobs[:4], 1)  # warm-up
    for batch_size in sorted({1} | {c for c in args.concurrency if c > 1}):
        latencies, total = bare_forward(served, jobs, batch_size)
        bare[batch_size] = (percentiles(latencies)[0], len(jobs) / total)
        out(f"{batch_size:>11} {bare[batch_size][0]:>8.1f} {bare[batch_size][1]:>10.1f}")

    n_ar = min(args.ar_users, len(prompts))
    generate_items(recommender, jobs[0].prompt, jobs[0].excluded, args.k)  # warm-up
    ar_latencies, agree = [], 0
    for job in jobs[:n_ar]:
        started = time.perf_counter()
        items = generate_items(recommender, job.prompt, job.excluded, args.k)
        ar_latencies.append(time.perf_counter() - started)
        agree += items[0] == served.score([job])[0][0][0]
    ar_p50 = percentiles(ar_latencies)[0]
    bare_beside_p50 = percentiles(bare_beside)[0] if 1 in args.concurrency else None
    # Decoding runs in PyTorch: where another engine serves the one pass, the ratio compares it with
    # PyTorch's one pass of the same prompts, so that it measures decoding, not the engines.
    one_pass_p50 = bare[1][0]
    if recommender.model.inference_backbone is not None:
        runner, recommender.model.inference_backbone = recommender.model.inference_backbone, None
        bare_forward(served, jobs[:4], 1)  # warm-up
        one_pass_p50 = percentiles(bare_forward(served, jobs[:n_ar], 1)[0])[0]
        recommender.model.inference_backbone = runner
    out(f"\nautoregressive, the same {args.k} items one token at a time (greedy, KV cache), {n_ar} users: "
          f"p50 {ar_p50:.1f} ms per user ({agree}/{n_ar} first items equal the one-pass top-1)")

    out("\nratios:")
    http = {row[0]: row for row in rows}
    if 1 in http:
        out(f"  HTTP p50 at concurrency 1 / bare forward p50 at batch 1, measured side by side: "
            f"{http[1][1] / bare_beside_p50:.2f}x ({http[1][1]:.1f} ms vs {bare_beside_p50:.1f} ms)")
    for concurrency in (c for c in args.concurrency if c > 1):
        out(f"  bare forward prompts/s at batch {concurrency} / HTTP req/s at concurrency {concurrency}: "
              f"{bare[concurrency][1] / http[concurrency][4]:.2f}x")
    if minimal:
        out(f"  the same for bench/minimal_server.py (uvicorn, one Redis read, the model; nothing else): "
            f"{minimal['overhead_ratio']:.2f}x ({minimal['p50_ms']:.1f} ms vs {minimal['forward_beside_c1_p50_ms']:.1f} ms)")
    out(f"  autoregressive p50 / one-pass forward p50 (batch 1, both PyTorch): {ar_p50 / one_pass_p50:.1f}x")
    out(f"load average at the end: {os.getloadavg()[0]:.2f}")

    device = recommender.model.collab_items.weight.device
    compute_dtype = matmul_dtype(recommender)
    mean_tokens = float(np.mean([len(p) for p in prompts]))
    floor, prompt_flops = floor_ms(recommender, mean_tokens, peak_matmul_flops(device, compute_dtype),
                                   peak_matmul_flops(device, torch.float32), read_bandwidth(device))
    result = {
        "device": str(device), "precision": served.precision.precision, "precision_reason": served.precision.reason,
        "threads": args.threads,
        "backbone_layers": meta["backbone"]["layers"], "n_items": meta["n_items"], "k": args.k,
        "mean_prompt_tokens": round(mean_tokens, 1), "prompt_flops": prompt_flops, "floor_ms": round(floor, 3),
        "forward_p50_ms": round(bare[1][0], 3),
        "http": {str(c): {"p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2),
                          "rps": round(rps, 1), "mean_batch": round(mean_batch, 1)}
                 for c, p50, p95, p99, rps, mean_batch in rows},
        "forward_beside_c1_p50_ms": round(bare_beside_p50, 3) if 1 in http else None,
        "overhead_ratio": round(http[1][1] / bare_beside_p50, 3) if 1 in http else None,
        "minimal_server": minimal,
        "batch_endpoint": batched,
        "floor_ratio": round(http[1][1] / floor, 2) if 1 in http else None,
        "forward_floor_ratio": round(bare[1][0] / floor, 2),
        "autoregressive_ratio": round(ar_p50 / one_pass_p50, 2),  # both PyTorch (see above)
        "breakdown_c1_mean_ms": {key: round(value, 3) for key, value in breakdown.items()},
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"floor {floor:.2f} ms per request ({prompt_flops / 1e9:.3f} GFLOP at the measured peak); "
              f"HTTP p50 at concurrency 1 / floor: {result['floor_ratio']}x")


if __name__ == "__main__":
    main()
