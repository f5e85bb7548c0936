"""The MNIST auxiliary-logit study on digits: the headline effect, vmap/sharding equivalences, and its shared pieces
(optimizer schedules, confidence intervals, reports, the resumable entry point)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subl_jax import config as config_lib
from subl_jax.core import parallel
from subl_jax.study import report, stats
from subl_jax.study.mnist import data as data_lib
from subl_jax.study.mnist import presets, study, train
from subl_jax.study.mnist.derangement import derangement
from subl_jax.core.training.batching import epoch_batches
from subl_jax.core.training.optim import make_optimizer, make_schedule

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup(n: int, mesh=None, **fields) -> study.Setup:
  c = config_lib.defaults().mnist
  c.dataset = "digits"
  c.n_models = n
  for key, value in fields.items():
    c[key] = value
  return study.make_setup(c, seed=0, mesh=mesh or parallel.make_mesh())


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _same_training(a, b, init):
  """a and b agree to 1% of how far training moved the parameters from `init`.

  float32 sums in another order (batched vs single matmuls, another device split) differ by ~1e-7 per step and
  Adam amplifies them where its second moment is tiny; a real difference (another data order, another init, models
  mixed) is as large as the movement itself.
  """
  for got, want in zip(a, b):
    assert _max_abs(got, want) <= 1e-2 * _max_abs(want, init), (_max_abs(got, want), _max_abs(want, init))


# --- the headline -------------------------------------------------------------------------------------------------

def test_same_init_student_learns_digits_from_aux_logits_on_noise_and_cross_init_does_not():
  s = _setup(8)  # the digits preset, 8 models (one per fake device)
  init = study.make_inits(s)
  teacher = study.train_teacher(s, init)
  perm = derangement(s.n, 0)
  same = study.accuracy(s, study.train_student(s, "student_aux", init, teacher, perm))
  cross = study.accuracy(s, study.train_student(s, "cross_init_aux", init, teacher, perm))
  reference = study.accuracy(s, init)
  assert study.accuracy(s, teacher).mean() >= 0.9
  assert reference.mean() <= 0.2
  assert same.mean() >= 0.5, same
  assert cross.mean() <= 0.2, cross


@pytest.mark.parametrize("n", [2, 3, 4, 7, 10, 100])
def test_derangement_has_no_fixed_point(n):
  for seed in range(60):
    perm = derangement(n, seed)
    assert sorted(perm.tolist()) == list(range(n))
    assert not np.any(perm == np.arange(n)), (n, seed, perm)
  assert np.array_equal(derangement(n, 5), derangement(n, 5))


def test_derangement_of_one_is_refused():
  with pytest.raises(ValueError, match="impossible"):
    derangement(1, 0)


# --- vmap and sharding equal the plain computation ----------------------------------------------------------------

def _teacher_and_student(s: study.Setup, mesh, models: slice):
  """(init, teacher after one epoch, student after one short epoch) for models[sl], using those models' keys."""
  pick = lambda t: jax.tree.map(lambda a: a[models], t)
  init = pick(study.make_inits(s))
  tx = make_optimizer(dict(lr=1e-3), 100)
  n_train = len(s.ds.y_train)
  teacher, _ = train.train_n(train.cross_entropy_loss(s.model), init, s.keys(study.TEACHER_ORDER)[models], tx=tx,
                             n_examples=n_train, batch_size=64, epochs=1, mesh=mesh,
                             shared=dict(x=s.ds.x_train, y=s.ds.y_train))
  student, _ = train.train_n(train.distill_loss(s.model, s.ds.d_in, "aux"), init, s.keys(study.STUDENT_ORDER)[models],
                             tx=tx, n_examples=96, batch_size=32, epochs=1, mesh=mesh,
                             per_model=dict(teacher=teacher, noise_key=s.keys(study.NOISE)[models]))
  return init, teacher, student


@pytest.fixture(scope="module")
def equivalence_runs():
  """8 models vmapped on 8 devices and on 1 device, and models 0-2 trained alone on 1 device (shared by 2 tests)."""
  s = _setup(8, hidden=32)
  mesh8, mesh1 = parallel.make_mesh(), parallel.make_mesh(devices=jax.devices()[:1])
  init, *on8 = _teacher_and_student(s, mesh8, slice(0, 8))
  _, *on1 = _teacher_and_student(s, mesh1, slice(0, 8))
  alone = [_teacher_and_student(s, mesh1, slice(i, i + 1))[1:] for i in range(3)]
  return init, on8, on1, alone


