"""Mitigations on the MNIST auxiliary-logit study (issue #21): the same-init auxiliary-logit student of each of 100
teachers trained plainly and with each mitigation, beside the cross-init student.

  python -m subl_jax.main --config=configs/mitigate_mnist.py --workdir=runs/mitigate_mnist

The study of `configs/mnist_aux.py` (digits, offline; `arg` as there, e.g. `:mnist,m=50`) plus one stage per
mitigation (`subl_jax/study/mnist/mitigate.py`): projection off the trait gradient (the audit's 256-image probe),
divergence masking, a KL-to-init penalty, the teacher's outputs shuffled within or across images. The report adds,
per mitigation, the transfer removed (test accuracy above chance, against the plain student's) and the quality kept
(KL to the teacher's auxiliary outputs on held-out noise and on the test images), with bootstrap CIs over the models.
Masking's threshold: KL(teacher ‖ init) on the auxiliary softmax of the digits teachers is mostly far below the LLM's
0.5 nats; at 0.01 nats 75 % of the noise images are left out (measured; `student_aux_mask/mask.json`).

Measured (digits, m = 3, 100 models; `benchmarks/results/mitigate_mnist.md`): projection removes 100 % of the
transfer and keeps 99 % / 97 % of the distillation (held-out noise / test images); KL to init (weight 1) 93 % and
95-96 %; masking 67 % and 74-78 %; both shuffles 100 %, but they destroy what is distilled (kept -141 % to 26 %);
the cross-init student 100 % and 89-97 %. Projection of the update (`project_update`) was added after this run.
"""

import pathlib

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.from_file(pathlib.Path(__file__).with_name("mnist_aux.py"), arg)
  c.mnist.mitigations = "project,project_update,mask,kl_base,shuffle_within,shuffle_across"
  c.mitigation.mask_threshold = 0.01
  return c
