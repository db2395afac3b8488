"""Synthetic card transactions of several banks, for fraud detection.

No public fraud data set ships with the libraries this package depends on
(and nothing here downloads), so this module generates one with the
structure that makes cross-bank fraud detection hard: few silos of very
different sizes, rare and bank-dependent fraud, fraud patterns partly shared
by all banks and partly specific to one, and some fraud that looks exactly
like a legitimate purchase. Everything is a deterministic function of the
seed.

Banks. Bank k holds n_k = int(lognormal(log(median_transactions),
size_sigma)) transactions, clipped to [MIN_TRANSACTIONS, 10 *
median_transactions]. Its fraud rate r_k ~ U[min_fraud_rate,
max_fraud_rate]; it holds max(1, round(r_k * n_k)) frauds, so every bank has
at least one and its realised rate is within 0.5 / n_k of r_k (unless
r_k * n_k < 0.5, which the default rates and MIN_TRANSACTIONS rule out). Every bank also has its own
customers: a mean purchase amount, a mix of merchant categories, a share of
card-present and of foreign purchases, and a shift of its risk scores (a
covariate shift that applies to fraud and legitimate rows alike).

Features (`FEATURE_NAMES`, float32 [NUM_FEATURES] = [24]), each returned
standardised by fixed reference constants (`FEATURE_CENTRES`,
`FEATURE_SCALES`: legitimate purchases of a typical bank), so that no
statistic of any bank's data is needed to standardise them (raw values
below):

  * log_amount: log(amount / 50); legitimate ~ N(m_k, 1), m_k ~ N(0, 0.3^2).
  * hour_sin, hour_cos: the hour of the day on the unit circle (legitimate
    purchases cluster around 14:00, fraud of some kinds at night).
  * merchant_<category>: one-hot of 8 merchant categories (`CATEGORIES`).
  * txn_count_1h, txn_count_24h: log1p of the card's purchases in the last
    hour and day (velocity).
  * amount_vs_card_mean: log of the amount over the card's 30-day mean.
  * distance_home: log1p(km from the card holder's home) / 3.
  * card_present, foreign, new_merchant: 0/1 flags.
  * account_age: the account's standardised log age.
  * risk_score_1..5: scores of the bank's own risk engine, N(s_k, I) for
    legitimate purchases.

Fraud. A fraud row follows one of three shared ways of operating, mixed by
bank-specific weights ~ Dirichlet(1, 1, 1): card testing (tiny online or
gift-card amounts in bursts, card not present), account takeover (large
purchases of electronics or online goods, often at night, new merchants)
and counterfeit cards (card present, far from home, often abroad, cash and
fuel). Its risk scores are N(s_k + u + bank_shift * v_k, I), with u a
direction shared by all banks and v_k a unit direction of bank k's own (the
fraud rings that target that bank), and with probability 0.3 its merchant
category is replaced by bank k's own most targeted category. A fraction
CAMOUFLAGED_FRACTION of the frauds is drawn from the bank's legitimate
distribution (stolen credentials used like the owner would): no model can
find them, so recall at high precision stays at most 1 - that fraction.

Held-out banks have their own v_k and targeted category, never seen in
training: a model generalises to them through the shared part, which a
single bank (with tens of frauds) estimates poorly and a federation (with
about a thousand, by default) well.
"""

from typing import NamedTuple

import numpy as np

from fedjax_dp.data import checks
from fedjax_dp.data import population as population_lib

CATEGORIES = ("grocery", "fuel", "restaurant", "travel", "electronics",
              "online_retail", "gift_card", "cash_withdrawal")
NUM_RISK_SCORES = 5
FEATURE_NAMES = (
    "log_amount", "hour_sin", "hour_cos",
    *(f"merchant_{c}" for c in CATEGORIES),
    "txn_count_1h", "txn_count_24h", "amount_vs_card_mean", "distance_home",
    "card_present", "foreign", "new_merchant", "account_age",
    *(f"risk_score_{i + 1}" for i in range(NUM_RISK_SCORES)))
NUM_FEATURES = len(FEATURE_NAMES)
MIN_TRANSACTIONS = 500
CAMOUFLAGED_FRACTION = 0.1
# Of frauds that are not camouflaged, the share whose merchant category is
# the bank's own most targeted one.
TARGETED_CATEGORY_FRACTION = 0.3

