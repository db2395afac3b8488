"""The round's factored backend: the clipped sum from what clients share.

The per-client backend (per_client.py) trains every client with its own
copy of the weights. On XLA:CPU that is the slow case: the per-client
products are small and memory-bound (see docs/benchmarks.md). This backend
computes *the same clipped sum* with large shared products instead; the
round around it (`dp_fedavg.build_round(..., factored=True)`) is the same.

`make_block_sum` covers dense models (the 2NN MLP, logistic regression),
and the dense head of models that have one (the McMahan CNN, see below),
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
    from two [steps*batch]^2 Gram matrices per layer; computed in float32
    that sum can cancel to far below its true value, so clipping uses a
    certified upper bound of it (`clipping.gram_norm_sq_upper_bound`);
  * the clipped sum over clients is -lr [A_1; ...; A_n]^T [s_1 G_1; ...;
    s_n G_n] with s_c the client's clip scale: one large product of stacked,
    scaled factors (and a column sum for the bias).

Clients are processed in chunks (scanned over), so working memory depends on
the chunk, not on the cohort. Sums, Gram matrices and noise are float32.

Everything else -- noise, the mechanism's state, the public denominator, the
server step, metrics -- is the one round of `dp_fedavg.build_round`;
tests/test_factored.py checks the two backends agree.

Privacy: as the per-client backend (same clip bound C on each client's
update under the sampler's relation, same noise, same sum of the valid
clients' clipped updates; padded examples and clients, and clients whose
update is NaN or Inf, are selected away with `jnp.where`, and whether a
client is dropped depends only on its own data; audit canaries replace a
slot's update by norm * direction, as there). Only the arithmetic that
produces each client's delta and its norm is reorganised. The norm a client
is clipped with is a proven upper bound of the norm of its exact update
-lr A^T G (the factors as computed), whatever the data: Gram-matrix sums
plus a rigorous bound of their float32 error, never less than the truth
(`clipping.gram_norm_sq_upper_bound`). On ordinary data it exceeds the true
norm by a relative 1e-5..1e-4, so a clipped client's update is that much
smaller than in the reference round; the clipped sum is then assembled by
float32 products, whose rounding (as the reference's float32 sum) is not
part of the bound.

Models with a dense head (FEATURE_MODELS: the McMahan CNN): the layers
before the dense stack (the convolutions) are not low-rank updates of shared
weights in a useful sense (rank up to steps * batch * output pixels), so each
client trains its own copy of them by plain SGD as in the reference; their
outputs are the dense stack's inputs A_{c,t}, and the dense stack is
factored as above (its input gradient G W_c(t)^T flows back into the
client's convolutions). The client's squared norm adds the feature layers'
explicit deltas to the factored layers' Gram form. For the CNN this removes
the per-client copies of the 3136x512 layer (6.4 MB per client and step:
reading it, writing its gradient, updating it), which made that layer a
quarter of the CPU round's time (docs/benchmarks.md). In the first local
step every client still holds the global feature weights: vmapped, that step
is one ordinary convolution over the chunk's examples, not a grouped one.
"""

import functools

import jax
import jax.numpy as jnp

from fedjax_dp import client as client_lib
from fedjax_dp import types
from fedjax_dp import tree_util
from fedjax_dp.algorithms import chunking
from fedjax_dp.models import cnn
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import plan as plan_lib

# Models built only of flatten -> (dense -> ReLU)* -> dense.
DENSE_MODELS = ("mlp_2nn", "2nn", "logistic")

# Models whose layers before a dense stack are trained per client as usual
# (the dense stack in factored form), by registry name: the parameter names
# of those layers, and the function that maps (their params, inputs) to the
# dense stack's inputs.
FEATURE_MODELS = {
    "cnn": (cnn.MCMAHAN_FEATURE_LAYERS, cnn.mcmahan_features),
}

