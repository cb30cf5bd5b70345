"""PyTorch yardstick: the imagenet256 MaskGIT transformer's decode step and train step on CPU.

An independent PyTorch (torch.nn) model of `maskgit_jax.models.transformer.MaskedTransformer`
with the sizes of `config_lib.base_config()`: 24 post-LayerNorm layers, width 768, 16 heads,
MLP 3072, 257 tokens (class token + 16x16 image tokens), 2025 vocabulary rows (1024 codes,
1000 classes, the mask token last), tied MlmLayer output head; 172,457,193 parameters, as
the Flax model. Same computation order: word + position embedding, LayerNorm (eps 1e-12),
dropout; per layer attention (query scaled by 1/sqrt(head_dim) after its bias), dropout on
the probabilities and on the output, residual, LayerNorm, then Dense-GELU(tanh)-Dense,
dropout, residual, LayerNorm; head Dense-GELU-LayerNorm, logits against the first
`num_logits` rows of the word-embedding table plus a bias, in float32.

It times, on the threads given (`torch.set_num_threads`), at random weights:

- forward: one MaskGIT decode step's transformer call (eval mode, no dropout, inference
  mode), class token then all image tokens masked, logits over the codebook only;
- train: one AdamW step (betas 0.9/0.96, weight decay 0.045 on matrices and embeddings,
  lr 1e-4) on the label-smoothed (0.1) cross-entropy over the masked tokens (half of the 256
  image tokens of each example, chosen at random), dropout 0.1, forward + backward + update;
- each in float32 and in bfloat16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`:
  bf16 matmuls with bf16 outputs and bf16 GELU/softmax; the Flax model keeps matmul outputs,
  GELU and softmax in float32, so it does slightly more elementwise work in bf16 mode);
- each dtype's dense-matmul peak (2048x2048 square matmul) in the same run.

Times are the best of `--repeats` calls after one warm-up. FLOPs count matmuls only (2*M*N*K
each, as `maskgit_jax.training.flops`; train = 3 x forward), and each throughput is also
given as a fraction of the same dtype's peak. It is the yardstick for this project's JAX
speed on the same CPU (`benchmarks/train_speed.py`, `benchmarks/sample_speed.py`); other
scripts call `run(parse_args([...]))`, which returns the seconds and peaks, or take the
`timed_calls` to time them their own way.

  pip install -e .[benchmarks]
  python benchmarks/pytorch_reference.py [--threads 2] [--decode_batch 8] [--train_batch 4] \
      [--dtypes float32 bfloat16] [--repeats 3] [--layers 24]
"""

import argparse
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)
from torch import nn

LAYER_NORM_EPSILON = 1e-12
PEAK_MATMUL_SIZE = 2048
PEAK_REPEATS = 10


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the imagenet256 transformer (`config_lib.base_config()`)."""

    codebook_size: int = 1024
    num_classes: int = 1000
    tokens_per_side: int = 16
    hidden_size: int = 768
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1

    @property
    def vocab_size(self) -> int:
        """Codes, class tokens and the mask token (the last row)."""
        return self.codebook_size + self.num_classes + 1

    @property
    def mask_token_id(self) -> int:
        """The mask token: the last vocabulary row."""
        return self.vocab_size - 1

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per example."""
        return self.tokens_per_side**2

    @property
    def sequence_length(self) -> int:
        """The class token, then the image tokens."""
        return self.num_image_tokens + 1


def _truncated_normal_(tensor: torch.Tensor, stddev: float = 0.02) -> torch.Tensor:
    """BERT's initialiser as the Flax model's: Normal(0, stddev) cut at two deviations."""
    return nn.init.trunc_normal_(tensor, 0.0, stddev, -2 * stddev, 2 * stddev)


