"""Scale-out on JAX's own runtime: several processes, sharded state, errors.

The multi-process test starts two ``experiments.train`` processes on
localhost joined by ``jax.distributed`` (CPU collectives: gloo), each with
two fake CPU devices, and checks that they train exactly as one process on
one device (the global batches are the same; only the summation order of
the reductions differs).
"""

import os
import pathlib
import re
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import blaq_jax
from experiments import checkpointing
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import train as train_lib
from experiments.configs import quick

REPO = pathlib.Path(__file__).resolve().parents[1]

# A 2-epoch BLAQ run of a narrow MLP on an MNIST subset; m = 2, so the first
# epoch runs the two-stage update and the second plain LAQ.
OVERRIDES = dict(method="blaq", blaq_period_epochs=2, train_size=400,
                 validation_size=100, test_size=200, num_epochs=2,
                 progress_bar=False, write_plots=False, tensorboard=False)
HIDDEN = (16,)


def _config(data_dir):
  config = quick.get_config()
  config.data_dir = str(data_dir)
  config.model_options.hidden = HIDDEN
  config.num_devices = 1  # this process has 8 fake devices; batch 100
  for k, v in OVERRIDES.items():
    setattr(config, k, v)
  return config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "experiments.train", "--config",
          str(REPO / "experiments" / "configs" / "quick.py"), "--workdir",
          str(workdir), f"--config.data_dir={data_dir}",
          f"--config.model_options.hidden={HIDDEN}",
          *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *extra]


def _env(devices: int):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _epochs(workdir):
  return metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics" /
                              "epochs.jsonl")