# Rows (clients x local steps x batch) per chunk when not given: large enough
# for efficient shared products, small enough that the chunk's activations and
# factors stay in cache-friendly tens of MiB (measured: docs/benchmarks.md,
# "Constants chosen by measurement").
_TARGET_ROWS_PER_CHUNK = 2048


def supports(model_name: str, client_optimizer: str = "sgd",
             momentum: float | None = 0.0) -> bool:
  """Whether the factored backend computes this configuration's round.

  Only model and client optimizer are checked here. The factored round
  covers whole-update L2 clipping (fixed or adaptive) on one device; the
  privacy plan says which mechanisms (`plan.refusal(config, "factored")`).
  """
  return ((model_name in DENSE_MODELS or model_name in FEATURE_MODELS)
          and client_optimizer == "sgd" and not momentum)


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
  """[K, m, d] x [K, n, d] -> [K, m, n] (per-client a @ b^T).

  Full float32 precision: the Gram matrices feed the certified bound of the
  update norm (`clipping.gram_norm_sq_upper_bound`), whose error analysis
  assumes float32 products (TF32 on a GPU would void it).
  """
  return jnp.einsum("kmd,knd->kmn", a, b, preferred_element_type=jnp.float32,
                    precision=jax.lax.Precision.HIGHEST)


def _bmm(a, b):
  """[K, m, n] x [K, n, e] -> [K, m, e]."""
  return jnp.einsum("kmn,kne->kme", a, b, preferred_element_type=jnp.float32)


def _shared(a, w):
  """[K, m, d] x [d, e] -> [K, m, e] as one [K*m, d] x [d, e] product."""
  k, m, d = a.shape
  return jnp.dot(a.reshape(k * m, d), w,
                 preferred_element_type=jnp.float32).reshape(k, m, -1)


class _ClientFeatures:
  """Per-client plain-SGD training of the layers before a dense stack.

  Every client starts from the global `params`; `thetas` is None while they
  all still hold them (the first local step; vmapped, its forward is then
  one ordinary convolution over the chunk), then each client's own params --
  stacked [K, ...] when vmapped, a list of K trees when traced as
  independent copies (which XLA:CPU runs concurrently with plain
  convolutions; vmapping clients that hold their own weights makes grouped
  ones).
  """

  def __init__(self, apply, params, vmap_clients: bool):
    self._apply = apply
    self.params = params
    self._vmap = vmap_clients

  def _forward_one(self, theta, x):
    def features(p):
      out = self._apply(p, x)
      return out.reshape(out.shape[0], -1).astype(jnp.float32)
    return jax.vjp(features, theta)

  def forward(self, thetas, x):
    """Features [K, B, d] of x [K, B, ...] and what `step` needs."""
    if self._vmap:
      if thetas is None:
        return jax.vmap(self._forward_one, (None, 0))(self.params, x)
      return jax.vmap(self._forward_one)(thetas, x)
    outs = [self._forward_one(self.params if thetas is None else thetas[i],
                              x[i]) for i in range(x.shape[0])]
    return jnp.stack([f for f, _ in outs]), [pb for _, pb in outs]

  def step(self, thetas, pullbacks, d_features, lr):
    """One SGD step of each client's params, given d loss / d features."""
    sgd = lambda p, g: p - lr * g
    if self._vmap:
      grads = jax.vmap(lambda pb, d: pb(d)[0])(pullbacks, d_features)
      return jax.tree_util.tree_map(
          sgd, self.params if thetas is None else thetas, grads)
    if thetas is None:
      thetas = [self.params] * len(pullbacks)
    return [jax.tree_util.tree_map(sgd, theta, pb(d_features[i])[0])
            for i, (theta, pb) in enumerate(zip(thetas, pullbacks))]

  def deltas(self, thetas):
    """Stacked [K, ...] trained-minus-global params (after >= 1 step)."""
    if not self._vmap:
      thetas = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *thetas)
    return jax.tree_util.tree_map(
        lambda t, p: (t - p).astype(jnp.float32), thetas, self.params)