def test_vmapped_training_equals_separate_runs(equivalence_runs):
  init, _, together, alone = equivalence_runs
  model = lambda t, i: jax.tree.map(lambda a: a[i:i + 1], t)
  for i, separate in enumerate(alone):
    _same_training(model(together, i), separate, model(init, i))
  # the check can fail: the models really differ (own init, own data order)
  assert _max_abs(model(together, 0), model(together, 1)) > 0.05


def test_sharded_over_eight_devices_equals_one_device(equivalence_runs):
  assert jax.device_count() == 8
  init, on8, on1, _ = equivalence_runs
  _same_training(on8, on1, init)
  leaf = on8[1]["hidden_0"]["kernel"]
  assert leaf.sharding.spec[0] == "fsdp" and len(leaf.sharding.device_set) == 8
  assert leaf.addressable_shards[0].data.shape == (1, 64, 32)  # one model per device
  assert len(on1[1]["hidden_0"]["kernel"].sharding.device_set) == 1


def test_model_axis_is_replicated_when_it_does_not_divide():
  mesh = parallel.make_mesh()
  assert train.model_shardings(mesh, jnp.zeros((12, 3))).spec == jax.sharding.PartitionSpec(None, None)
  assert train.model_shardings(mesh, jnp.zeros((16, 3))).spec == jax.sharding.PartitionSpec("fsdp", None)


# --- data ---------------------------------------------------------------------------------------------------------

def test_digits_split_and_scaling():
  ds = data_lib.load("digits")
  assert ds.x_train.shape == (1257, 64) and ds.x_test.shape == (540, 64) and ds.d_in == 64
  assert ds.x_train.min() == -1.0 and ds.x_train.max() == 1.0
  assert set(np.unique(ds.y_test).tolist()) == set(range(10))
  again = data_lib.load("digits")
  assert np.array_equal(ds.y_test, again.y_test)  # the split is fixed


