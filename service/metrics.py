"""Every Prometheus metric of the server, defined once. Base units (seconds); labels never carry a
user or item id, so the number of series stays fixed however many users there are.

The Grafana dashboard reads the first five. All live in the process-wide default registry (one
server per process), which also carries the process_* and python_* metrics of prometheus_client.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

# Request latencies on CPU range from milliseconds (tiny models, fallback) to seconds (full
# backbone under load); the same buckets serve the forward pass.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

http_request_duration = Histogram(
    "cllm4rec_http_request_duration_seconds", "HTTP request latency, from the first byte in to the last byte out",
    ["endpoint", "method", "status"], buckets=LATENCY_BUCKETS)
model_forward_duration = Histogram(
    "cllm4rec_model_forward_duration_seconds", "One batched forward pass scoring every item, with masking and top-k",
    buckets=LATENCY_BUCKETS)
batch_queue_wait = Histogram(
    "cllm4rec_batch_queue_wait_seconds", "Time a request waited in the batch queue before its forward pass",
    buckets=LATENCY_BUCKETS)
batch_size = Histogram(
    "cllm4rec_batch_size", "Requests scored together in one forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
requests_in_flight = Gauge(
    "cllm4rec_requests_in_flight", "HTTP requests being handled now")

redis_operation_duration = Histogram(
    "cllm4rec_redis_operation_duration_seconds", "Latency of one history store call to Redis (failed calls included)",
    ["operation"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
errors = Counter(
    "cllm4rec_errors_total", "Requests answered with an error, by kind: unauthorized (401), forbidden (403), "
    "too_large (413), unknown_item (404), item_exists (409), validation (422), overloaded (503, queue full), history_store (503, "
    "Redis unreachable), "
    "timeout (504), reload_failed (400), internal (500)", ["kind"])
cold_start = Counter(
    "cllm4rec_cold_start_total", "Recommendations for users the model has no token for (history-only prompt or "
    "fallback)")
fallback = Counter(
    "cllm4rec_fallback_total", "Recommendations answered by most-popular because there was nothing to prompt with")
model_info = Info(
    "cllm4rec_model", "The served checkpoint (labels: model_version, backbone, backbone_layers, n_items, n_users, "
    "precision: the backbone's weights, float32 or bfloat16)")
reloads = Counter(
    "cllm4rec_reloads_total", "Checkpoint reloads (POST /admin/reload, SIGHUP), by result: ok, failed (the previous "
    "model kept serving)", ["result"])
history_store_up = Gauge(
    "cllm4rec_history_store_up", "1 when the history store answered its last ping (each /readyz and seeding "
    "check), else 0; the replica stays ready either way")
batcher_alive = Gauge(
    "cllm4rec_batcher_alive", "1 while the forward-pass worker runs; 0 once it has died (the process then exits)")
retired_items = Gauge(
    "cllm4rec_retired_items", "Items retired from recommendations (DELETE or PATCH /items/{item_id}), as last read")
live_items = Gauge(
    "cllm4rec_live_items", "Items added from their text while serving (POST /items), as last read")