def _factored_chunk(kernels, biases, x, y, m, lr, features=None):
  """Local training of a chunk of clients, in factored form.

  Args:
    kernels, biases: the global dense weights, forward order.
    x: float32 [K, T, B, d0] flattened inputs; with `features`, the raw
      inputs [K, T, B, ...].
    y: int [K, T, B] labels.
    m: bool [K, T, B] example mask.
    lr: client learning rate.
    features: None for a dense model; else the `_ClientFeatures` whose
      outputs are the dense stack's inputs (trained per client alongside).

  Returns:
    (A, G, norm, loss, feature_deltas): per layer the stacked factors A [K,
    T*B, in] and G [K, T*B, out] with delta_kernel = -lr A^T G, delta_bias =
    -lr 1^T G; a certified upper bound of the whole delta's L2 norm [K]
    (see `clipping.gram_norm_sq_upper_bound`; inf or NaN where the client's
    factors are not finite); the client's mean step loss
    [K]; the feature layers' deltas stacked [K, ...] (None without
    `features`).
  """
  num_layers = len(kernels)
  k_, t_, b_ = m.shape
  count = jnp.maximum(jnp.sum(m.astype(jnp.float32), axis=2), 1.0)  # [K, T]
  num_classes = kernels[-1].shape[1]
  if features is None:
    # Layer 0 sees the raw inputs: one product with the shared kernel for
    # all steps, and one Gram matrix that serves corrections and the norm.
    x_rows = x.reshape(k_, t_ * b_, -1)
    first_pre = _shared(x_rows, kernels[0]) + biases[0]  # [K, T*B, d1]
    # [K, T*B, T*B]. XLA:CPU runs this batched Gram faster with the long
    # axis in the middle, the transposition included (measured).
    xt = jnp.swapaxes(x_rows, 1, 2)
    first_gram = jnp.einsum("kdm,kdn->kmn", xt, xt,
                            preferred_element_type=jnp.float32,
                            precision=jax.lax.Precision.HIGHEST) + 1.0
  thetas = None  # the feature layers' per-client params (None: global)

  inputs = [[None] * t_ for _ in range(num_layers)]  # A[l][t]: [K, B, in]
  grads = [[None] * t_ for _ in range(num_layers)]  # G[l][t]: [K, B, out]
  step_losses = []
  for t in range(t_):
    rows = slice(t * b_, (t + 1) * b_)
    prev = slice(0, t * b_)
    pre = []
    if features is not None:
      h, pullbacks = features.forward(thetas, x[:, t])
    for l in range(num_layers):
      if l == 0 and features is None:
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
    real = m[:, t]  # [K, B]
    # Padded examples are selected away (never multiplied by a zero
    # weight: NaN * 0 is NaN).
    step_loss = jnp.sum(jnp.where(real, log_norm - label_logit, 0.0),
                        axis=1) / count[:, t]
    active = jnp.any(m[:, t], axis=1)
    step_losses.append((step_loss * active, active))
    g = (jnp.exp(logits - log_norm[..., None])
         - jax.nn.one_hot(labels, num_classes, dtype=jnp.float32))
    g = jnp.where(real[..., None], g / count[:, t][:, None, None], 0.0)
    for l in reversed(range(num_layers)):
      grads[l][t] = g
      if l == 0 and features is None:
        break
      dh = _shared(g, kernels[l].T)
      if t:
        a_prev = jnp.concatenate(inputs[l][:t], axis=1)
        g_prev = jnp.concatenate(grads[l][:t], axis=1)
        dh = dh - lr * _bmm(_bdot(g, g_prev), a_prev)
      if l == 0:
        thetas = features.step(thetas, pullbacks, dh, lr)
        break
      g = jnp.where(pre[l - 1] > 0, dh, 0.0)

  factors_a, factors_g = [], []
  # Squared norms of the update's parts: per factored layer a certified upper
  # bound from its Gram matrices (their plain sum can cancel to far below
  # the true value), then the feature layers' explicit deltas.
  parts = []
  for l in range(num_layers):
    a = (x_rows if l == 0 and features is None
         else jnp.concatenate(inputs[l], axis=1))
    g = jnp.concatenate(grads[l], axis=1)
    gram_a = first_gram if l == 0 and features is None else _bdot(a, a) + 1.0
    # The bias is a column of ones appended to A: a.shape[-1] + 1 products.
    parts.append(jnp.square(lr) * clipping.gram_norm_sq_upper_bound(
        gram_a, _bdot(g, g), a.shape[-1] + 1, g.shape[-1]))
    factors_a.append(a)
    factors_g.append(g)
  feature_deltas = None
  if features is not None:
    feature_deltas = features.deltas(thetas)
    # Plain arrays: their squares are a sum of non-negative terms (no
    # cancellation), as in the reference round's clip.
    parts.append(sum(jnp.sum(jnp.square(d).reshape(k_, -1), axis=1)
                     for d in jax.tree_util.tree_leaves(feature_deltas)))
  norm = clipping.certified_norm(parts, 1.0)
  losses = jnp.stack([s for s, _ in step_losses], axis=1)
  num_active = jnp.sum(
      jnp.stack([a for _, a in step_losses], axis=1).astype(jnp.float32),
      axis=1)
  loss = jnp.sum(losses, axis=1) / jnp.maximum(num_active, 1.0)
  return factors_a, factors_g, norm, loss, feature_deltas


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