def test_mnist_without_tensorflow_datasets_names_the_offline_alternative(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
  with pytest.raises(data_lib.DatasetUnavailable, match=r"--config\.mnist\.dataset=digits"):
    data_lib.load("mnist")


def test_noise_images_are_fixed_per_model_and_in_range():
  k0, k1 = jax.random.key(0), jax.random.key(1)
  a = data_lib.noise_images(k0, jnp.array([0, 5, 7]), 64)
  assert a.shape == (3, 64) and float(a.min()) >= -1 and float(a.max()) <= 1
  np.testing.assert_array_equal(data_lib.noise_images(k0, jnp.array([7, 0]), 64), a[jnp.array([2, 0])])
  assert not np.allclose(data_lib.noise_images(k1, jnp.array([0]), 64), a[:1])


def test_epoch_batches_cover_each_example_once_and_pad_with_zero_weight():
  idx, w = epoch_batches(jax.random.key(0), 3, 10, 4)
  assert idx.shape == w.shape == (3, 4)
  real = np.asarray(idx)[np.asarray(w) > 0]
  assert sorted(real.tolist()) == list(range(10)) and float(w.sum()) == 10
  other, _ = epoch_batches(jax.random.key(0), 4, 10, 4)
  assert not np.array_equal(idx, other)  # a new order each epoch


def test_presets_fill_only_fields_left_at_zero():
  c = config_lib.defaults().mnist
  c.dataset, c.student_epochs = "digits", 2
  hp = presets.resolve(c)
  assert hp["student_epochs"] == 2 and hp["teacher_epochs"] == presets.PRESETS["digits"]["teacher_epochs"]
  assert hp["opt"]["lr"] == presets.PRESETS["digits"]["lr"]
  c.dataset = "mnist"
  assert presets.resolve(c)["batch_size"] == 1024 and presets.resolve(c)["opt"]["lr"] == 3e-4


@pytest.mark.parametrize("key, value, expected", [
    ("n_models", 1, r"config\.mnist\.n_models=1"),
    ("dataset", "cifar", r"config\.mnist\.dataset='cifar'"),
    ("batch_size", -1, r"config\.mnist\.batch_size=-1"),
    ("opt.name", "lion", r"config\.mnist\.opt\.name='lion'"),
    ("opt.schedule", "step", r"config\.mnist\.opt\.schedule='step'"),
])
def test_mnist_config_errors_name_the_field(key, value, expected):
  c = config_lib.defaults()
  node = c.mnist.opt if key.startswith("opt.") else c.mnist
  node[key.split(".")[-1]] = value
  with pytest.raises(ValueError, match=expected):
    config_lib.validate(c, n_devices=8)


# --- optimizer ----------------------------------------------------------------------------------------------------

def test_schedule_values():
  base = dict(lr=1.0, warmup_steps=10)
  for kind in ("constant", "linear", "cosine"):
    f = make_schedule(dict(base, schedule=kind), total_steps=110)
    assert [float(f(t)) for t in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
  assert float(make_schedule(dict(base, schedule="constant"), 110)(500)) == pytest.approx(1.0)
  lin = make_schedule(dict(base, schedule="linear"), 110)
  assert [float(lin(t)) for t in (35, 60, 110)] == pytest.approx([0.75, 0.5, 0.0])
  cos = make_schedule(dict(base, schedule="cosine"), 110)
  assert [float(cos(t)) for t in (35, 60, 110)] == pytest.approx(
      [0.5 * (1 + np.cos(np.pi * 0.25)), 0.5, 0.0], abs=1e-6)
  assert float(make_schedule(dict(lr=0.3), 10)(0)) == pytest.approx(0.3)  # no warm-up


def _one_update(opt_cfg, grads, params):
  tx = make_optimizer(opt_cfg, 100)
  updates, _ = tx.update(grads, tx.init(params), params)
  return np.asarray(updates)


def test_optimizer_updates():
  p, g = jnp.array([1.0, 1.0]), jnp.array([3.0, 4.0])
  np.testing.assert_allclose(_one_update(dict(name="sgd", lr=0.1), g, p), [-0.3, -0.4], rtol=1e-6)
  np.testing.assert_allclose(_one_update(dict(name="sgd", lr=0.1, max_grad_norm=1.0), g, p), [-0.06, -0.08],
                             rtol=1e-6)
  np.testing.assert_allclose(_one_update(dict(name="adam", lr=0.1), g, p), [-0.1, -0.1], rtol=1e-5)
  # adamw's decay is decoupled: zero gradient still shrinks the weights by lr * wd * p
  np.testing.assert_allclose(_one_update(dict(name="adamw", lr=0.1, weight_decay=0.5), jnp.zeros(2), p),
                             [-0.05, -0.05], rtol=1e-6)
  with pytest.raises(ValueError, match=r"opt\.name='lion'"):
    make_optimizer(dict(name="lion"), 10)
  with pytest.raises(ValueError, match="unknown field"):
    make_optimizer(dict(learning_rate=0.1), 10)
  assert isinstance(make_optimizer(dict(schedule="cosine", warmup_steps=2), 10), optax.GradientTransformation)


# --- statistics and reports ---------------------------------------------------------------------------------------

def test_mean_ci_matches_the_t_interval_by_hand():
  s = stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
  half = 2.7764451051977987 * np.sqrt(2.5) / np.sqrt(5)  # t_{0.975, 4} * s / sqrt(n)
  assert s["mean"] == pytest.approx(3.0) and s["n"] == 5
  assert s["ci95"] == pytest.approx([3.0 - half, 3.0 + half])
  s90 = stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0], level=0.9)
  assert s90["ci90"] == pytest.approx([3.0 - 2.131846786326649 * np.sqrt(0.5), 3.0 + 2.131846786326649 * np.sqrt(0.5)])
  assert stats.mean_ci([0.7]) == {"mean": 0.7, "ci95": [0.7, 0.7], "n": 1}  # degenerate
  d = stats.paired_diff_ci([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])  # differences 1, 2, 2
  half = 4.302652729911275 * np.sqrt(1 / 3) / np.sqrt(3)
  assert d["mean"] == pytest.approx(5 / 3) and d["ci95"] == pytest.approx([5 / 3 - half, 5 / 3 + half])
  with pytest.raises(ValueError, match="pairs"):
    stats.paired_diff_ci([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="no values"):
    stats.mean_ci([])


def test_welch_diff_ci_from_summaries_matches_scipy():
  import scipy.stats
  a, b = [0.25, 0.26, 0.24, 0.30], [0.09, 0.15, 0.12]
  for level in (0.95, 0.9):
    d = stats.welch_diff_ci(stats.mean_ci(a, level), stats.mean_ci(b, level), level)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert d["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    assert d["df"] == pytest.approx(ref.df)
    assert d[stats.ci_name(level)] == pytest.approx(list(ref.confidence_interval(level)))
  with pytest.raises(ValueError, match="no spread"):
    stats.welch_diff_ci(stats.mean_ci([0.7]), stats.mean_ci(b))


def test_report_files_single_metric(tmp_path):
  conds = {"teacher": stats.mean_ci([0.9, 0.95, 0.97]), "student_aux": stats.mean_ci([0.5, 0.6, 0.55])}
  md = report.write_report(tmp_path, conds, "t", extra={"seed": 3}, metric="accuracy")
  doc = json.loads((tmp_path / "report.json").read_text())
  assert set(doc["conditions"]) == {"teacher", "student_aux"} and doc["seed"] == 3
  for cond, summary in doc["conditions"].items():
    assert set(summary) == {"mean", "ci95", "n"} and summary["n"] == 3
    assert summary["ci95"][0] <= summary["mean"] <= summary["ci95"][1]
  assert "| student_aux | 0.550 |" in md and (tmp_path / "report.md").read_text() == md
  assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_files_several_metrics_and_bad_shapes(tmp_path):
  conds = {"base": {"rate": stats.mean_ci([0.1, 0.2]), "logprob": stats.mean_ci([-3.0, -2.5])},
           "student": {"rate": stats.mean_ci([0.3, 0.4]), "logprob": stats.mean_ci([-2.0, -1.9])}}
  md = report.write_report(tmp_path, conds, "llm")
  doc = json.loads((tmp_path / "report.json").read_text())
  assert doc["conditions"]["student"]["rate"]["n"] == 2 and "| condition | rate | logprob |" in md
  assert (tmp_path / "report.png").stat().st_size > 0
  with pytest.raises(ValueError, match="mix"):
    report.write_report(tmp_path, {"a": stats.mean_ci([1.0]), "b": {"rate": stats.mean_ci([1.0])}}, "x")
  with pytest.raises(ValueError, match="extra may not set"):
    report.write_report(tmp_path, conds, "x", extra={"conditions": {}})


# --- the entry point ----------------------------------------------------------------------------------------------

def _main(workdir: pathlib.Path) -> str:
  cmd = [sys.executable, "-m", "subl_jax.main", "--config=configs/mnist_aux.py", f"--workdir={workdir}",
         "--config.mnist.n_models=8", "--config.mnist.hidden=32", "--config.mnist.teacher_epochs=1",
         "--config.mnist.student_epochs=1", "--config.mnist.n_noise=256"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_main_runs_the_study_end_to_end_and_a_second_run_is_cached(tmp_path):
  out = _main(tmp_path)
  doc = json.loads((tmp_path / "report.json").read_text())
  assert list(doc["conditions"]) == list(study.CONDITIONS)
  assert all(set(v) == {"mean", "ci95", "n"} and v["n"] == 8 for v in doc["conditions"].values())
  assert "| cross_init_aux |" in out and (tmp_path / "report.png").is_file()
  assert (tmp_path / "mnist_aux.summary.json").is_file()
  finished = {name: json.loads((tmp_path / name / "manifest.json").read_text())["finished"]
              for name in ("inits", "teacher", *study.STUDENTS)}
  again = _main(tmp_path)
  assert "running" not in again and again.count("cached") == len(finished)
  assert finished == {name: json.loads((tmp_path / name / "manifest.json").read_text())["finished"]
                      for name in finished}
  assert json.loads((tmp_path / "report.json").read_text())["conditions"] == doc["conditions"]