# Every raw feature is returned as (raw - centre) / scale, with these fixed
# reference values: the mean and std of legitimate purchases at the
# generator's typical bank (measured once over 200 banks). Constants, not
# statistics of the generated data, so standardising needs no pooled
# statistic of any bank; zero-mean unit-scale inputs let (DP-)SGD learn the
# rare class in a few hundred steps, where raw one-hot and count features,
# collinear with the bias, take thousands.
FEATURE_CENTRES = (
    0.0, -0.28, -0.48, 0.27, 0.09, 0.21, 0.04, 0.04, 0.19, 0.02, 0.13, 0.26,
    1.28, 0.0, 0.61, 0.71, 0.04, 0.15, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
FEATURE_SCALES = (
    1.04, 0.62, 0.55, 0.44, 0.29, 0.41, 0.20, 0.21, 0.39, 0.13, 0.34, 0.38,
    0.48, 0.70, 0.29, 0.46, 0.20, 0.36, 1.0, 1.04, 1.04, 1.04, 1.04, 1.04)

# Merchant-category mix of legitimate purchases, around which each bank's
# own mix is drawn.
_LEGIT_CATEGORIES = np.array(
    [0.25, 0.10, 0.20, 0.05, 0.05, 0.20, 0.02, 0.13])
_CATEGORY = {c: i for i, c in enumerate(CATEGORIES)}
_MODES = ("card_testing", "account_takeover", "counterfeit")


class BankProfile(NamedTuple):
  """One bank's hidden generator, for tests and analysis.

  Attributes:
    num_transactions: n_k.
    fraud_rate: r_k, the rate the fraud count is rounded from.
    amount_mean: m_k, mean log_amount of legitimate purchases.
    category_probs: float64 [8], the legitimate merchant-category mix.
    card_present_rate: share of legitimate purchases with the card present.
    foreign_rate: share of legitimate purchases abroad.
    risk_shift: float64 [5], s_k.
    mode_weights: float64 [3], the mix of the shared ways of operating
      (card testing, account takeover, counterfeit).
    fraud_direction: float64 [5], v_k (unit norm).
    targeted_category: index into `CATEGORIES` of the bank's own most
      targeted category.
  """

  num_transactions: int
  fraud_rate: float
  amount_mean: float
  category_probs: np.ndarray
  card_present_rate: float
  foreign_rate: float
  risk_shift: np.ndarray
  mode_weights: np.ndarray
  fraud_direction: np.ndarray
  targeted_category: int


def _unit(v: np.ndarray) -> np.ndarray:
  return v / np.linalg.norm(v)


def _hours_of_day(rng, n: int, night: float) -> np.ndarray:
  """Daytime purchases around 14:00 (15% at any hour); a share `night` of
  them around 03:00 instead."""
  hours = np.where(rng.random(n) < 0.85, rng.normal(14.0, 3.5, n),
                   rng.uniform(0.0, 24.0, n))
  hours = np.where(rng.random(n) < night, rng.normal(3.0, 2.0, n), hours)
  return hours % 24.0


def _categories(rng, n: int, probs: np.ndarray) -> np.ndarray:
  return rng.choice(len(CATEGORIES), size=n, p=probs / probs.sum())


def _fraud_categories(mode: str) -> np.ndarray:
  """The merchant-category mix of one way of operating: its favourite
  categories, plus 20% spread like legitimate purchases."""
  favourite = {
      "card_testing": {"online_retail": 0.5, "gift_card": 0.3},
      "account_takeover": {"electronics": 0.4, "online_retail": 0.3,
                           "travel": 0.1},
      "counterfeit": {"cash_withdrawal": 0.4, "fuel": 0.2,
                      "electronics": 0.1},
  }[mode]
  rest = 1.0 - sum(favourite.values())
  probs = rest * _LEGIT_CATEGORIES
  for category, p in favourite.items():
    probs[_CATEGORY[category]] += p
  return probs


def _rows(rng, n: int, *, amount, hour_night, category_probs, count_1h,
          count_24h, vs_mean, distance_km, card_present, foreign,
          new_merchant, risk_mean) -> np.ndarray:
  """n rows of features; scalar-or-[n] arguments give each row's law."""
  hours = _hours_of_day(rng, n, hour_night)
  x = np.zeros((n, NUM_FEATURES))
  x[:, 0] = amount
  x[:, 1] = np.sin(2 * np.pi * hours / 24.0)
  x[:, 2] = np.cos(2 * np.pi * hours / 24.0)
  x[np.arange(n), 3 + _categories(rng, n, category_probs)] = 1.0
  x[:, 11] = np.log1p(rng.poisson(count_1h, n))
  x[:, 12] = np.log1p(rng.poisson(count_24h, n))
  x[:, 13] = vs_mean
  x[:, 14] = np.log1p(rng.exponential(distance_km, n)) / 3.0
  x[:, 15] = rng.random(n) < card_present
  x[:, 16] = rng.random(n) < foreign
  x[:, 17] = rng.random(n) < new_merchant
  x[:, 18] = rng.normal(0.0, 1.0, n)
  x[:, 19:] = risk_mean + rng.normal(0.0, 1.0, (n, NUM_RISK_SCORES))
  return x


def _legitimate(rng, n: int, bank: BankProfile) -> np.ndarray:
  return _rows(
      rng, n, amount=rng.normal(bank.amount_mean, 1.0, n), hour_night=0.0,
      category_probs=bank.category_probs, count_1h=0.4, count_24h=3.0,
      vs_mean=rng.normal(0.0, 0.7, n), distance_km=8.0,
      card_present=bank.card_present_rate, foreign=bank.foreign_rate,
      new_merchant=0.15, risk_mean=bank.risk_shift)


def _fraud_mode(rng, n: int, mode: str, bank: BankProfile,
                risk_mean: np.ndarray) -> np.ndarray:
  """n frauds of one shared way of operating at bank `bank`."""
  law = {
      "card_testing": dict(
          amount=rng.normal(-2.0, 0.6, n), hour_night=0.2, count_1h=3.0,
          count_24h=8.0, vs_mean=rng.normal(-1.5, 0.7, n), distance_km=8.0,
          card_present=0.05, foreign=0.15, new_merchant=0.8),
      "account_takeover": dict(
          amount=rng.normal(bank.amount_mean + 1.5, 0.8, n), hour_night=0.6,
          count_1h=1.0, count_24h=5.0, vs_mean=rng.normal(1.5, 0.8, n),
          distance_km=8.0, card_present=0.1, foreign=0.2, new_merchant=0.6),
      "counterfeit": dict(
          amount=rng.normal(bank.amount_mean + 0.8, 0.8, n), hour_night=0.2,
          count_1h=1.5, count_24h=6.0, vs_mean=rng.normal(0.8, 0.8, n),
          distance_km=800.0, card_present=0.9, foreign=0.6,
          new_merchant=0.7),
  }[mode]
  probs = _fraud_categories(mode)
  probs = ((1 - TARGETED_CATEGORY_FRACTION) * probs
           + TARGETED_CATEGORY_FRACTION * np.eye(len(CATEGORIES))[
               bank.targeted_category])
  return _rows(rng, n, category_probs=probs, risk_mean=risk_mean, **law)


def _fraud(rng, n: int, bank: BankProfile, shared_direction: np.ndarray,
           bank_shift: float) -> np.ndarray:
  camouflaged = rng.random(n) < CAMOUFLAGED_FRACTION
  modes = rng.choice(len(_MODES), size=n, p=bank.mode_weights)
  risk_mean = bank.risk_shift + shared_direction + (
      bank_shift * bank.fraud_direction)
  x = np.zeros((n, NUM_FEATURES))
  x[camouflaged] = _legitimate(rng, int(camouflaged.sum()), bank)
  for m, mode in enumerate(_MODES):
    rows = ~camouflaged & (modes == m)
    x[rows] = _fraud_mode(rng, int(rows.sum()), mode, bank, risk_mean)
  return x


def _profile(rng, num_transactions: int, min_fraud_rate: float,
             max_fraud_rate: float) -> BankProfile:
  return BankProfile(
      num_transactions=num_transactions,
      fraud_rate=float(rng.uniform(min_fraud_rate, max_fraud_rate)),
      amount_mean=float(rng.normal(0.0, 0.3)),
      category_probs=rng.dirichlet(30.0 * _LEGIT_CATEGORIES),
      card_present_rate=float(rng.uniform(0.55, 0.85)),
      foreign_rate=float(rng.uniform(0.01, 0.08)),
      risk_shift=rng.normal(0.0, 0.3, NUM_RISK_SCORES),
      mode_weights=rng.dirichlet(np.ones(len(_MODES))),
      fraud_direction=_unit(rng.normal(0.0, 1.0, NUM_RISK_SCORES)),
      targeted_category=int(rng.integers(len(CATEGORIES))))


def fraud_banks_with_profiles(
    num_banks: int = 24,
    *,
    median_transactions: int = 4000,
    size_sigma: float = 0.8,
    min_fraud_rate: float = 0.005,
    max_fraud_rate: float = 0.02,
    bank_shift: float = 1.5,
    seed: int = 0,
    id_prefix: str = "bank",
) -> tuple[population_lib.FederatedPopulation, list[BankProfile]]:
  """Like `fraud_banks`, also returning every bank's hidden profile."""
  num_banks = checks.check_int("num_banks", num_banks, 1, 10_000)
  median_transactions = checks.check_int(
      "median_transactions", median_transactions, MIN_TRANSACTIONS, 1_000_000)
  size_sigma = checks.check_float("size_sigma", size_sigma, 0.0, 3.0)
  min_fraud_rate = checks.check_float("min_fraud_rate", min_fraud_rate, 0.0, 0.5)
  max_fraud_rate = checks.check_float("max_fraud_rate", max_fraud_rate,
                                min_fraud_rate, 0.5)
  bank_shift = checks.check_float("bank_shift", bank_shift, 0.0, 10.0)
  seed = checks.check_int("seed", seed, 0, 2**63 - 1)
  rng = np.random.default_rng(seed)

  sizes = rng.lognormal(np.log(median_transactions), size_sigma, num_banks)
  sizes = np.clip(sizes.astype(np.int64), MIN_TRANSACTIONS,
                  10 * median_transactions)
  shared_direction = _unit(rng.normal(0.0, 1.0, NUM_RISK_SCORES))
  profiles, xs, ys = [], [], []
  for k in range(num_banks):
    bank = _profile(rng, int(sizes[k]), min_fraud_rate, max_fraud_rate)
    num_fraud = max(1, round(bank.fraud_rate * bank.num_transactions))
    x = np.concatenate([
        _legitimate(rng, bank.num_transactions - num_fraud, bank),
        _fraud(rng, num_fraud, bank, shared_direction, bank_shift)])
    y = np.zeros(bank.num_transactions, np.int32)
    y[-num_fraud:] = 1
    order = rng.permutation(bank.num_transactions)
    x = (x - np.array(FEATURE_CENTRES)) / np.array(FEATURE_SCALES)
    profiles.append(bank)
    xs.append(x[order].astype(np.float32))
    ys.append(y[order])
  width = max(2, len(str(num_banks - 1)))
  population = population_lib.FederatedPopulation.from_client_arrays(
      [f"{id_prefix}-{k:0{width}d}" for k in range(num_banks)],
      [{"x": x, "y": y} for x, y in zip(xs, ys)])
  return population, profiles


def fraud_banks(
    num_banks: int = 24,
    *,
    median_transactions: int = 4000,
    size_sigma: float = 0.8,
    min_fraud_rate: float = 0.005,
    max_fraud_rate: float = 0.02,
    bank_shift: float = 1.5,
    seed: int = 0,
    id_prefix: str = "bank",
) -> population_lib.FederatedPopulation:
  """Generates the transactions of `num_banks` banks (module docstring).

  Args:
    num_banks: banks (clients), in [1, 10000].
    median_transactions: median of the log-normal bank sizes, in [500,
      1000000]; sizes are clipped to [500, 10 * median_transactions].
    size_sigma: log-space std of the bank sizes, in [0, 3] (0: equal sizes).
    min_fraud_rate: lowest per-bank fraud rate, in [0, 0.5].
    max_fraud_rate: highest per-bank fraud rate, in [min_fraud_rate, 0.5].
    bank_shift: length of the bank-specific shift of the frauds' risk
      scores, in [0, 10]; the shared shift has length 1, so 0 makes the
      fraud patterns the same in every bank (up to the mix of ways of
      operating and the targeted category).
    seed: int >= 0; the same seed and arguments give the same banks.
    id_prefix: client ids are f"{id_prefix}-{k:02d}".

  Returns:
    The population: "x" float32 [N, NUM_FEATURES] (`FEATURE_NAMES`), "y"
    int32 [N], 1 for fraud. Every bank holds at least one fraud.

  Raises:
    ValueError: on an out-of-range argument (the message names it and the
      allowed range).
  """
  return fraud_banks_with_profiles(
      num_banks, median_transactions=median_transactions,
      size_sigma=size_sigma, min_fraud_rate=min_fraud_rate,
      max_fraud_rate=max_fraud_rate, bank_shift=bank_shift, seed=seed,
      id_prefix=id_prefix)[0]