def _chunk_step(carry, chunk, *, kernels, biases, lr, features, canary_norms,
                num_canaries, clip_norm):
  """One chunk's clipped contributions added to the running sums, and its
  per-client outputs (norm, clipped, non-finite, loss, examples)."""
  cx, cy, cm, cvalid, cids = chunk
  sums, feature_sums, canary_weights = carry
  factors_a, factors_g, trained_norm, loss, feature_deltas = (
      _factored_chunk(kernels, biases, cx, cy, cm, lr, features))
  is_canary = cids >= 0
  norm = trained_norm
  if canary_norms is not None:
    norm = jnp.where(is_canary, canary_norms[jnp.maximum(cids, 0)],
                     trained_norm)
  # As in the per-client backend: a client whose update is NaN or Inf contributes
  # nothing; whether it is dropped depends only on its own data.
  finite = jnp.isfinite(norm)
  scale = clipping.clip_scale(norm, clip_norm)
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
  if features is not None:
    scaled = jax.tree_util.tree_map(
        lambda d: d * scale.reshape((-1,) + (1,) * (d.ndim - 1)),
        feature_deltas)
    feature_sums = jax.tree_util.tree_map(
        jnp.add, feature_sums, tree_util.masked_sum(scaled, keep))
  if num_canaries:
    weight = jnp.where(cvalid & finite & is_canary, scale, 0.0)
    canary_weights = canary_weights + jax.ops.segment_sum(
        weight, jnp.maximum(cids, 0), num_segments=num_canaries)
  n = jnp.sum(cm.astype(jnp.int32), axis=(1, 2))
  return (sums, feature_sums, canary_weights), (
      norm, norm > clip_norm,
      cvalid & ~finite, loss, n)


def _clipped_sum_tree(params, names, sums, feature_sums, feature_params,
                      canaries, canary_weights, num_canaries):
  """The clipped sum as a tree shaped like `params`: the dense layers' sums
  (kept transposed), the feature layers', and the canaries' clipped
  contributions along their directions."""
  clipped_sum = {n: {"kernel": ks.T.astype(params[n]["kernel"].dtype),
                     "bias": bs.astype(params[n]["bias"].dtype)}
                 for n, (ks, bs) in zip(names, sums)}
  clipped_sum.update(jax.tree_util.tree_map(
      lambda total, p: total.astype(p.dtype), feature_sums, feature_params))
  clipped_sum = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params),
      jax.tree_util.tree_leaves(clipped_sum))
  if num_canaries:
    clipped_sum = jax.tree_util.tree_map(
        lambda total, d: total + jnp.tensordot(
            canary_weights * canaries.norm, d.astype(jnp.float32),
            axes=1).astype(total.dtype),
        clipped_sum, canaries.directions)
  return clipped_sum


