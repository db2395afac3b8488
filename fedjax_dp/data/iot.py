"""Synthetic accelerometer windows of many devices, for activity recognition.

A generator (nothing is downloaded) of the cross-device setting of wearables
and IoT sensors: thousands of devices, each with a few labelled windows of a
3-axis accelerometer, differently calibrated and differently noisy, and most
devices seeing only some of the activities. Everything is a deterministic
function of the seed.

Windows. A window is `window_length` samples at SAMPLE_RATE_HZ = 20 Hz of
the three axes (x [window_length, 3], in g). It is gravity (a unit vector,
tilted by the device's mounting) plus the activity's periodic motion,

    a_c(t) = A w_c (sin(2 pi f t + phi_c) + h sin(4 pi f t + phi'_c)),

with the activity's base frequency f, amplitude A, axis weights w and second
harmonic h (`ACTIVITIES`), f and A jittered per window (log-normal, std 0.12
and 0.25) and random phases per axis. "idle" has no motion.
Frequencies of walking, stairs and cycling overlap once jittered, so the
axis weights, amplitudes and harmonics have to be used too.

Devices. Device d holds a number of windows uniform in [min_windows,
max_windows], and sees k_d of the `num_classes` activities, k_d = 1 with
probability 0.15, 2 with probability 0.25 and otherwise uniform over 3..C
(with C = 2 classes, 2 with probability 0.85);
its activities are a random subset of that size, each of them labels at
least one of its windows (if it has k_d windows) and the rest are uniform
over them. Overall the classes are balanced in expectation. Each device has
its own calibration: per-axis gain ~ lognormal(0, 0.15), per-axis offset ~
N(0, 0.1^2) g, a mounting tilt of up to 30 degrees, and white noise of std
log-uniform in [0.03, 0.3] g: what it records is gain * signal + offset +
noise.
"""

from typing import NamedTuple

import numpy as np

from fedjax_dp.data import checks
from fedjax_dp.data import population as population_lib

SAMPLE_RATE_HZ = 20.0
NUM_AXES = 3


class Activity(NamedTuple):
  """One activity's motion (see the module docstring).

  Attributes:
    name: the activity.
    frequency_hz: base frequency f.
    amplitude: A, in g.
    axis_weights: w, for the x, y and z axes.
    harmonic: h, the second harmonic's relative amplitude.
  """

  name: str
  frequency_hz: float
  amplitude: float
  axis_weights: tuple[float, float, float]
  harmonic: float


# Label i is ACTIVITIES[i]; a dataset of C classes uses the first C.
ACTIVITIES = (
    Activity("idle", 0.0, 0.0, (0.0, 0.0, 0.0), 0.0),
    Activity("walking", 1.9, 0.35, (0.3, 0.3, 1.0), 0.3),
    Activity("running", 2.8, 0.9, (0.4, 0.4, 1.0), 0.5),
    Activity("stairs", 1.6, 0.45, (0.6, 0.3, 1.0), 0.6),
    Activity("vehicle", 7.0, 0.12, (1.0, 1.0, 0.6), 0.2),
    Activity("cycling", 1.3, 0.25, (1.0, 0.5, 0.4), 0.1),
)
MAX_TILT_DEGREES = 30.0


class DeviceProfile(NamedTuple):
  """One device's hidden calibration and activities, for tests and analysis.

  Attributes:
    num_windows: windows the device holds.
    activities: int [k_d], the labels it sees.
    gain: float64 [3], per-axis gain.
    offset: float64 [3], per-axis offset in g.
    gravity: float64 [3], the unit gravity vector in the device's frame.
    noise_std: std of its white noise, in g.
  """

  num_windows: int
  activities: np.ndarray
  gain: np.ndarray
  offset: np.ndarray
  gravity: np.ndarray
  noise_std: float


def _tilted_gravity(rng) -> np.ndarray:
  """The unit vector (0, 0, 1) tilted by up to MAX_TILT_DEGREES."""
  tilt = np.radians(rng.uniform(0.0, MAX_TILT_DEGREES))
  azimuth = rng.uniform(0.0, 2 * np.pi)
  return np.array([np.sin(tilt) * np.cos(azimuth),
                   np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])


def _num_activities(rng, num_classes: int) -> int:
  u = rng.random()
  if u < 0.15:
    return 1
  if u < 0.40 or num_classes == 2:
    return 2
  return int(rng.integers(3, num_classes + 1))


def _labels(rng, num_windows: int, activities: np.ndarray) -> np.ndarray:
  """Every activity at least once (room permitting), the rest uniform."""
  first = activities[:num_windows]
  rest = rng.choice(activities, size=num_windows - first.size)
  return rng.permutation(np.concatenate([first, rest]))


