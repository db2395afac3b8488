"""Bad input fails before any compute, naming the field and allowed range."""

import math

import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import runner


@pytest.mark.parametrize("changes,field", [
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(noise_multiplier=math.inf), "noise_multiplier"),
    (dict(clip_norm=0.0), "clip_norm"),
    (dict(clip_norm=-1.0), "clip_norm"),
    (dict(delta=0.0), "delta"),
    (dict(delta=1.0), "delta"),
    (dict(sampling_probability=0.0), "sampling_probability"),
    (dict(sampling_probability=1.5), "sampling_probability"),
    (dict(dataset="mnist"), "dataset"),
    (dict(model="resnet"), "model"),
    (dict(rounds=0), "rounds"),
    (dict(rounds=-3), "rounds"),
    (dict(batch_size=0), "batch_size"),
    (dict(local_epochs=0), "local_epochs"),
    (dict(cohort_size=0), "cohort_size"),
    (dict(client_lr=0.0), "client_lr"),
    (dict(server_optimizer="lamb"), "server_optimizer"),
    (dict(accountant="moments"), "accountant"),
    (dict(sampling="fixed", accountant="pld"), "accountant"),
    (dict(sampling="shuffle"), "sampling"),
    (dict(noise_multiplier=None), "noise_multiplier"),
    (dict(noise_multiplier=1.0, target_epsilon=2.0), "target_epsilon"),
    (dict(epsilon_budget=-1.0), "epsilon_budget"),
    (dict(client_momentum=1.0), "client_momentum"),
    (dict(server_momentum=-0.1), "server_momentum"),
    (dict(server_lr=float("inf")), "server_lr"),
    (dict(eval_every=0), "eval_every"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(capacity=0), "capacity"),
    (dict(max_examples_per_client=0), "max_examples_per_client"),
    (dict(clients_per_chunk=0), "clients_per_chunk"),
    (dict(client_optimizer="rmsprop"), "client_optimizer"),
    (dict(dropout_rate=-0.1), "dropout_rate"),
    (dict(seed=-1), "seed"),
    (dict(target_epsilon=0.0, noise_multiplier=None), "target_epsilon"),
    (dict(stop_at_budget="yes"), "stop_at_budget"),
    (dict(shard_clients="auto"), "shard_clients"),
    (dict(vmap_clients="no"), "vmap_clients"),
    (dict(unroll_local_steps=2), "unroll_local_steps"),
    (dict(audit_canaries=-1), "audit_canaries"),
    (dict(adaptive_clipping="on"), "adaptive_clipping"),
    (dict(target_unclipped_quantile=1.0), "target_unclipped_quantile"),
    (dict(clip_learning_rate=0.0), "clip_learning_rate"),
    (dict(clip_count_stddev=0.0), "clip_count_stddev"),
    (dict(adaptive_clipping=True, clip_norm=math.inf), "clip_norm"),
    (dict(dataset_kwargs=[1]), "dataset_kwargs"),
    (dict(sampling="fixed", sampling_probability=0.1, accountant="rdp"),
     "sampling_probability"),
])
def test_invalid_fields_are_named(changes, field):
  with pytest.raises(ValueError, match=f"'{field}'"):
    config_lib.Config(**changes)


def test_cohort_larger_than_population_fails_before_compute(monkeypatch):
  config = config_lib.Config(cohort_size=10_000)
  compiled = []
  monkeypatch.setattr(runner.jax, "jit",
                      lambda *a, **k: compiled.append(1))
  with pytest.raises(ValueError, match="cohort_size"):
    runner.run(config, progress=False, log=lambda s: None)
  assert not compiled


def test_override_parsing():
  c = config_lib.Config()
  c = config_lib.parse_override(c, "rounds=7")
  c = config_lib.parse_override(c, "clip_norm=inf")
  c = config_lib.parse_override(c, "noise-multiplier=2")
  c = config_lib.parse_override(c, "model_kwargs={\"hidden\": [16]}")
  assert c.rounds == 7 and math.isinf(c.clip_norm)
  assert c.noise_multiplier == 2.0 and isinstance(c.noise_multiplier, float)
  assert c.model_kwargs == {"hidden": [16]}
  with pytest.raises(ValueError, match="unknown config field"):
    config_lib.parse_override(c, "learning_rate=1")
  with pytest.raises(ValueError, match="'rounds'"):
    config_lib.parse_override(c, "rounds=zero")


def test_a_dict_fields_key_is_set_without_dropping_the_others():
  c = config_lib.Config(dataset_kwargs={"path": "a.h5", "num_classes": 62})
  c = config_lib.parse_overrides(c, [
      "dataset_kwargs.path=b.h5", "dataset_kwargs.in_memory=false",
      "model_kwargs.hidden=[10, 10]"])
  assert c.dataset_kwargs == {"path": "b.h5", "num_classes": 62,
                              "in_memory": False}
  assert c.model_kwargs == {"hidden": [10, 10]}
  # The whole dict replaces; a later key still merges into it.
  c = config_lib.parse_overrides(c, ['dataset_kwargs={"path": "c.h5"}',
                                     "dataset_kwargs.num_classes=10"])
  assert c.dataset_kwargs == {"path": "c.h5", "num_classes": 10}
  with pytest.raises(ValueError, match="'rounds' is not a dict"):
    config_lib.parse_overrides(c, ["rounds.x=1"])
  with pytest.raises(ValueError, match="unknown config field 'bogus'"):
    config_lib.parse_overrides(c, ["bogus.x=1"])


def test_config_round_trips_through_dict():
  c = config_lib.Config(rounds=3, model_kwargs={"hidden": [8]})
  assert config_lib.Config.from_dict(c.to_dict()) == c
  with pytest.raises(ValueError, match="unknown config fields"):
    config_lib.Config.from_dict(c.to_dict() | {"bogus": 1})
