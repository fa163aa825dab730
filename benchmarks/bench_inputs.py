"""How the training inputs reach Ray workers at LM1B-full size: the object store against files.

    .venv/bin/python benchmarks/bench_inputs.py [--sentences 30000000]

A synthetic prepared split shaped like full LM1B (30M sentences, lengths drawn from the sample
shard's WordPiece length histogram with [CLS]/[SEP], int32 ids, int64 offsets: what
`TokenizedSplit` stores) goes through what `pipeline/train/ray/inputs.py` does, on a real
two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): `ray.put` on the driver's
node, then `ray.get` by a task on the same node (zero-copy from shared memory) and by a task
pinned to the other node (a copy over the object manager, once per node). The baseline, measured
in the same run, is what workers did before: `np.load` of the saved split from the driver's disk
(page cache warm, so a lower bound for a network filesystem). Reports seconds, GB/s and the ratio
to the baseline for each, plus the bytes each node holds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import lm1b_lines, machine


def synthetic_split(sentences: int, seed: int = 0):
    from pipeline.data.tokenize import TokenizedSplit, tokenize_lines
    from pipeline.model.loading import load_tokenizer

    sample = tokenize_lines(lm1b_lines(5000), load_tokenizer("default"), 64)
    rng = np.random.default_rng(seed)
    lengths = rng.choice(sample.lengths, size=sentences)  # [n], with [CLS]/[SEP]
    offsets = np.zeros(sentences + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = rng.integers(1000, 30522, size=int(offsets[-1]), dtype=np.int32)
    words = np.maximum(lengths - 2, 1).astype(np.int32)
    return TokenizedSplit(ids, offsets, words, np.zeros(sentences, dtype=bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=30_000_000)
    args = parser.parse_args()
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.data.tokenize import TokenizedSplit

    print(machine())
    split = synthetic_split(args.sentences)
    nbytes = split.ids.nbytes + split.offsets.nbytes + split.word_counts.nbytes + split.truncated.nbytes
    gb = nbytes / 1e9
    print(f"synthetic split: {len(split):,} sentences, {len(split.ids):,} tokens, {gb:.2f} GB")

    folder = Path(tempfile.mkdtemp(prefix="bench-inputs-"))
    try:
        split.save(folder)
        TokenizedSplit.load(folder)  # warm the page cache: the baseline's best case
        tick = time.perf_counter()
        loaded = TokenizedSplit.load(folder)
        disk_s = time.perf_counter() - tick
        assert len(loaded) == len(split)
        del loaded
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    store = int(gb * 1e9 * 1.3) + 200 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    other = cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:

        @ray.remote(num_cpus=0)
        def fetch(refs: list) -> tuple[float, int]:
            tick = time.perf_counter()
            value = ray.get(refs[0])
            seconds = time.perf_counter() - tick
            return seconds, len(value)

        tick = time.perf_counter()
        ref = ray.put(split)
        put_s = time.perf_counter() - tick
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        there = NodeAffinitySchedulingStrategy(other.node_id, soft=False)
        local_s, n_local = ray.get(fetch.options(scheduling_strategy=here).remote([ref]))
        remote_s, n_remote = ray.get(fetch.options(scheduling_strategy=there).remote([ref]))
        again_s, _ = ray.get(fetch.options(scheduling_strategy=there).remote([ref]))  # a second worker there
        assert n_local == n_remote == len(split)
    finally:
        ray.shutdown()
        cluster.shutdown()

    def row(name: str, seconds: float) -> str:
        return f"  {name:<44} {seconds:8.3f} s {gb / max(seconds, 1e-9):8.2f} GB/s  {seconds / disk_s:7.2f}x baseline"

    print(f"{len(split):,} sentences ({gb:.2f} GB) per worker start:")
    print(row("baseline: np.load from the driver's disk", disk_s))
    print(row("ray.put on the driver (once per run)", put_s))
    print(row("ray.get, worker on the driver's node", local_s))
    print(row("ray.get, first worker on another node", remote_s))
    print(row("ray.get, second worker on that node", again_s))
    print(f"  each node holds one {gb:.2f} GB copy in its object store, shared by all its workers")


if __name__ == "__main__":
    main()