def _dense(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    _truncated_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _layer_norm(size: int) -> nn.LayerNorm:
    return nn.LayerNorm(size, eps=LAYER_NORM_EPSILON)


class SelfAttention(nn.Module):
    """Multi-head self-attention, biased q/k/v/out projections; probability dropout is shared
    across the batch (Flax's `broadcast_dims=(0,)`).
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout_rate: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention_dropout_rate = attention_dropout_rate
        self.query = _dense(hidden_size, hidden_size)
        self.key = _dense(hidden_size, hidden_size)
        self.value = _dense(hidden_size, hidden_size)
        self.out = _dense(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query = heads(self.query(x) / math.sqrt(self.head_dim))
        key, value = heads(self.key(x)), heads(self.value(x))
        context = self.core(query, key, value).transpose(1, 2).reshape(batch, length, -1)
        return self.out(context)

    def core(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T) v over heads [B, H, L, D], the probabilities dropped out in training."""
        probs = torch.softmax(query @ key.transpose(-1, -2), dim=-1)
        if self.training and self.attention_dropout_rate > 0:
            keep = 1.0 - self.attention_dropout_rate
            shape = (1, *probs.shape[1:])
            keep_mask = torch.empty(shape, device=probs.device).bernoulli_(keep)
            probs = probs * keep_mask.to(probs.dtype) / keep
        return probs @ value


class TransformerLayer(nn.Module):
    """Post-LayerNorm encoder layer: attention sub-layer, then MLP sub-layer."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.hidden_size
        self.self_attention = SelfAttention(d, config.num_heads, config.attention_dropout_rate)
        self.attention_dropout = nn.Dropout(config.dropout_rate)
        self.attention_output_ln = _layer_norm(d)
        self.intermediate_output = _dense(d, config.mlp_dim)
        self.layer_output = _dense(config.mlp_dim, d)
        self.mlp_dropout = nn.Dropout(config.dropout_rate)
        self.layer_output_ln = _layer_norm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_block(self.attention_block(x))

    def attention_block(self, x: torch.Tensor) -> torch.Tensor:
        """Attention, dropout, residual, LayerNorm."""
        attended = self.attention_dropout(self.self_attention(x))
        return self.attention_output_ln(attended + x)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        """Dense-GELU-Dense, dropout, residual, LayerNorm."""
        h = F.gelu(self.intermediate_output(x), approximate="tanh")
        h = self.mlp_dropout(self.layer_output(h))
        return self.layer_output_ln(h + x)


class MaskedTransformer(nn.Module):
    """ids [B, L] (class token first, mask token = last row) -> float32 logits [B, L, V].

    V is the vocabulary, or `num_logits` (the codebook when decoding and training): only the
    first rows of the tied table enter the output matmul.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.sequence_length, d)
        _truncated_normal_(self.word_embeddings.weight)
        _truncated_normal_(self.position_embeddings.weight)
        self.embeddings_ln = _layer_norm(d)
        self.embeddings_dropout = nn.Dropout(config.dropout_rate)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.mlm_dense = _dense(d, d)
        self.mlm_ln = _layer_norm(d)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, ids: torch.Tensor, num_logits: int | None = None) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        x = self.embeddings_dropout(self.embeddings_ln(x))
        for layer in self.layers:
            x = layer(x)
        x = self.mlm_ln(F.gelu(self.mlm_dense(x), approximate="tanh"))
        rows = num_logits or self.mlm_bias.shape[0]
        logits = F.linear(x, self.word_embeddings.weight[:rows])
        return logits.float() + self.mlm_bias[:rows]


def parameter_count(model: nn.Module) -> int:
    """Number of scalars in the model's parameters."""
    return sum(p.numel() for p in model.parameters())


def forward_flops(config: TransformerConfig, batch_size: int, num_logits: int | None) -> float:
    """Matmul FLOPs (2*M*N*K each) of one forward pass over `batch_size` full sequences."""
    length, d = config.sequence_length, config.hidden_size
    vocab = num_logits or config.vocab_size
    projections = 2 * length * (4 * d * d + 2 * d * config.mlp_dim)
    attention = 2 * 2 * length * length * d  # scores and context
    head = 2 * length * d * (d + vocab)  # mlm_dense and the logits
    return float(batch_size * (config.num_layers * (projections + attention) + head))


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    """No-op for float32; CPU autocast to `dtype` (bf16 matmuls) otherwise."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, dtype))


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: str, size: int = PEAK_MATMUL_SIZE, repeats: int = PEAK_REPEATS) -> float:
    """FLOP/s of a square `size` matmul with `dtype` inputs (bf16 accumulates in fp32)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(getattr(torch, dtype))
    b = torch.randn(size, size, generator=generator).to(getattr(torch, dtype))
    with torch.inference_mode():
        seconds = best_seconds(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


def _decode_inputs(config: TransformerConfig, batch: int) -> torch.Tensor:
    """A first decode step's ids: the class token, then every image token masked."""
    labels = torch.arange(batch) % config.num_classes
    ids = torch.full((batch, config.sequence_length), config.mask_token_id)
    ids[:, 0] = config.codebook_size + labels
    return ids


def _random_mask(batch: int, num_tokens: int, ratio: float) -> torch.Tensor:
    """Bool [B, N] with exactly max(1, round(ratio * N)) uniformly chosen positions a row."""
    num_masked = max(1, round(ratio * num_tokens))
    order = torch.rand(batch, num_tokens).argsort(dim=1)[:, :num_masked]
    return torch.zeros(batch, num_tokens, dtype=torch.bool).scatter_(1, order, True)


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW as the project's: decay on matrices and embeddings (ndim >= 2) only."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.045},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-4,
        betas=(0.9, 0.96),
        eps=1e-8,
    )


