"""The main job: train a small causal language model with and without the retrieval block.

The corpus is Python's own documentation (the ``pydoc_data`` topics that ship with every
CPython, about 470 KB), read as bytes: no download, no tokenizer. The runs share the seed, the
data order, the base model's initial weights and the number of steps; the second adds Engram's
conditional memory at the chosen layers: hashed 2- and 3-gram embeddings (``NgramHashEmbedding``)
let into the residual stream through the fused gate (``RetrievalAttention``), as the official
demo's ``TransformerBlock`` does (``hidden = engram(hidden, ids) + hidden`` before attention).
The third is plain again, widened until a step takes as long as the second's: does the memory beat
spending the same compute on a bigger model?

It prints loss and tokens/s with a progress bar, continues "Harry Potter dropped his" with each
model through the decode path (keys and values, n-gram history and convolution state carried, a
byte per call), and writes the loss curves (``loss.png``), the gate per token and branch on a few
sentences (``gates.png``) and the figures (``summary.json``).

    PYTHONPATH=torch_ext python examples/train_lm.py            (or: make demo)
    ... --device cuda --size small --steps 2000 --out build/demo
    ... --nproc 2                 (or: torchrun --nproc-per-node 2 examples/train_lm.py)

With ``--nproc N`` (or under ``torchrun``) N processes train on the same global batch, each on its
share: the n-gram tables' rows are sharded over them (``NgramHashEmbedding(process_group=...)``)
and the rest of the model is replicated under DDP; gloo on CPU, NCCL on GPUs. The losses are those
of one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from retrieval_attention import NgramHashEmbedding, RetrievalAttention

VOCAB = 256  # bytes
PROMPT = "Harry Potter dropped his"
SAMPLE_BYTES = 60  # greedy continuation through the decode path, after training
CALIBRATION_STEPS = 12  # timed steps per candidate width of the matched run
WIDTH_STEP = 32  # a multiple of every size's heads
MAX_WIDTH_FACTOR = 4
SENTENCES = [
    "Harry Potter dropped his wand",
    'The simple form, "assert expression", is equivalent to',
    "for i in range(10):",
    "Raises a TypeError if the argument is not an integer.",
]


@dataclass
class Config:
    dim: int = 128
    layers: int = 2
    heads: int = 4
    seq: int = 128
    batch: int = 16
    lr: float = 3e-3
    branches: int = 2  # the block's G: Engram's hyper-connection branches, mocked as copies of the stream
    ngram_vocab: tuple[int, ...] = (5000, 30000)  # rows per head of the 2-gram and 3-gram tables
    ngram_heads: int = 4
    ngram_dim: int = 64  # embedding size per n-gram order (split over the heads)
    memory_lr_scale: float = 5.0  # the tables learn faster, as in the Engram paper


SIZES = {
    "tiny": Config(),
    "small": Config(dim=256, layers=4, heads=8, seq=256, batch=16, lr=2e-3, ngram_dim=128),
}


class Engram(nn.Module):
    """Hashed n-gram memory and the gate that lets it in: the demo's ``Engram`` on a plain stream."""

    def __init__(self, cfg: Config, layer_id: int, seed: int) -> None:
        super().__init__()
        self.branches = cfg.branches
        self.memory = NgramHashEmbedding.from_seed(
            cfg.ngram_vocab,
            cfg.ngram_heads,
            cfg.ngram_dim,
            token_vocab_size=VOCAB,
            seed=seed,
            layer_id=layer_id,
            sparse=True,
        )
        nn.init.normal_(self.memory.embedding.weight, std=0.02)
        self.block = RetrievalAttention(cfg.dim, self.memory.embed_size, cfg.branches)

    def new_cache(self, batch_size: int, device: torch.device) -> dict:
        """Decoding state: the ids before the next ones (pad_id at the start) and the convolution's state."""
        history = torch.full((batch_size, self.memory.max_n - 1), self.memory.pad_id, device=device)
        return {"history": history, "conv": self.block.new_conv_state(batch_size)}

    def forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, cache: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Every branch reads the one stream (the demo's mock hyper-connections); their outputs add up.
        h = hidden.unsqueeze(2).expand(-1, -1, self.branches, -1)
        if cache is None:
            y, a = self.block(h, self.memory(ids), return_gate=True)
        else:  # the decode path: n-grams reach into the history, the convolution into its state
            e = self.memory(ids, history=cache["history"])
            y, a = self.block(h, e, return_gate=True, conv_state=cache["conv"])
            cache["history"] = torch.cat([cache["history"], ids], dim=1)[:, ids.shape[1] :]
        return y.sum(2), a


class Layer(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(), nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # keys and values of the earlier tokens: a prompt, then one token per call
            if "k" in cache:
                assert T == 1, "after the prompt, decode one token per call"
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        att = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2])
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: Config, engram_layers: tuple[int, ...], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the base model starts from the same weights with or without memory
        self.tok = nn.Embedding(VOCAB, cfg.dim)
        self.pos = nn.Embedding(cfg.seq, cfg.dim)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim)
        for table in (self.tok, self.pos):  # small, as GPT-2: the output layer is tied to tok
            nn.init.normal_(table.weight, std=0.02)
        torch.manual_seed(seed + 1)
        self.engrams = nn.ModuleDict({str(i): Engram(cfg, i, seed) for i in engram_layers})

    def new_cache(self, batch_size: int) -> dict:
        """What decoding carries from call to call: the position, each layer's keys and values, each Engram's state."""
        device = self.tok.weight.device
        engrams = {i: engram.new_cache(batch_size, device) for i, engram in self.engrams.items()}
        return {"pos": 0, "layers": [{} for _ in self.layers], "engrams": engrams}

    def forward(self, ids: torch.Tensor, cache: dict | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        start = 0 if cache is None else cache["pos"]
        x = self.tok(ids) + self.pos.weight[start : start + ids.shape[1]]
        gates = {}
        for i, layer in enumerate(self.layers):
            if str(i) in self.engrams:
                y, gates[i] = self.engrams[str(i)](x, ids, None if cache is None else cache["engrams"][str(i)])
                x = x + y
            x = layer(x, None if cache is None else cache["layers"][i])
        if cache is not None:
            cache["pos"] += ids.shape[1]
        return F.linear(self.norm(x), self.tok.weight), gates  # tied output embedding


@torch.no_grad()
def generate(model: TinyLM, prompt: str, steps: int, device: str) -> tuple[str, float]:
    """Greedy continuation of ``prompt`` through the decode path: the prompt in one call, then a byte per call.

    Returns the text and the decode rate in bytes per second (the prompt's call not counted).
    """
    model.eval()
    cache = model.new_cache(1)
    ids = torch.tensor([list(prompt.encode())], device=device)
    logits = model(ids, cache)[0]
    out, start = [], time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = model(nxt, cache)[0]
    rate = steps / (time.perf_counter() - start)
    model.train()
    return prompt + bytes(out).decode(errors="replace"), rate


def load_corpus() -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).long()