def _motion(rng, labels: np.ndarray, window_length: int) -> np.ndarray:
  """float64 [n, window_length, 3]: each window's activity motion."""
  n = labels.size
  t = np.arange(window_length) / SAMPLE_RATE_HZ
  freq = np.array([ACTIVITIES[c].frequency_hz for c in labels])
  amp = np.array([ACTIVITIES[c].amplitude for c in labels])
  weights = np.array([ACTIVITIES[c].axis_weights for c in labels])
  harmonic = np.array([ACTIVITIES[c].harmonic for c in labels])
  freq = freq * rng.lognormal(0.0, 0.12, n)
  amp = amp * rng.lognormal(0.0, 0.25, n)
  phase = rng.uniform(0.0, 2 * np.pi, (n, 1, NUM_AXES))
  phase2 = rng.uniform(0.0, 2 * np.pi, (n, 1, NUM_AXES))
  angle = 2 * np.pi * freq[:, None, None] * t[None, :, None]
  wave = np.sin(angle + phase) + harmonic[:, None, None] * np.sin(
      2 * angle + phase2)
  return amp[:, None, None] * weights[:, None, :] * wave


def iot_devices_with_profiles(
    num_devices: int = 3000,
    *,
    min_windows: int = 5,
    max_windows: int = 20,
    window_length: int = 32,
    num_classes: int = 5,
    seed: int = 0,
    id_prefix: str = "device",
) -> tuple[population_lib.FederatedPopulation, list[DeviceProfile]]:
  """Like `iot_devices`, also returning every device's hidden profile."""
  num_devices = checks.check_int("num_devices", num_devices, 1, 1_000_000)
  min_windows = checks.check_int("min_windows", min_windows, 1, 10_000)
  max_windows = checks.check_int("max_windows", max_windows, min_windows, 10_000)
  window_length = checks.check_int("window_length", window_length, 8, 4096)
  num_classes = checks.check_int("num_classes", num_classes, 2, len(ACTIVITIES))
  seed = checks.check_int("seed", seed, 0, 2**63 - 1)
  rng = np.random.default_rng(seed)

  profiles = []
  for _ in range(num_devices):
    k = _num_activities(rng, num_classes)
    profiles.append(DeviceProfile(
        num_windows=int(rng.integers(min_windows, max_windows + 1)),
        activities=rng.choice(num_classes, size=k, replace=False),
        gain=rng.lognormal(0.0, 0.15, NUM_AXES),
        offset=rng.normal(0.0, 0.1, NUM_AXES),
        gravity=_tilted_gravity(rng),
        noise_std=float(np.exp(rng.uniform(np.log(0.03), np.log(0.3))))))
  xs, ys = [], []
  for device in profiles:
    labels = _labels(rng, device.num_windows, device.activities)
    signal = device.gravity + _motion(rng, labels, window_length)
    x = device.gain * signal + device.offset + device.noise_std * (
        rng.standard_normal(signal.shape))
    xs.append(x.astype(np.float32))
    ys.append(labels.astype(np.int32))
  width = max(4, len(str(num_devices - 1)))
  population = population_lib.FederatedPopulation.from_client_arrays(
      [f"{id_prefix}-{k:0{width}d}" for k in range(num_devices)],
      [{"x": x, "y": y} for x, y in zip(xs, ys)])
  return population, profiles


def iot_devices(
    num_devices: int = 3000,
    *,
    min_windows: int = 5,
    max_windows: int = 20,
    window_length: int = 32,
    num_classes: int = 5,
    seed: int = 0,
    id_prefix: str = "device",
) -> population_lib.FederatedPopulation:
  """Generates the sensor windows of `num_devices` devices (module docstring).

  Args:
    num_devices: devices (clients), in [1, 1000000].
    min_windows: fewest windows of a device, in [1, 10000].
    max_windows: most windows of a device, in [min_windows, 10000].
    window_length: samples per window (at 20 Hz), in [8, 4096].
    num_classes: activities, the first `num_classes` of `ACTIVITIES`, in
      [2, 6].
    seed: int >= 0; the same seed and arguments give the same devices.
    id_prefix: client ids are f"{id_prefix}-{k:04d}".

  Returns:
    The population: "x" float32 [N, window_length, 3] (accelerometer
    x, y, z in g), "y" int32 [N] in [0, num_classes).

  Raises:
    ValueError: on an out-of-range argument (the message names it and the
      allowed range).
  """
  return iot_devices_with_profiles(
      num_devices, min_windows=min_windows, max_windows=max_windows,
      window_length=window_length, num_classes=num_classes, seed=seed,
      id_prefix=id_prefix)[0]