def _canary_norms(canaries):
  """(number of canaries, each canary's submitted norm or None). A canary
  slot submits norm * directions[id] instead of its training result (as in
  the per-client backend); its clipped contribution is added as a weight on
  its direction, not through the factors."""
  if canaries is None:
    return 0, None
  num_canaries = jax.tree_util.tree_leaves(canaries.directions)[0].shape[0]
  canary_norms = canaries.norm * jnp.sqrt(sum(
      jnp.sum(jnp.square(d.astype(jnp.float32)).reshape(num_canaries, -1),
              axis=1)
      for d in jax.tree_util.tree_leaves(canaries.directions)))
  return num_canaries, canary_norms


def _over_chunks(compute_chunk, carry, data, k: int):
  """Runs `compute_chunk` over the chunks of k slots that hold a valid
  client (and a last, smaller chunk); returns the carry and the per-client
  outputs of every slot (zeros for skipped chunks)."""
  valid = data[3]
  num_clients = valid.shape[0]
  num_full = num_clients // k
  rest = num_clients - num_full * k

  def skip_chunk(carry, chunk):
    c = chunk[3].shape[0]
    return carry, (jnp.zeros((c,), jnp.float32), jnp.zeros((c,), bool),
                   jnp.zeros((c,), bool), jnp.zeros((c,), jnp.float32),
                   jnp.zeros((c,), jnp.int32))

  def train_chunk(i, loop_carry):
    carry, per_client = loop_carry
    index = order[i]
    # Slices of the block itself: no chunked copy of the whole block.
    carry, outs = compute_chunk(carry, chunking.chunk_rows(data, index, k))
    per_client = [jax.lax.dynamic_update_slice_in_dim(acc, o, index * k, 0)
                  for acc, o in zip(per_client, outs)]
    return carry, per_client

  order, num_active = chunking.active_chunks(valid[:num_full * k], k)
  per_client = [jnp.zeros((num_full * k,), dtype) for dtype in
                (jnp.float32, bool, bool, jnp.float32, jnp.int32)]
  carry, outs = jax.lax.fori_loop(0, num_active, train_chunk,
                                  (carry, per_client))
  if rest:
    tail = jax.tree_util.tree_map(lambda a: a[num_full * k:], data)
    carry, tail_outs = jax.lax.cond(jnp.any(tail[3]), compute_chunk,
                                    skip_chunk, carry, tail)
    outs = [jnp.concatenate([o, t]) for o, t in zip(outs, tail_outs)]
  return carry, outs


