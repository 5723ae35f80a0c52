"""Ingestion and retrieval benchmark.

1. Ingestion through the real pipeline (documents_add -> CPU worker parses and chunks -> GPU
   worker embeds through the Ollama stand-in at zero latency -> Milvus Lite): the Python
   documentation topics that ship with CPython (`pydoc_data.topics`, one document per
   topic), then the same topics copied N times as distinct documents. Printed: chunks/s and
   the share of the wall time spent outside the embedding calls.
2. Retrieval on a Milvus Lite collection loaded directly with 10,000 and 100,000 chunks
   (random unit vectors, topic text): p50/p95 latency of dense, BM25 and hybrid (RRF)
   queries, next to a brute-force numpy cosine search over the same vectors (the floor on
   this machine).

Every process is real and started here (Milvus Lite server, Celery workers, and the
stand-in, as Ollama would be), in a temporary folder, on a database of its own. Runs in
about 3 minutes; the 100,000-chunk load stops at --retrieval-budget seconds.

    .venv/bin/python bench/ingest.py [--copies 20] [--sizes 10000,100000] [--queries 50]

Environment: BENCH_REDIS_URL (default redis://127.0.0.1:6379/8; flushed), BENCH_DATABASE_URL
(default: a fresh PostgreSQL database rmassimo_bench_ingest when one answers on
127.0.0.1:5432, dropped at the end; else SQLite in the temporary folder), BENCH_KEEP=1 keeps
the folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DATABASE = "rmassimo_bench_ingest"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stack import drop_database, fresh_database, percentile, start_services  # noqa: E402

from tests.processes import free_port  # noqa: E402


class Bench:
    def __init__(self, *, batch_workers: int, cpu_concurrency: int) -> None:
        self.var = Path(tempfile.mkdtemp(prefix="rmassimo-bench-ingest-"))
        (self.var / "logs").mkdir()
        os.environ.update(
            {
                "DJANGO_SETTINGS_MODULE": "tests.settings",
                "RMASSIMO_VAR_DIR": str(self.var),
                "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/8"),
                "MILVUS_URI": f"http://127.0.0.1:{free_port()}",
                "RMASSIMO_LOG_LEVEL": "WARNING",
                "RMASSIMO_LLM_BACKEND": "ollama",
                # Production mode: no per-query debug bookkeeping in the workers.
                "DJANGO_DEBUG": "false",
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "DJANGO_ALLOWED_HOSTS": "localhost",
            }
        )
        self.own_database = fresh_database(_DATABASE)
        self.processes, self.milvus = start_services(self.var)
        processes = self.processes
        from django.conf import settings

        # The stand-in runs as its own process, as Ollama does, not on this one's threads.
        port = free_port()
        self.stub = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "ollama_stub.py"),
                "--port",
                str(port),
                "--name",
                "gpu0",
                "--embed-dim",
                "768",
                "--chat-model",
                settings.RMASSIMO_CHAT_MODEL,
                "--embed-model",
                settings.RMASSIMO_EMBED_MODEL,
            ],
            stdout=(self.var / "logs" / "stub.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.stub_url = f"http://127.0.0.1:{port}"
        processes.wait_for(
            lambda: processes.port_open("127.0.0.1", port), timeout=30, what="the stand-in"
        )
        self.workers = [
            processes.Worker(
                name="cpu@bench",
                queues=["cpu"],
                ollama_url=self.stub_url,
                concurrency=cpu_concurrency,
                log_dir=self.var / "logs",
                extra_env={"RMASSIMO_LOG_LEVEL": "WARNING"},
            )
        ]
        for i in range(batch_workers):
            self.workers.append(
                processes.Worker(
                    name=f"gpu{i}@bench",
                    queues=["interactive", "batch"],
                    ollama_url=self.stub_url,
                    gpu=f"gpu{i}",
                    log_dir=self.var / "logs",
                    extra_env={"RMASSIMO_LOG_LEVEL": "WARNING"},
                )
            )
        self.database = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.stub.terminate()
        self.stub.wait(30)
        self.milvus.terminate()
        self.milvus.wait(30)
        from django.db import connections

        connections.close_all()
        if self.own_database:
            drop_database(self.own_database)
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(self.var, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(c for child in children for c in _tree(int(child)))]


def cpu_usage(bench: Bench) -> dict[str, float]:
    """CPU seconds used so far by each part of the stack (Linux /proc; 0 elsewhere)."""
    usage = {"this process (adding)": _cpu_seconds(os.getpid())}
    for worker in bench.workers:
        usage[worker.name] = sum(_cpu_seconds(p) for p in _tree(worker.proc.pid))
    usage["stand-in"] = _cpu_seconds(bench.stub.pid)
    usage["milvus-lite"] = _cpu_seconds(bench.milvus.pid)
    return usage


def topics() -> dict[str, str]:
    from pydoc_data.topics import topics as all_topics

    return {name: text for name, text in sorted(all_topics.items()) if text.strip()}


def ingest_run(label: str, slug: str, docs: dict[str, bytes], timeout: float, bench: Bench) -> dict:
    from ingestion import services
    from ingestion.models import IngestionJob

    corpus, _ = services.corpus_get_or_create(slug=slug)
    cpu_before = cpu_usage(bench)
    started = time.monotonic()
    ids = []
    items = [services.NewDocument(source=name, data=data) for name, data in docs.items()]
    # As manage.py ingest adds a folder: in transactions of up to 200 files.
    for i in range(0, len(items), 200):
        for added in services.documents_add(corpus=corpus, documents=items[i : i + 200]):
            ids.append(added.job.pk)
    enqueued = time.monotonic() - started
    deadline = started + timeout
    while True:
        active = IngestionJob.objects.filter(pk__in=ids, status__in=["queued", "running"])
        if not active.exists():
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{label}: jobs still running after {timeout:.0f} s")
        time.sleep(0.1)
    cpu = {k: v - cpu_before[k] for k, v in cpu_usage(bench).items()}
    jobs = list(IngestionJob.objects.filter(pk__in=ids))
    wall = (
        max(j.finished_at for j in jobs).timestamp() - min(j.created_at for j in jobs).timestamp()
    )
    failed = [j for j in jobs if j.status != "done"]
    if failed:
        raise SystemExit(f"{label}: {len(failed)} jobs failed, e.g. {failed[0].error}")
    chunks = sum(j.chunks_total for j in jobs)
    embed = sum(j.embed_seconds for j in jobs)
    prepare = sum(j.prepare_seconds for j in jobs)
    result = {
        "label": label,
        "documents": len(jobs),
        "chunks": chunks,
        "wall": wall,
        "chunks_per_s": chunks / wall,
        "embed_s": embed,
        "outside_share": max(0.0, 1 - embed / wall),
        "prepare_s": prepare,
        "enqueue_s": enqueued,
    }
    print(
        f"  {label:<24} {len(jobs):>5} docs {chunks:>6} chunks  {wall:7.1f} s  "
        f"{chunks / wall:7.0f} chunks/s  embedding calls {embed:6.1f} s  "
        f"outside them {result['outside_share']:.0%}  (prepare, summed over CPU "
        f"processes: {prepare:.1f} s; adding the documents: {enqueued:.1f} s)",
        flush=True,
    )
    if any(cpu.values()):
        print(
            "      CPU seconds: "
            + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())
            + f" (of {wall * (os.cpu_count() or 1):.1f} available)",
            flush=True,
        )
    return result


def retrieval_run(sizes: list[int], queries: int, dim: int, budget: float) -> list[dict]:
    import numpy as np

    from core import vectorstore
    from ingestion import parsing

    rng = np.random.default_rng(7)
    pool = [
        c.text
        for text in topics().values()
        for c in parsing.chunk([parsing.Page(text=text, number=None)])
    ]
    words = sorted({w for text in pool for w in text.split() if w.isalpha() and len(w) > 4})
    corpus_id = 900_000  # a collection of its own, outside any corpus of the run
    vectorstore.drop_corpus(corpus_id)
    loaded = 0
    vectors = np.empty((0, dim), dtype=np.float32)
    results = []
    started = time.monotonic()
    batch = 2000
    for size in sizes:
        load_started = time.monotonic()
        while loaded < size:
            if time.monotonic() - started > budget:
                print(f"  stopped loading at {loaded} chunks: the {budget:.0f} s budget is spent")
                break
            n = min(batch, size - loaded)
            block = rng.standard_normal((n, dim)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            chunks = [
                vectorstore.Chunk(
                    document_id=(loaded + i) // 50,
                    index=(loaded + i) % 50,
                    text=pool[(loaded + i) % len(pool)],
                    title="bench",
                )
                for i in range(n)
            ]
            vectorstore.upsert_chunks(corpus_id, chunks, block.tolist())
            vectors = np.vstack([vectors, block])
            loaded += n
        # As the pipeline does when a corpus' last job is done.
        vectorstore.flush(corpus_id)
        load_s = time.monotonic() - load_started
        if loaded < size:
            size = loaded
        # First searches build the indexes; they are not what a user waits for.
        probe = vectors[0].tolist()
        for mode in ("dense", "bm25", "auto"):
            vectorstore.search(corpus_id, text="import", embedding=probe, top_k=4, mode=mode)
        row = {"size": size, "load_s": load_s}
        for mode, label in (("dense", "dense"), ("bm25", "bm25"), ("auto", "hybrid")):
            times = []
            for q in range(queries):
                text = " ".join(rng.choice(words, 3))
                embedding = vectors[int(rng.integers(len(vectors)))] + 0.05 * rng.standard_normal(
                    dim
                ).astype(np.float32)
                t0 = time.perf_counter()
                hits = vectorstore.search(
                    corpus_id, text=text, embedding=embedding.tolist(), top_k=4, mode=mode
                )
                times.append((time.perf_counter() - t0) * 1000)
                assert hits or q, f"{mode} search found nothing"
            row[label] = (percentile(times, 0.5), percentile(times, 0.95))
        times = []
        for _ in range(queries):
            query = vectors[int(rng.integers(len(vectors)))]
            t0 = time.perf_counter()
            scores = vectors @ query
            top = np.argpartition(-scores, 4)[:4]
            top[np.argsort(-scores[top])]
            times.append((time.perf_counter() - t0) * 1000)
        row["numpy"] = (percentile(times, 0.5), percentile(times, 0.95))
        results.append(row)
        print(
            f"  {size:>7} chunks (loaded in {load_s:5.1f} s)  "
            + "  ".join(
                f"{k} p50 {row[k][0]:6.1f} ms p95 {row[k][1]:6.1f} ms"
                for k in ("dense", "bm25", "hybrid", "numpy")
            ),
            flush=True,
        )
        if size < max(sizes) and loaded < max(sizes) and time.monotonic() - started > budget:
            break
    vectorstore.drop_corpus(corpus_id)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-workers", type=int, default=1)
    parser.add_argument("--cpu-concurrency", type=int, default=2)
    parser.add_argument(
        "--retrieval-budget", type=float, default=360, help="seconds for loading chunks"
    )
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-retrieval", action="store_true")
    args = parser.parse_args()

    overall = time.monotonic()
    bench = Bench(batch_workers=args.batch_workers, cpu_concurrency=args.cpu_concurrency)
    try:
        from django.conf import settings

        print(
            f"machine: {os.cpu_count()} CPUs · database: {bench.database} · Milvus Lite "
            f"server · embedding batch {settings.RMASSIMO_EMBED_BATCH} · chunk "
            f"{settings.RMASSIMO_CHUNK_SIZE} tokens · stand-in at zero latency, 768 dims",
            flush=True,
        )
        if not args.skip_ingest:
            print("Ingestion (real pipeline):", flush=True)
            docs = {f"{name}.txt": text.encode() for name, text in topics().items()}
            ingest_run("pydoc topics x1", "pydoc", docs, timeout=600, bench=bench)
            copies = {
                f"copy{k:02d}/{name}": data
                for k in range(args.copies)
                for name, data in docs.items()
            }
            ingest_run(
                f"pydoc topics x{args.copies}", "pydoc-copies", copies, timeout=900, bench=bench
            )
        if not args.skip_retrieval:
            sizes = [int(s) for s in args.sizes.split(",") if s]
            print(f"Retrieval (top 4, {args.queries} queries per kind, {args.dim} dims):")
            retrieval_run(sizes, args.queries, args.dim, args.retrieval_budget)
    finally:
        bench.close()
    print(f"total {time.monotonic() - overall:.0f} s")


if __name__ == "__main__":
    main()
