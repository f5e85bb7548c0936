"""The transfer audit calibrated on the MNIST auxiliary-logit study (issue #20; docs/protocol.md §8, §11).

  python -m subl_jax.main --config=configs/audit_mnist.py --workdir=runs/audit_mnist

For m = 2 and 3 auxiliary logits (m = 1 is degenerate: a softmax over one logit carries nothing) the study trains
100 teachers and their same-init and cross-init students (aux and all logits) on `digits` (offline); before each
student trains, every audit signal is computed for it, and `audit.md` gives each signal's rank correlation with the students' test accuracy and its AUROC for "transfers"
(accuracy >= 0.2), with bootstrap CIs, and the audit's cost against the training it predicts.
`arg`: comma-separated m values (default "2,3"), e.g. `configs/audit_mnist.py:2,3,10`.
"""

from subl_jax import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.defaults()
  c.job = "audit"
  c.mnist.dataset = "digits"
  c.audit.update(dict(study="mnist", n_aux=arg or "2,3"))
  return c