def batches(data: torch.Tensor, cfg: Config, generator: torch.Generator, device: str):
    while True:
        start = torch.randint(len(data) - cfg.seq - 1, (cfg.batch,), generator=generator)
        chunk = torch.stack([data[s : s + cfg.seq + 1] for s in start.tolist()]).to(device)
        yield chunk[:, :-1], chunk[:, 1:]


def progress(label: str, step: int, steps: int, loss: float, tok_s: float) -> None:
    width = 30
    filled = width * step // steps
    bar = "#" * filled + "." * (width - filled)
    line = f"{label:>9} [{bar}] {step:>5}/{steps} loss {loss:.3f} {tok_s / 1e3:6.1f}k tok/s"
    if sys.stdout.isatty():
        print("\r" + line, end="\n" if step == steps else "", flush=True)
    elif step == steps or step % max(1, steps // 10) == 0:
        print(line, flush=True)


@torch.no_grad()
def evaluate(model: TinyLM, val: torch.Tensor, cfg: Config, device: str) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    data = batches(val, cfg, gen, device)
    losses = [F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten()).item() for x, y in (next(data) for _ in range(8))]
    model.train()
    return sum(losses) / len(losses)


def shard_tables(model: TinyLM) -> None:
    """Each Engram's table, built whole as one process does, sharded by rows over the ranks (each keeps its rows)."""
    for engram in model.engrams.values():
        whole = engram.memory
        engram.memory = NgramHashEmbedding(
            whole.multipliers,
            whole.primes,
            whole.embed_dim_per_ngram,
            pad_id=whole.pad_id,
            sparse=True,
            device=whole.embedding.weight.device,
            process_group=dist.group.WORLD,
        )
        engram.memory.load_state_dict(whole.state_dict())


