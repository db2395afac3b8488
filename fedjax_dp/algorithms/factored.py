"""DP-FedAvg rounds that exploit what the cohort's clients share.

`dp_fedavg.build_round` trains every client with its own copy of the weights.
On XLA:CPU that is the slow case: the per-client products are small and
memory-bound (see docs/benchmarks.md). This module computes *the same round*
with large shared products instead.

`build_factored_round` -- dense models (the 2NN MLP, logistic regression)
under plain client SGD. All clients start a round from the same global weights
W, and after t local SGD steps a dense layer's weights are

    W_c(t) = W - lr * sum_{s<t} A_{c,s}^T G_{c,s}

where A_{c,s} [batch, in] are the layer's inputs and G_{c,s} [batch, out] the
loss gradients w.r.t. its outputs at step s (the bias is the same with a
column of ones appended to A). So for client c at step t:

  * forward   A_t W_c(t)   = A_t W   - lr * sum_s (A_t A_s^T) G_s
  * backward  G_t W_c(t)^T = G_t W^T - lr * sum_s (G_t G_s^T) A_s

i.e. one large product with the *shared* W over every client of a chunk at
once, plus corrections through [batch, batch] Gram blocks, which are tiny.
The client's delta is -lr A_c^T G_c (A_c, G_c: the factors of all its steps
stacked), never materialised:

  * its squared Frobenius norm is lr^2 * sum((A_c A_c^T + 1) * (G_c G_c^T)),
    from two [steps*batch]^2 Gram matrices per layer;
  * the clipped sum over clients is -lr [A_1; ...; A_n]^T [s_1 G_1; ...;
    s_n G_n] with s_c the client's clip scale: one large product of stacked,
    scaled factors (and a column sum for the bias).

Clients are processed in chunks (scanned over), so working memory depends on
the chunk, not on the cohort. Sums, Gram matrices and noise are float32.

Everything else -- noise, the public denominator, the server step, metrics --
is the same code path as `dp_fedavg.build_round`, and `round_fn` has the same
signature, inputs and outputs; tests/test_factored.py checks the two agree.

Privacy: identical to `dp_fedavg.build_round` (same clip bound, same noise,
same sum of the valid clients' clipped updates; padded clients and clients
whose update is NaN or Inf are selected away with `jnp.where`, and whether a
client is dropped depends only on its own data; audit canaries replace a
slot's update by norm * direction, as there). Only the arithmetic that
produces each client's delta and its norm is reorganised; the norm used for
clipping is the Frobenius norm of the delta up to float32 rounding, as in the
reference.

Convolutional models are not covered: a convolution's weights after a local
step are not a low-rank update of shared weights in a useful sense (rank up
to steps * batch * output pixels), and on XLA:CPU the bottleneck of the CNN
round is elsewhere (see docs/benchmarks.md: a convolution's weight gradient
inside a loop construct runs ~65x slower than unrolled).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp import types
from fedjax_dp.algorithms import dp_fedavg

# Models built only of flatten -> (dense -> ReLU)* -> dense.
DENSE_MODELS = ("mlp_2nn", "2nn", "logistic")

# Rows (clients x local steps x batch) per chunk when not given: large enough
# for efficient shared products, small enough that the chunk's activations and
# factors stay in cache-friendly tens of MiB. On the 2-core CI machine 100
# clients (2,000 rows) of workload A beat 200 and 400 by 10-25% in CPU time.
_TARGET_ROWS_PER_CHUNK = 2048


def supports(model_name: str, client_optimizer: str = "sgd",
             momentum: float | None = 0.0) -> bool:
  """Whether `build_factored_round` computes this configuration's round.

  Only model and client optimizer are checked here. The factored round
  covers whole-update clipping (fixed or adaptive) on one device: callers
  must not use it where they would pass `dp_fedavg.build_round` a `mesh` or
  `per_layer_clipping`.
  """
  return (model_name in DENSE_MODELS and client_optimizer == "sgd"
          and not momentum)


def _check_plain_sgd(client_optimizer_fn: client_lib.ClientOptimizerFn):
  """Raises unless the client optimizer is stateless `p - lr * g`."""
  lr = 0.5
  opt = client_optimizer_fn(jnp.float32(lr))
  probe = {"w": jnp.array([1.0, -2.0, 3.0], jnp.float32)}
  state = opt.init(probe)
  if jax.tree_util.tree_leaves(state):
    raise ValueError("factored rounds need plain client SGD (no optimizer "
                     "state such as momentum or Adam moments)")
  updates, _ = opt.update(probe, state, probe)
  if not bool(jnp.allclose(updates["w"], -lr * probe["w"])):
    raise ValueError("factored rounds need plain client SGD: update must be "
                     "-learning_rate * gradient")


def dense_layer_names(params: types.Params) -> list[str]:
  """The params' dense layers in forward order ("Dense_0", "Dense_1", ...).

  Raises:
    ValueError: if the tree is not a stack of flax `Dense` layers.
  """
  names = list(params.keys())
  if not names or not all(n.startswith("Dense_") for n in names):
    raise ValueError(f"expected only Dense_i layers, got {names}")
  names.sort(key=lambda n: int(n.split("_")[1]))
  prev = None
  for n in names:
    layer = params[n]
    if set(layer.keys()) != {"kernel", "bias"} or layer["kernel"].ndim != 2:
      raise ValueError(f"layer {n} is not a dense kernel + bias")
    if prev is not None and prev != layer["kernel"].shape[0]:
      raise ValueError(f"layer {n}: input width {layer['kernel'].shape[0]} "
                       f"does not match the previous output width {prev}")
    prev = layer["kernel"].shape[1]
  return names


def _bdot(a, b):
  """[K, m, d] x [K, n, d] -> [K, m, n] (per-client a @ b^T)."""
  return jnp.einsum("kmd,knd->kmn", a, b, preferred_element_type=jnp.float32)


def _bmm(a, b):
  """[K, m, n] x [K, n, e] -> [K, m, e]."""
  return jnp.einsum("kmn,kne->kme", a, b, preferred_element_type=jnp.float32)


def _shared(a, w):
  """[K, m, d] x [d, e] -> [K, m, e] as one [K*m, d] x [d, e] product."""
  k, m, d = a.shape
  return jnp.dot(a.reshape(k * m, d), w,
                 preferred_element_type=jnp.float32).reshape(k, m, -1)


def _factored_chunk(kernels, biases, x, y, m, lr):
  """Local training of a chunk of clients, in factored form.

  Args:
    kernels, biases: the global dense weights, forward order.
    x: float32 [K, T, B, d0] flattened inputs.
    y: int [K, T, B] labels.
    m: bool [K, T, B] example mask.
    lr: client learning rate.

  Returns:
    (A, G, norm, loss): per layer the stacked factors A [K, T*B, in] and G
    [K, T*B, out] with delta_kernel = -lr A^T G, delta_bias = -lr 1^T G;
    the delta's L2 norm [K]; the client's mean step loss [K].
  """
  num_layers = len(kernels)
  k_, t_, b_ = m.shape
  mf = m.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mf, axis=2), 1.0)  # [K, T]
  num_classes = kernels[-1].shape[1]
  # Layer 0 sees the raw inputs: one product with the shared kernel for all
  # steps, and one Gram matrix that serves both corrections and the norm.
  x_rows = x.reshape(k_, t_ * b_, -1)
  first_pre = _shared(x_rows, kernels[0]) + biases[0]  # [K, T*B, d1]
  # [K, T*B, T*B]. XLA:CPU runs this batched Gram faster with the long axis
  # in the middle, the transposition included (measured).
  xt = jnp.swapaxes(x_rows, 1, 2)
  first_gram = jnp.einsum("kdm,kdn->kmn", xt, xt,
                          preferred_element_type=jnp.float32) + 1.0

  inputs = [[None] * t_ for _ in range(num_layers)]  # A[l][t]: [K, B, in]
  grads = [[None] * t_ for _ in range(num_layers)]  # G[l][t]: [K, B, out]
  step_losses = []
  for t in range(t_):
    rows = slice(t * b_, (t + 1) * b_)
    prev = slice(0, t * b_)
    pre = []
    h = None
    for l in range(num_layers):
      if l == 0:
        inputs[0][t] = x_rows[:, rows]
        z = first_pre[:, rows]
        if t:
          z = z - lr * _bmm(first_gram[:, rows, prev],
                            jnp.concatenate(grads[0][:t], axis=1))
      else:
        inputs[l][t] = h
        z = _shared(h, kernels[l]) + biases[l]
        if t:
          a_prev = jnp.concatenate(inputs[l][:t], axis=1)
          g_prev = jnp.concatenate(grads[l][:t], axis=1)
          z = z - lr * _bmm(_bdot(h, a_prev) + 1.0, g_prev)
      pre.append(z)
      h = jax.nn.relu(z) if l < num_layers - 1 else z
    logits = h
    labels = y[:, t]
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    weight = mf[:, t] / count[:, t][:, None]  # [K, B]
    step_loss = jnp.sum((log_norm - label_logit) * weight, axis=1)
    active = jnp.any(m[:, t], axis=1)
    step_losses.append((step_loss * active, active))
    g = (jnp.exp(logits - log_norm[..., None])
         - jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
    g = g * weight[..., None]
    for l in reversed(range(num_layers)):
      grads[l][t] = g
      if l == 0:
        break
      dh = _shared(g, kernels[l].T)
      if t:
        a_prev = jnp.concatenate(inputs[l][:t], axis=1)
        g_prev = jnp.concatenate(grads[l][:t], axis=1)
        dh = dh - lr * _bmm(_bdot(g, g_prev), a_prev)
      g = jnp.where(pre[l - 1] > 0, dh, 0.0)

  factors_a, factors_g = [], []
  norm_sq = jnp.zeros((k_,), jnp.float32)
  for l in range(num_layers):
    a = x_rows if l == 0 else jnp.concatenate(inputs[l], axis=1)
    g = jnp.concatenate(grads[l], axis=1)
    gram_a = first_gram if l == 0 else _bdot(a, a) + 1.0
    norm_sq = norm_sq + jnp.sum(gram_a * _bdot(g, g), axis=(1, 2))
    factors_a.append(a)
    factors_g.append(g)
  norm = jnp.abs(lr) * jnp.sqrt(jnp.maximum(norm_sq, 0.0))
  losses = jnp.stack([s for s, _ in step_losses], axis=1)
  num_active = jnp.sum(
      jnp.stack([a for _, a in step_losses], axis=1).astype(jnp.float32),
      axis=1)
  loss = jnp.sum(losses, axis=1) / jnp.maximum(num_active, 1.0)
  return factors_a, factors_g, norm, loss


def _default_chunk(num_clients: int, num_rows_per_client: int) -> int:
  """About _TARGET_ROWS_PER_CHUNK rows; a divisor of the cohort if one is
  near, so that no second (tail) copy of the chunk program is compiled."""
  limit = max(1, _TARGET_ROWS_PER_CHUNK // max(num_rows_per_client, 1))
  if num_clients <= limit:
    return num_clients
  for k in range(limit, limit // 2, -1):
    if num_clients % k == 0:
      return k
  return -(-num_clients // -(-num_clients // limit))


def build_factored_round(
    model: types.Model,
    client_optimizer_fn: client_lib.ClientOptimizerFn,
    server_optimizer: optax.GradientTransformation,
    *,
    clients_per_chunk: int | None = None,
    unroll_local_steps: int | bool = True,
) -> Callable[..., tuple[server_lib.ServerState, dict]]:
  """Builds a round equal to `dp_fedavg.build_round`'s, in factored form.

  Cost per client beyond the shared products grows like (steps * batch)^2
  times the layer widths (the Gram blocks), so the factored form pays while
  steps * batch is well below the layer widths (workload A: 20 rows against
  widths 784/200/200/62); with many local steps the plain round may win.

  Args:
    model: a dense model (`model.name` in DENSE_MODELS).
    client_optimizer_fn: must be plain SGD (checked).
    server_optimizer: as for `dp_fedavg.build_round`.
    clients_per_chunk: clients per scanned chunk; None sizes it from the
      block (about 2,048 example rows per chunk). Any cohort size works: a
      last, smaller chunk takes the remainder.
    unroll_local_steps: accepted for signature compatibility; local steps
      are always unrolled (their count is static and small).

  Returns:
    `round_fn(state, block, hparams, noise_key, canaries=None) -> (new_state,
    metrics)`, the same contract as `dp_fedavg.build_round`.

  Raises:
    ValueError: for a model or client optimizer this round does not cover.
  """
  del unroll_local_steps
  if model.name not in DENSE_MODELS:
    raise ValueError(f"factored rounds cover {DENSE_MODELS}, not "
                     f"{model.name!r}")
  _check_plain_sgd(client_optimizer_fn)

  def round_fn(state: server_lib.ServerState, block: dp_fedavg.CohortBlock,
               hparams: dp_fedavg.RoundHparams, noise_key: types.PRNGKey,
               canaries: "dp_fedavg.Canaries | None" = None,
               adaptive=None, secagg=None, tree=None):
    # Central Gaussian noise only (Simulation.uses_factored_round).
    if secagg is not None or tree is not None:
      raise ValueError("the factored round adds central Gaussian noise only")
    params = state.params
    names = dense_layer_names(params)
    kernels = [params[n]["kernel"].astype(jnp.float32) for n in names]
    biases = [params[n]["bias"].astype(jnp.float32) for n in names]
    lr = hparams.client_lr
    num_clients, num_steps, batch = block.example_mask.shape
    x = jnp.asarray(block.features["x"], jnp.float32).reshape(
        num_clients, num_steps, batch, -1)
    y = block.features["y"].astype(jnp.int32)
    m = block.example_mask
    valid = block.client_mask
    if canaries is not None:
      # A canary slot submits norm * directions[id] instead of its training
      # result (as in dp_fedavg); its clipped contribution is added as a
      # weight on its direction, not through the factors.
      canary_ids = canaries.ids.astype(jnp.int32)
      num_canaries = jax.tree_util.tree_leaves(canaries.directions)[0].shape[0]
      canary_norms = canaries.norm * jnp.sqrt(sum(
          jnp.sum(jnp.square(d.astype(jnp.float32)).reshape(num_canaries, -1),
                  axis=1)
          for d in jax.tree_util.tree_leaves(canaries.directions)))
    else:
      canary_ids = jnp.full((num_clients,), -1, jnp.int32)
      num_canaries = 0
      canary_norms = None

    k = clients_per_chunk or _default_chunk(num_clients, num_steps * batch)
    k = min(k, num_clients)
    num_full = num_clients // k
    rest = num_clients - num_full * k

    def chunk_fn(carry, chunk):
      cx, cy, cm, cvalid, cids = chunk

      def compute(carry):
        sums, canary_weights = carry
        factors_a, factors_g, trained_norm, loss = _factored_chunk(
            kernels, biases, cx, cy, cm, lr)
        is_canary = cids >= 0
        norm = trained_norm
        if canary_norms is not None:
          norm = jnp.where(is_canary, canary_norms[jnp.maximum(cids, 0)],
                           trained_norm)
        # As in dp_fedavg: a client whose update is NaN or Inf contributes
        # nothing; whether it is dropped depends only on its own data.
        finite = jnp.isfinite(norm)
        scale = jnp.minimum(1.0, hparams.clip_norm / jnp.maximum(norm, 1e-30))
        keep = cvalid & finite & ~is_canary
        keep3 = keep[:, None, None]
        # Excluded clients are selected away, never multiplied by zero.
        scale3 = jnp.where(keep, scale, 0.0)[:, None, None]
        scaled_g = [jnp.where(keep3, g * scale3, 0.0) for g in factors_g]

        def accumulate(sums, mask_inputs):
          new_sums = []
          for (ks, bs), a, sg in zip(sums, factors_a, scaled_g):
            if mask_inputs:
              a = jnp.where(keep3, a, 0.0)
            ks = ks - lr * jnp.einsum("kre,krd->ed", sg, a,
                                      preferred_element_type=jnp.float32)
            bs = bs - lr * jnp.sum(sg, axis=(0, 1))
            new_sums.append((ks, bs))
          return new_sums

        # A finite Gram-based norm implies finite factors (their Gram
        # diagonals are finite), so only a chunk holding a non-finite
        # trained norm needs the factors themselves masked.
        sums = jax.lax.cond(jnp.all(jnp.isfinite(trained_norm)),
                            lambda s: accumulate(s, False),
                            lambda s: accumulate(s, True), sums)
        if num_canaries:
          weight = jnp.where(cvalid & finite & is_canary, scale, 0.0)
          canary_weights = canary_weights + jax.ops.segment_sum(
              weight, jnp.maximum(cids, 0), num_segments=num_canaries)
        n = jnp.sum(cm.astype(jnp.int32), axis=(1, 2))
        return (sums, canary_weights), (norm, norm > hparams.clip_norm,
                                        cvalid & ~finite, loss, n)

      def skip(carry):
        c = cvalid.shape[0]
        return carry, (jnp.zeros((c,), jnp.float32), jnp.zeros((c,), bool),
                       jnp.zeros((c,), bool), jnp.zeros((c,), jnp.float32),
                       jnp.zeros((c,), jnp.int32))

      return jax.lax.cond(jnp.any(cvalid), compute, skip, carry)

    # Kernel sums are kept transposed, [out, in]: the product (s G)^T A
    # then reads the large factor A (the inputs) in its natural layout
    # instead of transposing it.
    sums = [(jnp.zeros(kk.shape[::-1], jnp.float32),
             jnp.zeros(bb.shape, jnp.float32))
            for kk, bb in zip(kernels, biases)]
    carry = (sums, jnp.zeros((num_canaries,), jnp.float32))
    data = (x, y, m, valid, canary_ids)

    def scanned(carry, i):
      # Slices of the block itself: no chunked copy of the whole block.
      chunk = jax.tree_util.tree_map(
          lambda a: jax.lax.dynamic_slice_in_dim(a, i * k, k), data)
      return chunk_fn(carry, chunk)

    carry, outs = jax.lax.scan(scanned, carry, jnp.arange(num_full))
    outs = [o.reshape(-1) for o in outs]
    if rest:
      tail = jax.tree_util.tree_map(lambda a: a[num_full * k:], data)
      carry, tail_outs = chunk_fn(carry, tail)
      outs = [jnp.concatenate([o, t]) for o, t in zip(outs, tail_outs)]
    norms, was_clipped, nonfinite, client_loss, num_examples = outs
    sums, canary_weights = carry

    clipped_sum = {n: {"kernel": ks.T.astype(params[n]["kernel"].dtype),
                       "bias": bs.astype(params[n]["bias"].dtype)}
                   for n, (ks, bs) in zip(names, sums)}
    clipped_sum = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params),
        jax.tree_util.tree_leaves(clipped_sum))
    if num_canaries:
      clipped_sum = jax.tree_util.tree_map(
          lambda total, d: total + jnp.tensordot(
              canary_weights * canaries.norm, d.astype(jnp.float32),
              axes=1).astype(total.dtype),
          clipped_sum, canaries.directions)
    return dp_fedavg.noise_and_step(
        state, clipped_sum,
        (norms, was_clipped, nonfinite, client_loss, num_examples), valid,
        hparams, noise_key, server_optimizer, canaries, adaptive)

  return round_fn
