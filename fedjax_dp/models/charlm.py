"""Next-character language models over integer token sequences.

Both models map int tokens x [batch, T] to logits [batch, T, vocab_size],
where the logits at position t predict token t + 1 and depend only on tokens
0..t (causal), so one forward pass scores every position of a sequence.

`gru_lm` follows the recurrent Shakespeare model of LEAF (Caldas et al.,
2018) and McMahan et al. (2017): an 8-dimensional character embedding, two
recurrent layers of 256 units and a dense softmax layer (GRU cells here in
place of LSTM); `lstm_lm` is the same with LSTM cells, as in Reddi et al.
(2021)'s Shakespeare model. `transformer_lm` is a small decoder-only transformer with
pre-LayerNorm blocks; LayerNorm normalises each position of each example on
its own, so unlike batch norm it keeps examples independent and adds no
state beyond parameters.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.models import flax_model

DEFAULT_SEQ_LEN = 80


class _RecurrentLM(nn.Module):
  """Embedding, stacked unidirectional recurrent layers, dense logits."""

  vocab_size: int
  embed_dim: int
  hidden: int
  num_layers: int
  cell: str  # "gru" or "lstm"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cell = {"gru": nn.GRUCell, "lstm": nn.OptimizedLSTMCell}[self.cell]
    h = nn.Embed(self.vocab_size, self.embed_dim)(x)
    for _ in range(self.num_layers):
      # Zero initial carry; left-to-right scan over the time axis, so the
      # output at t sees only inputs 0..t.
      h = nn.RNN(cell(features=self.hidden))(h)
    return nn.Dense(self.vocab_size)(h)


class _Block(nn.Module):
  """Pre-LayerNorm transformer block with causal self-attention."""

  d_model: int
  num_heads: int

  @nn.compact
  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    a = nn.LayerNorm()(h)
    a = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        qkv_features=self.d_model,
        out_features=self.d_model,
        deterministic=True,
    )(a, a, mask=mask)
    h = h + a
    m = nn.LayerNorm()(h)
    m = nn.Dense(4 * self.d_model)(m)
    m = nn.Dense(self.d_model)(nn.gelu(m))
    return h + m


class _TransformerLM(nn.Module):
  """Token + learned position embeddings, causal blocks, LayerNorm, logits."""

  vocab_size: int
  seq_len: int
  d_model: int
  num_heads: int
  num_layers: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.shape[-1]
    if t > self.seq_len:
      raise ValueError(
          f"sequence length {t} exceeds the model's seq_len {self.seq_len}"
      )
    h = nn.Embed(self.vocab_size, self.d_model)(x)
    pos = self.param(
        "pos_embedding",
        nn.initializers.normal(stddev=0.02),
        (self.seq_len, self.d_model),
    )
    h = h + pos[:t]
    mask = nn.make_causal_mask(x)  # [batch, 1, T, T]; query t sees keys <= t.
    for _ in range(self.num_layers):
      h = _Block(d_model=self.d_model, num_heads=self.num_heads)(h, mask)
    h = nn.LayerNorm()(h)
    return nn.Dense(self.vocab_size)(h)


def _to_model(
    name: str, module: nn.Module, seq_len: int, vocab_size: int
) -> types.Model:
  return flax_model.from_module(
      name, module, jnp.zeros((1, seq_len), jnp.int32),
      (seq_len,), vocab_size)


def gru_lm(
    vocab_size: int,
    embed_dim: int = 8,
    hidden: int = 256,
    num_layers: int = 2,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> types.Model:
  """Builds a causal recurrent (GRU) next-character model.

  Args:
    vocab_size: number of token ids (also `num_classes`).
    embed_dim: character embedding size.
    hidden: units per GRU layer.
    num_layers: number of stacked GRU layers.
    seq_len: sequence length recorded as `input_shape`; the recurrent model
      itself accepts any length.

  Returns:
    A `types.Model` with `input_shape == (seq_len,)`; `apply(params, x)`
    takes integer `x` [batch, T] with ids in [0, vocab_size) and returns
    float32 logits [batch, T, vocab_size].
  """
  module = _RecurrentLM(
      vocab_size=vocab_size,
      embed_dim=embed_dim,
      hidden=hidden,
      num_layers=num_layers,
      cell="gru",
  )
  return _to_model("gru_lm", module, int(seq_len), vocab_size)


def lstm_lm(
    vocab_size: int,
    embed_dim: int = 8,
    hidden: int = 256,
    num_layers: int = 2,
    seq_len: int = DEFAULT_SEQ_LEN,
) -> types.Model:
  """Builds a causal recurrent (LSTM) next-character model: by default the
  Shakespeare model of Reddi et al. (2021) and Andrew et al. (2021), an
  8-dimensional embedding and two LSTM layers of 256 units (about 820,000
  parameters with 90 tokens).

  Args and returns: as `gru_lm`, with LSTM cells.
  """
  module = _RecurrentLM(
      vocab_size=vocab_size,
      embed_dim=embed_dim,
      hidden=hidden,
      num_layers=num_layers,
      cell="lstm",
  )
  return _to_model("lstm_lm", module, int(seq_len), vocab_size)


def transformer_lm(
    vocab_size: int,
    seq_len: int = DEFAULT_SEQ_LEN,
    d_model: int = 64,
    num_heads: int = 4,
    num_layers: int = 2,
) -> types.Model:
  """Builds a causal decoder-only transformer next-character model.

  Args:
    vocab_size: number of token ids (also `num_classes`).
    seq_len: maximum sequence length (size of the learned position table).
    d_model: width of the residual stream; divisible by `num_heads`.
    num_heads: attention heads per block.
    num_layers: number of transformer blocks.

  Returns:
    A `types.Model` with `input_shape == (seq_len,)`; `apply(params, x)`
    takes integer `x` [batch, T], T <= seq_len, with ids in
    [0, vocab_size) and returns float32 logits [batch, T, vocab_size].

  Raises:
    ValueError: if `d_model` is not divisible by `num_heads`.
  """
  if d_model % num_heads:
    raise ValueError(
        f"d_model ({d_model}) must be divisible by num_heads ({num_heads})"
    )
  module = _TransformerLM(
      vocab_size=vocab_size,
      seq_len=int(seq_len),
      d_model=d_model,
      num_heads=num_heads,
      num_layers=num_layers,
  )
  return _to_model("transformer_lm", module, int(seq_len), vocab_size)