def test_two_processes_train_like_one(shared_data_dir, tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      _train_cmd(tmp_path / "multi", shared_data_dir, "--jax_distributed",
                 f"--coordinator_address=localhost:{port}",
                 "--num_processes=2", f"--process_id={i}"),
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  single = subprocess.run(_train_cmd(tmp_path / "single", shared_data_dir),
                          cwd=REPO, env=_env(1), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]

  multi, one = _epochs(tmp_path / "multi"), _epochs(tmp_path / "single")
  assert [r["epoch"] for r in multi] == [1, 2]  # metrics written once
  assert [r["trial_active_fraction"] for r in multi] == [1.0, 0.0]
  for a, b in zip(multi, one):
    assert a["step"] == b["step"] and a["grad_evals"] == b["grad_evals"]
    for key in ("train_loss", "test_loss", "validation_loss"):
      assert a[key] == pytest.approx(b[key], rel=1e-5), key
    for key in ("train_accuracy", "test_accuracy", "validation_accuracy"):
      assert a[key] == pytest.approx(b[key], abs=0.006), key  # 1 example

  # Process 0 recorded the digests of both processes' files after the save.
  for epoch in (1, 2):
    assert checkpointing.verify_digests(
        tmp_path / "multi" / "checkpoints" / str(epoch)) is None
  assert list((tmp_path / "multi" / "checkpoints" / "2").rglob(
      "ocdbt.process_1"))

  # The single-process checkpoint restores here; the multi-process one is
  # refused for its process count, with a message naming it.
  config = _config(shared_data_dir)
  with pytest.raises(checkpointing.ConfigMismatchError,
                     match=r"written by 2 process\(es\); this run has 1"):
    train_lib.restore_latest(str(tmp_path / "multi"), config)
  _, state, meta = train_lib.restore_latest(str(tmp_path / "single"), config)
  assert meta["epoch"] == 2
  assert "kernel" in state["params"]["dense"][0]


def test_mesh_without_data_axis_is_a_clear_error():
  mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
  with pytest.raises(ValueError, match="no 'data' axis"):
    input_pipeline.global_batch(mesh, {"image": np.zeros((4, 2))})


@pytest.mark.parametrize("make", [
    lambda: blaq_jax.blaq(0.1, batch_axis_name="batch", active=2),
    lambda: blaq_jax.fogzo(0.1, batch_axis_name="batch")])
def test_unbound_batch_axis_name_is_a_clear_error(make):
  params = {"kernel": jnp.ones((3, 3))}
  opt = make()
  state = opt.init(params)
  with pytest.raises(ValueError, match="batch_axis_name='batch' is not an "
                     "axis of the enclosing pmap/shard_map"):
    opt.update(params, state, params, grad_fn=lambda q: q,
               loss_fn=lambda q: jnp.sum(q["kernel"]))


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("factory", [blaq_jax.laq, blaq_jax.blaq])
def test_sharded_params_stay_sharded_and_nothing_is_gathered(factory, bits):
  """Model-parallel params: state and updates keep the params' sharding, and
  no tensor crosses devices (the projection's sums are psums of scalars)."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  kernel_sharding = NamedSharding(mesh, P("data", "model"))
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0),
                                                  (64, 32)),
                      "bias": jnp.zeros(32)}}
  shardings = {"dense": {"kernel": kernel_sharding,
                         "bias": NamedSharding(mesh, P("model"))}}
  params = jax.device_put(params, shardings)
  target = jax.device_put(jnp.ones((64, 32)) * 0.1, kernel_sharding)
  loss = lambda p: jnp.sum((p["dense"]["kernel"] - target) ** 2)  # noqa
  opt = factory(0.01, bits=bits)
  state = opt.init(params)

  def step(p, s):
    u, s = opt.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
    return optax.apply_updates(p, u), s

  jitted = jax.jit(step, donate_argnums=(0, 1))
  hlo = jitted.lower(params, state).compile().as_text()
  # No tensor crosses devices: every collective carries less than a kernel
  # shard (16 x 16), here the projection's per-device sums (scalars).
  shard = 16 * 16
  collectives = re.compile(r" (all-gather|all-reduce|all-to-all|"
                           r"collective-permute|reduce-scatter)(-start)?\(")
  sizes = [[int(np.prod([int(x) for x in dims.split(",") if x]))
            for dims in re.findall(r"f32\[([\d,]*)\]", line.split("=")[1])]
           for line in hlo.splitlines() if collectives.search(line)]
  assert sizes and max(max(s) for s in sizes) < shard, sizes
  reference = step(*jax.device_get((params, state)))  # one device
  new_params, new_state = jitted(params, state)
  for p in (new_params, new_state.latent, optax.tree.get(new_state, "mu")):
    assert p["dense"]["kernel"].sharding.is_equivalent_to(kernel_sharding, 2)
  codes = blaq_jax.codes(new_state)["dense"]["kernel"]
  assert codes.sharding.is_equivalent_to(kernel_sharding, 2)
  chex.assert_trees_all_close(new_params, reference[0], rtol=1e-6)


def test_resnet18_imagenet_config_runs_data_parallel(tmp_path):
  """The ImageNet config (a = 0.9, m = 10, 8-bit first/last layers) end to
  end on synthetic ImageNet-shaped data, batch sharded over 2 devices."""
  from experiments.configs import imagenet_resnet18
  config = imagenet_resnet18.get_config()
  config.dataset = "synthetic_imagenet"
  config.model_options.width = 4
  config.train_size, config.validation_size, config.test_size = 64, 16, 16
  config.batch_size, config.eval_batch_size = 32, 16
  config.num_epochs = 2  # epoch 1 runs BLAQ's two-stage update, epoch 2 not
  config.num_devices = 2
  config.progress_bar = config.write_plots = config.tensorboard = False
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  assert summary["epochs"] == 2 and summary["step"] == 4
  assert summary["grad_evals"] == 2 * 2 + 2
  epochs = _epochs(tmp_path)
  assert [r["trial_active_fraction"] for r in epochs] == [1.0, 0.0]
  _, state, _ = train_lib.restore_latest(str(tmp_path), config)
  params = state["params"]
  assert len(params["stem_conv"]["kernel"].sharding.device_set) == 2
  codes = blaq_jax.codes(state["opt_state"])
  for name in ("stem_conv", "head"):  # 8 bits: up to 256 codes
    assert 2 < np.unique(np.asarray(codes[name]["kernel"])).size <= 256
  conv = np.asarray(codes["blocks"][0]["conv1"]["kernel"])
  assert set(np.unique(conv)) <= {0, 1}  # 1 bit
  qts = blaq_jax.quantized_tensors(state["opt_state"])
  np.testing.assert_allclose(params["head"]["kernel"],
                             qts["head"]["kernel"].dequantize(), rtol=1e-6)