def _train_step_fn(
    model: MaskedTransformer,
    optimizer: torch.optim.Optimizer,
    config: TransformerConfig,
    batch: int,
    dtype: str,
) -> Callable[[], float]:
    """One masked-token training step on a fixed batch of random tokens, new mask each call."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(
        config.codebook_size, (batch, config.num_image_tokens), generator=generator
    )
    class_ids = config.codebook_size + torch.randint(
        config.num_classes, (batch, 1), generator=generator
    )

    def step() -> float:
        mask = _random_mask(batch, config.num_image_tokens, 0.5)
        ids = torch.cat([class_ids, torch.where(mask, config.mask_token_id, tokens)], dim=1)
        with autocast(dtype):
            logits = model(ids, num_logits=config.codebook_size)[:, 1:]
            losses = F.cross_entropy(
                logits.reshape(-1, config.codebook_size),
                tokens.reshape(-1),
                reduction="none",
                label_smoothing=0.1,
            )
            weights = mask.reshape(-1).float()
            loss = (losses * weights).sum() / weights.sum().clamp_min(1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of `main`; `parse_args([])` gives the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--decode_batch", type=int, default=8, help="batch of the forward pass")
    parser.add_argument("--train_batch", type=int, default=4, help="batch of the train step")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up")
    parser.add_argument("--layers", type=int, default=24, help="transformer layers")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed_calls(args: argparse.Namespace) -> dict[str, Callable[[], object]]:
    """The timed calls of one model at random weights: `forward_<dtype>` and `train_<dtype>`.

    Each sets the model's mode (eval for the forward, train for the step) itself, so callers
    may time them in any order (`side_by_side.py` alternates them with this project's).
    """
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = TransformerConfig(num_layers=args.layers)
    model = MaskedTransformer(config)
    optimizer = _adamw(model)
    decode_ids = _decode_inputs(config, args.decode_batch)
    calls = {}
    for dtype in args.dtypes:

        def forward(dtype: str = dtype) -> torch.Tensor:
            model.eval()
            with torch.inference_mode(), autocast(dtype):
                return model(decode_ids, num_logits=config.codebook_size)

        step = _train_step_fn(model, optimizer, config, args.train_batch, dtype)

        def train(step: Callable[[], float] = step) -> float:
            model.train()
            return step()

        calls[f"forward_{dtype}"] = forward
        calls[f"train_{dtype}"] = train
    return calls


def run(args: argparse.Namespace) -> dict[str, float]:
    """Times forward and train step per dtype; returns seconds and peaks.

    Keys: `forward_<dtype>` and `train_<dtype>` (best seconds per call) and
    `peak_gflops_<dtype>` (GFLOP/s of the 2048x2048 matmul), for each dtype of `args.dtypes`.
    """
    calls = timed_calls(args)
    results = {}
    for dtype in args.dtypes:
        results[f"peak_gflops_{dtype}"] = matmul_peak(dtype) / 1e9
        for kind in ("forward", "train"):
            results[f"{kind}_{dtype}"] = best_seconds(calls[f"{kind}_{dtype}"], args.repeats)
    return results


def main() -> None:
    """Parses the flags, runs the timings and prints a table."""
    args = parse_args()
    config = TransformerConfig(num_layers=args.layers)
    with torch.device("meta"):
        count = parameter_count(MaskedTransformer(config))
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.layers} layers, "
        f"{count:,} parameters, best of {args.repeats}"
    )
    results = run(args)
    flops = {
        "forward": forward_flops(config, args.decode_batch, config.codebook_size),
        "train": 3 * forward_flops(config, args.train_batch, config.codebook_size),
    }
    batches = {"forward": args.decode_batch, "train": args.train_batch}
    print(f"{'call':<8} {'dtype':<9} {'batch':>5} {'seconds':>9} {'GFLOP/s':>8} {'peak':>6}")
    for dtype in args.dtypes:
        peak = results[f"peak_gflops_{dtype}"]
        for kind in ("forward", "train"):
            seconds = results[f"{kind}_{dtype}"]
            gflops = flops[kind] / seconds / 1e9
            print(
                f"{kind:<8} {dtype:<9} {batches[kind]:>5} {seconds:>9.4f} {gflops:>8.1f} "
                f"{100 * gflops / peak:>5.1f}%"
            )
        print(f"{'matmul':<8} {dtype:<9} {PEAK_MATMUL_SIZE:>5} {'':>9} {peak:>8.1f} (peak)")


if __name__ == "__main__":
    main()
