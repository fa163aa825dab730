"""GPU check: a short bf16 training run of a randomly initialised bert-base-sized denoiser.

    bash benchmarks/gpu_check.sh            # all visible GPUs (torchrun), prints tokens/s and MFU
    python benchmarks/gpu_check.py --device cpu --tiny   # a smoke run anywhere
    ... --json PATH                          # also write the numbers (rank 0)

Needs only torch and this repository: the encoder is a plain-torch BERT of bert-base's shape
(12 layers, 768 wide, 12 heads, 3072 FFN, 30522 ids, tied MLM head) and the loss is this
repository's exact diffusion loss (pipeline/diffusion/loss.py, torch only). Data are random
token ids with LM1B-like lengths, so nothing is downloaded. MFU counts 6 x non-embedding params +
6 x hidden x vocab + attention per non-pad token, against a bf16 matmul peak measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import diffusion_loss
from pipeline.diffusion.schedules import build_schedule
from pipeline.tensors import at_positions


class TorchBert(nn.Module):
    """BERT encoder + tied MLM head in plain torch; `forward` has the denoiser signature."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, ffn: int, positions: int = 512) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(positions, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.hidden, self.vocab, self.layers = hidden, vocab, layers

    def forward(self, ids, attention_mask, s, positions):
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.norm(self.words(ids) + self.positions(pos)[None])  # [B, L, d]
        h = self.encoder(h, src_key_padding_mask=~attention_mask.bool())
        h = self.transform(at_positions(h, positions))  # [N, d]
        return h @ self.words.weight.t() + self.bias  # [N, V]

    def flops_per_token(self, seq_len: int) -> float:
        params = sum(p.numel() for p in self.parameters())
        non_embedding = params - self.words.weight.numel() - self.positions.weight.numel()
        return 6 * non_embedding + 6 * self.hidden * self.vocab + 12 * self.layers * seq_len * self.hidden


def matmul_peak(device: torch.device, size: int = 8192) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * size**3 / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(
    batch: int, max_len: int, vocab: int, gen: torch.Generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(8, max_len - 1, (batch,), generator=gen)  # content lengths
    ids = torch.randint(1000, vocab, (batch, max_len), generator=gen)
    pos = torch.arange(max_len)[None, :]
    attn = pos <= lengths[:, None] + 1
    ids[:, 0] = 101
    ids[torch.arange(batch), lengths + 1] = 102
    ids[~attn] = 0
    return ids.to(device), attn.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128, help="per GPU")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model (smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here (rank 0)")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if args.device == "cuda" else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    shape = (30522, 64, 2, 2, 128) if args.tiny else (30522, 768, 12, 12, 3072)
    torch.manual_seed(0)
    model = TorchBert(*shape).to(device)
    wrapped = (
        nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    schedule = build_schedule("linear", 2048)
    special = SpecialIds(mask=103, pad=0, never_masked=(0, 101, 102))
    gen = torch.Generator().manual_seed(rank)
    tokens, seconds = 0, 0.0
    warmup = min(5, args.steps // 3)
    for step in range(args.steps):
        ids, attn = random_batch(args.batch, args.seq_len, 30522, gen, device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = diffusion_loss(wrapped, ids, attn, schedule, special, gen, 0.01)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sync(device)
        if step >= warmup:
            seconds += time.perf_counter() - start
            tokens += int(attn.sum())
    rate = torch.tensor([tokens / seconds], device=device)
    if world > 1:
        dist.all_reduce(rate)
    if rank == 0:
        peak = matmul_peak(device, 8192 if device.type == "cuda" else 256)  # bf16 on a CPU can be slow
        flops = model.flops_per_token(args.seq_len)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"device: {name} x {world}; model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params")
        print(
            f"bf16 training: {float(rate):,.0f} non-pad tokens/s over {world} device(s), last loss {out.loss.item():.3f}"
        )
        print(
            f"MFU: {float(rate) / world * flops / peak:.1%} of the measured bf16 matmul peak "
            f"({peak / 1e12:.1f} TFLOP/s per device; {flops / 1e6:.0f} MFLOP per token)"
        )
        if args.json is not None:
            numbers = {
                "device": name,
                "devices": world,
                "tokens_per_s": float(rate),
                "mfu": float(rate) / world * flops / peak,
                "bf16_peak_tflops": peak / 1e12,
                "mflop_per_token": flops / 1e6,
                "last_loss": out.loss.item(),
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(numbers, indent=1) + "\n")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