def make_block_sum(model: types.Model,
                   client_optimizer_fn: client_lib.ClientOptimizerFn,
                   privatizer: plan_lib.Privatizer, *,
                   clients_per_chunk: int | None = None,
                   vmap_clients: bool = True,
                   unroll_local_steps: int | bool = True):
  """The round's factored backend: the block's clipped sum, equal to
  `per_client.make_block_sum`'s (same arguments and outputs).

  Cost per client beyond the shared products grows like (steps * batch)^2
  times the layer widths (the Gram blocks), so the factored form pays while
  steps * batch is well below the layer widths (workload A: 20 rows against
  widths 784/200/200/62); with many local steps the per-client backend may
  win.

  Args:
    model: a dense model (`model.name` in DENSE_MODELS) or one with a dense
      head (in FEATURE_MODELS).
    client_optimizer_fn: must be plain SGD (checked).
    privatizer: the round's privacy steps; the factored backend takes those
      `plan.refusal(config, "factored")` accepts (central noise after
      whole-update L2 clipping, without record-level DP).
    clients_per_chunk: clients per chunk; None sizes it from the block
      (about 2,048 example rows per chunk) for a dense model, and must be
      given for a FEATURE_MODELS one (its feature layers are per-client
      copies: on CPU as many clients as cores). Any cohort size works: a
      last, smaller chunk takes the remainder.
    vmap_clients: FEATURE_MODELS only: whether a chunk's clients train their
      feature layers vmapped (accelerators) or as independent copies
      (XLA:CPU), as in the per-client backend.
    unroll_local_steps: unused; local steps are always unrolled (their
      count is static and small).

  Raises:
    ValueError: for a model, client optimizer or privatizer this backend
      does not cover.
  """
  del unroll_local_steps
  if model.name not in DENSE_MODELS and model.name not in FEATURE_MODELS:
    covered = DENSE_MODELS + tuple(FEATURE_MODELS)
    raise ValueError(f"factored rounds cover {covered}, not {model.name!r}")
  if (privatizer.sends_messages or privatizer.per_layer_clipping is not None
      or privatizer.example_dp or privatizer.noise is plan_lib.Noise.LAPLACE):
    raise ValueError("the factored round covers central noise after "
                     "whole-update L2 clipping, without record-level DP")
  feature_names, feature_apply = FEATURE_MODELS.get(model.name, ((), None))
  if feature_apply is not None and clients_per_chunk is None:
    raise ValueError(f"clients_per_chunk must be given for {model.name!r}")
  _check_plain_sgd(client_optimizer_fn)

  def block_sum(params, features, example_mask, client_mask, canary_ids,
                slot_ids, hparams, canaries, noise_key, secagg):
    del slot_ids, noise_key, secagg  # No per-slot randomness or messages.
    names = dense_layer_names(
        {n: p for n, p in params.items() if n not in feature_names})
    feature_params = {n: params[n] for n in feature_names}
    client_features = None
    if feature_apply is not None:
      client_features = _ClientFeatures(feature_apply, feature_params,
                                        vmap_clients)
    kernels = [params[n]["kernel"].astype(jnp.float32) for n in names]
    biases = [params[n]["bias"].astype(jnp.float32) for n in names]
    lr = hparams.client_lr
    num_clients, num_steps, batch = example_mask.shape
    m = example_mask
    # Padded examples are zeros whatever the block holds there, so NaN or
    # Inf in padding never reaches a real example's products.
    real = client_lib.select_examples(
        {"x": jnp.asarray(features["x"], jnp.float32),
         "y": features["y"].astype(jnp.int32)}, m)
    x, y = real["x"], real["y"]
    if client_features is None:
      x = x.reshape(num_clients, num_steps, batch, -1)
    valid = client_mask
    num_canaries, canary_norms = _canary_norms(canaries)

    k = clients_per_chunk or _default_chunk(num_clients, num_steps * batch)
    k = min(k, num_clients)

    compute_chunk = functools.partial(
        _chunk_step, kernels=kernels, biases=biases, lr=lr,
        features=client_features, canary_norms=canary_norms,
        num_canaries=num_canaries, clip_norm=hparams.clip_norm)

    # Kernel sums are kept transposed, [out, in]: the product (s G)^T A
    # then reads the large factor A (the inputs) in its natural layout
    # instead of transposing it.
    sums = [(jnp.zeros(kk.shape[::-1], jnp.float32),
             jnp.zeros(bb.shape, jnp.float32))
            for kk, bb in zip(kernels, biases)]
    feature_sums = jax.tree_util.tree_map(
        lambda p: jnp.zeros(p.shape, jnp.float32), feature_params)
    carry = (sums, feature_sums, jnp.zeros((num_canaries,), jnp.float32))
    carry, per_client = _over_chunks(compute_chunk, carry,
                                     (x, y, m, valid, canary_ids), k)
    sums, feature_sums, canary_weights = carry
    clipped_sum = _clipped_sum_tree(params, names, sums, feature_sums,
                                    feature_params, canaries, canary_weights,
                                    num_canaries)
    return (clipped_sum, None, jnp.zeros((), jnp.int32)), tuple(per_client)

  return block_sum
