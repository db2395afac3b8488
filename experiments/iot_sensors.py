"""Activity recognition on IoT accelerometers: user-level DP-FedAvg.

Data: the "iot_sensors" generator (fedjax_dp/data/iot.py; nothing is
downloaded): 3,000 devices, each with 5-20 windows of a 3-axis accelerometer
(32 samples at 20 Hz, 1.6 s), labelled with one of 5 activities (idle,
walking, running, stairs, vehicle) that differ in frequency, amplitude,
axes and harmonics. Devices differ in calibration (gain, offset, mounting
tilt) and noise level (0.03-0.3 g), and most see only some activities (15%
one, 24% two). 600 devices (7,516 windows) are held out for evaluation;
2,400 (29,783 windows) train.

Model and training: "conv1d" (fedjax_dp/models/sensor.py: two 1-D
convolutions of 16 and 32 channels, kernel 5, global average pooling, dense;
3,013 parameters). Cross-device: each round Poisson-samples an expected 150
of the 2,400 training devices (q = 0.0625); each runs 2 local epochs of SGD
(lr 0.6, batch 10), its update is clipped to L2 norm 1, Gaussian noise with
z = 1.8 is added to the sum, which is divided by the expected cohort 150;
server SGD with momentum 0.9; 1,000 rounds (with 300 rounds and z = 1.2, at
about the same epsilon, accuracy stays near 0.75: more, noisier rounds
help here).

Privacy unit: one device, all its windows (add/remove-one-device
neighbours), user-level DP-FedAvg with amplification by Poisson sampling,
accounted with dp_accounting's PLD accountant: epsilon 5.51 at delta 1e-5
(below one over the 3,000 devices).

Results (held-out devices): accuracy 0.845 (seed 0; 0.854 +- 0.008 over
seeds 0-2, each with its own generated devices); the same run without noise
(`--set noise_multiplier=0`, still clipped) 0.856 (0.861 +- 0.005). The same
model trained centrally on all training windows without privacy (Adam, 30
epochs) reaches about 0.91: the gap is that of federated training on few,
one-sided devices more than of the noise. About 40 s on a 2-core CPU.

Run:
  fedjax-dp train --config experiments/iot_sensors.py
  fedjax-dp train --config experiments/iot_sensors.py --smoke
"""

from fedjax_dp import config as config_lib


def get_config() -> config_lib.Config:
  return config_lib.Config(
      name="iot_sensors", dataset="iot_sensors",
      dataset_kwargs={"num_devices": 3000, "window_length": 32,
                      "num_classes": 5},
      model="conv1d", rounds=1000, sampling="poisson", cohort_size=150,
      client_lr=0.6, local_epochs=2, batch_size=10,
      server_optimizer="sgd", server_lr=1.0, server_momentum=0.9,
      clip_norm=1.0, noise_multiplier=1.8, delta=1e-5, accountant="pld",
      eval_every=100)


def get_smoke_config() -> config_lib.Config:
  return get_config().replace(
      name="iot_sensors_smoke",
      dataset_kwargs={"num_devices": 200, "max_windows": 8,
                      "window_length": 32, "num_classes": 5},
      rounds=3, cohort_size=20, eval_every=3)