def train(
    label: str, cfg: Config, engram_layers: tuple[int, ...], args: argparse.Namespace, data, show: bool = True
) -> dict:
    train_data, val_data = data
    model = TinyLM(cfg, engram_layers, args.seed).to(args.device)
    params = sum(p.numel() for p in model.parameters())  # whole tables, before any sharding
    forward = model
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if world > 1:
        shard_tables(model)
        from torch.nn.parallel import DistributedDataParallel

        # The tables are sharded, not replicated: DDP leaves them to the exchange.
        tables = [n for n, _ in model.named_parameters() if n.endswith("memory.embedding.weight")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, tables)
        forward = DistributedDataParallel(model)
    # The n-gram tables get sparse gradients: each step touches a few thousand of their rows.
    tables = [p for n, p in model.named_parameters() if n.endswith("memory.embedding.weight")]
    dense = [(n, p) for n, p in model.named_parameters() if not n.endswith("memory.embedding.weight")]
    decay = [p for n, p in dense if p.dim() >= 2 and n not in ("tok.weight", "pos.weight")]
    rest = [p for n, p in dense if not (p.dim() >= 2 and n not in ("tok.weight", "pos.weight"))]
    opts = [torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest}], lr=cfg.lr, weight_decay=0)]
    if tables:
        opts.append(torch.optim.SparseAdam(tables, lr=cfg.lr * cfg.memory_lr_scale))
    warmup = max(1, args.steps // 20)

    def schedule(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))

    scheds = [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in opts]
    stream = batches(train_data, cfg, torch.Generator().manual_seed(args.seed), args.device)
    history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
    tokens, elapsed = 0, 0.0
    for step in range(1, args.steps + 1):
        x, y = (t.chunk(world)[rank] for t in next(stream))  # this rank's share of the global batch
        start = time.perf_counter()
        loss = F.cross_entropy(forward(x)[0].flatten(0, 1), y.flatten())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt, sched in zip(opts, scheds, strict=True):
            opt.step()
            sched.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        tokens += x.numel() * world
        if world > 1:  # the global batch's loss: the mean of the ranks' equal shares
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        history["step"].append(step)
        history["loss"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, val_data, cfg, args.device))
        if rank == 0 and show:
            progress(label, step, args.steps, loss.item(), tokens / elapsed)
    tail = history["loss"][-max(1, args.steps // 10) :]
    return {
        "model": model,
        "history": history,
        "train_loss": sum(tail) / len(tail),
        "val_loss": history["val_loss"][-1],
        "tokens_per_s": tokens / elapsed,
        "params": params,
    }


def matched_width(cfg: Config, engram_layers: tuple[int, ...], args: argparse.Namespace, data) -> int:
    """The plain model's width whose training step takes as long as the Engram model's.

    Each candidate trains CALIBRATION_STEPS steps, timed as the runs are; widths grow by WIDTH_STEP
    until a step outlasts the Engram model's, and the closest wins.
    """
    short = argparse.Namespace(**{**vars(args), "steps": CALIBRATION_STEPS, "eval_every": CALIBRATION_STEPS})

    def seconds_per_step(c: Config, layers: tuple[int, ...]) -> float:
        return c.batch * c.seq / train("calibrate", c, layers, short, data, show=False)["tokens_per_s"]

    target = seconds_per_step(cfg, engram_layers)
    best = (cfg.dim, seconds_per_step(cfg, ()))
    for dim in range(cfg.dim + WIDTH_STEP, MAX_WIDTH_FACTOR * cfg.dim + 1, WIDTH_STEP):
        t = seconds_per_step(replace(cfg, dim=dim), ())
        if abs(t - target) < abs(best[1] - target):
            best = (dim, t)
        if t > target:
            break
    return best[0]


def plot_losses(runs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (label, run), color in zip(runs.items(), ("tab:gray", "tab:blue", "tab:orange"), strict=False):
        h = run["history"]
        window = max(1, len(h["loss"]) // 50)
        smooth = torch.tensor(h["loss"]).unfold(0, window, 1).mean(1).tolist()
        ax.plot(h["step"][window - 1 :], smooth, color=color, label=f"{label}: train (mean of {window})")
        ax.plot(h["val_step"], h["val_loss"], "o--", color=color, label=f"{label}: validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title("Byte-level LM on Python's documentation: with and without the retrieval block")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def gate_values(model: TinyLM, device: str) -> dict[str, list]:
    """The gate ``a`` [T][G] at the first Engram layer, per sentence of SENTENCES."""
    model.eval()
    layer = min(int(i) for i in model.engrams)
    found = {}
    for sentence in SENTENCES:
        ids = torch.tensor([list(sentence.encode())], device=device)
        found[sentence] = model(ids)[1][layer][0].float().cpu().tolist()
    model.train()
    return found


def plot_gates(gates: dict[str, list], model: TinyLM, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = min(int(i) for i in model.engrams)
    fig, axes = plt.subplots(len(gates), 1, figsize=(14, 1.2 + 1.1 * len(gates)), squeeze=False)
    for ax, (sentence, values) in zip(axes[:, 0], gates.items(), strict=True):
        a = torch.tensor(values)  # [T, G]
        image = ax.imshow(a.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(sentence)), list(sentence), fontsize=8, family="monospace")
        ax.set_yticks(range(a.shape[1]), [f"branch {g}" for g in range(a.shape[1])], fontsize=8)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="gate a", shrink=0.8)
    fig.suptitle(f"Gate per byte and branch at layer {layer} (bright: the 2- and 3-gram memory is let in)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--engram-layers", default="1", help="comma-separated layers that get the block")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--nproc", type=int, default=1, help="processes: the tables sharded, the rest under DDP")
    parser.add_argument("--no-matched", action="store_true", help="skip the plain model widened to the same step time")
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    args = parser.parse_args()
    cfg = SIZES[args.size]
    engram_layers = tuple(int(i) for i in args.engram_layers.split(","))
    if not all(0 <= i < cfg.layers for i in engram_layers):
        parser.error(f"--engram-layers must lie in 0..{cfg.layers - 1}, got {args.engram_layers}")
    if args.nproc < 1 or cfg.batch % args.nproc:
        parser.error(f"--nproc must divide the global batch {cfg.batch}, got {args.nproc}")
    args.out.mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:  # under torchrun
        run_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
    elif args.nproc > 1:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            store = f"file://{tmp}/store"
            mp.start_processes(run_rank, args=(args.nproc, store, args), nprocs=args.nproc, start_method="spawn")
    else:
        run(args)


def run_rank(rank: int, world: int, init_method: str, args: argparse.Namespace) -> None:
    """One of ``world`` processes: gloo on CPU, NCCL on GPUs (one per process)."""
    backend = "gloo"
    if args.device.startswith("cuda"):
        backend = "nccl"
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    elif not args.threads:
        args.threads = max(1, (os.cpu_count() or 1) // world)  # the cores shared among the processes
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    try:
        run(args)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SIZES[args.size]
    engram_layers = tuple(int(i) for i in args.engram_layers.split(","))
    lead = not dist.is_initialized() or dist.get_rank() == 0
    say = print if lead else (lambda *a, **k: None)
    world = dist.get_world_size() if dist.is_initialized() else 1
    data = load_corpus()
    split = int(0.95 * len(data))
    data = (data[:split], data[split:])
    say(f"corpus: {len(data[0]) + len(data[1]):,} bytes of pydoc_data topics; {args.size} model {asdict(cfg)}")
    say(
        f"{args.steps} steps of {cfg.batch}x{cfg.seq} tokens on {args.device}, {torch.get_num_threads()} threads"
        + (f" in each of {world} processes (tables sharded, the rest under DDP)" if world > 1 else "")
    )
    begin = time.perf_counter()
    runs = {
        "baseline": train("baseline", cfg, (), args, data),
        "engram": train("engram", cfg, engram_layers, args, data),
    }
    if world == 1 and not args.no_matched:  # widths timed on several ranks could differ, and DDP needs one model
        width = matched_width(cfg, engram_layers, args, data)
        say(f"a plain model {width} wide trains a step in the Engram model's time (it is {cfg.dim} wide)")
        runs["matched"] = train("matched", replace(cfg, dim=width), (), args, data)
    gates = gate_values(runs["engram"]["model"], args.device)  # every rank: the lookups exchange rows
    samples = {label: generate(run_["model"], PROMPT, SAMPLE_BYTES, args.device) for label, run_ in runs.items()}
    if not lead:
        return
    base, mem = runs["baseline"], runs["engram"]
    print(f"\n{'run':<10}{'params':>12}{'train loss':>12}{'val loss':>10}{'tokens/s':>12}")
    for label, run_ in runs.items():
        print(
            f"{label:<10}{run_['params']:>12,}{run_['train_loss']:>12.4f}{run_['val_loss']:>10.4f}"
            f"{run_['tokens_per_s']:>12,.0f}"
        )
    delta = base["val_loss"] - mem["val_loss"]
    verdict = "helps" if delta > 0 else "does not help"
    print(f"the block {verdict}: validation loss {base['val_loss']:.4f} -> {mem['val_loss']:.4f} ({delta:+.4f} nats)")
    if "matched" in runs:
        wide = runs["matched"]
        better = "beats" if mem["val_loss"] < wide["val_loss"] else "does not beat"
        print(
            f"the memory {better} the same step time spent on width: validation loss {wide['val_loss']:.4f} "
            f"(plain, {wide['params']:,} parameters) against {mem['val_loss']:.4f}"
        )
    for label, (text, rate) in samples.items():
        print(f"{label:<10} {rate:>8,.0f} bytes/s decoding: {text!r}")
    plot_losses(runs, args.out / "loss.png")
    plot_gates(gates, mem["model"], args.out / "gates.png")
    summary = {
        "config": asdict(cfg),
        "steps": args.steps,
        "device": args.device,
        "nproc": world,
        "engram_layers": engram_layers,
        "runs": {k: {m: v[m] for m in ("params", "train_loss", "val_loss", "tokens_per_s")} for k, v in runs.items()},
        "losses": {k: v["history"]["loss"] for k, v in runs.items()},
        "gates": gates,
        "samples": {k: {"text": text, "decode_bytes_per_s": rate} for k, (text, rate) in samples.items()},
        "seconds": time.perf_counter() - begin,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'loss.png'}, {args.out / 'gates.png'}, {args.out / 'summary.json'}")
    print(f"total {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
